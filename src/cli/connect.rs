//! Opening a byte stream to a device port through the relay's CONNECT proxy.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{anyhow, Context, Result};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::settings::Settings;
use crate::https_proxy::ProxyEnv;
use crate::proto::connect::head_end;
use crate::tls_client::{self, Trust};

/// Plain TCP or TLS to the relay.
enum Inner {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An open tunnel to a device port: read and write it like a socket.
pub struct DeviceStream {
    inner: Inner,
    /// Device bytes that arrived with the relay's answer, served before reading more.
    early: BytesMut,
}

/// The largest answer head we read from the relay.
const MAX_ANSWER: usize = 16 * 1024;

/// How long reaching the relay through an outbound proxy may take.
const OUTBOUND_PROXY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Opens a tunnel to `uuid:port` with the saved login. The connection to the relay goes
/// through `HTTPS_PROXY` (honouring `NO_PROXY`, as the agent's TCP link does) unless
/// `no_proxy`.
pub async fn open(
    settings: &Settings,
    uuid: &str,
    port: u16,
    no_proxy: bool,
) -> Result<DeviceStream> {
    let proxy = settings.proxy.as_deref().ok_or_else(|| {
        anyhow!("no proxy address saved: run `cloudlink login` with --proxy HOST:PORT")
    })?;
    let outbound = if no_proxy {
        None
    } else {
        ProxyEnv::from_env()
            .for_host(crate::addr::host(proxy))
            .map_err(|e| anyhow!(e))?
    };
    let tcp = match outbound {
        Some(outbound) => crate::https_proxy::connect(&outbound, proxy, OUTBOUND_PROXY_TIMEOUT)
            .await
            .map_err(|e| anyhow!("cannot reach the relay proxy at {proxy}: {e}"))?,
        None => TcpStream::connect(proxy)
            .await
            .with_context(|| format!("cannot reach the relay proxy at {proxy}"))?,
    };
    let _ = tcp.set_nodelay(true);
    let inner = if settings.proxy_tls {
        crate::tls_client::install_crypto();
        let trust = match &settings.ca {
            Some(ca) => Trust::CaFile(ca),
            None => Trust::System,
        };
        let config = tls_client::config(trust, &[])?;
        let host = crate::addr::host(proxy);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| anyhow!("{host} is not a valid TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                anyhow!(
                    "TLS with the relay proxy at {proxy} failed: {}",
                    tls_client::explain(&e)
                )
            })?;
        Inner::Tls(Box::new(tls))
    } else {
        Inner::Plain(tcp)
    };
    let mut stream = DeviceStream {
        inner,
        early: BytesMut::new(),
    };
    let request = format!(
        "CONNECT {uuid}.cloudlink:{port} HTTP/1.1\r\nHost: {uuid}.cloudlink:{port}\r\n\
         Proxy-Authorization: Bearer {}\r\n\r\n",
        settings.key
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_ANSWER {
            return Err(anyhow!("the relay sent an oversized answer"));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(anyhow!("the relay closed the connection without answering"));
        }
    };
    let head = buf.split_to(end);
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("the relay's answer is not HTTP"))?;
    if status == 200 {
        stream.early = buf;
        return Ok(stream);
    }
    // An error answer carries one sentence; read it (bounded) for the message.
    while buf.len() < MAX_ANSWER {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let sentence = String::from_utf8_lossy(&buf).trim().to_owned();
    Err(Refused {
        status,
        sentence: if sentence.is_empty() {
            "no reason given".into()
        } else {
            sentence
        },
        uuid: uuid.to_owned(),
        port,
    }
    .into())
}

/// The relay answered a CONNECT with an error status (PROTOCOL.md §1).
#[derive(Debug, thiserror::Error)]
#[error("relay refused {uuid}:{port} ({status}): {sentence}")]
pub struct Refused {
    /// The HTTP status.
    pub status: u16,
    /// The relay's one sentence.
    pub sentence: String,
    /// The device.
    pub uuid: String,
    /// The device port.
    pub port: u16,
}

impl DeviceStream {
    /// The plain TCP socket to the relay and the device bytes already read from it, when
    /// the proxy is not TLS (so the caller may `splice`); otherwise the stream itself.
    pub fn into_plain(self) -> std::result::Result<(TcpStream, BytesMut), DeviceStream> {
        match self.inner {
            Inner::Plain(tcp) => Ok((tcp, self.early)),
            inner => Err(DeviceStream {
                inner,
                early: self.early,
            }),
        }
    }

    /// The TCP socket to the relay underneath (for the reset-on-crash linger setting).
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, data),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

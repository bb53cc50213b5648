//! The relay's end of one device's link, on either transport: it opens tunnel streams
//! (PROTOCOL.md §2 over QUIC, §2b as HTTP/2 CONNECT streams over TLS/TCP) and closes the
//! link. Everything above (admission, presence, limits, forwarding, audit) sees a
//! [`DeviceLink`] and never asks which transport it is.

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::h2 as link_h2;
use super::{LinkRecv, LinkSend, Transport};
use crate::proto::frame;
use crate::proto::messages::{OpenReply, RefuseCode, TunnelOpen, TunnelResume};

/// A device's connection, on either transport.
pub enum DeviceLink {
    /// QUIC: tunnels are bidirectional streams.
    Quic(quinn::Connection),
    /// TLS over TCP: tunnels are HTTP/2 CONNECT streams the relay requests.
    Tcp(TcpLink),
}

/// Why a tunnel stream could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The link is gone.
    Offline,
    /// The agent said no.
    Refused(RefuseCode, String),
    /// The agent's answer made no sense.
    Bad(String),
}

impl DeviceLink {
    /// Which transport this is.
    pub fn transport(&self) -> Transport {
        match self {
            DeviceLink::Quic(_) => Transport::Quic,
            DeviceLink::Tcp(_) => Transport::Tcp,
        }
    }

    /// A number that changes whenever something arrives on the link (QUIC: the datagrams
    /// received; TLS/TCP: when the connection last read): the relay watches it for
    /// silence (PROTOCOL.md §2e, "Presence").
    pub fn heard(&self) -> u64 {
        match self {
            DeviceLink::Quic(conn) => conn.stats().udp_rx.datagrams,
            DeviceLink::Tcp(link) => link.heard.stamp_ms(),
        }
    }

    /// Closes the link. QUIC carries `code` and `reason` to the agent; TCP has no room for
    /// them and simply ends the connection.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            DeviceLink::Quic(conn) => conn.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
            DeviceLink::Tcp(link) => link.close(),
        }
    }

    /// Opens a tunnel stream to `open.port` on the device and waits for the agent's answer.
    pub async fn open_tunnel(
        &self,
        open: &TunnelOpen,
        max_frame: usize,
    ) -> Result<(LinkSend, LinkRecv), OpenError> {
        match self {
            DeviceLink::Quic(conn) => {
                let (send, recv, reply) = ask_quic(conn, open, max_frame).await?;
                match reply {
                    Ok(OpenReply::Opened) => Ok((LinkSend::Quic(send), LinkRecv::Quic(recv))),
                    Ok(OpenReply::Refused { code, message }) => {
                        Err(OpenError::Refused(code, message))
                    }
                    Ok(OpenReply::Resumed { .. }) => {
                        Err(OpenError::Bad("`resumed` in answer to an `open`".into()))
                    }
                    Err(e) => Err(OpenError::Bad(e.to_string())),
                }
            }
            DeviceLink::Tcp(link) => link.open_tunnel(open, max_frame).await,
        }
    }

    /// Opens a stream that resumes a tunnel (PROTOCOL.md §2e) on port `port` of the
    /// device and waits for the agent's answer: the stream and the agent's offsets.
    pub async fn resume_tunnel(
        &self,
        resume: &TunnelResume,
        port: u16,
        max_frame: usize,
    ) -> Result<(LinkSend, LinkRecv, (u64, bool)), OpenError> {
        match self {
            DeviceLink::Quic(conn) => {
                let (send, recv, reply) = ask_quic(conn, resume, max_frame).await?;
                match reply {
                    Ok(OpenReply::Resumed { written, fin }) => {
                        Ok((LinkSend::Quic(send), LinkRecv::Quic(recv), (written, fin)))
                    }
                    Ok(OpenReply::Refused { code, message }) => {
                        Err(OpenError::Refused(code, message))
                    }
                    Ok(OpenReply::Opened) => {
                        Err(OpenError::Bad("`opened` in answer to a `resume`".into()))
                    }
                    // The link went before the answer came (a newer session replaced it):
                    // the tunnel waits for the next, as for any lost link.
                    Err(crate::proto::ProtoError::Io(_) | crate::proto::ProtoError::Truncated) => {
                        Err(OpenError::Offline)
                    }
                    Err(e) => Err(OpenError::Bad(e.to_string())),
                }
            }
            DeviceLink::Tcp(link) => link.resume_tunnel(resume, port, max_frame).await,
        }
    }
}

/// Opens a QUIC tunnel stream, writes `head` (an `open` or a `resume`) and reads the
/// agent's answer frame.
async fn ask_quic(
    conn: &quinn::Connection,
    head: &impl serde::Serialize,
    max_frame: usize,
) -> Result<
    (
        quinn::SendStream,
        quinn::RecvStream,
        Result<OpenReply, crate::proto::ProtoError>,
    ),
    OpenError,
> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|_| OpenError::Offline)?;
    frame::write(&mut send, head)
        .await
        .map_err(|_| OpenError::Offline)?;
    let reply = frame::read_required(&mut recv, max_frame).await;
    Ok((send, recv, reply))
}

/// The relay's end of one device's TLS/TCP link.
pub struct TcpLink {
    /// Sends the relay's requests (one CONNECT stream per tunnel; the control stream).
    pub requests: h2::client::SendRequest<Bytes>,
    /// Cancelling it drops the connection.
    pub closer: CancellationToken,
    /// When the connection last read anything.
    heard: link_h2::LastHeard,
}

impl TcpLink {
    /// The link over an HTTP/2 connection on which the relay sends requests; cancelling
    /// `closer` drops the connection; `heard` is stamped by its reads.
    pub fn new(
        requests: h2::client::SendRequest<Bytes>,
        closer: CancellationToken,
        heard: link_h2::LastHeard,
    ) -> TcpLink {
        TcpLink {
            requests,
            closer,
            heard,
        }
    }

    /// Ends the connection (TCP has no room for a close code; the agent sees it end).
    pub fn close(&self) {
        self.closer.cancel();
    }

    /// Opens a CONNECT stream for `open` and waits for the agent's answer.
    pub async fn open_tunnel(
        &self,
        open: &TunnelOpen,
        max_frame: usize,
    ) -> Result<(LinkSend, LinkRecv), OpenError> {
        let mut headers = vec![
            (link_h2::TUNNEL_HEADER, open.tunnel.clone()),
            (link_h2::USER_HEADER, open.user.clone()),
        ];
        if let Some(credit) = open.credit {
            headers.push((link_h2::CREDIT_HEADER, credit.to_string()));
        }
        if open.resume {
            headers.push((link_h2::RESUME_HEADER, "1".into()));
        }
        let (send, recv, _) = self.connect(open.port, headers, max_frame).await?;
        Ok((send, recv))
    }

    /// Opens a CONNECT stream that resumes a tunnel (PROTOCOL.md §2e) and waits for the
    /// agent's answer: the stream and the agent's offsets.
    pub async fn resume_tunnel(
        &self,
        resume: &TunnelResume,
        port: u16,
        max_frame: usize,
    ) -> Result<(LinkSend, LinkRecv, (u64, bool)), OpenError> {
        let mut headers = vec![
            (link_h2::RESUME_HEADER, resume.tunnel.clone()),
            (
                link_h2::WRITTEN_HEADER,
                link_h2::offsets_header(resume.written, resume.fin),
            ),
        ];
        if let Some(credit) = resume.credit {
            headers.push((link_h2::CREDIT_HEADER, credit.to_string()));
        }
        let (send, recv, answer) = self.connect(port, headers, max_frame).await?;
        let offsets = answer
            .get(link_h2::WRITTEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(link_h2::parse_offsets)
            .ok_or_else(|| {
                OpenError::Bad("a resume answered without the agent's offsets".into())
            })?;
        Ok((send, recv, offsets))
    }

    /// Sends a CONNECT to `port` with `headers` and waits for the answer: the stream and
    /// the answer's headers on a 200, the refusal otherwise.
    async fn connect(
        &self,
        port: u16,
        headers: Vec<(&'static str, String)>,
        max_frame: usize,
    ) -> Result<(LinkSend, LinkRecv, http::HeaderMap), OpenError> {
        let mut requests = self
            .requests
            .clone()
            .ready()
            .await
            .map_err(|_| OpenError::Offline)?;
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("127.0.0.1:{port}"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(())
            .map_err(|e| OpenError::Bad(e.to_string()))?;
        let (response, send) = requests
            .send_request(request, false)
            .map_err(|_| OpenError::Offline)?;
        let response = response.await.map_err(|e| {
            if e.is_reset() {
                OpenError::Bad(format!("the agent reset the tunnel stream ({e})"))
            } else {
                OpenError::Offline
            }
        })?;
        let status = response.status();
        let refused = response
            .headers()
            .get(link_h2::REFUSED_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (parts, mut body) = response.into_parts();
        if status == http::StatusCode::OK {
            return Ok((LinkSend::H2(send), LinkRecv::H2(body), parts.headers));
        }
        let code = match (status.as_u16(), refused.as_deref()) {
            (_, Some("connect")) | (502, None) => RefuseCode::Connect,
            (_, Some("forbidden")) | (403, None) => RefuseCode::Forbidden,
            (_, Some("gone")) | (410, None) => RefuseCode::Gone,
            _ => return Err(OpenError::Bad(format!("answered {status}"))),
        };
        Err(OpenError::Refused(
            code,
            read_text(&mut body, max_frame).await,
        ))
    }
}

/// Reads a refusal's text body, at most `max` bytes of it.
async fn read_text(body: &mut h2::RecvStream, max: usize) -> String {
    let mut text = Vec::new();
    while text.len() < max {
        match body.data().await {
            Some(Ok(data)) => {
                let _ = body.flow_control().release_capacity(data.len());
                text.extend_from_slice(&data[..data.len().min(max - text.len())]);
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

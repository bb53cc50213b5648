//! The relay's end of one device's link, on either transport: it opens tunnel streams
//! (PROTOCOL.md §2 over QUIC, §2b as HTTP/2 CONNECT streams over TLS/TCP) and closes the
//! link. Everything above (admission, presence, limits, forwarding, audit) sees a
//! [`DeviceLink`] and never asks which transport it is.

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::h2 as link_h2;
use super::{LinkRecv, LinkSend, Transport};
use crate::proto::frame;
use crate::proto::messages::{OpenReply, RefuseCode, TunnelOpen};

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
                let (mut send, mut recv) = conn.open_bi().await.map_err(|_| OpenError::Offline)?;
                frame::write(&mut send, open)
                    .await
                    .map_err(|_| OpenError::Offline)?;
                match frame::read_required(&mut recv, max_frame).await {
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
}

/// The relay's end of one device's TLS/TCP link.
pub struct TcpLink {
    /// Sends the relay's requests (one CONNECT stream per tunnel; the control stream).
    pub requests: h2::client::SendRequest<Bytes>,
    /// Cancelling it drops the connection.
    pub closer: CancellationToken,
}

impl TcpLink {
    /// The link over an HTTP/2 connection on which the relay sends requests; cancelling
    /// `closer` drops the connection.
    pub fn new(requests: h2::client::SendRequest<Bytes>, closer: CancellationToken) -> TcpLink {
        TcpLink { requests, closer }
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
        let mut requests = self
            .requests
            .clone()
            .ready()
            .await
            .map_err(|_| OpenError::Offline)?;
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("127.0.0.1:{}", open.port))
            .header(link_h2::TUNNEL_HEADER, &open.tunnel)
            .header(link_h2::USER_HEADER, &open.user);
        if let Some(credit) = open.credit {
            request = request.header(link_h2::CREDIT_HEADER, credit);
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
        let mut body = response.into_body();
        if status == http::StatusCode::OK {
            return Ok((LinkSend::H2(send), LinkRecv::H2(body)));
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

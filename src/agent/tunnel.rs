//! One tunnel on the device: read what the relay asks for (an `open` frame on QUIC, a
//! CONNECT request on HTTP/2), connect locally, answer, forward.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::AgentConfig;
use super::link::{TunnelRequest, TunnelStream};
use crate::credit::Board;
use crate::forward::{self, Counters, Credit, Side};
use crate::link::h2 as link_h2;
use crate::link::{LinkRecv, LinkSend};
use crate::proto::frame::{self, MAX_FRAME};
use crate::proto::messages::{codes, OpenReply, RefuseCode, TunnelOpen};

/// How long the relay has to send `open`, and the local port to accept.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the answer to a tunnel request goes.
enum Answer {
    Quic(quinn::SendStream),
    H2(h2::server::SendResponse<Bytes>),
}

impl Answer {
    /// Says `opened`; the stream's sending half follows.
    async fn opened(self) -> Option<LinkSend> {
        match self {
            Answer::Quic(mut send) => frame::write(&mut send, &OpenReply::Opened)
                .await
                .ok()
                .map(|()| LinkSend::Quic(send)),
            Answer::H2(mut respond) => respond
                .send_response(http::Response::new(()), false)
                .ok()
                .map(LinkSend::H2),
        }
    }

    /// Says `refused` (a 502 or 403 with the message as body on HTTP/2).
    async fn refuse(self, code: RefuseCode, message: &str) {
        match self {
            Answer::Quic(mut send) => {
                let reply = OpenReply::Refused {
                    code,
                    message: message.to_owned(),
                };
                if frame::write(&mut send, &reply).await.is_ok() {
                    let _ = send.finish();
                }
            }
            Answer::H2(mut respond) => {
                let (status, name) = match code {
                    RefuseCode::Connect => (http::StatusCode::BAD_GATEWAY, "connect"),
                    RefuseCode::Forbidden => (http::StatusCode::FORBIDDEN, "forbidden"),
                    RefuseCode::Gone => (http::StatusCode::GONE, "gone"),
                };
                let response = http::Response::builder()
                    .status(status)
                    .header(link_h2::REFUSED_HEADER, name)
                    .header(http::header::CONTENT_TYPE, "text/plain")
                    .body(())
                    .expect("a valid response");
                if let Ok(mut body) = respond.send_response(response, false) {
                    let _ = body.send_data(Bytes::copy_from_slice(message.as_bytes()), true);
                }
            }
        }
    }
}

/// Serves one tunnel request.
pub async fn serve(request: TunnelRequest, config: Arc<AgentConfig>) {
    let TunnelRequest { stream, credit } = request;
    let (open, answer, recv) = match stream {
        TunnelStream::Quic(mut send, mut recv) => {
            let read = frame::read_required::<_, TunnelOpen>(&mut recv, MAX_FRAME);
            match tokio::time::timeout(OPEN_TIMEOUT, read).await {
                Ok(Ok(open)) => (open, Answer::Quic(send), LinkRecv::Quic(recv)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::logsafe::Peer(&e.to_string()), "bad tunnel request from the relay");
                    let _ = send.reset(VarInt::from_u32(codes::PROTOCOL));
                    return;
                }
                Err(_) => {
                    let _ = send.reset(VarInt::from_u32(codes::PROTOCOL));
                    return;
                }
            }
        }
        TunnelStream::H2(request, mut respond) => match connect_request(&request) {
            Some(open) => (open, Answer::H2(respond), LinkRecv::H2(request.into_body())),
            None => {
                tracing::warn!("bad tunnel request from the relay");
                let mut bad = http::Response::new(());
                *bad.status_mut() = http::StatusCode::BAD_REQUEST;
                let _ = respond.send_response(bad, true);
                return;
            }
        },
    };
    let span = tracing::info_span!(
        "tunnel",
        id = %crate::logsafe::Peer(&open.tunnel),
        user = %crate::logsafe::Peer(&open.user),
        port = open.port
    );
    connect_and_forward(&open, answer, recv, &config, &credit)
        .instrument(span)
        .await;
}

/// A CONNECT request as the §2 `open` it stands for: the port from `:authority`
/// (`127.0.0.1:<port>`), the tunnel, user and initial credit from their headers. A credit
/// header that is not a number is a bad request, not "no credit": reading it as none would
/// let the agent send past what the relay meant to allow.
fn connect_request(request: &http::Request<h2::RecvStream>) -> Option<TunnelOpen> {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let port = request.uri().authority()?.port_u16()?;
    let credit = match request.headers().get(link_h2::CREDIT_HEADER) {
        Some(v) => Some(v.to_str().ok()?.parse::<u64>().ok()?),
        None => None,
    };
    Some(TunnelOpen {
        port,
        tunnel: header(link_h2::TUNNEL_HEADER),
        user: header(link_h2::USER_HEADER),
        credit,
        resume: false,
    })
}

async fn connect_and_forward(
    open: &TunnelOpen,
    answer: Answer,
    recv: LinkRecv,
    config: &AgentConfig,
    board: &Arc<Board>,
) {
    let port = open.port;
    if !config.allows(port) {
        tracing::info!("refused: port not in the allowlist");
        answer
            .refuse(RefuseCode::Forbidden, "port not allowed on this device")
            .await;
        return;
    }
    let local_port = config.local_port(port);
    // Armed to reset from before the handshake: the service may see the connection
    // before this line returns, and a crash from then on must not read as a clean hang-up.
    let service = std::net::SocketAddr::from(([127, 0, 0, 1], local_port));
    let local = match tokio::time::timeout(OPEN_TIMEOUT, forward::connect_armed(service)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "refused: cannot connect locally");
            answer.refuse(RefuseCode::Connect, &e.to_string()).await;
            return;
        }
        Err(_) => {
            answer
                .refuse(RefuseCode::Connect, "local connect timed out")
                .await;
            return;
        }
    };
    let _ = local.set_nodelay(true);
    // On the board before `opened`: the relay may raise the credit as soon as it hears it.
    let gate = open.credit.map(|initial| board.open(&open.tunnel, initial));
    // A relay gone before it heard `opened` resets the service's connection too.
    let Some(send) = answer.opened().await else {
        return;
    };
    tracing::debug!("tunnel open");
    let counters = Counters::default();
    let (mut r, mut w) = local.into_split();
    let end = forward::join(
        send,
        recv,
        &mut r,
        &mut w,
        &counters,
        Side::Device,
        &CancellationToken::new(),
        None,
        match &gate {
            Some(entry) => Credit::Obey(entry.gate()),
            None => Credit::None,
        },
        None,
    )
    .await;
    if end.resets_socket() {
        forward::reset_tcp(r, w);
    } else {
        forward::disarm_reset(r.as_ref());
    }
    tracing::debug!(
        reason = %end.reason(),
        up = counters.up.load(std::sync::atomic::Ordering::Relaxed),
        down = counters.down.load(std::sync::atomic::Ordering::Relaxed),
        "tunnel ended"
    );
}

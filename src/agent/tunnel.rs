//! One tunnel on the device: read what the relay asks for (an `open` frame on QUIC, a
//! CONNECT request on HTTP/2), connect locally, answer, forward. A resumable tunnel
//! (PROTOCOL.md §2e) outlives its link: it keeps the service's connection while it waits,
//! and carries on when the relay resumes it on another.

use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::AgentConfig;
use super::link::{Answer, LinkShare, TunnelRequest, TunnelStream};
use super::resume::{Held, Rebind};
use crate::forward::{self, Counters, Credit, Side};
use crate::link::h2 as link_h2;
use crate::link::{End, LinkRecv, LinkSend};
use crate::proto::frame::{self, MAX_FRAME};
use crate::proto::messages::{codes, RefuseCode, StreamHead, TunnelOpen, TunnelResume};
use crate::resume::Carried;

/// How long the relay has to send `open`, and the local port to accept.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one tunnel request: a new tunnel, or a resume of one the agent holds.
pub async fn serve(request: TunnelRequest, config: Arc<AgentConfig>, held: Arc<Held>) {
    let TunnelRequest { stream, link } = request;
    let (head, answer, recv) = match stream {
        TunnelStream::Quic(mut send, mut recv) => {
            let read = frame::read_required::<_, serde_json::Value>(&mut recv, MAX_FRAME);
            let head = match tokio::time::timeout(OPEN_TIMEOUT, read).await {
                Ok(Ok(value)) => StreamHead::from_value(value).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no tunnel request in time".into()),
            };
            match head {
                Ok(head) => (head, Answer::Quic(send), LinkRecv::Quic(recv)),
                Err(e) => {
                    tracing::warn!(error = %crate::logsafe::Peer(&e), "bad tunnel request from the relay");
                    let _ = send.reset(VarInt::from_u32(codes::PROTOCOL));
                    return;
                }
            }
        }
        TunnelStream::H2(request, mut respond) => match connect_request(&request) {
            Some(head) => (head, Answer::H2(respond), LinkRecv::H2(request.into_body())),
            None => {
                tracing::warn!("bad tunnel request from the relay");
                let mut bad = http::Response::new(());
                *bad.status_mut() = http::StatusCode::BAD_REQUEST;
                let _ = respond.send_response(bad, true);
                return;
            }
        },
    };
    match head {
        StreamHead::Open(open) => {
            let span = tracing::info_span!(
                "tunnel",
                id = %crate::logsafe::Peer(&open.tunnel),
                user = %crate::logsafe::Peer(&open.user),
                port = open.port
            );
            connect_and_forward(&open, answer, recv, &config, link, &held)
                .instrument(span)
                .await;
        }
        StreamHead::Resume(resume) => {
            let span = tracing::info_span!("tunnel", id = %crate::logsafe::Peer(&resume.tunnel));
            rebind(resume, answer, recv, link, &held)
                .instrument(span)
                .await;
        }
    }
}

/// A CONNECT request as the §2 `open` (or §2e `resume`) it stands for: the port from
/// `:authority` (`127.0.0.1:<port>`), the tunnel, user and initial credit from their
/// headers. A credit header that is not a number is a bad request, not "no credit":
/// reading it as none would let the agent send past what the relay meant to allow.
fn connect_request(request: &http::Request<h2::RecvStream>) -> Option<StreamHead> {
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
    if let Some(tunnel) = request.headers().get(link_h2::RESUME_HEADER) {
        let tunnel = tunnel.to_str().ok()?;
        // `1` on a first CONNECT marks it resumable; a tunnel id asks for a resume.
        if tunnel != "1" {
            let written = request.headers().get(link_h2::WRITTEN_HEADER)?;
            let (written, fin) = link_h2::parse_offsets(written.to_str().ok()?)?;
            return Some(StreamHead::Resume(TunnelResume {
                tunnel: tunnel.to_owned(),
                written,
                fin,
                credit,
            }));
        }
    }
    Some(StreamHead::Open(TunnelOpen {
        port,
        tunnel: header(link_h2::TUNNEL_HEADER),
        user: header(link_h2::USER_HEADER),
        credit,
        resume: request.headers().contains_key(link_h2::RESUME_HEADER),
    }))
}

/// Hands a `resume` to the tunnel it names; answers it from a tombstone for a tunnel that
/// ended cleanly, or `gone`.
async fn rebind(
    resume: TunnelResume,
    answer: Answer,
    recv: LinkRecv,
    link: Arc<LinkShare>,
    held: &Arc<Held>,
) {
    if !link.resume {
        tracing::warn!("a resume on a link without the feature; refused");
        answer.refuse(RefuseCode::Gone, "not resumable here").await;
        return;
    }
    if let Some(tx) = held.find(&resume.tunnel) {
        let rebind = Rebind {
            answer,
            recv,
            relay: (resume.written, resume.fin),
            credit: resume.credit,
            link,
        };
        if let Err(tokio::sync::mpsc::error::SendError(r)) = tx.send(rebind).await {
            r.answer
                .refuse(RefuseCode::Gone, "the tunnel has just ended")
                .await;
        }
        return;
    }
    match held.tombstone(&resume.tunnel) {
        Some(offsets) => {
            from_tombstone(answer, recv, offsets).await;
            tracing::debug!("answered a resume for a tunnel that had ended");
        }
        None => {
            tracing::info!("a resume for a tunnel the agent does not hold; refused");
            answer
                .refuse(RefuseCode::Gone, "no such tunnel on this device")
                .await;
        }
    }
}

/// Answers a resume for a tunnel that ended cleanly here, whose last ack the relay missed
/// (PROTOCOL.md §2e): the final offsets, the FIN again, and whatever the relay still sends
/// read to its end.
async fn from_tombstone(answer: Answer, mut recv: LinkRecv, offsets: (u64, bool)) {
    use crate::link::{ChunkRecv, ChunkSend};
    if let Some(mut send) = answer.resumed(offsets).await {
        send.finish();
        let mut chunks = [bytes::Bytes::new()];
        let drained = async { while let Ok(Some(_)) = recv.read_chunks(&mut chunks).await {} };
        let _ = tokio::time::timeout(OPEN_TIMEOUT, drained).await;
    }
}

async fn connect_and_forward(
    open: &TunnelOpen,
    answer: Answer,
    recv: LinkRecv,
    config: &AgentConfig,
    link: Arc<LinkShare>,
    held: &Arc<Held>,
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
    let gate = open
        .credit
        .map(|initial| link.credit.open(&open.tunnel, initial));
    let resumable = open.resume && link.resume;
    // Held before `opened` too: an ack or a resume may follow at once.
    let held_entry = resumable.then(|| held.hold(&open.tunnel));
    // A relay gone before it heard `opened` resets the service's connection too.
    let Some(send) = answer.opened().await else {
        return;
    };
    tracing::debug!(resumable, "tunnel open");
    let counters = Counters::default();
    let (mut r, mut w) = local.into_split();
    let end = match held_entry {
        None => {
            forward::join(
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
            .await
        }
        Some((_entry, rebinds)) => {
            let first = Stream {
                send,
                recv,
                link,
                gate,
                from: (0, false),
            };
            let tunnel = Resumable {
                id: &open.tunnel,
                held,
                counters: &counters,
            };
            tunnel.run(first, rebinds, &mut r, &mut w).await
        }
    };
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

/// One stream a resumable tunnel runs on.
struct Stream {
    send: LinkSend,
    recv: LinkRecv,
    link: Arc<LinkShare>,
    gate: Option<crate::credit::BoardEntry>,
    /// Where the relay stands: its `written`, and its FIN passed on.
    from: (u64, bool),
}

/// A resumable tunnel on the agent's side.
struct Resumable<'a> {
    id: &'a str,
    held: &'a Arc<Held>,
    counters: &'a Counters,
}

impl Resumable<'_> {
    /// Runs the tunnel on `stream`, and on each stream a resume brings after it, until it
    /// ends: closed, reset, or its wait for a resume expired (a reset).
    async fn run(
        &self,
        mut stream: Stream,
        mut rebinds: tokio::sync::mpsc::Receiver<Rebind>,
        r: &mut tokio::net::tcp::OwnedReadHalf,
        w: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> End {
        let mut carried = Carried::new(stream.link.acks.sink(self.id));
        let _acks = self.held.links.acks.enter(self.id, &carried.acked);
        loop {
            // A resume that arrives while the stream still runs moves the tunnel at once:
            // the stream is cut first, so that the offsets we answer are final.
            let switch = CancellationToken::new();
            let mut pending = None;
            let end = {
                let credit = match &stream.gate {
                    Some(entry) => Credit::Obey(entry.gate()),
                    None => Credit::None,
                };
                let joined = forward::join(
                    stream.send,
                    stream.recv,
                    r,
                    w,
                    self.counters,
                    Side::Device,
                    &switch,
                    None,
                    credit,
                    Some(carried.on(stream.from, &stream.link.lost)),
                );
                tokio::pin!(joined);
                loop {
                    tokio::select! {
                        end = &mut joined => break end,
                        rebind = rebinds.recv(), if pending.is_none() => match rebind {
                            Some(rebind) => {
                                pending = Some(rebind);
                                switch.cancel();
                            }
                            None => return End::Cancelled,
                        },
                    }
                }
            };
            match (end, pending.take()) {
                (End::Closed, rebind) => {
                    let written = &carried.written;
                    let offsets = (written.written(), written.fin());
                    self.held.bury(self.id, offsets);
                    // A resume that crossed the clean end gets what a tombstone says.
                    if let Some(rebind) = rebind {
                        from_tombstone(rebind.answer, rebind.recv, offsets).await;
                    }
                    return End::Closed;
                }
                (End::ConnectionLost(why), None) => {
                    tracing::info!(error = %why, "link lost; the tunnel waits for a resume");
                }
                // Moved by the resume, or lost as it came: either way it carries on there.
                (End::ConnectionLost(_) | End::Cancelled, Some(rebind)) => pending = Some(rebind),
                (other, rebind) => {
                    if let Some(rebind) = rebind {
                        rebind
                            .answer
                            .refuse(RefuseCode::Gone, "the tunnel has just ended")
                            .await;
                    }
                    return other;
                }
            }
            // Until a resume gets its answer through (its link may be gone already),
            // within one wait from now.
            let deadline = tokio::time::Instant::now() + self.held.wait;
            stream = loop {
                let rebind = match pending.take() {
                    Some(rebind) => rebind,
                    None => match tokio::time::timeout_at(deadline, rebinds.recv()).await {
                        Ok(Some(rebind)) => rebind,
                        Ok(None) => return End::Cancelled,
                        Err(_) => {
                            tracing::info!(
                                after = ?self.held.wait,
                                "no resume in time; the tunnel ends with a reset"
                            );
                            return End::ConnectionLost("no resume in time".into());
                        }
                    },
                };
                let ours = (carried.written.written(), carried.written.fin());
                let gate = rebind
                    .credit
                    .map(|limit| rebind.link.credit.open(self.id, limit));
                let Some(send) = rebind.answer.resumed(ours).await else {
                    continue;
                };
                tracing::info!(
                    relay_written = rebind.relay.0,
                    agent_written = ours.0,
                    "tunnel resumed"
                );
                carried.written.set_sink(rebind.link.acks.sink(self.id));
                break Stream {
                    send,
                    recv: rebind.recv,
                    link: rebind.link,
                    gate,
                    from: rebind.relay,
                };
            };
        }
    }
}

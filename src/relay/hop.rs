//! The owner side of a resumable tunnel's peer hop (PROTOCOL.md §2e, "Through another
//! relay"): the device stream on this relay's session with the device, joined to a framed
//! connection from the relay that holds the user's socket (the *entry*). The owner keeps
//! no replay buffer and grants the agent no credit of its own: it passes the entry's
//! credit and acks to the agent and the agent's acks to the entry, so that the tunnel can
//! leave this relay (its session lost or superseded) and resume wherever the device is
//! next.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::presence::DeviceSession;
use super::proxy::{self, admit, tunnel, Refusal};
use super::registry::{Proof, TunnelEntry, TunnelKind};
use super::state::Shared;
use crate::forward::{self, Dir};
use crate::link::device::OpenError;
use crate::link::{Abort, ChunkRecv, ChunkSend, End, LinkRecv, LinkSend};
use crate::peerhop::{self, Framed, Inbound, Start, UPLOAD_WINDOW};
use crate::proto::connect::{self, PeerResume};
use crate::proto::messages::{codes, RefuseCode, TunnelOpen, TunnelResume};
use crate::resume::Acked;

/// A peer request whose token checked out, for a device connected here.
pub struct Checked {
    /// The token's claims.
    pub claims: crate::auth::peer::PeerClaims,
    /// The device uuid.
    pub device: String,
    /// The device port.
    pub port: u16,
    /// The device's session here.
    pub session: Arc<DeviceSession>,
}

impl Checked {
    /// The tunnel's registry entry on this relay, under the entry relay's tunnel id.
    pub fn entry(&self) -> Arc<TunnelEntry> {
        admit::new_entry(
            self.claims.sub,
            &self.device,
            self.port,
            Proof::Peer,
            Some(self.claims.tid.clone()),
            TunnelKind::Connect,
        )
    }
}

/// Serves a framed peer request: opens or resumes the device stream, answers, and passes
/// records until the tunnel ends here.
pub async fn serve(
    mut stream: TcpStream,
    leftover: BytesMut,
    version: &'static str,
    checked: Checked,
    ask: PeerResume,
    state: &Arc<Shared>,
) {
    let entry = checked.entry();
    let Checked {
        claims,
        device,
        port,
        session,
    } = checked;
    let span = tunnel::span(&entry.id, &claims.usr, &device);
    async move {
        if let PeerResume::Resume { tunnel, .. } = &ask {
            if *tunnel != entry.id {
                return proxy::refuse(stream, state, version, Refusal::Forbidden).await;
            }
        }
        if let Err(refusal) = admit::admit_entry(state, &entry) {
            return proxy::refuse(stream, state, version, refusal).await;
        }
        let place = session.tunnel(true);
        // The entry's offset of the device's direction: where this hop's sending starts.
        let (entry_written, opened) = match &ask {
            PeerResume::New { credit } => {
                let open = TunnelOpen {
                    port,
                    tunnel: entry.id.clone(),
                    user: claims.usr.clone(),
                    credit: Some(*credit),
                    resume: true,
                };
                let limits = &state.config.limits;
                let opened = admit::open_stream(
                    &session.link,
                    &open,
                    limits.open_timeout(),
                    limits.frame_max_bytes,
                )
                .await
                .map(|(send, recv)| (send, recv, None));
                (0, opened)
            }
            PeerResume::Resume {
                tunnel,
                written,
                fin,
                credit,
            } => {
                let ask = TunnelResume {
                    tunnel: tunnel.clone(),
                    written: *written,
                    fin: *fin,
                    credit: Some(*credit),
                };
                (
                    *written,
                    resume_stream(state, &session.link, &ask, port).await,
                )
            }
        };
        let (send, recv, agent) = match opened {
            Ok(opened) => opened,
            Err(refusal) => {
                state.registry.remove_tunnel(&entry.id);
                return proxy::refuse(stream, state, version, refusal).await;
            }
        };
        state.metrics.peer_tunnels_in.inc();
        let mut answer = format!(
            "{version} 200 Connection Established\r\n{}: 1\r\n",
            connect::RESUME_HEADER
        );
        if let Some(offsets) = agent {
            answer += &format!(
                "{}: {}\r\n",
                connect::WRITTEN_HEADER,
                connect::written_value(offsets)
            );
        }
        answer += "\r\n";
        forward::arm_reset(&stream);
        let answered = stream.write_all(answer.as_bytes()).await.is_ok();
        state.metrics.tunnels_open.inc();
        let end = if answered {
            tracing::info!(
                port,
                resumed = agent.is_some(),
                "tunnel open (framed peer hop)"
            );
            let agent_written = agent.map_or(0, |(written, _)| written);
            let id: Arc<str> = Arc::from(entry.id.as_str());
            let outbox = session.credit.clone();
            let credit_id = id.clone();
            let framed = peerhop::framed(
                stream,
                leftover,
                Start {
                    send: entry_written,
                    recv: agent_written,
                    grant: agent_written + UPLOAD_WINDOW,
                },
                Inbound {
                    acks: session.acks.sink(&entry.id),
                    credit: Some(Box::new(move |limit| outbox.post(&credit_id, limit))),
                },
            );
            pass(state, &entry, &session, framed, send, recv, agent_written).await
        } else {
            End::SocketReset
        };
        drop(place);
        tunnel::finish(state, &entry, &end, None, &tunnel::Resumes::default()).await;
    }
    .instrument(span)
    .await
}

/// Resumes the tunnel on the device's link: the new stream and the agent's offsets.
async fn resume_stream(
    state: &Shared,
    link: &crate::link::device::DeviceLink,
    ask: &TunnelResume,
    port: u16,
) -> Result<(LinkSend, LinkRecv, Option<(u64, bool)>), Refusal> {
    let limits = &state.config.limits;
    let answer = link.resume_tunnel(ask, port, limits.frame_max_bytes);
    match tokio::time::timeout(limits.open_timeout(), answer).await {
        Ok(Ok((send, recv, offsets))) => Ok((send, recv, Some(offsets))),
        Ok(Err(OpenError::Refused(RefuseCode::Gone, _))) => Err(Refusal::Gone),
        Ok(Err(OpenError::Offline)) => Err(Refusal::DeviceOffline),
        Err(_) => Err(Refusal::DeviceTimeout),
        Ok(Err(e)) => Err(Refusal::DeviceRefused(format!(
            "bad answer to a resume ({})",
            crate::logsafe::Peer(&format!("{e:?}"))
        ))),
    }
}

/// Passes records and streams until the tunnel ends here: closed (both ends' FINs and
/// their acks through), reset by either side, or moved (the session lost or superseded:
/// the peer connection is reset and the entry resumes the tunnel wherever the device is).
async fn pass(
    state: &Shared,
    entry: &TunnelEntry,
    session: &super::presence::DeviceSession,
    framed: Framed,
    mut send: LinkSend,
    mut recv: LinkRecv,
    agent_written: u64,
) -> End {
    let Framed {
        send: mut hop_send,
        recv: mut hop_recv,
        hop,
    } = framed;
    // The agent's acks of the user's direction, raised by the session's control stream,
    // go on to the entry as records.
    let acked = Arc::new(Acked::default());
    let _acks = state.acks.enter(&entry.id, &acked);
    let to_entry = hop.acks();
    let pass_acks = async {
        let mut seen = (0, false);
        loop {
            acked.changed(seen).await;
            seen = acked.get();
            to_entry.post(seen.0, seen.1);
        }
    };
    let counters = &entry.counters;
    // The user's bytes to the device; credit for more as the device stream takes them.
    let mut handed = agent_written;
    let up = pass_dir(&mut hop_recv, &mut send, &counters.up, |n| {
        handed += n;
        hop.grant(handed + UPLOAD_WINDOW);
    });
    // The device's bytes to the entry, within the credit the entry granted.
    let down = pass_dir(&mut recv, &mut hop_send, &counters.down, |_| {});
    let moved = async {
        tokio::select! {
            _ = session.lost.cancelled() => "its device session ended",
            _ = session.superseded.cancelled() => "its device session was superseded",
        }
    };
    tokio::pin!(pass_acks);
    let outcome = {
        let joined = forward::join_dirs(up, down, counters, &entry.cancel, None);
        tokio::pin!(joined);
        tokio::select! {
            end = &mut joined => Ok(end),
            why = moved => Err(why),
            () = &mut pass_acks => Ok(unreachable_end()),
        }
    };
    let end = match outcome {
        Ok(end) => end,
        Err(why) => {
            tracing::info!("{why}; the tunnel moves on from this relay");
            hop.abort();
            return moved_on(state, session, send, recv).await;
        }
    };
    match &end {
        End::Closed => {
            // Both FINs crossed; the last acks still have to: the entry closes once it has
            // its own, within the resume window.
            let wait = Duration::from_secs(state.config.limits.tunnel_resume_secs.max(1));
            let _ = tokio::time::timeout(wait, async {
                tokio::select! {
                    () = &mut pass_acks => {}
                    () = hop.lost().cancelled() => {}
                }
            })
            .await;
            hop.close().await;
        }
        End::ConnectionLost(why) if !session.lost.is_cancelled() => {
            // The entry's connection ended without the tunnel closing: its user is gone.
            tracing::info!(error = %why, "the entry relay's connection ended; resetting the device stream");
            send.abort(codes::STREAM_RESET);
            recv.abort(codes::STREAM_RESET);
        }
        End::ConnectionLost(_) => hop.abort(),
        End::LinkReset => {
            // The entry's reset record, or the device stream's reset: both ends hear it.
            hop_send.abort(codes::STREAM_RESET);
            send.abort(codes::STREAM_RESET);
            recv.abort(codes::STREAM_RESET);
            hop.close().await;
        }
        _ => {
            // Cut here (revocation, shutdown): a reset both ways.
            hop_send.abort(codes::STREAM_CANCELLED);
            send.abort(codes::STREAM_CANCELLED);
            recv.abort(codes::STREAM_CANCELLED);
            hop.close().await;
        }
    }
    end
}

/// Passes one direction's chunks from `recv` on to `send` until its FIN (passed on as a
/// finish), counting them in `counter` and telling `moved` how many bytes each batch
/// handed on.
async fn pass_dir<R: ChunkRecv, S: ChunkSend>(
    recv: &mut R,
    send: &mut S,
    counter: &std::sync::atomic::AtomicU64,
    mut moved: impl FnMut(u64),
) -> Dir {
    let mut bufs: [Bytes; 8] = Default::default();
    loop {
        match recv.read_chunks(&mut bufs).await {
            Ok(Some(n)) => {
                let mut batch = 0;
                for chunk in bufs[..n].iter_mut() {
                    let chunk = std::mem::take(chunk);
                    let len = chunk.len() as u64;
                    if let Err(end) = send.write_chunk(chunk).await {
                        return Dir::Abnormal(end);
                    }
                    batch += len;
                    counter.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                }
                moved(batch);
            }
            Ok(None) => {
                send.finish();
                return Dir::Eof;
            }
            Err(end) => return Dir::Abnormal(end),
        }
    }
}

/// The tunnel left this relay: its device stream stays open until the agent moves it to
/// the new link (a superseded session's link still works) or the link goes, within the
/// resume window; a stream the agent never moved is then reset.
async fn moved_on(
    state: &Shared,
    session: &super::presence::DeviceSession,
    mut send: LinkSend,
    mut recv: LinkRecv,
) -> End {
    let wait = Duration::from_secs(state.config.limits.tunnel_resume_secs);
    let drained = async {
        let mut bufs: [Bytes; 8] = Default::default();
        // What the agent still sends here is in its replay buffer: it resends it on the
        // stream the entry's resume brings.
        while let Ok(Some(_)) = recv.read_chunks(&mut bufs).await {}
    };
    tokio::select! {
        () = drained => {}
        _ = session.lost.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
    send.abort(codes::STREAM_CANCELLED);
    recv.abort(codes::STREAM_CANCELLED);
    End::ConnectionLost("moved to the device's next session".into())
}

/// The ack pump never ends by itself.
fn unreachable_end() -> End {
    End::ConnectionLost("the ack pump ended".into())
}

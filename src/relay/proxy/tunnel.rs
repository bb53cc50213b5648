//! One admitted tunnel: the 200, the joined streams, and the audit row of how it ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::admit::{Admitted, TunnelCredit};
use super::client::ClientConn;
use super::owner::{Attempt, Leg, Resumed};
use crate::forward::{self, Side};
use crate::link::device::OpenError;
use crate::link::{ChunkSend, End};
use crate::proto::connect;
use crate::proto::messages::{RefuseCode, TunnelResume};
use crate::relay::presence::{DeviceSession, Next};
use crate::relay::registry::TunnelEntry;
use crate::relay::state::Shared;
use crate::resume::Carried;
use crate::store::{now_ms, Id, TunnelClose, TunnelSession};
use tracing::Instrument;

/// Answers 200, forwards pipelined bytes, joins the streams, and records how it ended.
/// `received` is when the CONNECT head was read (for the set-up time). Every log line of
/// the tunnel carries its id, user and device (the `tunnel` span).
pub async fn run<C: ClientConn>(
    client: C,
    leftover: BytesMut,
    t: Admitted,
    state: &Arc<Shared>,
    received: Instant,
) {
    let span = span(&t.entry.id, &t.username, &t.device);
    run_in_span(client, leftover, t, state, received)
        .instrument(span)
        .await
}

/// The span every log line about one tunnel is in.
pub fn span(id: &str, user: &str, device: &str) -> tracing::Span {
    tracing::info_span!("tunnel", id = %id, user = %user, device = %device)
}

async fn run_in_span<C: ClientConn>(
    client: C,
    leftover: BytesMut,
    t: Admitted,
    state: &Arc<Shared>,
    received: Instant,
) {
    let Admitted {
        version,
        user_id,
        username,
        device,
        port,
        entry,
        send,
        recv,
        on_session,
        audited,
        ssh_login: _,
        credit,
        resumable,
    } = t;
    // A resumable tunnel's state, carried from link to link (PROTOCOL.md §2e); its acks
    // arrive on whichever session's control stream carries them.
    let carried = resumable.then(|| Carried::new(on_session.session().acks.sink(&entry.id)));
    let tunnel = Carry {
        version,
        user_id,
        username,
        device,
        port,
        entry,
        audited,
        credit,
        carried,
        device_relay: None,
    };
    let leg = Leg::Here {
        send,
        recv,
        place: on_session,
    };
    carry(client, leftover, tunnel, leg, state, received).await
}

/// A tunnel admitted at this relay, whichever relay holds its device.
pub struct Carry {
    /// The request's HTTP version, echoed in the answer.
    pub version: &'static str,
    /// Who asked.
    pub user_id: Id,
    /// Their name.
    pub username: String,
    /// The device uuid.
    pub device: String,
    /// The device port.
    pub port: u16,
    /// The tunnel's registry entry here.
    pub entry: Arc<TunnelEntry>,
    /// Whether this relay writes the audit row.
    pub audited: bool,
    /// Its share of the relay's tunnel buffer.
    pub credit: TunnelCredit,
    /// A resumable tunnel's state (PROTOCOL.md §2e).
    pub carried: Option<Carried>,
    /// The relay that held the device when the tunnel opened, if not this one.
    pub device_relay: Option<String>,
}

/// Answers 200, forwards pipelined bytes, and runs the tunnel on `leg` and on each leg a
/// resume brings after it, until it ends; records how it ended.
pub async fn carry<C: ClientConn>(
    mut client: C,
    leftover: BytesMut,
    t: Carry,
    leg: Leg,
    state: &Arc<Shared>,
    received: Instant,
) {
    let Carry {
        version,
        user_id,
        username,
        device,
        port,
        entry,
        audited,
        mut credit,
        mut carried,
        device_relay,
    } = t;
    let counters = &entry.counters;
    // From here until an orderly close, a crash of this process resets the client's
    // connection instead of ending it with a FIN that reads like a complete (empty)
    // transfer. Armed before the 200: a crash just after it must reset too.
    if let Some(tcp) = client.tcp() {
        forward::arm_reset(tcp);
    }
    // The 200 goes out alone and flushed before any device byte (PROTOCOL.md §1).
    let answered = answer_established(&mut client, version).await;
    let route = if device_relay.is_some() {
        "peer"
    } else {
        "local"
    };
    state.metrics.tunnel_set_up(route, received.elapsed());
    state
        .metrics
        .proxy_responses
        .with_label_values(&["200", "none"])
        .inc();
    let audit = audited.then(|| {
        Audit::open(
            state,
            &entry,
            user_id,
            &username,
            &device,
            port,
            device_relay.clone(),
        )
    });
    state.metrics.tunnels_open.inc();
    tracing::info!(
        port,
        owner = device_relay.as_deref().unwrap_or("here"),
        "tunnel open"
    );

    // The user socket's kernel queue, for credit: a second descriptor of the same socket,
    // since the halves own the first for the tunnel's life.
    let user_socket = client
        .tcp()
        .and_then(|tcp| socket2::SockRef::from(tcp).try_clone().ok());
    let user = move || match &user_socket {
        Some(socket) => crate::credit::UserQueue::of(socket),
        None => crate::credit::UserQueue::IN_PROCESS,
    };
    let _acks = carried
        .as_ref()
        .map(|c| state.acks.enter(&entry.id, &c.acked));
    let mut resumes = Resumes::default();
    let who = Who {
        user_id,
        username: &username,
    };
    // The first stream sends the pipelined bytes from the ring: not a replay.
    let pipelined = leftover.len() as u64;
    let end = if !answered {
        End::SocketReset
    } else {
        let mut leg = leg;
        let mut early_failed = false;
        if !leftover.is_empty() {
            counters
                .up
                .fetch_add(leftover.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let leftover = leftover.freeze();
            match (carried.as_mut(), &mut leg) {
                // The pipelined bytes are the first of the user's direction: into the ring,
                // from which the first stream sends them, as any later one would.
                (Some(c), _) => c.ring.push(leftover),
                (None, Leg::Here { send, .. }) => {
                    early_failed = send.write_chunk(leftover).await.is_err()
                }
                (None, Leg::Hop { send, .. }) => {
                    early_failed = send.write_chunk(leftover).await.is_err()
                }
            }
        }
        let (mut r, mut w) = client.halves();
        let end = if early_failed {
            End::LinkReset
        } else {
            let idle = idle_timeout(state);
            let mut from = (0, false);
            loop {
                let gone = leg.session();
                let pace = match &mut credit {
                    TunnelCredit::Grant(grant) => forward::Credit::Grant { grant, user: &user },
                    TunnelCredit::Reserved(_) => forward::Credit::None,
                };
                let (cancel, state_now) = (&entry.cancel, carried.as_mut());
                let (end, _waiting_on) = match leg {
                    Leg::Here { send, recv, place } => {
                        let lost = place.session().lost.clone();
                        let resume = state_now.map(|c| c.on(from, &lost));
                        let end = forward::join(
                            send,
                            recv,
                            &mut r,
                            &mut w,
                            counters,
                            Side::User,
                            cancel,
                            idle,
                            pace,
                            resume,
                        )
                        .await;
                        // Kept until the tunnel is on its next leg: while it waits, its
                        // session's row says `reconnecting` (PROTOCOL.md §2e, "Presence").
                        (end, Some(place))
                    }
                    Leg::Hop {
                        send, recv, hop, ..
                    } => {
                        let resume = state_now.map(|c| c.on(from, hop.lost()));
                        let end = forward::join(
                            send,
                            recv,
                            &mut r,
                            &mut w,
                            counters,
                            Side::User,
                            cancel,
                            idle,
                            pace,
                            resume,
                        )
                        .await;
                        if !matches!(end, End::ConnectionLost(_)) {
                            // The last ack, or the reset, must reach the owner.
                            hop.close().await;
                        }
                        (end, None)
                    }
                };
                let (Some(c), End::ConnectionLost(why)) = (carried.as_mut(), &end) else {
                    break end;
                };
                tracing::info!(error = %why, "device link lost; the tunnel waits for the device");
                match resume(state, &entry, &who, gone, c, &mut credit, &mut resumes).await {
                    Ok(next) => {
                        (leg, from) = next;
                        tracing::info!(agent_written = from.0, "tunnel resumed");
                    }
                    Err(end) => break end,
                }
            }
        };
        C::close(r, w, end.resets_socket());
        end
    };
    if let Some(c) = carried.as_mut() {
        resumes.replayed = c.ring.replayed().saturating_sub(pipelined);
        state.metrics.tunnel_replayed_bytes.inc_by(resumes.replayed);
        // What the replay buffer drew from the relay's budget goes back with it.
        if let TunnelCredit::Grant(grant) = &credit {
            let budget = grant.budget();
            budget.give(c.ring.budget_all());
            // The gauge forgets what it counted of this ring.
            let (added, freed) = c.ring.held_change();
            budget.replay_change(added, freed + c.ring.held());
        }
    }
    finish(state, &entry, &end, audit, &resumes).await;
}

/// Who a tunnel is for, as a resume over the peer hop names them.
pub struct Who<'a> {
    /// The user's id.
    pub user_id: Id,
    /// Their name.
    pub username: &'a str,
}

/// What a resumable tunnel went through, for its audit row.
#[derive(Default)]
pub struct Resumes {
    /// Resumes that succeeded.
    pub count: u64,
    /// Bytes sent again after them.
    pub replayed: u64,
    /// Time spent waiting for the device.
    pub waited: Duration,
    /// Why the last one failed, if it did.
    pub failure: Option<&'static str>,
}

/// Waits for the device's next session, on this relay or another of the cluster, and
/// resumes the tunnel on it (PROTOCOL.md §2e): the new leg and the agent's offsets. Ends
/// the tunnel when the device is not back within `tunnel_resume_secs`, the tunnel is cut,
/// or the agent no longer holds it. Counted either way, with the time it waited.
async fn resume(
    state: &Arc<Shared>,
    entry: &TunnelEntry,
    who: &Who<'_>,
    lost: String,
    carried: &mut Carried,
    credit: &mut TunnelCredit,
    counted: &mut Resumes,
) -> Result<(Leg, (u64, bool)), End> {
    let m = &state.metrics;
    m.tunnels_waiting.inc();
    let since = Instant::now();
    // The wait itself; an end names its failure reason for the count.
    let resumed: Result<_, (End, &'static str)> = async {
        let limits = &state.config.limits;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(limits.tunnel_resume_secs);
        let mut gone = lost;
        loop {
            let next = tokio::time::timeout_at(
                deadline,
                state.presence.next_session(&entry.device, &gone),
            );
            let next = tokio::select! {
                next = next => match next {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::info!("the device did not come back in time; the tunnel ends with a reset");
                        let end = End::ConnectionLost("the device did not come back in time".into());
                        return Err((end, "expired"));
                    }
                },
                _ = entry.cancel.cancelled() => return Err((End::Cancelled, "cut")),
            };
            let attempt = match next {
                Next::Here(session) => resume_here(state, entry, carried, credit, session).await,
                Next::Elsewhere(owner) => {
                    let TunnelCredit::Grant(grant) = credit else {
                        // A hop needs credit; a tunnel without it stays on this relay.
                        gone = owner.session.clone();
                        continue;
                    };
                    let tried = owner.session.clone();
                    let ask = Resumed {
                        owner: &owner,
                        user_id: who.user_id,
                        username: who.username,
                        entry,
                    };
                    ask.resume(state, carried, grant).await.map_err(|e| (e, tried))
                }
            };
            match attempt {
                Ok(resumed) => return Ok(resumed),
                Err((Attempt::Failed(end, why), _)) => return Err((end, why)),
                // That session went too; wait for the next.
                Err((Attempt::Retry, session)) => gone = session,
            }
        }
    }
    .await;
    m.tunnels_waiting.dec();
    m.tunnel_wait_seconds.inc_by(since.elapsed().as_secs_f64());
    counted.waited += since.elapsed();
    match &resumed {
        Ok(_) => {
            m.tunnel_resumes.inc();
            counted.count += 1;
        }
        Err((_, why)) => {
            m.tunnel_resume_failures.with_label_values(&[why]).inc();
            counted.failure = Some(why);
        }
    }
    resumed.map_err(|(end, _)| end)
}

/// Resumes the tunnel on this relay's session with the device.
async fn resume_here(
    state: &Shared,
    entry: &TunnelEntry,
    carried: &mut Carried,
    credit: &mut TunnelCredit,
    session: Arc<DeviceSession>,
) -> Result<(Leg, (u64, bool)), (Attempt, String)> {
    let retry = |session: &DeviceSession| Err((Attempt::Retry, session.session.clone()));
    if !session.resume {
        tracing::info!("the device came back without resumable tunnels");
        let end = End::ConnectionLost("the device came back without resume".into());
        return Err((Attempt::Failed(end, "unsupported"), String::new()));
    }
    let limit = match credit {
        TunnelCredit::Grant(grant) => {
            grant.move_to(session.credit.clone());
            Some(grant.limit())
        }
        TunnelCredit::Reserved(_) => None,
    };
    let ask = TunnelResume {
        tunnel: entry.id.clone(),
        written: carried.written.written(),
        fin: carried.written.fin(),
        credit: limit,
    };
    let limits = &state.config.limits;
    let place = session.tunnel(true);
    let answer = session
        .link
        .resume_tunnel(&ask, entry.port, limits.frame_max_bytes);
    match tokio::time::timeout(limits.open_timeout(), answer).await {
        Ok(Ok((send, recv, offsets))) => {
            carried.written.set_sink(session.acks.sink(&entry.id));
            Ok((Leg::Here { send, recv, place }, offsets))
        }
        Ok(Err(OpenError::Refused(RefuseCode::Gone, _))) => {
            tracing::info!("the agent no longer holds the tunnel; it ends with a reset");
            Err((Attempt::Failed(End::LinkReset, "gone"), String::new()))
        }
        Ok(Err(OpenError::Offline)) | Err(_) => retry(&session),
        Ok(Err(e)) => {
            tracing::warn!(error = ?e, "the agent did not take the resume; the tunnel ends");
            Err((Attempt::Failed(End::LinkReset, "protocol"), String::new()))
        }
    }
}

/// Sends the 200 alone and flushed; false if the client is gone. A client inside this
/// process gets no answer (it has its typed one).
pub async fn answer_established<C: ClientConn>(client: &mut C, version: &str) -> bool {
    if C::IN_PROCESS {
        return true;
    }
    client
        .write_all(&connect::established(version))
        .await
        .is_ok()
        && client.flush().await.is_ok()
}

/// The tunnel idle timeout in force, if any.
pub fn idle_timeout(state: &Shared) -> Option<Duration> {
    match state.config.limits.tunnel_idle_timeout_secs {
        0 => None,
        s => Some(Duration::from_secs(s)),
    }
}

/// A tunnel's audit row: written (off the set-up path) when the tunnel opens, completed
/// when it ends, by the relay the user came to.
pub struct Audit {
    /// The row's id (the tunnel id).
    id: String,
    /// The write of the opening row.
    opened: tokio::task::JoinHandle<crate::store::Result<()>>,
}

impl Audit {
    /// Starts writing the opening row. `device_relay` names the relay that held the device
    /// when it is not this one.
    pub fn open(
        state: &Shared,
        entry: &TunnelEntry,
        user_id: Id,
        username: &str,
        device: &str,
        port: u16,
        device_relay: Option<String>,
    ) -> Audit {
        let row = TunnelSession {
            id: entry.id.clone(),
            user_id,
            username: username.to_owned(),
            device_uuid: device.to_owned(),
            port: port.into(),
            relay_id: state.relay_id.clone(),
            opened_at: now_ms(),
            closed_at: None,
            bytes_up: 0,
            bytes_down: 0,
            close_reason: None,
            device_relay,
            kind: entry.kind.as_str().to_owned(),
            resumes: 0,
            replayed_bytes: 0,
            waited_ms: 0,
            resume_failure: None,
        };
        let store = state.store.clone();
        Audit {
            id: row.id.clone(),
            opened: tokio::spawn(async move { store.open_tunnel(&row).await }),
        }
    }
}

/// Forgets the tunnel, counts it, logs how it ended, and completes its audit row (if this
/// relay keeps one). Runs in the connection's tracked task, so a graceful shutdown
/// completes every audit row.
pub async fn finish(
    state: &Arc<Shared>,
    entry: &TunnelEntry,
    end: &End,
    audit: Option<Audit>,
    resumes: &Resumes,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let up = entry.counters.up.load(Relaxed);
    let down = entry.counters.down.load(Relaxed);
    let m = &state.metrics;
    // Out of the running ones, then into the ended ones: a scrape in between sees too few
    // bytes, which the counter holds over (metrics.rs), never too many.
    state.registry.remove_tunnel(&entry.id);
    m.tunnel_ended(up, down);
    m.tunnels_open.dec();
    let reason = match end {
        End::Cancelled => entry.reason.get().copied().unwrap_or("shutdown").to_owned(),
        other => other.reason(),
    };
    m.tunnels_closed.with_label_values(&[&reason]).inc();
    match end {
        End::Closed => tracing::info!(up, down, "tunnel closed"),
        End::ConnectionLost(e) => {
            tracing::warn!(up, down, error = %e, "tunnel ended: device connection lost")
        }
        _ => tracing::info!(up, down, reason = %reason, "tunnel ended"),
    }
    let Some(audit) = audit else { return };
    // The open row was written off the set-up path; the close waits for it.
    match audit.opened.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(tunnel = %audit.id, error = %e, "audit row not written");
            m.store_write_failures.with_label_values(&["audit"]).inc();
            return;
        }
        Err(_) => return,
    }
    let close = TunnelClose {
        bytes_up: up as i64,
        bytes_down: down as i64,
        reason,
        resumes: resumes.count as i64,
        replayed_bytes: resumes.replayed as i64,
        waited_ms: resumes.waited.as_millis() as i64,
        resume_failure: resumes.failure.map(str::to_owned),
    };
    if let Err(e) = state.store.close_tunnel(&audit.id, &close).await {
        tracing::warn!(tunnel = %audit.id, error = %e, "audit row not completed");
        m.store_write_failures.with_label_values(&["audit"]).inc();
    }
}

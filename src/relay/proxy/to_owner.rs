//! The entry side of the peer link (PROTOCOL.md §3): a CONNECT authorized here for a
//! device another relay of the cluster holds is asked of that relay (the *owner*) with a
//! peer token instead of the user's credential; the owner's answer reaches the user
//! unchanged, and on a 200 the user's connection is joined to the owner's. The entry keeps
//! the user's token, so it re-checks revocation and cuts forwarded tunnels like local
//! ones, and it writes the one audit row, naming both relays.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::admit::Forward;
use super::client::{refuse, ClientConn};
use super::refusal::Refusal;
use super::tunnel::{self, Audit};
use crate::auth::peer::PeerKeys;
use crate::forward::{self, Counters, Side};
use crate::link::End;
use crate::proto::connect::{self, HeadError};
use crate::relay::state::Shared;

/// How long dialing the owner may take before the user gets a 503.
const PEER_DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest answer head (and error body) read from the owner.
const MAX_ANSWER: usize = 16 * 1024;

/// The entry side: forwards an authorized CONNECT to the relay that holds the device,
/// passes its answer back, and joins the user's connection to the peer connection.
pub async fn forward<C: ClientConn>(
    client: C,
    leftover: BytesMut,
    f: Forward,
    state: &Arc<Shared>,
    received: std::time::Instant,
) {
    let span = tunnel::span(&f.entry.id, &f.username, &f.device);
    forward_in_span(client, leftover, f, state, received)
        .instrument(span)
        .await
}

/// The entry side's first half: asks the relay that holds the device for the tunnel. On a
/// refusal (the owner's own, or none reachable) the tunnel is forgotten here; on its 200,
/// the connection to join and the device bytes that came with the answer.
pub async fn reach_owner(f: &Forward, state: &Shared) -> Result<(TcpStream, BytesMut), Refusal> {
    let Some(keys) = &state.peer_keys else {
        state.registry.remove_tunnel(&f.entry.id);
        return Err(Refusal::DeviceOffline);
    };
    let (peer, status, answer, early) = match ask_owner(f, keys, state).await {
        Ok(found) => found,
        Err(why) => {
            state.registry.remove_tunnel(&f.entry.id);
            state.presence.forget(&f.device);
            tracing::warn!(owner = %f.owner.relay_id, addr = %f.owner.peer_addr, "cannot forward: {why}");
            return Err(Refusal::DeviceOffline);
        }
    };
    state.metrics.peer_tunnels_out.inc();
    if status != 200 {
        state.registry.remove_tunnel(&f.entry.id);
        if status == 503 {
            // It no longer holds the device: ask the store next time.
            state.presence.forget(&f.device);
        }
        tracing::info!(status, owner = %f.owner.relay_id, "CONNECT refused by the device's relay");
        return Err(Refusal::Owner { status, answer });
    }
    Ok((peer, early))
}

async fn forward_in_span<C: ClientConn>(
    client: C,
    leftover: BytesMut,
    f: Forward,
    state: &Arc<Shared>,
    received: std::time::Instant,
) {
    match reach_owner(&f, state).await {
        Ok(owner) => join_owner(client, leftover, f, owner, state, received).await,
        Err(refusal) => refuse(client, state, f.version, refusal).await,
    }
}

/// The entry side's second half: answers the user with a 200 and joins their connection
/// to the owner's until the tunnel ends; writes the audit row.
pub async fn join_owner<C: ClientConn>(
    mut client: C,
    leftover: BytesMut,
    f: Forward,
    (mut peer, early): (TcpStream, BytesMut),
    state: &Arc<Shared>,
    received: std::time::Instant,
) {
    let counters = &f.entry.counters;
    // Both sockets reset if this process dies from here on, the 200 included (a crash
    // just after it must not read as an empty, complete transfer).
    if let Some(tcp) = client.tcp() {
        forward::arm_reset(tcp);
    }
    forward::arm_reset(&peer);
    let answered = tunnel::answer_established(&mut client, f.version).await;
    state.metrics.tunnel_set_up("peer", received.elapsed());
    state
        .metrics
        .proxy_responses
        .with_label_values(&["200", "none"])
        .inc();
    let audit = Audit::open(
        state,
        &f.entry,
        f.user_id,
        &f.username,
        &f.device,
        f.port,
        Some(f.owner.relay_id.clone()),
    );
    state.metrics.tunnels_open.inc();
    tracing::info!(port = f.port, owner = %f.owner.relay_id, "tunnel open (forwarded)");
    let end = if !answered {
        End::SocketReset
    } else {
        join(client, &mut peer, leftover, early, counters, &f, state).await
    };
    // The peer side follows the user side: reset on an abnormal end, FIN otherwise.
    if end.resets_socket() {
        forward::arm_reset(&peer);
    } else {
        forward::disarm_reset(&peer);
    }
    drop(peer);
    // A peer-hop tunnel does not resume (yet): nothing to count.
    let resumes = tunnel::Resumes::default();
    tunnel::finish(state, &f.entry, &end, Some(audit), &resumes).await;
}

/// Dials the owner and sends the CONNECT with a peer token; returns the connection, the
/// status, the whole answer (head and any error body) and device bytes that came with a
/// 200.
async fn ask_owner(
    f: &Forward,
    keys: &PeerKeys,
    state: &Shared,
) -> Result<(TcpStream, u16, Vec<u8>, BytesMut), String> {
    let mut peer = tokio::time::timeout(PEER_DIAL_TIMEOUT, TcpStream::connect(&f.owner.peer_addr))
        .await
        .map_err(|_| "dial timed out".to_owned())?
        .map_err(|e| format!("dial failed: {e}"))?;
    let _ = peer.set_nodelay(true);
    let request = format!(
        "CONNECT {}:{} HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
        f.device,
        f.port,
        keys.mint(f.user_id, &f.username, &f.device, f.port, &f.entry.id)
    );
    peer.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    // The owner answers within its own open timeout; a little more for the hop.
    let wait = state.config.limits.open_timeout() + PEER_DIAL_TIMEOUT;
    // An answer head reads like a request head: up to the blank line, bounded, in time.
    let (head, rest) = match connect::read_head(&mut peer, MAX_ANSWER, wait).await {
        Ok((head, rest)) => (head.0.to_vec(), rest),
        Err(HeadError::Timeout) => return Err("no answer in time".to_owned()),
        Err(HeadError::TooLarge) => return Err("oversized answer".to_owned()),
        Err(_) => return Err("closed before answering".to_owned()),
    };
    let status: u16 = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "answer is not HTTP".to_owned())?;
    if status == 200 {
        return Ok((peer, status, head, rest));
    }
    // An error answer: its one-sentence body follows (bounded); keep it all.
    let mut answer = head;
    answer.extend_from_slice(&rest);
    let mut body = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        (&mut peer).take(MAX_ANSWER as u64).read_to_end(&mut body),
    )
    .await;
    answer.extend_from_slice(&body);
    Ok((peer, status, answer, BytesMut::new()))
}

/// Joins the user's connection to the peer connection (the one join: `splice(2)` when the
/// user came over plain TCP, a copy over TLS).
async fn join<C: ClientConn>(
    client: C,
    peer: &mut TcpStream,
    leftover: BytesMut,
    early: BytesMut,
    counters: &Counters,
    f: &Forward,
    state: &Shared,
) -> End {
    use std::sync::atomic::Ordering::Relaxed;
    let idle = tunnel::idle_timeout(state);
    let (mut r, mut w) = client.halves();
    // Bytes the user sent with the request, and device bytes that came with the answer.
    if !leftover.is_empty() {
        if peer.write_all(&leftover).await.is_err() {
            C::close(r, w, true);
            return End::SocketReset;
        }
        counters.up.fetch_add(leftover.len() as u64, Relaxed);
    }
    if !early.is_empty() {
        if w.write_all(&early).await.is_err() {
            C::close(r, w, true);
            return End::SocketReset;
        }
        counters.down.fetch_add(early.len() as u64, Relaxed);
    }
    let end = crate::splice::join(
        (&mut r, &mut w),
        C::plain_halves,
        Side::User,
        peer,
        counters,
        &f.entry.cancel,
        idle,
    )
    .await;
    C::close(r, w, end.resets_socket());
    end
}

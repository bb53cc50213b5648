//! The entry side of the peer link (PROTOCOL.md §3): a CONNECT authorized here for a
//! device another relay of the cluster holds is asked of that relay (the *owner*) with a
//! peer token instead of the user's credential; the owner's answer reaches the user
//! unchanged, and on a 200 the user's connection is joined to the owner's. The entry keeps
//! the user's token, so it re-checks revocation and cuts forwarded tunnels like local
//! ones, and it writes the one audit row, naming both relays.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::admit::{Forward, TunnelCredit};
use super::client::{refuse, ClientConn};
use super::owner::{ask_owner, framing, Framing, Leg, PeerAsk};
use super::refusal::Refusal;
use super::tunnel::{self, Audit};
use crate::credit::{Grant, Outbox};
use crate::forward::{self, Counters, Side};
use crate::link::End;
use crate::peerhop::{self, Inbound, Start};
use crate::proto::connect::PeerResume;
use crate::relay::state::Shared;
use crate::resume::{Acked, Carried};

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
    reach_owner_asking(f, state, None)
        .await
        .map(|(peer, early, _)| (peer, early))
}

/// [`reach_owner`], asking for a resumable tunnel with `resume` (PROTOCOL.md §2e); also
/// returns the owner's answer head, which says whether the hop is framed.
async fn reach_owner_asking(
    f: &Forward,
    state: &Shared,
    resume: Option<PeerResume>,
) -> Result<(TcpStream, BytesMut, Vec<u8>), Refusal> {
    let Some(keys) = &state.peer_keys else {
        state.registry.remove_tunnel(&f.entry.id);
        return Err(Refusal::DeviceOffline);
    };
    let (peer, status, answer, early) = match ask_owner(&PeerAsk::of(f, resume), keys, state).await
    {
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
    Ok((peer, early, answer))
}

async fn forward_in_span<C: ClientConn>(
    client: C,
    leftover: BytesMut,
    f: Forward,
    state: &Arc<Shared>,
    received: std::time::Instant,
) {
    if f.resumable && state.resumes() && state.peer_keys.is_some() {
        return forward_resumable(client, leftover, f, state, received).await;
    }
    match reach_owner(&f, state).await {
        Ok(owner) => join_owner(client, leftover, f, owner, state, received).await,
        Err(refusal) => refuse(client, state, f.version, refusal).await,
    }
}

/// A tunnel the entry may resume (PROTOCOL.md §2e, "Through another relay"): asked of the
/// owner with `Cloudlink-Resume: new`, its credit granted here from the user's socket;
/// framed when the owner answers that it is, raw (as [`join_owner`]) when it does not.
async fn forward_resumable<C: ClientConn>(
    client: C,
    leftover: BytesMut,
    f: Forward,
    state: &Arc<Shared>,
    received: std::time::Instant,
) {
    // The grant's limits go to the hop once it exists; its first is in the request.
    let mut grant = Grant::open_for(
        &f.entry.id,
        Arc::new(Outbox::default()),
        state.budget.clone(),
        f.user,
    );
    let resume = PeerResume::New {
        credit: grant.limit(),
    };
    let (peer, early, answer) = match reach_owner_asking(&f, state, Some(resume)).await {
        Ok(found) => found,
        Err(refusal) => return refuse(client, state, f.version, refusal).await,
    };
    let Some(Framing { .. }) = framing(&answer) else {
        // An owner without the feature, or a device that cannot resume: raw, as before.
        drop(grant);
        return join_owner(client, leftover, f, (peer, early), state, received).await;
    };
    let acked = Arc::new(Acked::default());
    let framed = peerhop::framed(
        peer,
        early,
        Start {
            send: 0,
            recv: 0,
            grant: grant.limit(),
        },
        Inbound {
            acks: acked.clone(),
            credit: None,
        },
    );
    grant.move_to(framed.hop.credit());
    let carried = Carried::with_acked(acked, framed.hop.acks());
    let leg = Leg::Hop {
        send: framed.send,
        recv: framed.recv,
        hop: framed.hop,
        session: f.owner.session.clone(),
    };
    let tunnel = tunnel::Carry {
        version: f.version,
        user_id: f.user_id,
        username: f.username,
        device: f.device,
        port: f.port,
        entry: f.entry,
        audited: true,
        credit: TunnelCredit::Grant(grant),
        carried: Some(carried),
        device_relay: Some(f.owner.relay_id),
    };
    tunnel::carry(client, leftover, tunnel, leg, state, received).await
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

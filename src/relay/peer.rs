//! The peer link between relays of a cluster (PROTOCOL.md §3).
//!
//! The relay a user came to (the *entry*) authorizes the CONNECT, then asks the relay that
//! holds the device (the *owner*) with the same CONNECT request carrying a peer token
//! instead of the user's credential. The owner does not check the policy again (the token
//! says the entry did), enforces its per-device limits, opens the device stream and
//! answers like any CONNECT; the entry passes that answer back unchanged. The entry keeps
//! the user's token, so it re-checks revocation and cuts forwarded tunnels like local ones,
//! and it writes the one audit row, naming both relays.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::listen::{Accepted, Conn, Listeners};
use super::proxy::admit::{self, Forward};
use super::proxy::tunnel::{self, Audit};
use super::proxy::{self, ClientConn, Refusal};
use super::state::Shared;
use crate::auth::tokens::unix_now;
use crate::forward::{self, Counters};
use crate::link::End;
use crate::proto::connect::{self, HeadError};

/// The audience of peer tokens: never accepted as a user token, and the other way round.
pub const PEER_AUDIENCE: &str = "cloudlink-peer";

/// The peer link's minor version within protocol 1. A relay sends its own and accepts any
/// other: fields it does not know are ignored, so relays one version apart interoperate
/// during a rolling upgrade.
pub const PEER_VERSION: u32 = 1;

/// How long a peer token is valid: long enough for one dial, short enough to be useless
/// when stolen off the private network later.
const PEER_TOKEN_SECS: u64 = 30;

/// How long dialing the owner may take before the user gets a 503.
const PEER_DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest answer head (and error body) read from the owner.
const MAX_ANSWER: usize = 16 * 1024;

/// Claims of a peer token (PROTOCOL.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerClaims {
    /// The user's id.
    pub sub: i64,
    /// The user's name (for the device's logs).
    pub usr: String,
    /// The device uuid.
    pub dev: String,
    /// The device port.
    pub port: u16,
    /// The tunnel id (the entry relay's), so both relays' logs name the same tunnel.
    pub tid: String,
    /// Relay hops so far; the owner refuses more than one.
    pub hop: u32,
    /// The sender's [`PEER_VERSION`].
    pub ver: u32,
    /// Audience, [`PEER_AUDIENCE`].
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Signs and checks peer tokens with the cluster secret.
pub struct PeerKeys {
    /// Signs.
    encoding: EncodingKey,
    /// Checks.
    decoding: DecodingKey,
}

impl PeerKeys {
    /// Keys from the cluster secret.
    pub fn new(secret: &[u8]) -> PeerKeys {
        PeerKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// A token for one forwarded tunnel.
    pub fn mint(&self, f: &Forward) -> String {
        let now = unix_now();
        let claims = PeerClaims {
            sub: f.user_id,
            usr: f.username.clone(),
            dev: f.device.clone(),
            port: f.port,
            tid: f.entry.id.clone(),
            hop: 1,
            ver: PEER_VERSION,
            aud: PEER_AUDIENCE.to_owned(),
            iat: now,
            exp: now + PEER_TOKEN_SECS,
        };
        // HS256 over strings and integers cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// The claims of a valid, unexpired peer token signed with this cluster's secret.
    pub fn verify(&self, token: &str) -> Option<PeerClaims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[PEER_AUDIENCE]);
        validation.leeway = crate::auth::tokens::JWT_LEEWAY_SECS;
        jsonwebtoken::decode::<PeerClaims>(token, &self.decoding, &validation)
            .ok()
            .map(|d| d.claims)
    }
}

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
            state.owners.remove(&f.device);
            tracing::warn!(owner = %f.owner.relay_id, addr = %f.owner.peer_addr, "cannot forward: {why}");
            return Err(Refusal::DeviceOffline);
        }
    };
    state.metrics.peer_tunnels_out.inc();
    if status != 200 {
        state.registry.remove_tunnel(&f.entry.id);
        if status == 503 {
            // It no longer holds the device: ask the store next time.
            state.owners.remove(&f.device);
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
        Err(refusal) => proxy::refuse(client, state, f.version, refusal).await,
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
    tunnel::finish(state, &f.entry, &end, Some(audit)).await;
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
        keys.mint(f)
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

/// Joins the user's connection to the peer connection: `splice(2)` when the user came
/// over plain TCP, an ordinary copy when over TLS.
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
    let spliced = match C::plain_halves(&r, &w) {
        Some(user) => crate::splice::join(user, peer, counters, &f.entry.cancel, idle).await,
        None => None,
    };
    let end = match spliced {
        Some(end) => end,
        None => copy_join(&mut r, &mut w, peer, counters, f, idle).await,
    };
    C::close(r, w, end.resets_socket());
    end
}

/// The copying join, for a user on TLS (or when no pipe could be made).
async fn copy_join<R, W>(
    r: &mut R,
    w: &mut W,
    peer: &mut TcpStream,
    counters: &Counters,
    f: &Forward,
    idle: Option<Duration>,
) -> End
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (mut pr, mut pw) = peer.split();
    forward::join_dirs(
        forward::copy_dir(r, &mut pw, &counters.up),
        forward::copy_dir(&mut pr, w, &counters.down),
        counters,
        &f.entry.cancel,
        idle,
    )
    .await
}

/// The owner side: serves CONNECTs from other relays until the relay shuts down. The
/// listener carries peer tokens only and must sit on a private network (deploy/ says how).
pub async fn run(listener: TcpListener, state: Arc<Shared>, tracker: TaskTracker) {
    let listeners = Listeners {
        plain: Some(listener),
        tls: None,
    };
    let cap = Arc::new(Semaphore::new(state.config.limits.tunnels_per_relay));
    while let Some(accepted) = listeners.next(&cap, &state.shutdown).await {
        let Accepted { conn, peer, permit } = accepted;
        let Conn::Plain(stream) = conn else { continue };
        let state = state.clone();
        let span = tracing::info_span!("peer", from = %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                serve(stream, peer, state).await
            }
            .instrument(span),
        );
    }
}

/// Serves one CONNECT from another relay.
async fn serve(mut stream: TcpStream, _peer: SocketAddr, state: Arc<Shared>) {
    let limits = &state.config.limits;
    let read = connect::read_head(&mut stream, limits.head_max_bytes, limits.head_timeout()).await;
    let received = std::time::Instant::now();
    let (head, leftover) = match read {
        Ok(ok) => ok,
        Err(HeadError::Closed) => return,
        Err(_) => {
            let refusal = Refusal::BadRequest("unreadable peer request".into());
            return proxy::refuse(stream, &state, "HTTP/1.1", refusal).await;
        }
    };
    let head = match connect::parse_head(&head.0) {
        Ok(head) => head,
        Err(_) => {
            let refusal = Refusal::BadRequest("malformed peer request".into());
            return proxy::refuse(stream, &state, "HTTP/1.1", refusal).await;
        }
    };
    match admit_peer(&head, &state).await {
        Ok(admitted) => {
            state.metrics.peer_tunnels_in.inc();
            tunnel::run(stream, leftover, admitted, &state, received).await
        }
        Err(refusal) => proxy::refuse(stream, &state, head.version, refusal).await,
    }
}

/// Checks a peer token and opens the device stream on this relay.
async fn admit_peer(
    head: &connect::ConnectHead,
    state: &Shared,
) -> Result<admit::Admitted, Refusal> {
    let keys = state.peer_keys.as_ref().ok_or(Refusal::AuthRequired)?;
    let token = head.token.as_deref().ok_or(Refusal::AuthRequired)?;
    let claims = keys.verify(token).ok_or(Refusal::AuthRequired)?;
    if claims.hop > 1 {
        return Err(Refusal::Forbidden);
    }
    let (device, port) = connect::parse_target(&head.target, &state.config.device_domains)
        .map_err(|e| Refusal::BadRequest(e.to_string()))?;
    if device != claims.dev || port != claims.port {
        return Err(Refusal::Forbidden);
    }
    // The device must be here: the owner never forwards further (no loops).
    let session = state
        .registry
        .device(&device)
        .ok_or(Refusal::DeviceOffline)?;
    let entry = admit::new_entry(
        claims.sub,
        &device,
        port,
        "",
        false,
        Some(claims.tid),
        crate::relay::registry::TunnelKind::Connect,
    );
    admit::open_local(state, &session, entry, head.version, claims.usr, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_tokens_are_bound_to_the_cluster_secret() {
        let keys = PeerKeys::new(b"cluster-secret-cluster-secret-cl");
        let now = unix_now();
        let claims = PeerClaims {
            sub: 1,
            usr: "u".into(),
            dev: "d".into(),
            port: 22,
            tid: "t".into(),
            hop: 1,
            ver: PEER_VERSION,
            aud: PEER_AUDIENCE.into(),
            iat: now,
            exp: now + 30,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&token), Some(claims.clone()));
        let other = PeerKeys::new(b"another-secret-another-secret-an");
        assert_eq!(other.verify(&token), None);
        // A user token's audience is not a peer token's.
        let user = PeerClaims {
            aud: crate::auth::tokens::USER_AUDIENCE.into(),
            ..claims
        };
        let token = jsonwebtoken::encode(&Header::default(), &user, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&token), None);
    }
}

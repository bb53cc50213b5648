//! The CONNECT listeners (plain and TLS): read the head, check the caller, open a stream to
//! the device, answer 200 only once the device is connected, then join the two streams.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::registry::{LimitHit, TunnelEntry};
use super::state::Shared;
use crate::auth::policy::{self, Decision};
use crate::auth::{AuthError, Credential, Principal};
use crate::forward::{self, Counters, End};
use crate::proto::connect::{self, ConnectHead, HeadError};
use crate::proto::frame;
use crate::proto::messages::{OpenReply, RefuseCode, TunnelOpen};
use crate::store::{now_ms, TunnelSession};

/// A client connection the proxy serves: plain TCP or TLS over TCP.
pub trait ClientConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read half after the head.
    type R: AsyncRead + Unpin + Send;
    /// The write half.
    type W: AsyncWrite + Unpin + Send;
    /// Splits for the two directions of a tunnel.
    fn halves(self) -> (Self::R, Self::W);
    /// Drops the connection with a TCP RST instead of a FIN.
    fn reset(r: Self::R, w: Self::W);
}

impl ClientConn for TcpStream {
    type R = OwnedReadHalf;
    type W = OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn reset(r: Self::R, w: Self::W) {
        forward::reset_tcp(r, w);
    }
}

impl ClientConn for TlsStream<TcpStream> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn reset(r: Self::R, w: Self::W) {
        let stream = r.unsplit(w);
        forward::arm_reset(stream.get_ref().0);
    }
}

/// Why a CONNECT was refused; each variant names the side that caused it, which picks the
/// status and labels the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// User: unparseable request, bad target or port.
    BadRequest(String),
    /// User: a method other than CONNECT.
    MethodNotAllowed,
    /// User: no credentials, or ones that prove nobody.
    AuthRequired,
    /// User: authenticated, but no such device, not theirs, or a closed port.
    Forbidden,
    /// User: the head did not arrive in time.
    HeadTimeout,
    /// User: too many tunnels or failed attempts; retry after this many seconds.
    TooMany(u64, &'static str),
    /// User: head over the size limit.
    HeadTooLarge,
    /// Device: refused the port (nothing listening, or its allowlist).
    DeviceRefused(String),
    /// Device: not connected to this relay.
    DeviceOffline,
    /// Device: did not answer the stream in time.
    DeviceTimeout,
    /// Relay: the store cannot answer.
    StoreUnavailable,
}

impl Refusal {
    /// Status, reason phrase, and the side that caused it.
    pub fn status(&self) -> (u16, &'static str, &'static str) {
        match self {
            Refusal::BadRequest(_) => (400, "Bad Request", "user"),
            Refusal::MethodNotAllowed => (405, "Method Not Allowed", "user"),
            Refusal::AuthRequired => (407, "Proxy Authentication Required", "user"),
            Refusal::Forbidden => (403, "Forbidden", "user"),
            Refusal::HeadTimeout => (408, "Request Timeout", "user"),
            Refusal::TooMany(..) => (429, "Too Many Requests", "user"),
            Refusal::HeadTooLarge => (431, "Request Header Fields Too Large", "user"),
            Refusal::DeviceRefused(_) => (502, "Bad Gateway", "device"),
            Refusal::DeviceOffline => (503, "Service Unavailable", "device"),
            Refusal::DeviceTimeout => (504, "Gateway Timeout", "device"),
            Refusal::StoreUnavailable => (503, "Service Unavailable", "relay"),
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::BadRequest(why) => format!("Bad request: {why}."),
            Refusal::MethodNotAllowed => "Only CONNECT is served here.".into(),
            Refusal::AuthRequired => {
                "A valid API key or token is required in Proxy-Authorization.".into()
            }
            Refusal::Forbidden => "You may not reach that device on that port.".into(),
            Refusal::HeadTimeout => "The request did not arrive in time.".into(),
            Refusal::TooMany(_, what) => format!("Too many {what}; try again later."),
            Refusal::HeadTooLarge => "The request head is too large.".into(),
            Refusal::DeviceRefused(why) => format!("The device refused the connection: {why}."),
            Refusal::DeviceOffline => "The device is not connected.".into(),
            Refusal::DeviceTimeout => "The device did not answer in time.".into(),
            Refusal::StoreUnavailable => {
                "The relay cannot check credentials right now; try again shortly.".into()
            }
        }
    }

    /// The whole answer.
    pub fn response(&self, version: &str) -> Vec<u8> {
        let (status, reason, _) = self.status();
        let mut headers = Vec::new();
        match self {
            Refusal::AuthRequired => {
                headers.push(("Proxy-Authenticate", "Basic realm=\"cloudlink\"".to_owned()))
            }
            Refusal::TooMany(secs, _) => headers.push(("Retry-After", secs.to_string())),
            Refusal::MethodNotAllowed => headers.push(("Allow", "CONNECT".to_owned())),
            _ => {}
        }
        connect::error_response(version, status, reason, &self.message(), &headers)
    }
}

/// Accepts CONNECT clients until shutdown; each connection is tracked by `tracker` so
/// shutdown can wait for open tunnels.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<Shared>,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = state.shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let span = tracing::info_span!("connect", client = %peer);
        match tls.clone() {
            None => tracker.spawn(serve(stream, peer, state).instrument(span)),
            Some(acceptor) => tracker.spawn(
                async move {
                    let timeout = state.config.limits.head_timeout();
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve(tls, peer, state).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                .instrument(span),
            ),
        };
    }
}

/// Serves one client connection from head to close.
pub async fn serve<C: ClientConn>(mut client: C, peer: SocketAddr, state: Arc<Shared>) {
    let limits = &state.config.limits;
    let (head, leftover) =
        match connect::read_head(&mut client, limits.head_max_bytes, limits.head_timeout()).await {
            Ok(ok) => ok,
            Err(HeadError::Closed) => return,
            Err(HeadError::TooLarge) => {
                return refuse(client, &state, "HTTP/1.1", Refusal::HeadTooLarge).await
            }
            Err(HeadError::Timeout) => {
                return refuse(client, &state, "HTTP/1.1", Refusal::HeadTimeout).await
            }
            Err(HeadError::BadRequest(why)) => {
                return refuse(client, &state, "HTTP/1.1", Refusal::BadRequest(why.into())).await
            }
        };
    let head = match connect::parse_head(&head.0) {
        Ok(head) => head,
        Err(e) => {
            return refuse(
                client,
                &state,
                "HTTP/1.1",
                Refusal::BadRequest(e.to_string()),
            )
            .await
        }
    };
    let version = head.version;
    match admit(&head, peer, &state).await {
        Ok(admitted) => tunnel(client, leftover, admitted, &state).await,
        Err(refusal) => refuse(client, &state, version, refusal).await,
    }
}

async fn refuse<C: ClientConn>(mut client: C, state: &Shared, version: &str, refusal: Refusal) {
    let (status, _, side) = refusal.status();
    tracing::info!(status, side, "CONNECT refused: {}", refusal.message());
    state
        .metrics
        .proxy_responses
        .with_label_values(&[&status.to_string(), side])
        .inc();
    let _ = client.write_all(&refusal.response(version)).await;
    let _ = client.shutdown().await;
    // Closing with unread bytes from the client would send a RST that can overtake the
    // answer; read (and drop) what is still coming for a moment first, within bounds.
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A CONNECT that passed every check, with its device stream open and accepted.
struct Admitted {
    version: &'static str,
    principal: Principal,
    device: String,
    port: u16,
    entry: Arc<TunnelEntry>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// Checks the request and opens the device stream; any failure is a [`Refusal`].
async fn admit(
    head: &ConnectHead,
    peer: SocketAddr,
    state: &Arc<Shared>,
) -> Result<Admitted, Refusal> {
    if !head.method.eq_ignore_ascii_case("CONNECT") {
        return Err(Refusal::MethodNotAllowed);
    }
    if let Some(wait) = state.auth_failures.retry_after(peer.ip()) {
        return Err(Refusal::TooMany(wait.as_secs().max(1), "failed attempts"));
    }
    let (device, port) = connect::parse_target(&head.target, &state.config.device_domains)
        .map_err(|e| Refusal::BadRequest(e.to_string()))?;
    let token = head.token.as_deref().ok_or(Refusal::AuthRequired)?;
    let principal = match authorize(state, token, &device, port).await? {
        Decision::Allow { principal, .. } => principal,
        Decision::Unauthenticated => {
            state.metrics.auth_failures.inc();
            state.auth_failures.record(peer.ip());
            return Err(Refusal::AuthRequired);
        }
        Decision::Forbidden => return Err(Refusal::Forbidden),
    };
    let session = state
        .registry
        .device(&device)
        .ok_or(Refusal::DeviceOffline)?;
    let entry = Arc::new(TunnelEntry {
        id: crate::auth::tokens::new_device_uuid(),
        user_id: principal.user.id,
        device: device.clone(),
        port,
        token: token.to_owned(),
        // Not a child of the shutdown token: open tunnels run on through the grace period.
        cancel: CancellationToken::new(),
        reason: OnceLock::new(),
    });
    let limits = &state.config.limits;
    state
        .registry
        .admit_tunnel(
            entry.clone(),
            limits.tunnels_per_user,
            limits.tunnels_per_device,
            limits.tunnels_per_relay,
        )
        .map_err(|hit| {
            Refusal::TooMany(
                1,
                match hit {
                    LimitHit::User => "open tunnels for this user",
                    LimitHit::Device => "open tunnels to this device",
                    LimitHit::Relay => "open tunnels on this relay",
                },
            )
        })?;
    let open = TunnelOpen {
        port,
        tunnel: entry.id.clone(),
        user: principal.user.username.clone(),
    };
    match open_stream(
        &session.conn,
        &open,
        limits.open_timeout(),
        limits.frame_max_bytes,
    )
    .await
    {
        Ok((send, recv)) => Ok(Admitted {
            version: head.version,
            principal,
            device,
            port,
            entry,
            send,
            recv,
        }),
        Err(refusal) => {
            state.registry.remove_tunnel(&entry.id);
            Err(refusal)
        }
    }
}

/// Authorizes through the short-lived cache.
async fn authorize(
    state: &Shared,
    token: &str,
    device: &str,
    port: u16,
) -> Result<Decision, Refusal> {
    if let Some(decision) = state.auth_cache.get(token, device, port) {
        return Ok(decision);
    }
    let decision = policy::authorize(state.store.as_ref(), &state.jwt, token, device, port)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot authorize a CONNECT");
            Refusal::StoreUnavailable
        })?;
    state.auth_cache.put(token, device, port, &decision);
    Ok(decision)
}

/// Opens a tunnel stream, sends `open`, and waits for the device's answer.
async fn open_stream(
    conn: &quinn::Connection,
    open: &TunnelOpen,
    timeout: Duration,
    max_frame: usize,
) -> Result<(quinn::SendStream, quinn::RecvStream), Refusal> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|_| Refusal::DeviceOffline)?;
        frame::write(&mut send, open)
            .await
            .map_err(|_| Refusal::DeviceOffline)?;
        let reply: OpenReply = frame::read_required(&mut recv, max_frame)
            .await
            .map_err(|e| Refusal::DeviceRefused(format!("bad answer from the agent ({e})")))?;
        match reply {
            OpenReply::Opened => Ok((send, recv)),
            OpenReply::Refused { code, message } => Err(Refusal::DeviceRefused(match code {
                RefuseCode::Connect => format!(
                    "nothing accepts connections on port {} ({message})",
                    open.port
                ),
                RefuseCode::Forbidden => format!("port {} is not allowed by the device", open.port),
            })),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Refusal::DeviceTimeout)?
}

/// Answers 200, forwards pipelined bytes, joins the streams, and records how it ended.
async fn tunnel<C: ClientConn>(
    mut client: C,
    leftover: BytesMut,
    t: Admitted,
    state: &Arc<Shared>,
) {
    let Admitted {
        version,
        principal,
        device,
        port,
        entry,
        mut send,
        recv,
    } = t;
    let counters = Counters::default();
    // The 200 goes out alone and flushed before any device byte (PROTOCOL.md §1).
    let answered = client
        .write_all(&connect::established(version))
        .await
        .is_ok()
        && client.flush().await.is_ok();
    state
        .metrics
        .proxy_responses
        .with_label_values(&["200", "none"])
        .inc();
    let audit = audit_row(&entry, &principal, &device, port, state);
    let store = state.store.clone();
    let audit_id = audit.id.clone();
    let opened = tokio::spawn(async move { store.open_tunnel(&audit).await });
    state.metrics.tunnels_open.inc();
    tracing::info!(tunnel = %entry.id, user = %principal.user.username, %device, port, "tunnel open");

    let end = if !answered {
        End::SocketReset
    } else {
        let mut early_failed = false;
        if !leftover.is_empty() {
            counters
                .to_quic
                .fetch_add(leftover.len() as u64, std::sync::atomic::Ordering::Relaxed);
            early_failed = send.write_chunk(leftover.freeze()).await.is_err();
        }
        let (mut r, mut w) = client.halves();
        let idle = match state.config.limits.tunnel_idle_timeout_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        let end = if early_failed {
            End::QuicReset
        } else {
            forward::join(send, recv, &mut r, &mut w, &counters, &entry.cancel, idle).await
        };
        if end.resets_socket() {
            C::reset(r, w);
        }
        end
    };
    finish(state, &entry, &counters, &end, audit_id, opened).await;
}

fn audit_row(
    entry: &TunnelEntry,
    principal: &Principal,
    device: &str,
    port: u16,
    state: &Shared,
) -> TunnelSession {
    TunnelSession {
        id: entry.id.clone(),
        user_id: principal.user.id,
        username: principal.user.username.clone(),
        device_uuid: device.to_owned(),
        port: port.into(),
        relay_id: state.relay_id.clone(),
        opened_at: now_ms(),
        closed_at: None,
        bytes_up: 0,
        bytes_down: 0,
        close_reason: None,
    }
}

async fn finish(
    state: &Arc<Shared>,
    entry: &TunnelEntry,
    counters: &Counters,
    end: &End,
    audit_id: String,
    opened: tokio::task::JoinHandle<crate::store::Result<()>>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    state.registry.remove_tunnel(&entry.id);
    state.metrics.tunnels_open.dec();
    let reason = match end {
        End::Cancelled => entry.reason.get().copied().unwrap_or("shutdown").to_owned(),
        other => other.reason(),
    };
    let up = counters.to_quic.load(Relaxed);
    let down = counters.from_quic.load(Relaxed);
    state
        .metrics
        .tunnels_closed
        .with_label_values(&[&reason])
        .inc();
    state
        .metrics
        .tunnel_bytes
        .with_label_values(&["up"])
        .inc_by(up);
    state
        .metrics
        .tunnel_bytes
        .with_label_values(&["down"])
        .inc_by(down);
    match end {
        End::Closed => tracing::info!(tunnel = %entry.id, up, down, "tunnel closed"),
        End::ConnectionLost(e) => {
            tracing::warn!(tunnel = %entry.id, up, down, error = %e, "tunnel ended: device connection lost")
        }
        _ => tracing::info!(tunnel = %entry.id, up, down, reason = %reason, "tunnel ended"),
    }
    // The open row was written off the set-up path; the close waits for it. This runs in
    // the connection's tracked task, so a graceful shutdown completes every audit row.
    match opened.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(tunnel = %audit_id, error = %e, "audit row not written");
            return;
        }
        Err(_) => return,
    }
    if let Err(e) = state
        .store
        .close_tunnel(&audit_id, up as i64, down as i64, &reason)
        .await
    {
        tracing::warn!(tunnel = %audit_id, error = %e, "audit row not completed");
    }
}

/// Every few seconds, re-checks each open tunnel's authorization without the cache and ends
/// those whose key, membership, user, device or port is gone, so revocation takes effect
/// within [`REVALIDATE_EVERY`] plus one store round trip.
pub async fn revalidate(state: Arc<Shared>) {
    let mut tick = tokio::time::interval(REVALIDATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let mut answers: std::collections::HashMap<(String, String, u16), bool> =
            std::collections::HashMap::new();
        for entry in state.registry.tunnels() {
            let key = (entry.token.clone(), entry.device.clone(), entry.port);
            let allowed = match answers.get(&key) {
                Some(allowed) => *allowed,
                None => match still_allowed(&state, &entry).await {
                    Some(allowed) => {
                        answers.insert(key, allowed);
                        allowed
                    }
                    // The store is down: keep tunnels running rather than cut everyone off.
                    None => continue,
                },
            };
            if !allowed {
                tracing::info!(tunnel = %entry.id, "access revoked; ending tunnel");
                entry.end("revoked");
            }
        }
    }
}

/// How often open tunnels are re-authorized (DESIGN.md: revocation ends tunnels within 5 s).
pub const REVALIDATE_EVERY: Duration = Duration::from_secs(2);

/// Whether the tunnel's user may still reach its device and port; `None` if the store
/// cannot say. A JWT that expired after the tunnel opened does not end it; the user,
/// membership and port must still be there.
async fn still_allowed(state: &Shared, entry: &TunnelEntry) -> Option<bool> {
    let store = state.store.as_ref();
    let principal = if crate::auth::tokens::is_api_key(&entry.token) {
        // The key must still exist unrevoked; re-checking it is not a use of it.
        match crate::auth::identify(store, &state.jwt, &entry.token).await {
            Ok(principal) => principal,
            Err(AuthError::InvalidToken) => return Some(false),
            Err(AuthError::Store(_)) => return None,
        }
    } else {
        match store.user_by_id(entry.user_id).await {
            Ok(Some(user)) => Principal {
                user,
                credential: Credential::Jwt { exp: 0 },
            },
            Ok(None) => return Some(false),
            Err(_) => return None,
        }
    };
    policy::may_reach(store, principal, &entry.device, entry.port)
        .await
        .ok()
        .map(|d| matches!(d, Decision::Allow { .. }))
}

/// Cuts every open tunnel (after the shutdown grace period).
pub fn cut_all(state: &Shared, reason: &'static str) {
    for entry in state.registry.tunnels() {
        entry.end(reason);
    }
}

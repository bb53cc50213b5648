//! The CONNECT listeners (plain and TLS): admit the connection under the edge caps, read
//! the head, then hand over to [`admit`] (who, where, device stream) and [`tunnel`] (the
//! joined streams and their audit row). [`refusal`] says what each refusal answers.

pub mod admit;
pub mod refusal;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::limits::SourceSlot;
use super::listen::{Accepted, Conn, Listeners};
use super::registry::TunnelKind;
use super::state::Shared;
use crate::forward;
use crate::proto::connect::{self, HeadError};
pub use refusal::{Refusal, Side};

/// A client connection the proxy serves: plain TCP or TLS over TCP.
pub trait ClientConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// A client inside this process, which gets no HTTP answer: it learns the outcome
    /// from admission's typed result.
    const IN_PROCESS: bool = false;
    /// The read half after the head.
    type R: AsyncRead + Unpin + Send;
    /// The write half.
    type W: AsyncWrite + Unpin + Send;
    /// The TCP socket underneath (for the reset-on-crash linger setting); `None` for a
    /// client inside this process.
    fn tcp(&self) -> Option<&TcpStream>;
    /// The socket itself when the client speaks plain TCP (a forwarded tunnel can then
    /// `splice` it); `None` over TLS.
    fn plain_halves<'a>(r: &'a Self::R, w: &'a Self::W) -> Option<&'a TcpStream>;
    /// Splits for the two directions of a tunnel.
    fn halves(self) -> (Self::R, Self::W);
    /// Closes the connection after a tunnel: with a TCP RST when `reset`, otherwise with an
    /// orderly FIN (the linger armed by [`forward::arm_reset`] is disarmed first).
    fn close(r: Self::R, w: Self::W, reset: bool);
}

impl ClientConn for TcpStream {
    type R = OwnedReadHalf;
    type W = OwnedWriteHalf;
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn plain_halves<'a>(r: &'a Self::R, _w: &'a Self::W) -> Option<&'a TcpStream> {
        Some(r.as_ref())
    }
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn close(r: Self::R, w: Self::W, reset: bool) {
        if reset {
            forward::reset_tcp(r, w);
        } else {
            forward::disarm_reset(r.as_ref());
        }
    }
}

impl ClientConn for TlsStream<TcpStream> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
    fn plain_halves<'a>(_r: &'a Self::R, _w: &'a Self::W) -> Option<&'a TcpStream> {
        None
    }
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn close(r: Self::R, w: Self::W, reset: bool) {
        let stream = r.unsplit(w);
        if reset {
            forward::arm_reset(stream.get_ref().0);
        } else {
            forward::disarm_reset(stream.get_ref().0);
        }
    }
}

/// A client inside this process (the browser terminal): one end of an in-memory pipe.
impl ClientConn for DuplexStream {
    const IN_PROCESS: bool = true;
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
    fn plain_halves<'a>(_r: &'a Self::R, _w: &'a Self::W) -> Option<&'a TcpStream> {
        None
    }
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn close(_r: Self::R, _w: Self::W, _reset: bool) {
        // Dropping the halves ends the pipe; the other end reads EOF either way.
    }
}

/// What an unauthenticated connection holds: its place under the total cap, and its place
/// under its source address's cap (`None` when that source had none left). Both are given
/// back once the caller has authenticated, or when the connection ends.
pub struct Pending {
    /// The place under `limits.proxy_unauthenticated_max`.
    _total: OwnedSemaphorePermit,
    /// The place under `limits.proxy_unauthenticated_per_source`.
    slot: Option<SourceSlot>,
}

/// Accepts CONNECT clients on the plain and TLS listeners until shutdown; each connection
/// is tracked by `tracker` so shutdown can wait for open tunnels.
///
/// At most `proxy_unauthenticated_max` connections are between accept and authentication
/// at once: past that nothing is accepted and the kernel's backlog holds the rest (a
/// slowloris cannot take every file descriptor). A source address over its own cap is
/// answered 429 at once.
pub async fn run(listeners: Listeners, state: Arc<Shared>, tracker: TaskTracker) {
    while let Some(accepted) = listeners.next(&state.proxy_pending, &state.draining).await {
        let Accepted { conn, peer, permit } = accepted;
        let pending = Pending {
            _total: permit,
            slot: state.proxy_sources.take(peer.ip()),
        };
        let state = state.clone();
        let span = tracing::info_span!("connect", client = %peer);
        match conn {
            Conn::Plain(stream) => tracker.spawn(
                serve(stream, peer, state, pending, TunnelKind::Connect, None).instrument(span),
            ),
            Conn::Tls(tls) => tracker.spawn(
                async move {
                    let timeout = state.config.limits.head_timeout();
                    match tokio::time::timeout(timeout, tls.finish()).await {
                        Ok(Ok(tls)) => {
                            serve(tls, peer, state, pending, TunnelKind::Connect, None).await
                        }
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
pub async fn serve<C: ClientConn>(
    mut client: C,
    peer: SocketAddr,
    state: Arc<Shared>,
    pending: Pending,
    kind: TunnelKind,
    id: Option<String>,
) {
    if pending.slot.is_none() {
        let refusal = Refusal::TooMany(1, "connections from your address");
        return refuse(client, &state, "HTTP/1.1", refusal).await;
    }
    let limits = &state.config.limits;
    let (head, leftover) =
        match connect::read_head(&mut client, limits.head_max_bytes, limits.head_timeout()).await {
            Ok(ok) => ok,
            Err(e) => match head_refusal(e) {
                Some((version, refusal)) => return refuse(client, &state, version, refusal).await,
                None => return,
            },
        };
    let received = std::time::Instant::now();
    let head = match connect::parse_head(&head.0) {
        Ok(head) => head,
        Err(e) => match head_refusal(e) {
            Some((version, refusal)) => return refuse(client, &state, version, refusal).await,
            None => return,
        },
    };
    let version = head.version;
    let ask = match admit::Ask::from_head(&head, &state) {
        Ok(ask) => ask,
        Err(refusal) => return refuse(client, &state, version, refusal).await,
    };
    match admit::admit(&ask, peer, &state, pending, kind, id).await {
        Ok(admit::Route::Local(admitted)) => {
            tunnel::run(client, leftover, admitted, &state, received).await
        }
        Ok(admit::Route::Peer(forward)) => {
            crate::relay::peer::forward(client, leftover, forward, &state, received).await
        }
        Err(refusal) => refuse(client, &state, version, refusal).await,
    }
}

/// A tunnel opened for a client inside this relay (the browser terminal).
pub struct InProcess {
    /// This end of the in-memory pipe; the device's bytes come out of it.
    pub stream: DuplexStream,
    /// Who it was admitted for.
    pub user_id: crate::store::Id,
    /// Their name.
    pub username: String,
}

/// Opens a tunnel for a client inside this relay (the browser terminal): the same
/// admission, caps, limits, peer forwarding, revalidation and audit row as a CONNECT from
/// outside at `peer`, under `kind` and the tunnel id `id`, with no HTTP in between. The
/// tunnel runs on an in-memory pipe; its refusal comes back typed.
pub async fn open_in_process(
    state: &Arc<Shared>,
    peer: SocketAddr,
    ask: admit::Ask,
    kind: TunnelKind,
    id: &str,
) -> Result<InProcess, Refusal> {
    // The same caps as a connection from outside, under the caller's address.
    let Ok(permit) = state.proxy_pending.clone().try_acquire_owned() else {
        return Err(Refusal::TooMany(1, "connections waiting to be admitted"));
    };
    let pending = Pending {
        _total: permit,
        slot: state.proxy_sources.take(peer.ip()),
    };
    if pending.slot.is_none() {
        return Err(Refusal::TooMany(1, "connections from your address"));
    }
    let received = std::time::Instant::now();
    let route = admit::admit(&ask, peer, state, pending, kind, Some(id.to_owned())).await?;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let tasks = state.tunnel_tasks.clone();
    let state = state.clone();
    let (user_id, username) = match route {
        admit::Route::Local(admitted) => {
            let user = (admitted.user_id, admitted.username.clone());
            tasks.spawn(async move {
                tunnel::run(theirs, BytesMut::new(), admitted, &state, received).await
            });
            user
        }
        admit::Route::Peer(forward) => {
            let span = tunnel::span(&forward.entry.id, &forward.username, &forward.device);
            let owner = crate::relay::peer::reach_owner(&forward, &state)
                .instrument(span.clone())
                .await?;
            let user = (forward.user_id, forward.username.clone());
            tasks.spawn(
                async move {
                    crate::relay::peer::join_owner(
                        theirs,
                        BytesMut::new(),
                        forward,
                        owner,
                        &state,
                        received,
                    )
                    .await
                }
                .instrument(span),
            );
            user
        }
    };
    Ok(InProcess {
        stream: ours,
        user_id,
        username,
    })
}

/// The answer to a head that could not be read or parsed (`None`: the client left).
fn head_refusal(e: HeadError) -> Option<(&'static str, Refusal)> {
    let version = "HTTP/1.1";
    Some(match e {
        HeadError::Closed => {
            tracing::debug!("client left before sending a request");
            return None;
        }
        HeadError::TooLarge => (version, Refusal::HeadTooLarge),
        HeadError::Timeout => (version, Refusal::HeadTimeout),
        HeadError::BadRequest(why) => (version, Refusal::BadRequest(why.into())),
        HeadError::MethodNotAllowed(version) => (version, Refusal::MethodNotAllowed),
    })
}

/// Answers `refusal` and closes.
pub async fn refuse<C: ClientConn>(client: C, state: &Shared, version: &str, refusal: Refusal) {
    let (status, _, side) = refusal.status();
    tracing::info!(
        status,
        side = side.as_str(),
        "CONNECT refused: {}",
        crate::logsafe::Peer(&refusal.message())
    );
    state
        .metrics
        .proxy_responses
        .with_label_values(&[&status.to_string(), side.as_str()])
        .inc();
    answer_and_close(client, &refusal.response(version)).await;
}

/// Writes a whole error answer and closes, without letting a RST overtake it.
pub async fn answer_and_close<C: ClientConn>(mut client: C, answer: &[u8]) {
    let _ = client.write_all(answer).await;
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

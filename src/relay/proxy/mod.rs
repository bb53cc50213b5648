//! The CONNECT listeners (plain and TLS): admit the connection under the edge caps, read
//! the head, then hand over to [`admit`] (who, where, device stream) and [`tunnel`] (the
//! joined streams and their audit row). [`refusal`] says what each refusal answers.

pub mod admit;
pub mod client;
pub mod owner;
pub mod refusal;
pub mod to_owner;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::DuplexStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::listen::{Accepted, Conn, Listeners};
use super::registry::TunnelKind;
use super::state::Shared;
use crate::proto::connect::{self, HeadError};
pub use client::{refuse, ClientConn, Pending};
pub use refusal::{Refusal, Side};

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
    let mut ask = match admit::Ask::from_head(&head, &state) {
        Ok(ask) => ask,
        Err(refusal) => return refuse(client, &state, version, refusal).await,
    };
    if let Some(tcp) = client.tcp() {
        ask.user = crate::credit::UserQueue::of(&socket2::SockRef::from(tcp));
    }
    // This task keeps the user's socket while the device's link is rebuilt.
    ask.resumable = !C::IN_PROCESS;
    match admit::admit(&ask, peer, &state, pending, kind, id).await {
        Ok(admit::Route::Local(admitted)) => {
            tunnel::run(client, leftover, admitted, &state, received).await
        }
        Ok(admit::Route::Peer(forward)) => {
            to_owner::forward(client, leftover, forward, &state, received).await
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
    /// The account the device's sshd logs users in as, from its hello (`None`: each
    /// user's own cloud username).
    pub ssh_login: Option<String>,
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
    let pending = Pending::take(state, peer.ip())?;
    let received = std::time::Instant::now();
    let route = admit::admit(&ask, peer, state, pending, kind, Some(id.to_owned())).await?;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let tasks = state.tunnel_tasks.clone();
    let state = state.clone();
    let (user_id, username, ssh_login) = match route {
        admit::Route::Local(admitted) => {
            let user = (
                admitted.user_id,
                admitted.username.clone(),
                admitted.ssh_login.clone(),
            );
            tasks.spawn(async move {
                tunnel::run(theirs, BytesMut::new(), admitted, &state, received).await
            });
            user
        }
        admit::Route::Peer(forward) => {
            let span = tunnel::span(&forward.entry.id, &forward.username, &forward.device);
            let owner = to_owner::reach_owner(&forward, &state)
                .instrument(span.clone())
                .await?;
            let user = (
                forward.user_id,
                forward.username.clone(),
                forward.owner.ssh_login.clone(),
            );
            tasks.spawn(
                async move {
                    to_owner::join_owner(theirs, BytesMut::new(), forward, owner, &state, received)
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
        ssh_login,
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

//! The owner side of the peer link between relays of a cluster (PROTOCOL.md §3).
//!
//! The relay a user came to (the *entry*, `proxy/to_owner.rs`) authorizes the CONNECT,
//! then asks the relay that holds the device (the *owner*, this listener) with the same
//! CONNECT request carrying a peer token instead of the user's credential. The owner does
//! not check the policy again (the token says the entry did), enforces its per-device
//! limits, opens the device stream and answers like any CONNECT.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::hop::{self, Checked};
use super::listen::{Accepted, Conn, Listeners};
use super::proxy::admit;
use super::proxy::tunnel;
use super::proxy::{self, Refusal};
use super::state::Shared;
use crate::proto::connect::{self, HeadError, PeerResume};

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
    let checked = match check(&head, &state) {
        Ok(checked) => checked,
        Err(refusal) => return proxy::refuse(stream, &state, head.version, refusal).await,
    };
    // A resumable tunnel's hop is framed (PROTOCOL.md §2e) where the device's session can
    // resume tunnels and obeys credit; otherwise the owner answers as before, raw.
    let ask = match head.resume.as_deref().map(PeerResume::parse) {
        None => None,
        Some(None) => {
            let refusal = Refusal::BadRequest("malformed Cloudlink-Resume".into());
            return proxy::refuse(stream, &state, head.version, refusal).await;
        }
        Some(Some(ask)) => Some(ask),
    };
    let framed = checked.session.resume && checked.session.takes_credit();
    match ask {
        Some(ask) if framed => {
            return hop::serve(stream, leftover, head.version, checked, ask, &state).await;
        }
        Some(PeerResume::Resume { .. }) => {
            let refusal = Refusal::DeviceRefused("its session cannot resume tunnels".into());
            return proxy::refuse(stream, &state, head.version, refusal).await;
        }
        _ => {}
    }
    match admit_peer(checked, head.version, &state).await {
        Ok(admitted) => {
            state.metrics.peer_tunnels_in.inc();
            tunnel::run(stream, leftover, admitted, &state, received).await
        }
        Err(refusal) => proxy::refuse(stream, &state, head.version, refusal).await,
    }
}

/// Checks a peer token against the request line, and that the device is here: the owner
/// never forwards further (no loops).
fn check(head: &connect::ConnectHead, state: &Shared) -> Result<Checked, Refusal> {
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
    let session = state.presence.here(&device).ok_or(Refusal::DeviceOffline)?;
    Ok(Checked {
        claims,
        device,
        port,
        session,
    })
}

/// Opens the device stream of a peer request on this relay.
async fn admit_peer(
    checked: Checked,
    version: &'static str,
    state: &Shared,
) -> Result<admit::Admitted, Refusal> {
    let entry = checked.entry();
    let Checked {
        claims, session, ..
    } = checked;
    // The user is the entry relay's; the peer socket here starts at the least window.
    admit::open_local(
        state,
        &session,
        entry,
        version,
        crate::credit::UserQueue::IN_PROCESS,
        claims.usr,
        false,
        // Raw: the entry did not ask for a resumable tunnel, or the device cannot.
        false,
    )
    .await
}

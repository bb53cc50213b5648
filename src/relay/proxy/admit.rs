//! Admission of one CONNECT: target, credentials, policy, limits, and the device stream.
//! The 200 is sent only after all of it succeeded (PROTOCOL.md §1).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Pending, Refusal};
use crate::auth::policy::{self, Decision};
use crate::auth::Principal;
use crate::proto::connect::{self, ConnectHead};
use crate::proto::frame;
use crate::proto::messages::{OpenReply, RefuseCode, TunnelOpen};
use crate::relay::registry::{LimitHit, TunnelEntry};
use crate::relay::state::Shared;

/// A CONNECT that passed every check, with its device stream open and accepted.
pub struct Admitted {
    /// The request's HTTP version, echoed in the answer.
    pub version: &'static str,
    /// Who asked.
    pub principal: Principal,
    /// The device uuid.
    pub device: String,
    /// The device port.
    pub port: u16,
    /// The tunnel's registry entry (limits, revocation).
    pub entry: Arc<TunnelEntry>,
    /// The device stream, sending half.
    pub send: quinn::SendStream,
    /// The device stream, receiving half.
    pub recv: quinn::RecvStream,
}

/// Checks the request and opens the device stream; any failure is a [`Refusal`]. The
/// connection's [`Pending`] places are given back once the caller has authenticated.
pub async fn admit(
    head: &ConnectHead,
    peer: SocketAddr,
    state: &Arc<Shared>,
    pending: Pending,
) -> Result<Admitted, Refusal> {
    let (device, port) = connect::parse_target(&head.target, &state.config.device_domains)
        .map_err(|e| Refusal::BadRequest(e.to_string()))?;
    let token = head.token.as_deref().ok_or(Refusal::AuthRequired)?;
    let principal = match authorize(state, token, &device, port).await? {
        Decision::Allow { principal, .. } => principal,
        Decision::Unauthenticated => {
            state.metrics.auth_failures.inc();
            // Only a failed credential is ever throttled; a valid one from the same
            // address went through above, whatever the address did before.
            return Err(match state.auth_failures.record(peer.ip()) {
                Some(wait) => Refusal::TooMany(wait.as_secs().max(1), "failed attempts"),
                None => Refusal::AuthRequired,
            });
        }
        Decision::Forbidden => return Err(Refusal::Forbidden),
    };
    drop(pending);
    state.record_key_use(&principal);
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
        .admit_tunnel(entry.clone(), limits)
        .map_err(|hit| {
            Refusal::TooMany(
                1,
                match hit {
                    LimitHit::User => "open tunnels for this user",
                    LimitHit::UserDevice => "open tunnels from this user to this device",
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
                    "nothing accepts connections on port {} ({})",
                    open.port,
                    crate::logsafe::Peer(&message)
                ),
                RefuseCode::Forbidden => format!("port {} is not allowed by the device", open.port),
            })),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Refusal::DeviceTimeout)?
}

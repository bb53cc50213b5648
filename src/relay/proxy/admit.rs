//! Admission of one CONNECT: target, credentials, policy, limits, and the route to the
//! device: a stream on this relay's session with it, or the peer link to the relay that
//! holds it. The 200 is sent only after all of it succeeded (PROTOCOL.md §1).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::client::Pending;
use super::refusal::Refusal;
use crate::auth::policy::{self, Decision};
use crate::credit::UserQueue;
use crate::link::device::{DeviceLink, OpenError};
use crate::link::{LinkRecv, LinkSend};
use crate::proto::connect::{self, ConnectHead};
use crate::proto::messages::{RefuseCode, TunnelOpen};
use crate::relay::presence::{DeviceSession, SessionTunnel, Where};
use crate::relay::registry::{LimitHit, Proof, TunnelEntry, TunnelKind};
use crate::relay::state::Shared;
use crate::store::{Id, Presence};

/// A tunnel whose device stream is open and accepted on this relay.
pub struct Admitted {
    /// The request's HTTP version, echoed in the answer.
    pub version: &'static str,
    /// Who asked.
    pub user_id: Id,
    /// Their name (audit row, logs).
    pub username: String,
    /// The device uuid.
    pub device: String,
    /// The device port.
    pub port: u16,
    /// The tunnel's registry entry (limits, revocation).
    pub entry: Arc<TunnelEntry>,
    /// The device stream, sending half.
    pub send: LinkSend,
    /// The device stream, receiving half.
    pub recv: LinkRecv,
    /// The tunnel's place on its device session (a superseded session waits for it).
    pub on_session: SessionTunnel,
    /// The account the device's sshd logs users in as, from its hello (`None`: each
    /// user's own cloud username).
    pub ssh_login: Option<String>,
    /// Whether this relay writes the audit row: not for a tunnel that came over the peer
    /// link (the relay the user came to writes it, once).
    pub audited: bool,
    /// The tunnel's share of the relay's tunnel buffer (PROTOCOL.md §2d).
    pub credit: TunnelCredit,
    /// Whether the tunnel outlives its device link (PROTOCOL.md §2e).
    pub resumable: bool,
}

/// A tunnel's share of the relay's tunnel buffer.
pub enum TunnelCredit {
    /// The agent obeys credit: the grant, which draws on the budget as it goes.
    Grant(crate::credit::Grant),
    /// An agent without credit: the transport's whole window, held while the tunnel runs.
    Reserved(crate::credit::Reservation),
}

/// A tunnel to a device held by another relay, authorized here, to be forwarded.
pub struct Forward {
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
    /// The tunnel's registry entry here (per-user limits, revocation).
    pub entry: Arc<TunnelEntry>,
    /// Where the device is.
    pub owner: Presence,
    /// The user's socket's send queue at admission (the first credit window of a framed
    /// hop, PROTOCOL.md §2e).
    pub user: UserQueue,
    /// Whether the caller keeps the user's socket through the loss of the device's link.
    pub resumable: bool,
}

/// What is asked for, however the request arrived (a CONNECT head, the terminal).
pub struct Ask {
    /// The device uuid.
    pub device: String,
    /// The device port.
    pub port: u16,
    /// The credential presented.
    pub proof: Proof,
    /// The request's HTTP version, echoed in the answer.
    pub version: &'static str,
    /// The user's socket's send queue at admission, which sizes the tunnel's first
    /// credit window; [`UserQueue::IN_PROCESS`] for a user inside the relay.
    pub user: UserQueue,
    /// Whether the caller keeps the user's socket through the loss of the device's link
    /// (a CONNECT user, PROTOCOL.md §2e): the tunnel is then resumable where the device's
    /// session allows it.
    pub resumable: bool,
}

impl Ask {
    /// What a CONNECT head asks for: its target (the balena forms included) and its
    /// credential.
    pub fn from_head(head: &ConnectHead, state: &Shared) -> Result<Ask, Refusal> {
        let (device, port) = connect::parse_target(&head.target, &state.config.device_domains)
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let token = head.token.clone().ok_or(Refusal::AuthRequired)?;
        Ok(Ask {
            device,
            port,
            proof: Proof::Token(token),
            version: head.version,
            user: UserQueue::IN_PROCESS,
            resumable: false,
        })
    }
}

/// Where an admitted request goes.
pub enum Route {
    /// The device is connected here.
    Local(Admitted),
    /// The device is connected to another relay of the cluster.
    Peer(Forward),
}

/// The one admission of a tunnel, for the CONNECT listeners and the terminal alike:
/// credentials (failures throttled), the reach policy, the limits, and the route to the
/// device; any failure is a [`Refusal`]. The connection's [`Pending`] places are given
/// back once the caller has authenticated. `id` names the tunnel when its opener must find
/// it in the registry (the terminal).
pub async fn admit(
    ask: &Ask,
    peer: SocketAddr,
    state: &Arc<Shared>,
    pending: Pending,
    kind: TunnelKind,
    id: Option<String>,
) -> Result<Route, Refusal> {
    let route = admit_route(ask, peer, state, pending, kind, id).await;
    if route.is_ok() {
        state
            .metrics
            .tunnels_admitted
            .with_label_values(&[kind.as_str()])
            .inc();
    }
    route
}

async fn admit_route(
    ask: &Ask,
    peer: SocketAddr,
    state: &Arc<Shared>,
    pending: Pending,
    kind: TunnelKind,
    id: Option<String>,
) -> Result<Route, Refusal> {
    let (device, port) = (ask.device.clone(), ask.port);
    let principal = match authorize(state, &ask.proof, &device, port).await? {
        Decision::Allow { principal, .. } => principal,
        Decision::Unauthenticated => {
            return Err(match state.auth_failed(Some(peer.ip())) {
                Some(secs) => Refusal::TooMany(secs, "failed attempts"),
                None => Refusal::AuthRequired,
            });
        }
        Decision::Forbidden => return Err(Refusal::Forbidden),
    };
    drop(pending);
    state.record_key_use(&principal);
    let user_id = principal.user.id;
    let username = principal.user.username;
    let entry = new_entry(user_id, &device, port, ask.proof.clone(), id, kind);
    let owner = match state.presence.locate(&device).await {
        Ok(Where::Here(session)) => {
            return open_local(
                state,
                &session,
                entry,
                ask.version,
                ask.user,
                username,
                true,
                ask.resumable,
            )
            .await
            .map(Route::Local);
        }
        Ok(Where::Elsewhere(owner)) => owner,
        Ok(Where::Offline) => return Err(Refusal::DeviceOffline),
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up where a device is");
            return Err(Refusal::StoreUnavailable);
        }
    };
    admit_entry(state, &entry)?;
    Ok(Route::Peer(Forward {
        version: ask.version,
        user_id,
        username,
        device,
        port,
        entry,
        owner,
        user: ask.user,
        resumable: ask.resumable,
    }))
}

/// A registry entry for a new tunnel. `id` is given for tunnels that came over the peer
/// link (the entry relay's tunnel id, so both relays' logs name the same tunnel).
pub fn new_entry(
    user_id: Id,
    device: &str,
    port: u16,
    proof: Proof,
    id: Option<String>,
    kind: TunnelKind,
) -> Arc<TunnelEntry> {
    Arc::new(TunnelEntry {
        id: id.unwrap_or_else(crate::auth::tokens::new_device_uuid),
        user_id,
        device: device.to_owned(),
        port,
        proof,
        kind,
        // Not a child of the shutdown token: open tunnels run on through the grace period.
        cancel: CancellationToken::new(),
        reason: OnceLock::new(),
        counters: Default::default(),
    })
}

/// Counts the tunnel under the limits, or refuses with 429.
pub fn admit_entry(state: &Shared, entry: &Arc<TunnelEntry>) -> Result<(), Refusal> {
    state
        .registry
        .admit_tunnel(entry.clone(), &state.config.limits)
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
        })
}

/// Admits `entry` under the limits and opens its stream on the device's session here.
// The user's side in four values (version, queue, name, resumable), as its callers hold
// them; a struct for one call would only restate them.
#[allow(clippy::too_many_arguments)]
pub async fn open_local(
    state: &Shared,
    session: &Arc<DeviceSession>,
    entry: Arc<TunnelEntry>,
    version: &'static str,
    user: UserQueue,
    username: String,
    audited: bool,
    resumable: bool,
) -> Result<Admitted, Refusal> {
    admit_entry(state, &entry)?;
    let resumable = resumable && session.resume;
    let limits = &state.config.limits;
    let credit = if session.takes_credit() {
        TunnelCredit::Grant(crate::credit::Grant::open_for(
            &entry.id,
            session.credit.clone(),
            state.budget.clone(),
            user,
        ))
    } else {
        match crate::credit::Reservation::take(&state.budget, crate::credit::MAX_WINDOW) {
            Some(held) => TunnelCredit::Reserved(held),
            None => {
                state.registry.remove_tunnel(&entry.id);
                return Err(Refusal::RelayBusy);
            }
        }
    };
    let open = TunnelOpen {
        port: entry.port,
        tunnel: entry.id.clone(),
        user: username.clone(),
        credit: match &credit {
            TunnelCredit::Grant(grant) => Some(grant.limit()),
            TunnelCredit::Reserved(_) => None,
        },
        resume: resumable,
    };
    let on_session = session.tunnel(resumable);
    match open_stream(
        &session.link,
        &open,
        limits.open_timeout(),
        limits.frame_max_bytes,
    )
    .await
    {
        Ok((send, recv)) => Ok(Admitted {
            version,
            user_id: entry.user_id,
            username,
            device: entry.device.clone(),
            port: entry.port,
            entry,
            send,
            recv,
            on_session,
            ssh_login: session.ssh_login.clone(),
            audited,
            credit,
            resumable,
        }),
        Err(refusal) => {
            state.registry.remove_tunnel(&entry.id);
            Err(refusal)
        }
    }
}

/// Authorizes `proof` for `device:port`, tokens through the short-lived cache.
async fn authorize(
    state: &Shared,
    proof: &Proof,
    device: &str,
    port: u16,
) -> Result<Decision, Refusal> {
    let unavailable = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "cannot authorize a tunnel");
        Refusal::StoreUnavailable
    };
    let store = state.store.as_ref();
    let token = match proof {
        Proof::Token(token) => token,
        Proof::SshKey { user, key } => {
            return match policy::ssh_key_principal(store, *user, *key).await {
                Ok(Some(principal)) => policy::may_reach(store, principal, device, port)
                    .await
                    .map_err(unavailable),
                Ok(None) => Ok(Decision::Unauthenticated),
                Err(e) => Err(unavailable(e)),
            };
        }
        Proof::Peer => return Ok(Decision::Unauthenticated),
    };
    let key = (token.to_owned(), device.to_owned(), port);
    if let Some(decision) = state.auth_cache.get(&key) {
        return Ok(decision);
    }
    let decision = policy::authorize(store, &state.jwt, token, device, port)
        .await
        .map_err(unavailable)?;
    if matches!(decision, Decision::Allow { .. }) {
        state.auth_cache.put(key, decision.clone());
    }
    Ok(decision)
}

/// Opens a tunnel stream on the device's link and waits for the device's answer.
pub async fn open_stream(
    link: &DeviceLink,
    open: &TunnelOpen,
    timeout: Duration,
    max_frame: usize,
) -> Result<(LinkSend, LinkRecv), Refusal> {
    let opened = tokio::time::timeout(timeout, link.open_tunnel(open, max_frame))
        .await
        .map_err(|_| Refusal::DeviceTimeout)?;
    opened.map_err(|e| match e {
        OpenError::Offline => Refusal::DeviceOffline,
        OpenError::Bad(e) => Refusal::DeviceRefused(format!(
            "bad answer from the agent ({})",
            crate::logsafe::Peer(&e)
        )),
        OpenError::Refused(RefuseCode::Connect, message) => Refusal::DeviceRefused(format!(
            "nothing accepts connections on port {} ({})",
            open.port,
            crate::logsafe::Peer(&message)
        )),
        OpenError::Refused(RefuseCode::Forbidden, _) => {
            Refusal::DeviceRefused(format!("port {} is not allowed by the device", open.port))
        }
        // Only a `resume` is answered `gone`; to an `open` it makes no sense.
        OpenError::Refused(RefuseCode::Gone, _) => {
            Refusal::DeviceRefused("bad answer from the agent (gone)".into())
        }
    })
}

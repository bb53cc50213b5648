//! Device sessions: the listeners devices dial (QUIC in `quic.rs`, TLS over TCP with HTTP/2
//! streams in `tcp.rs`) and what a session is once its hello is accepted, whichever
//! transport carries it.
//!
//! Everything above this module (admission, presence, limits, forwarding, audit) sees a
//! [`crate::link::device::DeviceLink`] that opens tunnel streams and never asks which
//! transport it is.

pub mod quic;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::presence::DeviceSession;
use super::state::Shared;
use crate::auth::tokens;
use crate::auth::KeyMatch;
use crate::link::device::DeviceLink;
use crate::proto::messages::VERSION;
use crate::proto::messages::{codes, Hello, RejectCode, RelayControl};
use crate::proto::{frame, ProtoError};
use crate::store::StoreError;

/// How long after `drain` devices are asked to have reconnected elsewhere.
const DRAIN_RECONNECT_MS: u64 = 5_000;

/// When the relay starts draining, tells every connected device (on either link) to
/// `drain`: reconnect elsewhere, keeping open tunnels. From then on both listeners reject
/// new hellos with `draining` ([`accept_hello`]), so a device that lands here again through
/// a load balancer moves on at once.
pub async fn announce_drain(state: Arc<Shared>) {
    tokio::select! {
        _ = state.draining.cancelled() => {}
        _ = state.shutdown.cancelled() => return,
    }
    for device in state.presence.sessions() {
        let _ = device.control.try_send(RelayControl::Drain {
            reconnect_ms: DRAIN_RECONNECT_MS,
        });
    }
}

/// Why a hello failed, and how the connection is closed for it.
pub enum HelloFailure {
    /// No hello within the hello timeout.
    Timeout,
    /// Not a hello, or a malformed one.
    Protocol(ProtoError),
    /// A hello the relay says no to, with a `reject` frame.
    Reject(RejectCode, &'static str),
    /// The store could not be asked.
    Store(StoreError),
}

impl HelloFailure {
    /// Counts and logs the failure; the transport closes the connection.
    fn record(&self, state: &Shared) {
        let label = match self {
            HelloFailure::Timeout => {
                tracing::info!("no hello in time; closing");
                "timeout"
            }
            HelloFailure::Protocol(e) => {
                tracing::info!(error = %crate::logsafe::Peer(&e.to_string()), "bad hello; closing");
                "protocol"
            }
            HelloFailure::Store(e) => {
                tracing::warn!(error = %e, "cannot check a device hello");
                "unavailable"
            }
            HelloFailure::Reject(code, _) => {
                tracing::info!(code = code.as_str(), "hello rejected");
                code.as_str()
            }
        };
        state
            .metrics
            .device_rejects
            .with_label_values(&[label])
            .inc();
    }
}

/// Decides on a hello: the draining check, its fields, version and key. Returns the
/// normalised uuid; a hello with the new key after a rotation retires the old one.
async fn accept_hello(state: &Shared, hello: &Hello) -> Result<String, HelloFailure> {
    if state.draining.is_cancelled() {
        return Err(HelloFailure::Reject(
            RejectCode::Draining,
            "this relay is draining; connect to another one",
        ));
    }
    hello
        .check_fields()
        .map_err(|e| HelloFailure::Protocol(ProtoError::Unexpected(e)))?;
    if hello.version != VERSION {
        return Err(HelloFailure::Reject(
            RejectCode::Version,
            "this relay speaks protocol version 1",
        ));
    }
    let unauthorized = HelloFailure::Reject(
        RejectCode::Unauthorized,
        "unknown device or wrong device key",
    );
    let Some(uuid) = crate::proto::device_uuid(&hello.uuid) else {
        return Err(unauthorized);
    };
    let device = state
        .store
        .device(&uuid)
        .await
        .map_err(HelloFailure::Store)?;
    let hash = tokens::hash_secret(&hello.key);
    let rotating = device.as_ref().is_some_and(|d| d.prev_key_hash.is_some());
    match device.and_then(|d| crate::auth::device_key_matches(&d, &hash, crate::store::now_ms())) {
        Some(KeyMatch::Current) => {
            // After a rotation, the first hello with the new key retires the old one.
            // (Only then: a write per hello would serialize a fleet's reconnects.)
            if rotating {
                if let Err(e) = state.store.forget_previous_device_key(&uuid).await {
                    tracing::warn!(device = %uuid, error = %e, "cannot retire the previous device key");
                }
            }
            Ok(uuid)
        }
        Some(KeyMatch::Previous) => {
            tracing::info!(device = %uuid, "device connected with its previous key (rotation grace period)");
            Ok(uuid)
        }
        None => Err(unauthorized),
    }
}

/// A session's control channel to its agent, as each transport carries it.
pub trait Control: Send {
    /// Sends one control frame; false if the channel is gone.
    fn send(&mut self, msg: &RelayControl) -> impl std::future::Future<Output = bool> + Send;
    /// Resolves when the link has ended, with why.
    fn ended(&mut self) -> impl std::future::Future<Output = String> + Send;
    /// Ends the control channel and waits briefly until the agent has read it, so that a
    /// last message is not lost to the close that follows.
    fn finish(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// A session in presence: tunnels can reach it.
pub struct Registered {
    device: Arc<DeviceSession>,
    messages: mpsc::Receiver<RelayControl>,
}

/// Makes an accepted session its device's session in presence (before the agent hears
/// that it is connected, so that "connected" means reachable).
async fn register(
    state: &Arc<Shared>,
    uuid: String,
    session_id: String,
    hello: &Hello,
    link: DeviceLink,
) -> Registered {
    let transport = link.transport();
    let (control_tx, messages) = mpsc::channel(4);
    let device = Arc::new(DeviceSession {
        uuid: uuid.clone(),
        session: session_id,
        link,
        control: control_tx,
        ssh_login: hello.ssh_login.clone(),
        features: hello.features.clone(),
        credit: Default::default(),
        tunnels: Default::default(),
        fixed: Default::default(),
        tunnel_ended: Default::default(),
        resume: state.resumes()
            && crate::proto::messages::features::has(
                &hello.features,
                crate::proto::messages::features::RESUME,
            ),
        acks: Default::default(),
        lost: CancellationToken::new(),
        superseded: CancellationToken::new(),
        keep_alive: hello
            .keep_alive_ms
            .map(|ms| Duration::from_millis(ms.max(1000))),
        reconnecting: Default::default(),
        since: std::time::Instant::now(),
    });
    state.presence.claim(device.clone()).await;
    state
        .metrics
        .device_hellos
        .with_label_values(&[transport.as_str()])
        .inc();
    tracing::info!(
        device = %uuid,
        %transport,
        agent = %crate::logsafe::Peer(&hello.agent),
        features = %hello.features.join(","),
        "device connected"
    );
    Registered { device, messages }
}

/// Serves a registered session until its link ends, then unregisters it.
async fn run_session<C: Control>(state: &Arc<Shared>, mut registered: Registered, mut control: C) {
    watch_silence(state, &registered.device);
    let reason = serve(
        &registered.device,
        &mut control,
        &mut registered.messages,
        state,
    )
    .await;
    unregister(state, &registered, &reason).await;
}

/// Reports the session's device `reconnecting` while its link is silent for longer than
/// the agent's keep-alive allows, and `online` again once it is heard (PROTOCOL.md §2e,
/// "Presence"), until the session ends. It looks every tenth of that time (1 to 5 s), so
/// a relay with many devices wakes for each only now and then.
fn watch_silence(state: &Arc<Shared>, device: &Arc<DeviceSession>) {
    use crate::store::PresenceState;
    let Some(after) = device.silent_after() else {
        return;
    };
    let every = (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(5));
    let (presence, device) = (state.presence.clone(), device.clone());
    tokio::spawn(async move {
        let mut heard = device.link.heard();
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = device.lost.cancelled() => return,
            }
            let now = device.link.heard();
            if now != heard {
                (heard, since) = (now, tokio::time::Instant::now());
                presence.mark(&device, PresenceState::Online).await;
            } else if since.elapsed() >= after {
                presence.mark(&device, PresenceState::Reconnecting).await;
            }
        }
    });
}

/// Takes a session out of presence.
async fn unregister(state: &Shared, registered: &Registered, reason: &str) {
    let device = &registered.device;
    // Its resumable tunnels wait for the device's next session from now.
    device.lost.cancel();
    state
        .presence
        .release(device, state.shutdown.is_cancelled())
        .await;
    let class = super::metrics::disconnect_reason(reason, state.draining.is_cancelled());
    state
        .metrics
        .device_disconnects
        .with_label_values(&[class])
        .inc();
    tracing::info!(device = %device.uuid, reason = %crate::logsafe::Peer(reason), "device disconnected");
}

/// Runs a session until its link ends: forwards control messages and tunnel credit to the
/// agent. A superseded session tells the agent `replaced`, then lets its open tunnels
/// finish before closing (still granting them credit meanwhile).
async fn serve<C: Control>(
    device: &DeviceSession,
    control: &mut C,
    messages: &mut mpsc::Receiver<RelayControl>,
    state: &Shared,
) -> String {
    let mut credit = Vec::new();
    let mut acks = Vec::new();
    loop {
        tokio::select! {
            reason = control.ended() => return reason,
            _ = device.credit.next(&mut credit) => {
                if !send_credit(control, &mut credit).await {
                    return control.ended().await;
                }
            }
            _ = device.acks.next(&mut acks) => {
                if !send_acks(control, &mut acks).await {
                    return control.ended().await;
                }
            }
            msg = messages.recv() => match msg {
                Some(RelayControl::Replaced) => {
                    control.send(&RelayControl::Replaced).await;
                    let grace = Duration::from_secs(state.config.limits.shutdown_grace_secs);
                    let done = tokio::time::timeout(grace, device.tunnels_done());
                    tokio::pin!(done);
                    loop {
                        tokio::select! {
                            _ = &mut done => break,
                            _ = control.ended() => break,
                            _ = device.credit.next(&mut credit) => {
                                if !send_credit(control, &mut credit).await {
                                    break;
                                }
                            }
                            _ = device.acks.next(&mut acks) => {
                                if !send_acks(control, &mut acks).await {
                                    break;
                                }
                            }
                        }
                    }
                    control.finish().await;
                    device.link.close(codes::REPLACED, "replaced by a newer session");
                    return "replaced by a newer session".into();
                }
                Some(msg) => {
                    if !control.send(&msg).await {
                        return control.ended().await;
                    }
                }
                None => return "session closed".into(),
            },
        }
    }
}

/// Sends the new limits of a session's tunnels, one `credit` frame each; false if the
/// control channel is gone.
async fn send_credit<C: Control>(control: &mut C, batch: &mut Vec<(Arc<str>, u64)>) -> bool {
    for (tunnel, limit) in batch.drain(..) {
        let msg = RelayControl::Credit {
            tunnel: tunnel.to_string(),
            limit,
        };
        if !control.send(&msg).await {
            return false;
        }
    }
    true
}

/// Sends the relay's acks of a session's resumable tunnels (PROTOCOL.md §2e), one `ack`
/// frame each; false if the control channel is gone.
async fn send_acks<C: Control>(control: &mut C, batch: &mut Vec<(Arc<str>, (u64, bool))>) -> bool {
    for (tunnel, (written, fin)) in batch.drain(..) {
        let msg = RelayControl::Ack {
            tunnel: tunnel.to_string(),
            written,
            fin,
        };
        if !control.send(&msg).await {
            return false;
        }
    }
    true
}

/// Reads the agent's side of the control stream after `welcome`: its acks of resumable
/// tunnels (PROTOCOL.md §2e) raise their tunnels on `acks`. Runs until the stream ends or
/// breaks the framing; `done` fires then.
async fn read_agent_control<R: tokio::io::AsyncRead + Unpin>(
    mut recv: R,
    acks: Arc<crate::resume::AckBoard>,
    max_frame: usize,
    done: CancellationToken,
) {
    use crate::proto::messages::AgentControl;
    loop {
        match frame::read::<_, serde_json::Value>(&mut recv, max_frame).await {
            Ok(Some(msg)) => match serde_json::from_value::<AgentControl>(msg) {
                Ok(AgentControl::Ack {
                    tunnel,
                    written,
                    fin,
                }) => acks.raise(&tunnel, written, fin),
                // A message of a newer agent this relay does not know: ignored, as the
                // features rule asks (PROTOCOL.md §2).
                Err(e) => tracing::debug!(error = %e, "ignoring a control message from the agent"),
            },
            Ok(None) => break,
            Err(e) => {
                tracing::info!(error = %crate::logsafe::Peer(&e.to_string()), "bad control frame from the agent");
                break;
            }
        }
    }
    done.cancel();
}

/// Encodes a control frame for a byte stream.
fn control_frame(msg: &RelayControl) -> Bytes {
    Bytes::from(frame::encode(msg))
}

//! The QUIC listener devices dial, and each device's session on it.

use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::registry::DeviceSession;
use super::state::Shared;
use crate::auth::tokens;
use crate::proto::messages::{codes, Hello, RejectCode, RelayControl, VERSION};
use crate::proto::{frame, ProtoError};
use crate::store::{KeyMatch, StoreError};

/// How long after `drain` devices are asked to have reconnected elsewhere.
const DRAIN_RECONNECT_MS: u64 = 5_000;

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

/// Accepts device connections until shutdown. When the relay starts draining it tells
/// every device to `drain` (reconnect elsewhere, keeping open tunnels) and from then on
/// rejects new hellos with `draining`, so a device that lands here again through a load
/// balancer moves on at once. At shutdown the endpoint closes whatever is still open.
pub async fn run(endpoint: quinn::Endpoint, state: Arc<Shared>) {
    let tracker = TaskTracker::new();
    let mut drain_sent = false;
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            _ = state.draining.cancelled(), if !drain_sent => {
                drain_sent = true;
                for device in state.registry.devices() {
                    let _ = device.control.try_send(RelayControl::Drain {
                        reconnect_ms: DRAIN_RECONNECT_MS,
                    });
                }
                continue;
            }
            _ = state.shutdown.cancelled() => break,
        };
        match admission(&endpoint, &incoming, &state) {
            Admission::Accept => {}
            Admission::Retry => {
                state
                    .metrics
                    .quic_admissions
                    .with_label_values(&["retry"])
                    .inc();
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Admission::Refuse => {
                state
                    .metrics
                    .quic_admissions
                    .with_label_values(&["refuse"])
                    .inc();
                incoming.refuse();
                continue;
            }
        }
        state
            .metrics
            .quic_admissions
            .with_label_values(&["accept"])
            .inc();
        let span = tracing::info_span!(
            "device",
            remote = %incoming.remote_address(),
            device = tracing::field::Empty
        );
        tracker.spawn(session(incoming, state.clone()).instrument(span));
    }
    endpoint.set_server_config(None);
    endpoint.close(VarInt::from_u32(codes::SHUTDOWN), b"relay shutting down");
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}

/// Takes `old` out of service because a newer session of its device exists (on this relay
/// or another): it gets no new tunnels, hears `replaced`, and closes once its open tunnels
/// have ended (or the grace period passed).
pub fn supersede(state: &Shared, old: &DeviceSession) {
    state.metrics.presence_conflicts.inc();
    tracing::info!(device = %old.uuid, session = %old.session, "session superseded by a newer one");
    if old.control.try_send(RelayControl::Replaced).is_err() {
        // Its loop is gone or stuck: nothing left to wait for.
        close(&old.conn, codes::REPLACED, "replaced by a newer session");
    }
}

/// Supersedes local sessions whose device has connected elsewhere since (PROTOCOL.md §2):
/// presence changes come from every relay through the store (Postgres `LISTEN/NOTIFY`).
pub async fn watch_presence(state: Arc<Shared>) {
    let mut changes = state.store.presence_changes();
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = state.shutdown.cancelled() => return,
        };
        match change {
            Ok(change) => {
                state.owners.remove(&change.device_uuid);
                if let Some(old) = state
                    .registry
                    .supersede(&change.device_uuid, &change.session)
                {
                    state.metrics.devices_connected.dec();
                    supersede(&state, &old);
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "presence changes came faster than handled");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// What the listener does with a new connection, before any handshake work.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// Start the handshake.
    Accept,
    /// Send a stateless Retry: the client must prove it receives at its address first.
    Retry,
    /// Refuse at once (CONNECTION_REFUSED), cheaply.
    Refuse,
}

/// Admission by open connections (as quinn's server example does): refuse past
/// `max_devices` or past `handshakes_max` handshakes in flight (a storm of reconnecting
/// devices is served as fast as it can be finished, the rest back off and come again);
/// while more than `quic_retry_above_pending` handshakes are in progress, make addresses
/// that have not been validated prove themselves with a Retry, so a flood of spoofed
/// Initials costs us one stateless packet each instead of connection state.
fn admission(endpoint: &quinn::Endpoint, incoming: &quinn::Incoming, state: &Shared) -> Admission {
    let limits = &state.config.limits;
    let open = endpoint.open_connections();
    if open >= limits.max_devices {
        return Admission::Refuse;
    }
    let pending = open.saturating_sub(state.registry.device_count());
    if pending >= limits.handshakes_max {
        return Admission::Refuse;
    }
    if pending >= limits.quic_retry_above_pending && !incoming.remote_address_validated() {
        return Admission::Retry;
    }
    Admission::Accept
}

/// Why a hello failed, and how the connection is closed for it.
enum HelloFailure {
    Timeout,
    Protocol(ProtoError),
    Reject(RejectCode, &'static str),
    Store(StoreError),
}

/// Accepts the control stream and reads the hello, within the hello timeout.
async fn read_hello(
    conn: &quinn::Connection,
    state: &Shared,
) -> Result<(quinn::SendStream, quinn::RecvStream, Hello), HelloFailure> {
    let limits = &state.config.limits;
    let read = async {
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| HelloFailure::Protocol(ProtoError::Io(e.into())))?;
        let hello: Hello = frame::read_required(&mut recv, limits.frame_max_bytes)
            .await
            .map_err(HelloFailure::Protocol)?;
        Ok((send, recv, hello))
    };
    tokio::time::timeout(limits.hello_timeout(), read)
        .await
        .map_err(|_| HelloFailure::Timeout)?
}

/// Checks a hello's fields, version and key; returns the normalised uuid, which of the
/// device's keys it used, and whether the device is in a key rotation.
async fn check_hello(
    state: &Shared,
    hello: &Hello,
) -> Result<(String, KeyMatch, bool), HelloFailure> {
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
    match device.and_then(|d| d.key_matches(&hash, crate::store::now_ms())) {
        Some(which) => Ok((uuid, which, rotating)),
        None => Err(unauthorized),
    }
}

/// Finishes the control stream and waits (briefly) until the agent has read it, so that a
/// last message is not lost to the connection close that follows.
async fn finish_control(send: &mut quinn::SendStream) {
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

async fn session(incoming: quinn::Incoming, state: Arc<Shared>) {
    let hello_timeout = state.config.limits.hello_timeout();
    let conn = match tokio::time::timeout(hello_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    let (mut send, recv, hello) = match read_hello(&conn, &state).await {
        Ok(ok) => ok,
        Err(failure) => return refuse(&conn, &state, None, failure).await,
    };
    let checked = if state.draining.is_cancelled() {
        Err(HelloFailure::Reject(
            RejectCode::Draining,
            "this relay is draining; connect to another one",
        ))
    } else {
        check_hello(&state, &hello).await
    };
    let (uuid, key, rotating) = match checked {
        Ok(found) => found,
        Err(failure) => return refuse(&conn, &state, Some(&mut send), failure).await,
    };
    if key == KeyMatch::Current {
        // After a rotation, the first hello with the new key retires the old one. (Only
        // then: a write per hello would serialize a fleet's reconnects on the store.)
        if rotating {
            if let Err(e) = state.store.forget_previous_device_key(&uuid).await {
                tracing::warn!(device = %uuid, error = %e, "cannot retire the previous device key");
            }
        }
    } else {
        tracing::info!(device = %uuid, "device connected with its previous key (rotation grace period)");
    }
    tracing::Span::current().record("device", uuid.as_str());
    let session_id = tokens::new_device_uuid();
    let (control_tx, mut control_rx) = mpsc::channel(4);
    let device = Arc::new(DeviceSession {
        uuid: uuid.clone(),
        session: session_id.clone(),
        conn: conn.clone(),
        control: control_tx,
        tunnels: Default::default(),
        tunnel_ended: Default::default(),
    });
    match state.registry.insert_device(device.clone()) {
        Some(old) => supersede(&state, &old),
        None => state.metrics.devices_connected.inc(),
    }
    if let Err(e) = state
        .store
        .set_presence(&uuid, &state.relay_id, &session_id)
        .await
    {
        tracing::warn!(device = %uuid, error = %e, "cannot record presence; the device is reachable here anyway");
    }
    let welcome = RelayControl::Welcome {
        relay: state.relay_id.clone(),
        session: session_id.clone(),
    };
    if frame::write(&mut send, &welcome).await.is_ok() {
        state.metrics.device_hellos.inc();
        tracing::info!(device = %uuid, agent = %crate::logsafe::Peer(&hello.agent), "device connected");
        serve(&device, send, recv, &mut control_rx, &state).await;
    }
    if state.registry.remove_device(&uuid, &session_id) {
        state.metrics.devices_connected.dec();
    }
    // At shutdown the relay removes all of its presence rows in one statement; one write
    // per device here would only hold up the exit.
    if !state.shutdown.is_cancelled() {
        if let Err(e) = state.store.clear_presence(&uuid, &session_id).await {
            tracing::warn!(device = %uuid, error = %e, "cannot clear presence");
        }
    }
    let reason = conn
        .close_reason()
        .map(|r| r.to_string())
        .unwrap_or_default();
    tracing::info!(device = %uuid, reason = %crate::logsafe::Peer(&reason), "device disconnected");
}

/// Runs a session until its connection ends: forwards control messages to the agent and
/// refuses any stream the device opens (only the relay opens tunnel streams). A superseded
/// session tells the agent `replaced`, then lets its open tunnels finish before closing.
async fn serve(
    device: &DeviceSession,
    mut send: quinn::SendStream,
    _recv: quinn::RecvStream,
    control: &mut mpsc::Receiver<RelayControl>,
    state: &Shared,
) {
    let conn = &device.conn;
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((mut s, mut r)) => {
                    tracing::warn!("device opened a stream of its own; refused");
                    let _ = s.reset(VarInt::from_u32(codes::STREAM_REFUSED));
                    let _ = r.stop(VarInt::from_u32(codes::STREAM_REFUSED));
                }
                Err(_) => return,
            },
            msg = control.recv() => match msg {
                Some(RelayControl::Replaced) => {
                    let _ = frame::write(&mut send, &RelayControl::Replaced).await;
                    let grace = Duration::from_secs(state.config.limits.shutdown_grace_secs);
                    tokio::select! {
                        _ = tokio::time::timeout(grace, device.tunnels_done()) => {}
                        _ = conn.closed() => {}
                    }
                    finish_control(&mut send).await;
                    close(conn, codes::REPLACED, "replaced by a newer session");
                    return;
                }
                Some(msg) => {
                    if frame::write(&mut send, &msg).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

async fn refuse(
    conn: &quinn::Connection,
    state: &Shared,
    control: Option<&mut quinn::SendStream>,
    failure: HelloFailure,
) {
    match failure {
        HelloFailure::Timeout => {
            tracing::info!("no hello in time; closing");
            state
                .metrics
                .device_rejects
                .with_label_values(&["timeout"])
                .inc();
            close(conn, codes::HELLO_TIMEOUT, "hello timeout");
        }
        HelloFailure::Protocol(e) => {
            tracing::info!(error = %crate::logsafe::Peer(&e.to_string()), "bad hello; closing");
            state
                .metrics
                .device_rejects
                .with_label_values(&["protocol"])
                .inc();
            close(conn, codes::PROTOCOL, &e.to_string());
        }
        HelloFailure::Store(e) => {
            tracing::warn!(error = %e, "cannot check a device hello");
            state
                .metrics
                .device_rejects
                .with_label_values(&["unavailable"])
                .inc();
            close(
                conn,
                codes::UNAVAILABLE,
                "relay store unavailable; retry later",
            );
        }
        HelloFailure::Reject(code, message) => {
            tracing::info!(code = code.as_str(), "hello rejected");
            state
                .metrics
                .device_rejects
                .with_label_values(&[code.as_str()])
                .inc();
            if let Some(send) = control {
                let reject = RelayControl::Reject {
                    code,
                    message: message.to_owned(),
                };
                if frame::write(send, &reject).await.is_ok() {
                    finish_control(send).await;
                }
            }
            close(conn, codes::REJECTED, message);
        }
    }
}

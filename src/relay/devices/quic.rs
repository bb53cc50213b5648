//! The QUIC device listener (PROTOCOL.md §2): admission, the hello on the first stream,
//! and the control stream of a session.

use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{accept_hello, control_frame, read_agent_control, register, run_session, unregister};
use super::{Control, HelloFailure};
use crate::auth::tokens;
use crate::link::device::DeviceLink;
use crate::link::Transport;
use crate::proto::messages::{codes, Hello, RelayControl};
use crate::proto::{frame, ProtoError};
use crate::relay::state::Shared;

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

/// Accepts device connections until shutdown, then closes whatever is still open.
pub async fn run(endpoint: quinn::Endpoint, state: Arc<Shared>) {
    let tracker = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            _ = state.shutdown.cancelled() => break,
        };
        let action = admission(&endpoint, &incoming, &state);
        state
            .metrics
            .quic_admissions
            .with_label_values(&[match action {
                Admission::Accept => "accept",
                Admission::Retry => "retry",
                Admission::Refuse => "refuse",
            }])
            .inc();
        match action {
            Admission::Accept => {}
            Admission::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Admission::Refuse => {
                incoming.refuse();
                continue;
            }
        }
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
    let sessions = state.metrics.connected_over(Transport::Quic).get().max(0) as usize;
    let pending = open.saturating_sub(sessions);
    // Devices on either transport count against `max_devices`.
    if state.presence.count() + pending >= limits.max_devices {
        return Admission::Refuse;
    }
    if pending >= limits.handshakes_max {
        return Admission::Refuse;
    }
    if pending >= limits.quic_retry_above_pending && !incoming.remote_address_validated() {
        return Admission::Retry;
    }
    Admission::Accept
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

/// A QUIC session's control stream (the first stream, which carried the hello); its
/// receiving half is read by [`read_agent_control`] for the session's life.
struct QuicControl {
    conn: quinn::Connection,
    send: quinn::SendStream,
}

impl Control for QuicControl {
    async fn send(&mut self, msg: &RelayControl) -> bool {
        self.send.write_all(&control_frame(msg)).await.is_ok()
    }

    /// Refuses any stream the device opens (only the relay opens tunnel streams) until the
    /// connection ends.
    async fn ended(&mut self) -> String {
        loop {
            match self.conn.accept_bi().await {
                Ok((mut s, mut r)) => {
                    tracing::warn!("device opened a stream of its own; refused");
                    let _ = s.reset(VarInt::from_u32(codes::STREAM_REFUSED));
                    let _ = r.stop(VarInt::from_u32(codes::STREAM_REFUSED));
                }
                Err(e) => return e.to_string(),
            }
        }
    }

    async fn finish(&mut self) {
        finish_control(&mut self.send).await;
    }
}

/// Finishes the control stream and waits (briefly) until the agent has read it.
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
    let uuid = match accept_hello(&state, &hello).await {
        Ok(uuid) => uuid,
        Err(failure) => return refuse(&conn, &state, Some(&mut send), failure).await,
    };
    tracing::Span::current().record("device", uuid.as_str());
    let session_id = tokens::new_device_uuid();
    let registered = register(
        &state,
        uuid,
        session_id.clone(),
        &hello,
        DeviceLink::Quic(conn.clone()),
    )
    .await;
    let welcome = RelayControl::Welcome {
        relay: state.relay_id.clone(),
        features: state.features(),
        session: session_id,
    };
    if frame::write(&mut send, &welcome).await.is_err() {
        let reason = conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_default();
        return unregister(&state, &registered, &reason).await;
    }
    // Credit frames ahead of tunnel bytes: a grant stuck behind a megabyte of another
    // tunnel's data would stall the tunnel waiting for it.
    let _ = send.set_priority(1);
    tokio::spawn(read_agent_control(
        recv,
        state.acks.clone(),
        state.config.limits.frame_max_bytes,
        CancellationToken::new(),
    ));
    let control = QuicControl { conn, send };
    run_session(&state, registered, control).await;
}

async fn refuse(
    conn: &quinn::Connection,
    state: &Shared,
    control: Option<&mut quinn::SendStream>,
    failure: HelloFailure,
) {
    failure.record(state);
    match failure {
        HelloFailure::Timeout => close(conn, codes::HELLO_TIMEOUT, "hello timeout"),
        HelloFailure::Protocol(e) => close(conn, codes::PROTOCOL, &e.to_string()),
        HelloFailure::Store(_) => close(
            conn,
            codes::UNAVAILABLE,
            "relay store unavailable; retry later",
        ),
        HelloFailure::Reject(code, message) => {
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

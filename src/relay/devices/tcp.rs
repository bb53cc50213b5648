//! The TLS/TCP device listener (PROTOCOL.md §2b): TLS 1.3, the §2 hello and welcome as
//! frames, then one HTTP/2 connection on which the relay is the client and opens a
//! CONNECT stream per tunnel.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{accept_hello, control_frame, read_agent_control, register, run_session, unregister};
use super::{Control, HelloFailure};
use crate::auth::tokens;
use crate::link::device::{DeviceLink, TcpLink};
use crate::link::h2::{self as link_h2, Heard, LastHeard};
use crate::proto::frame;
use crate::proto::messages::{Hello, RelayControl};
use crate::relay::listen::{Accepted, Conn, Listeners};
use crate::relay::state::Shared;

/// Accepts device connections until shutdown. At most `handshakes_max` connections are
/// between accept and `welcome` at once (past that, the kernel's backlog holds the rest),
/// and none is taken past `max_devices`.
pub async fn run(listeners: Listeners, state: Arc<Shared>) {
    let limits = &state.config.limits;
    let handshakes = Arc::new(Semaphore::new(limits.handshakes_max));
    let tracker = TaskTracker::new();
    while let Some(accepted) = listeners.next(&handshakes, &state.shutdown).await {
        if state.presence.count() >= limits.max_devices {
            tracing::debug!(remote = %accepted.peer, "device limit reached; connection dropped");
            continue;
        }
        let span = tracing::info_span!(
            "device",
            remote = %accepted.peer,
            device = tracing::field::Empty
        );
        tracker.spawn(session(accepted, state.clone()).instrument(span));
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}

type Tls = TlsStream<TcpStream>;

async fn session(accepted: Accepted, state: Arc<Shared>) {
    let Accepted { conn, permit, .. } = accepted;
    let Conn::Tls(pending) = conn else {
        return;
    };
    let limits = &state.config.limits;
    // The handshake and the hello share the hello timeout.
    let deadline = tokio::time::Instant::now() + limits.hello_timeout();
    let mut tls = match tokio::time::timeout_at(deadline, pending.finish()).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    crate::link::tune_tcp(
        tls.get_ref().0,
        Duration::from_millis(limits.tcp_idle_timeout_ms),
    );
    let read = frame::read_required::<_, Hello>(&mut tls, limits.frame_max_bytes);
    let hello = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => return refuse(tls, &state, HelloFailure::Protocol(e)).await,
        Err(_) => return refuse(tls, &state, HelloFailure::Timeout).await,
    };
    let uuid = match accept_hello(&state, &hello).await {
        Ok(uuid) => uuid,
        Err(failure) => return refuse(tls, &state, failure).await,
    };
    tracing::Span::current().record("device", uuid.as_str());
    let session_id = tokens::new_device_uuid();
    let welcome = RelayControl::Welcome {
        relay: state.relay_id.clone(),
        features: state.features(),
        session: session_id.clone(),
    };
    if frame::write(&mut tls, &welcome).await.is_err() || tls.flush().await.is_err() {
        return;
    }
    let Some((link, ended)) = start_h2(tls, &state, hello.keep_alive_ms).await else {
        return;
    };
    let requests = link.requests.clone();
    let closer = link.closer.clone();
    let registered = register(
        &state,
        uuid.clone(),
        session_id,
        &hello,
        DeviceLink::Tcp(link),
    )
    .await;
    drop(permit);
    // The agent counts itself connected once the control stream arrives, which is after
    // the session is registered: "connected" means reachable.
    match open_control(requests, &uuid, ended, &state).await {
        Ok(control) => run_session(&state, registered, control).await,
        Err(why) => {
            closer.cancel();
            unregister(&state, &registered, &why).await;
        }
    }
}

/// How a link's connection ended, once it has.
#[derive(Clone)]
struct Ended {
    token: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

/// Starts HTTP/2 on the link (the relay is the client) and drives the connection, with
/// keep-alive, in a task of its own. With the relay's own keep-alive off, a link silent a
/// little longer than the agent's keep-alive (`agent_keep_alive`, ms, from its hello) gets
/// one PING: an agent that hears the relay's traffic does not ping itself, and its answer
/// keeps it from being reported `reconnecting` (PROTOCOL.md §2e, "Presence").
async fn start_h2(
    tls: Tls,
    state: &Shared,
    agent_keep_alive: Option<u64>,
) -> Option<(TcpLink, Ended)> {
    let limits = &state.config.limits;
    let heard = LastHeard::default();
    let io = Heard::new(tls, heard.clone());
    let link_heard = heard.clone();
    let setup = link_h2::client().handshake::<_, Bytes>(io);
    let (requests, mut connection) = match tokio::time::timeout(limits.hello_timeout(), setup).await
    {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "HTTP/2 setup failed");
            return None;
        }
        Err(_) => {
            tracing::info!("HTTP/2 setup timed out");
            return None;
        }
    };
    let ping = connection.ping_pong();
    let closer = state.shutdown.child_token();
    let ended = Ended {
        token: CancellationToken::new(),
        reason: Arc::default(),
    };
    let keep_alive = match (limits.tcp_keep_alive_ms, agent_keep_alive) {
        (0, Some(agent)) => {
            Some(Duration::from_millis(agent.max(1000)) + crate::relay::presence::SILENCE_GRACE / 2)
        }
        (0, None) => None,
        (ms, _) => Some(Duration::from_millis(ms)),
    };
    let idle = Duration::from_millis(limits.tcp_idle_timeout_ms);
    {
        let (closer, ended) = (closer.clone(), ended.clone());
        tokio::spawn(async move {
            let alive = link_h2::keep_alive(ping, heard, keep_alive, idle);
            let why = tokio::select! {
                r = connection => match r {
                    Ok(()) => "the agent closed the connection".to_owned(),
                    Err(e) => e.to_string(),
                },
                why = alive => why,
                _ = closer.cancelled() => "closed by the relay".to_owned(),
            };
            let _ = ended.reason.set(why);
            ended.token.cancel();
        });
    }
    Some((TcpLink::new(requests, closer, link_heard), ended))
}

/// Opens the control stream (`POST /cloudlink/control`) and waits for the agent's 200.
async fn open_control(
    requests: h2::client::SendRequest<Bytes>,
    uuid: &str,
    ended: Ended,
    state: &Shared,
) -> Result<TcpControl, String> {
    let open = async {
        let mut requests = requests.ready().await?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("https://{uuid}{}", link_h2::CONTROL_PATH))
            .body(())
            .expect("a valid request");
        let (response, send) = requests.send_request(request, false)?;
        let response = response.await?;
        Ok::<_, h2::Error>((response, send))
    };
    match tokio::time::timeout(state.config.limits.hello_timeout(), open).await {
        Ok(Ok((response, send))) if response.status() == http::StatusCode::OK => {
            let done = CancellationToken::new();
            tokio::spawn(read_agent_control(
                link_h2::BodyReader::new(response.into_body()),
                state.acks.clone(),
                state.config.limits.frame_max_bytes,
                done.clone(),
            ));
            Ok(TcpControl { send, ended, done })
        }
        Ok(Ok((response, _))) => Err(format!(
            "the agent answered the control stream with {}",
            response.status()
        )),
        Ok(Err(e)) => Err(format!("cannot open the control stream: {e}")),
        Err(_) => Err("the control stream was not answered in time".into()),
    }
}

/// A TCP session's control stream, and the end of its connection.
struct TcpControl {
    send: h2::SendStream<Bytes>,
    ended: Ended,
    /// Fires when the agent's side of the control stream has ended (its reader is done).
    done: CancellationToken,
}

impl Control for TcpControl {
    async fn send(&mut self, msg: &RelayControl) -> bool {
        link_h2::write_chunk(&mut self.send, control_frame(msg))
            .await
            .is_ok()
    }

    /// Ends with the connection, or when the agent ends or resets its side of the control
    /// stream (which ends the session, §2b). What the agent sends there is its acks
    /// (§2e), read by [`read_agent_control`].
    async fn ended(&mut self) -> String {
        tokio::select! {
            _ = self.ended.token.cancelled() => {
                self.ended.reason.get().cloned().unwrap_or_default()
            }
            _ = self.done.cancelled() => "the agent ended the control stream".into(),
        }
    }

    async fn finish(&mut self) {
        link_h2::finish(&mut self.send);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ended()).await;
    }
}

/// Answers a failed hello: a `reject` frame and close_notify for a reject, a plain close
/// otherwise (TCP has no room for a close code).
async fn refuse(mut tls: Tls, state: &Shared, failure: HelloFailure) {
    failure.record(state);
    if let HelloFailure::Reject(code, message) = failure {
        let reject = RelayControl::Reject {
            code,
            message: message.to_owned(),
        };
        if frame::write(&mut tls, &reject).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), tls.shutdown()).await;
        }
    }
}

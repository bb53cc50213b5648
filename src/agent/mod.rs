//! The device side: dial a relay, say hello, serve tunnel streams, reconnect forever.

pub mod authorized_keys;
pub mod config;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::proto::frame::{self, MAX_FRAME};
use crate::proto::messages::{codes, Hello, RejectCode, RelayControl, VERSION};
use crate::tls_client::{self, Trust};
pub use config::{AgentArgs, AgentConfig};

/// What the agent calls itself in its hello.
pub const AGENT_NAME: &str = concat!("cloudlink-agent/", env!("CARGO_PKG_VERSION"));

/// A session that lasted at least this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// How long one dial (handshake + hello) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors that stop the agent for good (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::AgentConfigError),
    /// TLS trust could not be set up.
    #[error(transparent)]
    Tls(#[from] tls_client::TlsClientError),
    /// No UDP socket could be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
}

/// Why a dial or a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Could not reach or talk to the relay.
    Unreachable(String),
    /// The relay refused the hello.
    Rejected(RejectCode, String),
    /// The session ran, then the connection was lost.
    Lost(String),
    /// The relay asked us to reconnect elsewhere within this many ms.
    Drain(u64),
    /// Another session of this device replaced ours.
    Replaced,
    /// We are shutting down.
    Shutdown,
}

/// What the agent logs about its link, once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkState {
    Starting,
    Connected(String),
    Down(String),
}

struct Agent {
    config: Arc<AgentConfig>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    shutdown: CancellationToken,
    state: LinkState,
    /// The address of a relay that is draining: tried last until we connect elsewhere.
    avoid: Option<SocketAddr>,
    /// The address of the current (or last) session's relay.
    connected_to: Option<SocketAddr>,
    /// Tunnels open now, on any session (a drained session's tunnels run on).
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    config.validate_for_agent()?;
    let trust = config.trust();
    if trust == Trust::Insecure {
        tracing::warn!("relay certificate NOT verified (--insecure-skip-verify): development only");
    }
    let tls = tls_client::config(trust, &[crate::proto::ALPN])?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| {
        AgentError::Tls(tls_client::TlsClientError::Rustls(rustls::Error::General(
            e.to_string(),
        )))
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(crate::quic::transport(
        Duration::from_millis(config.keep_alive_ms),
        Duration::from_millis(config.idle_timeout_ms),
        // Tunnel streams the relay may have open at once.
        4096,
    )));
    let socket = crate::quic::udp_socket((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| crate::quic::udp_socket((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
        .map_err(AgentError::Socket)?;
    let endpoint = crate::quic::endpoint(socket, None).map_err(AgentError::Socket)?;
    let mut agent = Agent {
        config: Arc::new(config),
        endpoint,
        client,
        shutdown,
        state: LinkState::Starting,
        avoid: None,
        connected_to: None,
        tunnels: Default::default(),
    };
    agent.run().await;
    Ok(())
}

impl Agent {
    fn set_state(&mut self, state: LinkState) {
        if self.state == state {
            return;
        }
        match &state {
            LinkState::Connected(relay) => tracing::info!(%relay, "connected to relay"),
            LinkState::Down(why) => {
                // The reason may quote the relay's own words: escaped like any peer text.
                tracing::warn!(reason = %crate::logsafe::Peer(why), "relay link down; retrying with backoff")
            }
            LinkState::Starting => {}
        }
        self.state = state;
    }

    async fn run(&mut self) {
        let relays = self.config.relay.clone();
        let mut next = 0usize;
        let mut failures: u32 = 0;
        // When the last relay said `drain`: a restart or rolling upgrade is under way.
        let mut drained_at: Option<Instant> = None;
        loop {
            let relay = relays[next % relays.len()].clone();
            next = next.wrapping_add(1);
            let started = Instant::now();
            let outcome = self.session(&relay).await;
            let pause = match &outcome {
                Outcome::Shutdown => {
                    self.endpoint
                        .close(VarInt::from_u32(codes::OK), b"agent stopping");
                    self.endpoint.wait_idle().await;
                    return;
                }
                Outcome::Drain(ms) => {
                    failures = 0;
                    drained_at = Some(Instant::now());
                    self.set_state(LinkState::Down(format!("relay {relay} is draining")));
                    self.avoid = self.connected_to;
                    if self.tunnels.load(std::sync::atomic::Ordering::Acquire) > 0 {
                        // Someone is using this device: make the new link at once (the old
                        // one keeps its tunnels), so new tunnels find it without a gap.
                        Duration::ZERO
                    } else {
                        // Spread the reconnects of a whole fleet over the window.
                        Duration::from_millis(rand::rng().random_range(0..=*ms))
                    }
                }
                other => {
                    if started.elapsed() >= STABLE_SESSION && matches!(other, Outcome::Lost(_)) {
                        failures = 0;
                    }
                    let why = match other {
                        Outcome::Unreachable(e) => format!("cannot reach {relay}: {e}"),
                        Outcome::Rejected(code, m) => {
                            format!(
                                "relay {relay} rejected this device ({}): {m}",
                                code.as_str()
                            )
                        }
                        Outcome::Lost(e) => format!("connection to {relay} lost: {e}"),
                        Outcome::Replaced => {
                            format!("another agent with this device's uuid connected to {relay}")
                        }
                        Outcome::Drain(_) | Outcome::Shutdown => String::new(),
                    };
                    self.set_state(LinkState::Down(why));
                    failures = failures.saturating_add(1);
                    // Try the other relays at once before backing off: one that cannot be
                    // reached, or one whose link was lost (it may have died), says nothing
                    // about the next one in the list.
                    if !next.is_multiple_of(relays.len())
                        && matches!(other, Outcome::Unreachable(_) | Outcome::Lost(_))
                    {
                        Duration::ZERO
                    } else {
                        let since_drain = drained_at.map(|t| t.elapsed());
                        let cap = backoff_cap(
                            since_drain,
                            Duration::from_millis(self.config.max_backoff_ms),
                        );
                        backoff(failures, cap)
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.shutdown.cancelled() => {
                    self.endpoint.close(VarInt::from_u32(codes::OK), b"agent stopping");
                    return;
                }
            }
        }
    }

    /// Dials one relay (each of its addresses in turn) and serves the session.
    async fn session(&mut self, relay: &str) -> Outcome {
        let (host, addrs) = match resolve(relay).await {
            Ok(found) => found,
            Err(e) => return Outcome::Unreachable(e),
        };
        let server_name = self.config.server_name.clone().unwrap_or(host);
        let mut last_error = String::from("no address");
        let mut addrs = addrs;
        // A draining relay's address goes last, behind every other address of the name.
        if let Some(avoid) = self.avoid {
            addrs.sort_by_key(|a| *a == avoid);
        }
        for addr in addrs {
            let dial = self.dial(addr, &server_name);
            let dialed = tokio::select! {
                d = tokio::time::timeout(DIAL_TIMEOUT, dial) => d,
                _ = self.shutdown.cancelled() => return Outcome::Shutdown,
            };
            match dialed {
                Ok(Ok((conn, control, relay_id))) => {
                    self.set_state(LinkState::Connected(format!("{relay} ({relay_id})")));
                    if self.avoid != Some(addr) {
                        self.avoid = None;
                    }
                    self.connected_to = Some(addr);
                    return self.serve(conn, control).await;
                }
                Ok(Err(Outcome::Rejected(RejectCode::Draining, m))) => {
                    // Landed on a draining relay (a load balancer's choice): the next
                    // address of the name, then the next relay of the list, at once; only
                    // when every one fails does the agent back off.
                    self.avoid = Some(addr);
                    last_error = format!("{addr} is draining: {m}");
                }
                Ok(Err(Outcome::Unreachable(e))) => last_error = e,
                Ok(Err(other)) => return other,
                Err(_) => last_error = format!("no answer from {addr} within {DIAL_TIMEOUT:?}"),
            }
        }
        Outcome::Unreachable(last_error)
    }

    /// Handshake and hello.
    async fn dial(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<(quinn::Connection, Control, String), Outcome> {
        let unreachable = |e: &dyn std::fmt::Display| Outcome::Unreachable(e.to_string());
        let conn = self
            .endpoint
            .connect_with(self.client.clone(), addr, server_name)
            .map_err(|e| unreachable(&e))?
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
        let hello = Hello {
            version: VERSION,
            uuid: self.config.uuid.clone(),
            key: self.config.key.0.clone(),
            agent: AGENT_NAME.into(),
        };
        frame::write(&mut send, &hello)
            .await
            .map_err(|e| unreachable(&e))?;
        match frame::read_required::<_, RelayControl>(&mut recv, MAX_FRAME).await {
            Ok(RelayControl::Welcome { relay, .. }) => Ok((conn, Control { send, recv }, relay)),
            Ok(RelayControl::Reject { code, message }) => Err(Outcome::Rejected(code, message)),
            Ok(other) => Err(Outcome::Unreachable(format!(
                "unexpected {other:?} before welcome"
            ))),
            Err(e) => Err(Outcome::Unreachable(match conn.close_reason() {
                Some(reason) => reason.to_string(),
                None => e.to_string(),
            })),
        }
    }

    /// Serves tunnel streams until the connection ends or the relay says drain/replaced.
    async fn serve(&self, conn: quinn::Connection, control: Control) -> Outcome {
        let Control { send: _send, recv } = control;
        let (tx, mut rx) = mpsc::channel(4);
        let reader = tokio::spawn(read_control(recv, tx));
        let outcome = loop {
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok((send, recv)) => self.spawn_tunnel(send, recv),
                    Err(e) => break Outcome::Lost(e.to_string()),
                },
                msg = rx.recv() => match msg {
                    Some(RelayControl::Drain { reconnect_ms }) => {
                        // Make before break: the draining relay may still route a tunnel
                        // here until this device's new session is up, so the old link
                        // keeps serving until the relay closes it.
                        tokio::spawn(serve_drained(
                            conn.clone(),
                            self.config.clone(),
                            self.tunnels.clone(),
                            self.shutdown.clone(),
                        ));
                        break Outcome::Drain(reconnect_ms);
                    }
                    Some(RelayControl::Replaced) => break Outcome::Replaced,
                    Some(other) => tracing::debug!(?other, "ignoring control message"),
                    // The control stream ended; the connection's end will show on accept.
                    None => {
                        let e = conn.closed().await;
                        break Outcome::Lost(e.to_string());
                    }
                },
                _ = self.shutdown.cancelled() => {
                    conn.close(VarInt::from_u32(codes::OK), b"agent stopping");
                    break Outcome::Shutdown;
                }
            }
        };
        reader.abort();
        outcome
    }

    fn spawn_tunnel(&self, send: quinn::SendStream, recv: quinn::RecvStream) {
        tokio::spawn(counted_tunnel(
            send,
            recv,
            self.config.clone(),
            self.tunnels.clone(),
        ));
    }
}

/// Serves one tunnel stream, counted among the agent's open tunnels.
async fn counted_tunnel(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    config: Arc<AgentConfig>,
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
) {
    tunnels.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    tunnel::serve(send, recv, config).await;
    tunnels.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
}

/// Keeps serving tunnel streams on a drained relay's connection until the relay closes it
/// (after this device's new session superseded it and its tunnels ended) or the agent
/// stops.
async fn serve_drained(
    conn: quinn::Connection,
    config: Arc<AgentConfig>,
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(counted_tunnel(send, recv, config.clone(), tunnels.clone()));
                }
                Err(_) => return,
            },
            _ = shutdown.cancelled() => {
                conn.close(VarInt::from_u32(codes::OK), b"agent stopping");
                return;
            }
        }
    }
}

/// The control stream of a session. Our half stays open for the session's life: the relay
/// reads nothing after the hello, but a close would read as a goodbye.
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// Reads control frames into a channel (frame reads are not cancel-safe, so they run here).
async fn read_control(mut recv: quinn::RecvStream, tx: mpsc::Sender<RelayControl>) {
    while let Ok(Some(msg)) = frame::read::<_, RelayControl>(&mut recv, MAX_FRAME).await {
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// How long after a `drain` the agent keeps its backoff short.
pub const AFTER_DRAIN: Duration = Duration::from_secs(90);

/// The longest backoff after a `drain`: the relays are restarting on purpose and will be
/// back within seconds, so the whole fleet's refused handshakes (the relay's handshake
/// cap, a `draining` reject) are retried soon instead of in pauses that grow to a minute.
/// Measured on a 10,000-device restart: with the full 60 s cap the last devices waited in
/// 30–60 s pauses while the relay had CPU to spare.
pub const DRAIN_BACKOFF_CAP: Duration = Duration::from_secs(8);

/// The backoff cap in force: [`DRAIN_BACKOFF_CAP`] within [`AFTER_DRAIN`] of a drain,
/// `max` otherwise.
pub fn backoff_cap(since_drain: Option<Duration>, max: Duration) -> Duration {
    match since_drain {
        Some(d) if d < AFTER_DRAIN => max.min(DRAIN_BACKOFF_CAP),
        _ => max,
    }
}

/// Exponential backoff with full jitter: a random pause up to min(cap, 1 s × 2^failures).
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let ceiling = Duration::from_secs(1)
        .saturating_mul(1u32 << failures.min(16))
        .min(cap);
    Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
}

/// Splits `HOST:PORT` and resolves it (a name may give many addresses).
async fn resolve(relay: &str) -> Result<(String, Vec<SocketAddr>), String> {
    let (host, _) = relay
        .rsplit_once(':')
        .ok_or_else(|| format!("{relay} is not HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| format!("cannot resolve {relay}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{relay} resolves to no address"));
    }
    Ok((host, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let cap = Duration::from_secs(60);
        for failures in 0..40 {
            let d = backoff(failures, cap);
            assert!(d <= cap);
            assert!(d <= Duration::from_secs(1) * 2u32.pow(failures.min(16)));
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(10, cap)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    #[test]
    fn backoff_stays_short_right_after_a_drain() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff_cap(None, max), max);
        assert_eq!(
            backoff_cap(Some(Duration::from_secs(5)), max),
            DRAIN_BACKOFF_CAP
        );
        assert_eq!(backoff_cap(Some(AFTER_DRAIN), max), max);
        for failures in 0..20 {
            assert!(backoff(failures, backoff_cap(Some(Duration::ZERO), max)) <= DRAIN_BACKOFF_CAP);
        }
        // A configured cap below the drain cap still wins.
        let small = Duration::from_secs(2);
        assert_eq!(backoff_cap(Some(Duration::ZERO), small), small);
    }
}

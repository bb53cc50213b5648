//! The device side: dial a relay (QUIC, or TLS over TCP where UDP is blocked), say hello,
//! serve tunnel streams, reconnect forever.

pub mod authorized_keys;
pub mod config;
pub mod http;
pub mod link;
pub mod path;
pub mod probe;
pub mod resume;
pub mod tunnel;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::https_proxy;
use crate::link::Transport;
use crate::proto::messages::{codes, RejectCode, RelayControl};
use crate::tls_client::{self, Trust};
pub use config::{AgentArgs, AgentConfig, RelaySpec, TransportChoice};
pub use link::AGENT_NAME;
use link::{AgentLink, Outcome, TunnelRequest};

/// Replaces the status file with one line about `state` (written aside, then renamed, so
/// a health check never reads half of it). A failure is logged, never fatal.
fn write_status(path: &std::path::Path, state: &LinkState) {
    let line = match state {
        LinkState::Starting => "starting\n".to_owned(),
        LinkState::Connected(relay, transport) => format!("up {relay} {transport}\n"),
        LinkState::Down(why) => format!("down {}\n", why.replace(['\n', '\r'], " ")),
    };
    // Readable by a health check running as another user (0644), and never half written.
    if let Err(e) = crate::private_file::replace(path, line.as_bytes(), 0o644) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the status file");
    }
}

/// A session that lasted at least this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// The longest pause between dials while resumable tunnels wait for a link.
const RESUME_REDIAL: Duration = Duration::from_secs(1);

/// How long a QUIC link with open tunnels may hear nothing back for what it sent (a poke
/// included) before the agent dials again beside it (at least six round trips past the
/// poke). QUIC's own retransmissions back off exponentially and without a ceiling: after a
/// 20 s blackout the link took 13 s to carry a byte again (bench l), and a firewall that
/// starts dropping UDP looks the same until the idle timeout. A fresh handshake, tried
/// once a second, gets through as soon as the path does, or finds TLS/TCP in `auto`; the
/// tunnels resume on it (PROTOCOL.md §2e, "A silent link").
const SILENT_REDIAL: Duration = Duration::from_secs(3);

/// The handshake budget of each dial beside a silent link (at least four round trips).
const REDIAL_HANDSHAKE: Duration = Duration::from_secs(1);

/// How long a QUIC link with open tunnels may hear nothing before the agent pokes it.
const POKE_AFTER: Duration = Duration::from_millis(1500);

/// How often a QUIC link's traffic is looked at for [`SILENT_REDIAL`].
const SILENCE_TICK: Duration = Duration::from_millis(500);

/// How long one dial (handshake + hello) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a QUIC handshake may take in `auto` before the agent tries TLS over TCP.
pub const QUIC_FALLBACK: Duration = Duration::from_secs(3);

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

/// What the agent logs about its link, once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkState {
    Starting,
    Connected(String, Transport),
    Down(String),
}

/// What the agent needs to dial QUIC, shareable with a background probe.
#[derive(Clone)]
struct QuicDialer {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    config: Arc<AgentConfig>,
    held: Arc<resume::Held>,
}

struct Agent {
    config: Arc<AgentConfig>,
    relays: Vec<RelaySpec>,
    /// `None` with `--transport tcp`: no UDP socket is needed.
    quic: Option<QuicDialer>,
    tcp_tls: tokio_rustls::TlsConnector,
    proxies: https_proxy::ProxyEnv,
    shutdown: CancellationToken,
    state: LinkState,
    /// The address of a relay that is draining: tried last until we connect elsewhere.
    avoid: Option<SocketAddr>,
    /// The address of the current (or last) session's relay.
    connected_to: Option<SocketAddr>,
    /// Tunnels open now, on any session (a drained session's tunnels run on).
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
    /// Which transport last worked, per relay entry (`auto` starts there).
    worked: HashMap<String, Transport>,
    /// The resumable tunnels the agent holds, on any link (PROTOCOL.md §2e).
    held: Arc<resume::Held>,
    /// Links the agent has moved to within a session (probes, dials beside a silent link):
    /// the session's loop starts watching a new link's silence afresh.
    moves: u64,
}

/// A background dial that may bring a new link.
type Dialing = Option<tokio::task::JoinHandle<Option<(AgentLink, SocketAddr)>>>;

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    config.validate_for_agent()?;
    let trust = config.trust();
    if trust == Trust::Insecure {
        tracing::warn!("relay certificate NOT verified (--insecure-skip-verify): development only");
    }
    let relays = config
        .relay
        .iter()
        .map(|r| RelaySpec::parse(r).map_err(config::AgentConfigError::Invalid))
        .collect::<Result<Vec<_>, _>>()?;
    let tcp_tls = tls_client::config(trust, &[crate::link::TCP_ALPN])?;
    let tcp_tls = tokio_rustls::TlsConnector::from(Arc::new(tcp_tls));
    let uses_quic = relays
        .iter()
        .any(|r| r.transports(config.transport).contains(&Transport::Quic));
    let held = Arc::new(resume::Held::new(Duration::from_secs(
        config.tunnel_resume_secs,
    )));
    let config = Arc::new(config);
    let quic = if uses_quic {
        Some(quic_dialer(config.clone(), held.clone())?)
    } else {
        None
    };
    let mut agent = Agent {
        config,
        relays,
        quic,
        tcp_tls,
        proxies: https_proxy::ProxyEnv::from_env(),
        shutdown,
        state: LinkState::Starting,
        avoid: None,
        connected_to: None,
        moves: 0,
        tunnels: Default::default(),
        worked: HashMap::new(),
        held,
    };
    if let Some(path) = &agent.config.status_file {
        // Not the last run's "up".
        write_status(path, &LinkState::Starting);
    }
    agent.run().await;
    if let Some(path) = &agent.config.status_file {
        write_status(path, &LinkState::Down("agent stopped".into()));
    }
    Ok(())
}

fn quic_dialer(
    config: Arc<AgentConfig>,
    held: Arc<resume::Held>,
) -> Result<QuicDialer, AgentError> {
    let tls = tls_client::config(config.trust(), &[crate::proto::ALPN])?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| {
        AgentError::Tls(tls_client::TlsClientError::Rustls(rustls::Error::General(
            e.to_string(),
        )))
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(crate::quic::transport(&crate::quic::Settings {
        keep_alive: Some(Duration::from_millis(config.keep_alive_ms)),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        // Tunnel streams the relay may have open at once.
        peer_bidi_streams: 4096,
        mtu_max: config.quic_mtu_max,
        congestion: config.quic_congestion,
    })));
    let socket = crate::quic::udp_socket((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| crate::quic::udp_socket((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
        .map_err(AgentError::Socket)?;
    let endpoint = crate::quic::endpoint(socket, None).map_err(AgentError::Socket)?;
    Ok(QuicDialer {
        endpoint,
        client,
        config,
        held,
    })
}

impl QuicDialer {
    /// Dials `relay` over QUIC (see [`each_address`]); the handshakes share `budget`.
    async fn dial(
        &self,
        relay: &str,
        server_name: &str,
        avoid: &mut Option<SocketAddr>,
        budget: Duration,
    ) -> Result<(AgentLink, SocketAddr), Outcome> {
        each_address(relay, avoid, budget, |addr, left| {
            link::dial_quic(
                &self.endpoint,
                &self.client,
                &self.config,
                &self.held.links,
                addr,
                server_name,
                left,
            )
        })
        .await
    }
}

/// Dials each address of `relay` in turn with `dial` until one session is up. An address
/// that answered `draining` before (`avoid`) goes last; one that answers it now becomes
/// `avoid` and the next address is tried at once (a load balancer's choice). Each dial
/// gets [`DIAL_TIMEOUT`]; together they get `budget`, which `dial` is handed what is left
/// of (the QUIC handshake's fallback timer in `auto`).
async fn each_address<F, Fut>(
    relay: &str,
    avoid: &mut Option<SocketAddr>,
    budget: Duration,
    mut dial: F,
) -> Result<(AgentLink, SocketAddr), Outcome>
where
    F: FnMut(SocketAddr, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<AgentLink, Outcome>>,
{
    let mut addrs = resolve(relay).await.map_err(Outcome::Unreachable)?;
    addrs.sort_by_key(|a| Some(*a) == *avoid);
    let deadline = tokio::time::Instant::now().checked_add(budget);
    let mut last = String::from("no address");
    for addr in addrs {
        let left = deadline.map_or(budget, |d| {
            d.saturating_duration_since(tokio::time::Instant::now())
        });
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(DIAL_TIMEOUT, dial(addr, left)).await {
            Ok(Ok(link)) => return Ok((link, addr)),
            Ok(Err(Outcome::Rejected(RejectCode::Draining, m))) => {
                *avoid = Some(addr);
                last = format!("{addr} is draining: {m}");
            }
            Ok(Err(Outcome::Unreachable(e))) => last = e,
            Ok(Err(other)) => return Err(other),
            Err(_) => last = format!("no answer from {addr} within {DIAL_TIMEOUT:?}"),
        }
    }
    Err(Outcome::Unreachable(last))
}

impl Agent {
    fn set_state(&mut self, state: LinkState) {
        if self.state == state {
            return;
        }
        if let Some(path) = &self.config.status_file {
            write_status(path, &state);
        }
        match &state {
            LinkState::Connected(relay, transport) => {
                let was = match &self.state {
                    LinkState::Connected(_, t) => Some(*t),
                    _ => None,
                };
                tracing::info!(%relay, %transport, "connected to relay");
                if *transport == Transport::Tcp && was != Some(Transport::Tcp) {
                    tracing::info!("device link on TLS over TCP (QUIC did not get through, or TCP was asked for)");
                } else if *transport == Transport::Quic && was == Some(Transport::Tcp) {
                    tracing::info!("device link back on QUIC");
                }
            }
            LinkState::Down(why) => {
                // The reason may quote the relay's own words: escaped like any peer text.
                match crate::tls_client::trust_hint(why) {
                    Some(hint) => {
                        tracing::warn!(reason = %crate::logsafe::Peer(why), hint, "relay link down; retrying with backoff")
                    }
                    None => {
                        tracing::warn!(reason = %crate::logsafe::Peer(why), "relay link down; retrying with backoff")
                    }
                }
            }
            LinkState::Starting => {}
        }
        self.state = state;
    }

    fn close_endpoint(&self) {
        if let Some(quic) = &self.quic {
            quic.endpoint
                .close(VarInt::from_u32(codes::OK), b"agent stopping");
        }
    }

    async fn run(&mut self) {
        let relays = self.relays.clone();
        let mut next = 0usize;
        let mut failures: u32 = 0;
        // When the last relay said `drain`: a restart or rolling upgrade is under way.
        let mut drained_at: Option<Instant> = None;
        loop {
            let relay = relays[next % relays.len()].clone();
            next = next.wrapping_add(1);
            let started = Instant::now();
            let outcome = self.session(&relay).await;
            // A link that served a while and was lost: tunnels waiting for it get the next
            // dial at once (its path may be back already, or be a new one).
            let link_lost =
                matches!(outcome, Outcome::Lost(_)) && started.elapsed() >= RESUME_REDIAL;
            let relay = &relay.addr;
            let pause = match &outcome {
                Outcome::Shutdown => {
                    self.close_endpoint();
                    if let Some(quic) = &self.quic {
                        quic.endpoint.wait_idle().await;
                    }
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
            // Tunnels that wait for this link to come back (PROTOCOL.md §2e) cannot wait out
            // a back-off: at least one dial a second while any is held.
            let pause = if self.held.count() > 0 && link_lost {
                Duration::ZERO
            } else if self.held.count() > 0 {
                pause.min(RESUME_REDIAL)
            } else {
                pause
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.shutdown.cancelled() => {
                    self.close_endpoint();
                    return;
                }
            }
        }
    }

    /// The transports to try for `relay`, in order: in `auto`, the one that last worked
    /// there goes first.
    fn order(&self, relay: &RelaySpec) -> Vec<Transport> {
        let mut order = relay.transports(self.config.transport);
        if order.len() > 1 && self.worked.get(&relay.addr) == Some(&Transport::Tcp) {
            order.reverse();
        }
        order
    }

    /// Dials one relay (each transport and address in turn) and serves the session.
    async fn session(&mut self, relay: &RelaySpec) -> Outcome {
        let order = self.order(relay);
        let auto = order.len() > 1;
        let mut last = Outcome::Unreachable("no transport".into());
        let shutdown = self.shutdown.clone();
        for transport in order {
            let dialed = tokio::select! {
                d = self.connect(relay, transport, auto) => d,
                _ = shutdown.cancelled() => return Outcome::Shutdown,
            };
            match dialed {
                Ok((link, addr)) => {
                    self.worked.insert(relay.addr.clone(), link.transport);
                    self.set_state(LinkState::Connected(
                        format!("{} ({})", relay.addr, link.relay_id),
                        link.transport,
                    ));
                    if addr.is_none() || self.avoid != addr {
                        self.avoid = None;
                    }
                    self.connected_to = addr;
                    return self.serve(link, relay, auto).await;
                }
                // The relay answered: the other transport would hear the same.
                Err(e @ Outcome::Rejected(..)) => return e,
                Err(e) => last = e,
            }
        }
        last
    }

    /// Dials `relay` over `transport`: QUIC to each of its addresses, or TCP directly to
    /// each (or once through the `HTTPS_PROXY` proxy, which resolves the name itself).
    async fn connect(
        &mut self,
        relay: &RelaySpec,
        transport: Transport,
        auto: bool,
    ) -> Result<(AgentLink, Option<SocketAddr>), Outcome> {
        let host = crate::addr::host(&relay.addr).to_owned();
        let server_name = self.config.server_name.clone().unwrap_or(host.clone());
        if transport == Transport::Quic {
            let quic = self
                .quic
                .as_ref()
                .ok_or_else(|| Outcome::Unreachable("QUIC is off".into()))?;
            let budget = if auto { QUIC_FALLBACK } else { DIAL_TIMEOUT };
            let (link, addr) = quic
                .dial(&relay.addr, &server_name, &mut self.avoid, budget)
                .await?;
            return Ok((link, Some(addr)));
        }
        let proxy = self.proxies.for_host(&host).map_err(Outcome::Unreachable)?;
        if let Some(proxy) = proxy {
            let dial = async {
                let tcp = https_proxy::connect(&proxy, &relay.addr, DIAL_TIMEOUT)
                    .await
                    .map_err(Outcome::Unreachable)?;
                link::dial_tcp(
                    tcp,
                    &self.tcp_tls,
                    &self.config,
                    &self.held.links,
                    &server_name,
                )
                .await
            };
            return match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
                Ok(r) => r.map(|link| (link, None)),
                Err(_) => Err(Outcome::Unreachable(format!(
                    "no answer from {} through the proxy within {DIAL_TIMEOUT:?}",
                    relay.addr
                ))),
            };
        }
        let (tls, config, held) = (&self.tcp_tls, &self.config, &self.held.links);
        let (link, addr) = each_address(&relay.addr, &mut self.avoid, Duration::MAX, |addr, _| {
            let server_name = &server_name;
            async move {
                let tcp = link::connect_tcp(addr)
                    .await
                    .map_err(|e| Outcome::Unreachable(format!("{addr}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                link::dial_tcp(tcp, tls, config, held, server_name).await
            }
        })
        .await?;
        Ok((link, Some(addr)))
    }

    /// Serves tunnel requests until the link ends or the relay says drain/replaced. On TCP
    /// in `auto`, the relay's QUIC port is probed in the background (a 16-byte UDP probe,
    /// PROTOCOL.md §2c, backing off from 5 s to `quic_probe_secs`), and a QUIC handshake
    /// follows a probe that was answered; once it works, the new QUIC session replaces
    /// this one make-before-break (this link keeps its open tunnels until the relay closes
    /// it). A relay that does not announce `udp-probe` is tried with a handshake every
    /// 10 minutes, as before probes existed.
    async fn serve(&mut self, mut link: AgentLink, relay: &RelaySpec, auto: bool) -> Outcome {
        let probe_cap = Duration::from_secs(self.config.quic_probe_secs);
        let answers_probes = crate::proto::messages::features::has(
            &link.relay_features,
            crate::proto::messages::features::UDP_PROBE,
        );
        let mut unanswered = 0u32;
        let mut probe_at = None;
        let mut probing: Dialing = None;
        let mut silence = Silence::new(&link);
        let mut redialing: Dialing = None;
        let mut watched = self.moves;
        let mut tick = tokio::time::interval(SILENCE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if watched != self.moves {
                watched = self.moves;
                silence = Silence::new(&link);
            }
            if auto && link.transport == Transport::Tcp && probe_at.is_none() && probing.is_none() {
                let pause = probe::pause(unanswered, probe_cap, answers_probes);
                probe_at = Some(tokio::time::Instant::now() + pause);
            }
            let event = tokio::select! {
                request = link.requests.accept() => Event::Request(request),
                msg = link.control.recv() => Event::Control(msg),
                _ = sleep_until(probe_at) => Event::ProbeDue,
                probed = join_probe(&mut probing) => Event::Probed(probed),
                redialed = join_probe(&mut redialing) => Event::Redialed(redialed),
                _ = tick.tick() => Event::Tick,
                _ = self.shutdown.cancelled() => Event::Shutdown,
            };
            match event {
                Event::Request(Ok(request)) => self.spawn_tunnel(request),
                // Our own QUIC probe's session may have replaced this one, and a relay
                // whose tunnels resume (PROTOCOL.md §2e) closes the old link at once: wait
                // for the probe before giving up.
                Event::Request(Err(e)) => {
                    if !self
                        .adopt_pending(&mut link, [&mut probing, &mut redialing], relay)
                        .await
                    {
                        return Outcome::Lost(e);
                    }
                }
                Event::Control(Some(RelayControl::Drain { reconnect_ms })) => {
                    // Make before break: the draining relay may still route a tunnel here
                    // until this device's new session is up, so the old link keeps
                    // serving until the relay closes it.
                    self.spawn_drained(link);
                    return Outcome::Drain(reconnect_ms);
                }
                Event::Control(Some(RelayControl::Replaced)) => {
                    // Our own QUIC probe replaces this session as it registers, before
                    // its welcome arrives: wait for the probe before giving up the link.
                    if !self
                        .adopt_pending(&mut link, [&mut probing, &mut redialing], relay)
                        .await
                    {
                        return Outcome::Replaced;
                    }
                }
                Event::Control(Some(other)) => {
                    tracing::debug!(?other, "ignoring control message")
                }
                // The control stream ended; the link's end shows on accept. As above, our
                // own QUIC probe's session may be what ended it: wait for the probe.
                Event::Control(None) => loop {
                    tokio::select! {
                        request = link.requests.accept() => match request {
                            Ok(request) => self.spawn_tunnel(request),
                            Err(e) => {
                                if self.adopt_pending(&mut link, [&mut probing, &mut redialing], relay).await {
                                    break;
                                }
                                return Outcome::Lost(e);
                            }
                        },
                        _ = self.shutdown.cancelled() => {
                            link.requests.close();
                            return Outcome::Shutdown;
                        }
                    }
                },
                Event::ProbeDue => {
                    probe_at = None;
                    probing = self.probe_quic(relay, answers_probes);
                }
                Event::Probed(Some((quic, addr))) => self.adopt(&mut link, quic, addr, relay),
                Event::Probed(None) => {
                    unanswered = unanswered.saturating_add(1);
                    tracing::debug!(relay = %relay.addr, "QUIC still does not get through");
                }
                Event::Tick => {
                    let busy = self.tunnels.load(std::sync::atomic::Ordering::Acquire) > 0;
                    if let Some(silent) = silence.check(&link, busy) {
                        if redialing.is_none() && silence.may_redial() {
                            tracing::info!(relay = %relay.addr, ?silent, "nothing heard back on the QUIC link; dialing again beside it");
                            let rtt = link.traffic().map_or(Duration::ZERO, |(_, rtt)| rtt);
                            redialing = Some(self.redial(relay, auto, rtt));
                        }
                    }
                }
                // Once the new session is up the relay moves the tunnels to it and closes
                // this link: take it whether or not this link has spoken again meanwhile.
                Event::Redialed(Some((new, addr))) => self.adopt(&mut link, new, addr, relay),
                // The next at once: each dial's first handshake packet is its best chance.
                Event::Redialed(None) => {
                    tracing::debug!(relay = %relay.addr, "the dial beside the silent link failed");
                    if silence.check(&link, true).is_some() && silence.may_redial() {
                        let rtt = link.traffic().map_or(Duration::ZERO, |(_, rtt)| rtt);
                        redialing = Some(self.redial(relay, auto, rtt));
                    }
                }
                Event::Shutdown => {
                    link.requests.close();
                    for task in [probing, redialing].into_iter().flatten() {
                        task.abort();
                    }
                    return Outcome::Shutdown;
                }
            }
        }
    }

    /// Waits for a QUIC probe or a dial beside a silent link under way, if one is, and
    /// moves to the link it made; whether it did. The link that just ended may have been
    /// ended by that very session (the relay moves the tunnels to it and closes this one).
    async fn adopt_pending(
        &mut self,
        link: &mut AgentLink,
        pending: [&mut Dialing; 2],
        relay: &RelaySpec,
    ) -> bool {
        for task in pending {
            let Some(task) = task.take() else { continue };
            if let Some((new, addr)) = task.await.ok().flatten() {
                self.adopt(link, new, addr, relay);
                return true;
            }
        }
        false
    }

    /// Moves to the link a probe or a dial beside a silent link made: the old link serves
    /// its open tunnels until the relay closes it (make-before-break).
    fn adopt(&mut self, link: &mut AgentLink, new: AgentLink, addr: SocketAddr, relay: &RelaySpec) {
        let transport = new.transport;
        self.moves += 1;
        tracing::info!(relay = %relay.addr, %transport, "moving the link over to a new connection");
        let old = std::mem::replace(link, new);
        self.spawn_drained(old);
        self.worked.insert(relay.addr.clone(), transport);
        self.connected_to = Some(addr);
        self.set_state(LinkState::Connected(
            format!("{} ({})", relay.addr, link.relay_id),
            transport,
        ));
    }

    /// Dials `relay` again in the background, beside a silent QUIC link: QUIC, then in
    /// `auto` TLS/TCP straight to its addresses (not through a proxy: a device behind one
    /// waits for the idle timeout, as before).
    fn redial(
        &self,
        relay: &RelaySpec,
        auto: bool,
        rtt: Duration,
    ) -> tokio::task::JoinHandle<Option<(AgentLink, SocketAddr)>> {
        let quic = self.quic.clone();
        let addr = relay.addr.clone();
        let host = crate::addr::host(&addr).to_owned();
        let server_name = self.config.server_name.clone().unwrap_or(host.clone());
        let tcp = (auto && matches!(self.proxies.for_host(&host), Ok(None))).then(|| {
            (
                self.tcp_tls.clone(),
                self.config.clone(),
                self.held.links.clone(),
            )
        });
        tokio::spawn(async move {
            if let Some(quic) = quic {
                // One handshake a second: its first Initial goes out at once, and the next
                // attempt's as soon as this one gives up (the handshake's own retransmission
                // would wait 1, then 2 s). Hello and welcome get as long again.
                let budget = REDIAL_HANDSHAKE.max(rtt * 4);
                let mut avoid = None;
                let dial = quic.dial(&addr, &server_name, &mut avoid, budget);
                if let Ok(Ok(found)) = tokio::time::timeout(budget * 2, dial).await {
                    return Some(found);
                }
            }
            let (tls, config, held) = tcp?;
            let found = each_address(&addr, &mut None, QUIC_FALLBACK, |to, _| {
                let (tls, config, held, server_name) = (&tls, &config, &held, &server_name);
                async move {
                    let tcp = link::connect_tcp(to)
                        .await
                        .map_err(|e| Outcome::Unreachable(format!("{to}: {e}")))?;
                    let _ = tcp.set_nodelay(true);
                    link::dial_tcp(tcp, tls, config, held, server_name).await
                }
            })
            .await;
            found.ok()
        })
    }

    /// Starts a background try of QUIC to `relay`: a UDP probe of its QUIC port first when
    /// it answers probes, then (only if the probe was answered) a QUIC dial. `None` when
    /// QUIC is off.
    fn probe_quic(&self, relay: &RelaySpec, udp_probe: bool) -> Dialing {
        let quic = self.quic.clone()?;
        let addr = relay.addr.clone();
        // The TCP link's address: a bare HOST:PORT entry serves QUIC on the same port.
        let connected = self.connected_to;
        let server_name = self
            .config
            .server_name
            .clone()
            .unwrap_or_else(|| crate::addr::host(&addr).to_owned());
        Some(tokio::spawn(async move {
            if udp_probe {
                let target = match connected {
                    Some(a) => a,
                    None => *resolve(&addr).await.ok()?.first()?,
                };
                if let Err(why) = probe::probe(target, probe::ANSWER_WAIT).await {
                    tracing::debug!(relay = %addr, reason = %why, "UDP probe not answered");
                    return None;
                }
                tracing::debug!(relay = %addr, "UDP probe answered; dialing QUIC");
            }
            quic.dial(&addr, &server_name, &mut None, QUIC_FALLBACK)
                .await
                .ok()
        }))
    }

    fn spawn_tunnel(&self, request: TunnelRequest) {
        tokio::spawn(counted_tunnel(
            request,
            self.config.clone(),
            self.held.clone(),
            self.tunnels.clone(),
        ));
    }

    fn spawn_drained(&self, link: AgentLink) {
        tokio::spawn(serve_drained(
            link,
            self.config.clone(),
            self.held.clone(),
            self.tunnels.clone(),
            self.shutdown.clone(),
        ));
    }
}

/// What woke a session's loop.
enum Event {
    Request(Result<TunnelRequest, String>),
    Control(Option<RelayControl>),
    ProbeDue,
    Probed(Option<(AgentLink, SocketAddr)>),
    Redialed(Option<(AgentLink, SocketAddr)>),
    Tick,
    Shutdown,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a QUIC link with open tunnels has gone silent (PROTOCOL.md §2, "A silent
/// link"): after [`POKE_AFTER`] without a datagram it is poked, and if that (or anything
/// else it sent) draws no answer for [`SILENT_REDIAL`], or six round trips past the poke,
/// it counts as silent.
struct Silence {
    /// The traffic when something last arrived, and when that was.
    last: Option<link::Traffic>,
    heard_at: tokio::time::Instant,
    /// Whether the link was poked since it last heard anything.
    poked: bool,
    /// Whether it has counted as silent: from then on the agent dials until it has a new
    /// link, even once this one hears something again. What it hears first is often only
    /// the relay's acknowledgement of the agent's own packets, while the relay's data
    /// still waits out its retransmission back-off (bench l: 12.8 s after a 20 s
    /// blackout).
    stalled: bool,
    /// When the agent last dialed beside this link.
    redialed: Option<tokio::time::Instant>,
}

impl Silence {
    fn new(link: &AgentLink) -> Silence {
        Silence {
            last: link.traffic().map(|(t, _)| t),
            heard_at: tokio::time::Instant::now(),
            poked: false,
            stalled: false,
            redialed: None,
        }
    }

    /// How long the link has been silent, once it counts as silent; pokes it on the way.
    /// Only while `busy` (tunnels open): an idle link is left to its keep-alive.
    fn check(&mut self, link: &AgentLink, busy: bool) -> Option<Duration> {
        let (now, rtt) = link.traffic()?;
        if self.stalled {
            return Some(self.heard_at.elapsed());
        }
        let last = self.last.get_or_insert(now);
        if now.received != last.received || !busy {
            *last = now;
            self.heard_at = tokio::time::Instant::now();
            self.poked = false;
            return None;
        }
        let silent = self.heard_at.elapsed();
        if !self.poked && silent >= POKE_AFTER {
            link.poke();
            self.poked = true;
        }
        let answer_due = SILENT_REDIAL.max(POKE_AFTER + rtt * 6);
        self.stalled = now.sent > last.sent && silent >= answer_due;
        self.stalled.then_some(silent)
    }

    /// At most one dial a second ([`RESUME_REDIAL`], less a tick's slack); true if now is
    /// its turn.
    fn may_redial(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let spacing = RESUME_REDIAL - Duration::from_millis(100);
        if self.redialed.is_some_and(|at| now - at < spacing) {
            return false;
        }
        self.redialed = Some(now);
        true
    }
}

/// The probe's result once it finishes (never while none runs).
async fn join_probe(probe: &mut Dialing) -> Option<(AgentLink, SocketAddr)> {
    let Some(handle) = probe.as_mut() else {
        return std::future::pending().await;
    };
    let result = handle.await.ok().flatten();
    *probe = None;
    result
}

/// Serves one tunnel request, counted among the agent's open tunnels.
async fn counted_tunnel(
    request: TunnelRequest,
    config: Arc<AgentConfig>,
    held: Arc<resume::Held>,
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
) {
    tunnels.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    tunnel::serve(request, config, held).await;
    tunnels.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
}

/// Keeps serving tunnel requests on a drained or replaced link until the relay closes it
/// (after this device's new session superseded it and its tunnels ended) or the agent
/// stops.
async fn serve_drained(
    mut link: AgentLink,
    config: Arc<AgentConfig>,
    held: Arc<resume::Held>,
    tunnels: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            request = link.requests.accept() => match request {
                Ok(request) => {
                    tokio::spawn(counted_tunnel(
                        request,
                        config.clone(),
                        held.clone(),
                        tunnels.clone(),
                    ));
                }
                Err(_) => return,
            },
            // Control messages on a link being left are of no use; read so none backs up.
            _ = link.control.recv() => {}
            _ = shutdown.cancelled() => {
                link.requests.close();
                return;
            }
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

/// Resolves `HOST:PORT` (a name may give many addresses).
async fn resolve(relay: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| format!("cannot resolve {relay}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{relay} resolves to no address"));
    }
    Ok(addrs)
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

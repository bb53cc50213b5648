//! QUIC set-up shared by the relay and the agent: UDP sockets, transport settings, the
//! congestion controller (`bbr.rs`), and the relay's socket that answers UDP probes
//! (`probes.rs`).

pub mod bbr;
pub mod probes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// UDP socket buffer size. With the kernel default (~200 KiB) a fast stream overflows the
/// receive buffer and loses packets on loopback; 4 MiB removed the loss (measured here).
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr` with [`UDP_BUFFER`]-sized buffers, ready for quinn.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Serve (and dial) IPv4 too on a [::] socket, where the OS allows it.
        let _ = socket.set_only_v6(false);
    }
    // The kernel may clamp these to net.core.{r,w}mem_max; a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The relay's device endpoint on `socket`, serving with `server`, answering UDP probes
/// (PROTOCOL.md §2c) on the same socket and counting them into `stats`.
pub fn relay_endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    stats: Arc<probes::ProbeStats>,
) -> std::io::Result<quinn::Endpoint> {
    use quinn::Runtime;
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server),
        Arc::new(probes::Answering::new(inner, stats)),
        runtime,
    )
}

/// A quinn endpoint on `socket`, serving with `server` if given.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The largest UDP payload QUIC probes for by default: 1500-byte Ethernet minus IPv6 and UDP
/// headers, safe on the internet (quinn's own default).
pub const MTU_MAX_DEFAULT: u16 = 1452;

/// The range `quic_mtu_max` accepts: QUIC's minimum datagram, up to the largest UDP payload.
pub const MTU_MAX_RANGE: std::ops::RangeInclusive<u16> = 1200..=65527;

/// The congestion controller a QUIC link's sender runs (each end for what it sends).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// Cloudlink's BBR ([`bbr`]): paces at the measured bottleneck rate and does not take
    /// a random loss for congestion, as the kernel's default here does for TCP. The
    /// default: on a lossy mobile path the other three run tunnels at a tenth of plain
    /// TCP (docs/field.md).
    #[default]
    Bbr,
    /// quinn's experimental BBR, for comparison.
    QuinnBbr,
    /// CUBIC (quinn's default): cuts its window on every loss.
    Cubic,
    /// NewReno: halves its window on every loss.
    #[value(name = "newreno")]
    #[serde(rename = "newreno")]
    NewReno,
}

impl Congestion {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::QuinnBbr => "quinn-bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        }
    }

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Bbr => Arc::new(bbr::BbrFactory),
            Congestion::QuinnBbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        }
    }
}

/// A stream's receive window: what one tunnel may have in flight towards its receiver.
/// It must cover the path's bandwidth-delay product plus what waits behind a lost packet
/// during recovery (about one more round trip): 40 Mbit/s × 200 ms is 1 MB, so twice
/// that, rounded up.
pub const STREAM_WINDOW: u32 = 4 << 20;

/// What one end may have sent and not yet had acknowledged, over all its streams: more
/// than one stream's window, so that a fast tunnel is not cut by the others, and five
/// of the longest path's bandwidth-delay products. Not more: quinn keeps every
/// unacknowledged byte, and on loopback 200 concurrent downloads ran as fast with this
/// as with quinn's default of 10 MB, on less than half the relay's memory (docs/field.md).
pub const SEND_WINDOW: u32 = 5_000_000;

/// Everything a QUIC link's transport is set up with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How often an idle link sends a PING (it holds NAT bindings open); `None`: never,
    /// the other end keeps the link alive.
    pub keep_alive: Option<Duration>,
    /// Silence after which the peer counts as gone (the link uses the smaller of the two
    /// ends' values).
    pub idle_timeout: Duration,
    /// Bidirectional streams the peer may have open at once.
    pub peer_bidi_streams: u32,
    /// The largest packet path-MTU discovery tries. Above 1452 it only pays on paths that
    /// carry bigger datagrams (loopback, jumbo-frame data-centre links): there fewer,
    /// larger packets cost less CPU per byte. Elsewhere discovery finds the probes lost
    /// and stays at what works.
    pub mtu_max: u16,
    /// The sender's congestion controller.
    pub congestion: Congestion,
}

/// The quinn transport for `settings`.
pub fn transport(settings: &Settings) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(settings.mtu_max);
    t.mtu_discovery_config(Some(mtu));
    t.keep_alive_interval(settings.keep_alive);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(settings.idle_timeout).ok());
    t.max_concurrent_bidi_streams(settings.peer_bidi_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.congestion_controller_factory(settings.congestion.factory());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.send_window(SEND_WINDOW.into());
    t.datagram_receive_buffer_size(Some(POKE_BUFFER));
    t
}

/// The QUIC DATAGRAM bytes an end keeps unread (PROTOCOL.md §2, "A silent link"): an agent
/// pokes a link that has gone quiet with one-byte datagrams, which only elicit an ACK;
/// nobody reads them, and quinn drops the oldest past this many bytes.
pub const POKE_BUFFER: usize = 64;

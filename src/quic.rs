//! QUIC set-up shared by the relay and the agent: UDP sockets and transport settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// UDP socket buffer size. With the kernel default (~200 KiB) a fast stream overflows the
/// receive buffer and loses packets on loopback; 4 MiB removed the loss (NOTES.md).
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

/// Transport settings: keep-alive holds NAT bindings (and idle tunnels) open; the idle
/// timeout notices a vanished peer; `peer_bidi_streams` caps streams the peer may open;
/// `mtu_max` is the largest packet path-MTU discovery tries. Above 1452 it only pays on
/// paths that carry bigger datagrams (loopback, jumbo-frame data-centre links): there fewer,
/// larger packets cost less CPU per byte. Elsewhere discovery finds the probes lost and
/// stays at what works.
pub fn transport(
    keep_alive: Duration,
    idle_timeout: Duration,
    peer_bidi_streams: u32,
    mtu_max: u16,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(mtu_max);
    t.mtu_discovery_config(Some(mtu));
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.max_concurrent_bidi_streams(peer_bidi_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends 4 MiB over one stream between two endpoints on loopback (whose MTU is 64 KiB)
    /// and returns the packet size path-MTU discovery settled on at the sender.
    async fn settled_mtu(mtu_max: u16) -> u16 {
        crate::tls_client::install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, generated.cert.pem()).unwrap();
        let material = crate::relay::tls::Material {
            certs: vec![generated.cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(
                generated.signing_key.serialize_der().into(),
            ),
            cert_path: cert_path.clone(),
        };
        let config = || transport(Duration::from_secs(5), Duration::from_secs(30), 4, mtu_max);
        let server = crate::relay::tls::quic_server(&material, config()).unwrap();
        let server = endpoint(
            udp_socket("127.0.0.1:0".parse().unwrap()).unwrap(),
            Some(server),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let receiver = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            while recv.read_chunk(usize::MAX, true).await.unwrap().is_some() {}
            conn.close(0u32.into(), b"done");
        });
        let tls = crate::tls_client::config(
            crate::tls_client::Trust::CaFile(&cert_path),
            &[crate::proto::ALPN],
        )
        .unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(config()));
        let client_end =
            endpoint(udp_socket("127.0.0.1:0".parse().unwrap()).unwrap(), None).unwrap();
        let conn = client_end
            .connect_with(client, addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
        for _ in 0..64 {
            send.write_chunk(chunk.clone()).await.unwrap();
        }
        send.finish().unwrap();
        tokio::time::timeout(Duration::from_secs(30), receiver)
            .await
            .expect("the transfer ends")
            .unwrap();
        conn.stats().path.current_mtu
    }

    #[tokio::test]
    async fn mtu_stays_internet_safe_by_default_and_grows_where_allowed() {
        assert_eq!(settled_mtu(MTU_MAX_DEFAULT).await, MTU_MAX_DEFAULT);
        let big = settled_mtu(8952).await;
        assert!(
            big > MTU_MAX_DEFAULT && big <= 8952,
            "loopback carries 8952-byte datagrams; discovery settled on {big}"
        );
    }
}

//! Whether the device's path to the relay still exists, so that the agent dials again at
//! once when the address or route its TLS/TCP link uses goes away (PROTOCOL.md §2e,
//! "Waiting"), instead of waiting out the link's idle timeout on a connection nothing can
//! reach any more. A QUIC link needs none of this: QUIC moves to the new address by itself.
//!
//! Route netlink (address, route and interface changes) only wakes the watch; each wake-up
//! asks the kernel itself, with sockets that never send: is the link's local address
//! still assigned, and is there still a route to the relay? Parsing netlink's messages
//! would only re-derive what the kernel answers directly.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use tokio::sync::watch;

/// The route netlink groups that announce a change of the path: interfaces
/// (`RTMGRP_LINK`), IPv4 and IPv6 addresses (`RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`)
/// and routes (`RTMGRP_IPV4_ROUTE`, `RTMGRP_IPV6_ROUTE`), from `<linux/rtnetlink.h>`.
const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

/// Changes come in bursts (an address goes, then each of its routes): the path is looked
/// at once the burst has been quiet this long.
const SETTLE: Duration = Duration::from_millis(100);

/// Resolves, with why, once the path from `local` to `remote` is gone: `local`'s address
/// is no longer the device's, or nothing routes to `remote` any more. Never resolves where
/// route netlink cannot be opened (then the link's idle timeout notices, as before).
pub async fn gone(local: SocketAddr, remote: SocketAddr) -> String {
    let Some(mut changes) = changes() else {
        return std::future::pending().await;
    };
    // What happened between the dial and now counts too.
    if let Some(why) = lost(local, remote) {
        return why;
    }
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        // Let the burst finish.
        while let Ok(Ok(())) = tokio::time::timeout(SETTLE, changes.changed()).await {}
        if let Some(why) = lost(local, remote) {
            return why;
        }
    }
}

/// A counter that moves on every burst of route netlink messages, from a thread of its own
/// that reads them (a blocking read: the crate keeps `unsafe` out of this, and tokio can
/// only wrap a raw descriptor unsafely). One thread for the agent's life, started by the
/// first TLS/TCP link; `None` where route netlink cannot be opened.
fn changes() -> Option<watch::Receiver<u64>> {
    static CHANGES: OnceLock<Option<watch::Sender<u64>>> = OnceLock::new();
    let sender = CHANGES.get_or_init(|| {
        let fd = match open() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch addresses and routes; a TLS/TCP link whose path goes away is noticed at its idle timeout");
                return None;
            }
        };
        let (tx, _) = watch::channel(0u64);
        let sender = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("path-watch".into())
            .spawn(move || read_forever(&fd, &tx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the address and route watch");
            return None;
        }
        Some(sender)
    });
    sender.as_ref().map(watch::Sender::subscribe)
}

/// Reads route netlink messages until the socket fails, counting each read on `tx`. An
/// overrun (ENOBUFS: more changes than the socket's buffer held) counts as a change too.
fn read_forever(fd: &std::os::fd::OwnedFd, tx: &watch::Sender<u64>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rustix::net::recv(fd, &mut buf[..], rustix::net::RecvFlags::empty()) {
            Ok(_) | Err(rustix::io::Errno::NOBUFS) => tx.send_modify(|n| *n += 1),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the address and route watch stopped");
                return;
            }
        }
    }
}

/// A route netlink socket subscribed to [`GROUPS`] (protocol 0 is `NETLINK_ROUTE`).
fn open() -> std::io::Result<std::os::fd::OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, GROUPS))?;
    Ok(fd)
}

/// Why the path from `local` to `remote` is gone, if it is.
pub fn lost(local: SocketAddr, remote: SocketAddr) -> Option<String> {
    let unspecified = match local.ip() {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    // Binding to an address the device no longer has fails (EADDRNOTAVAIL).
    if let Err(e) = std::net::UdpSocket::bind((local.ip(), 0)) {
        if e.kind() == std::io::ErrorKind::AddrNotAvailable {
            return Some(format!("the device no longer has address {}", local.ip()));
        }
    }
    // Connecting a UDP socket looks the route up and sends nothing.
    let probe = std::net::UdpSocket::bind((unspecified, 0)).ok()?;
    match probe.connect(remote) {
        Ok(()) => None,
        Err(e) => Some(format!("no route to {remote} any more ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_the_device_has_and_a_route_are_a_path() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(lost(local, "127.0.0.2:443".parse().unwrap()), None);
    }

    #[test]
    fn an_address_the_device_does_not_have_is_a_lost_path() {
        // TEST-NET-3 (RFC 5737): never assigned to a test machine.
        let local: SocketAddr = "203.0.113.77:40000".parse().unwrap();
        let why = lost(local, "127.0.0.1:443".parse().unwrap()).expect("lost");
        assert!(why.contains("203.0.113.77"), "{why}");
    }
}

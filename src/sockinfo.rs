//! What the kernel knows about a TCP socket that no safe wrapper asks: how many bytes its
//! send queue holds that it has not sent yet (`TCP_INFO`'s `tcpi_notsent_bytes`, Linux
//! 4.6 and later); and the one TCP option no safe wrapper sets: the retransmission
//! timeout's ceiling (`TCP_RTO_MAX_MS`, Linux 6.15 and later).
//!
//! The relay's tunnel credit counts a byte as taken by the user once the kernel has sent
//! it (PROTOCOL.md §2d), so that a user who stops reading leaves the bytes in flight in
//! their socket's kernel queue, not in the relay. socket2 0.6, rustix 1.1 and nix 0.31
//! have no safe call for `TCP_INFO` (checked 2026-12-07), so this module holds the crate's
//! only `unsafe`: one `getsockopt(2)` and one `setsockopt(2)` on a borrowed descriptor.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};

/// Bytes in `socket`'s send queue not yet sent; `None` when the kernel cannot say (not a
/// TCP socket, or a kernel without the field).
pub fn unsent_bytes(socket: &impl AsFd) -> Option<u64> {
    let fd = socket.as_fd();
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a descriptor borrowed for the length of the call; `info` is a
    // writable buffer of `len` bytes, of which the kernel writes at most `len` and sets
    // `len` to the number it wrote.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // A kernel older than the field writes a shorter struct.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
    if (len as usize) < needed {
        return None;
    }
    // SAFETY: the buffer was zeroed and then (partly) written by the kernel; every field of
    // `tcp_info` is a plain integer, for which any bit pattern is valid.
    let info = unsafe { info.assume_init() };
    Some(u64::from(info.tcpi_notsent_bytes))
}

/// `TCP_RTO_MAX_MS` from `<linux/tcp.h>` (Linux 6.15); the libc crate does not have it yet.
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Caps `socket`'s retransmission timeout at `max` (at least 1 s, the kernel's floor for
/// this option): after a blackout a connection then retransmits within `max` of the path
/// coming back, instead of up to two minutes later on its exponential back-off (PROTOCOL.md
/// §2e: a device link that lived through a blackout carries on at once). Whether the
/// kernel took it: older kernels answer `ENOPROTOOPT`.
pub fn cap_retransmit_timeout(socket: &impl AsFd, max: std::time::Duration) -> bool {
    let ms = max.as_millis().clamp(1000, 120_000) as libc::c_int;
    // SAFETY: `socket` is a descriptor borrowed for the length of the call; the option
    // value is a readable `c_int` of the length given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            std::ptr::from_ref(&ms).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_retransmission_timeout_is_capped_where_the_kernel_can() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let capped = cap_retransmit_timeout(&socket, std::time::Duration::from_secs(1));
        // These machines run Linux 6.18 (NOTES.md); an older kernel says no, cleanly.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        assert_eq!(capped, (major, minor) >= (6, 15), "kernel {release}");
    }

    #[test]
    fn bytes_a_reader_does_not_take_wait_unsent_and_go_once_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        // Small buffers, so that the reader's side fills quickly, and the writer's queue
        // too: draining megabytes through a 4 KiB window takes a debug build minutes.
        socket2::SockRef::from(&reader)
            .set_recv_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&writer)
            .set_send_buffer_size(32 * 1024)
            .unwrap();
        assert_eq!(unsent_bytes(&writer), Some(0));
        writer.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        // Until the send queue is full: the reader takes nothing meanwhile.
        for _ in 0..10_000 {
            match writer.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let unsent = unsent_bytes(&writer).unwrap();
        assert!(
            unsent > 0,
            "nothing unsent after {written} bytes to a full reader"
        );
        assert!(unsent <= written as u64);
        let mut buf = vec![0u8; 256 * 1024];
        let mut read = 0usize;
        while read < written {
            read += reader.read(&mut buf).unwrap();
        }
        assert_eq!(unsent_bytes(&writer), Some(0));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(unsent_bytes(&udp), None, "not a TCP socket");
    }

    /// Writes to `writer` until its queue takes nothing more, and says what waits unsent.
    fn fill(writer: &mut std::net::TcpStream) -> u64 {
        writer.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 1200];
        // In-flight bytes are acknowledged (and leave the queue) a moment after the
        // reader's window closes: until a few tries in a row take nothing.
        let mut idle = 0;
        for _ in 0..100_000 {
            match writer.write(&chunk) {
                Ok(_) => idle = 0,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    idle += 1;
                    if idle == 5 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
        unsent_bytes(writer).unwrap()
    }

    #[test]
    fn a_stalled_reader_s_sender_queues_what_capacity_of_says() {
        use crate::credit::UserQueue;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Autotuned: the reader first takes 64 MiB at full speed, so the send buffer grows.
        let mut writer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        let total = 64 << 20;
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut read = 0;
            while read < total {
                read += reader.read(&mut buf).unwrap();
            }
            reader
        });
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            writer.write_all(&chunk).unwrap();
        }
        let _reader = drain.join().unwrap();
        // Set: the kernel doubles what is asked for its overhead.
        let mut small = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_small_reader, _) = listener.accept().unwrap();
        socket2::SockRef::from(&small)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        for (name, socket) in [("autotuned", &mut writer), ("set", &mut small)] {
            let unsent = fill(socket);
            let send_buffer = socket2::SockRef::from(&*socket).send_buffer_size().unwrap() as u64;
            let capacity = UserQueue::capacity_of(send_buffer);
            // At least: the kernel may queue a little past its figure (one more write).
            assert!(
                unsent >= capacity,
                "{name}: {unsent} bytes queued, SO_SNDBUF {send_buffer}, capacity_of {capacity}"
            );
        }
    }
}

//! The device link's two transports behind one face: QUIC (PROTOCOL.md §2) and TLS over
//! TCP carrying HTTP/2 streams (§2b), for networks that block UDP.
//!
//! A tunnel stream is a [`LinkSend`] and a [`LinkRecv`] whichever transport carries it,
//! so the hot path ([`crate::forward`]) and everything above it (admission, audit,
//! forwarding) never ask which one it is. The match per chunk costs nothing measurable
//! next to a syscall.

mod chunks;
#[cfg(feature = "relay")]
pub mod device;
pub mod h2;
pub mod quic;

use bytes::Bytes;
use quinn::VarInt;

/// The TLS/TCP device link's retransmission timeout ceiling, on both ends (PROTOCOL.md
/// §2b): a link that outlived a blackout retransmits within a second of the path coming
/// back, where TCP's exponential back-off would wait up to two minutes and the tunnels'
/// users with it.
pub const TCP_RTO_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets up a TLS/TCP device link's socket for blackouts (PROTOCOL.md §2b): its
/// retransmission timeout capped at [`TCP_RTO_MAX`], and unacknowledged data given up only
/// after `idle` (`TCP_USER_TIMEOUT`), the link's idle timeout. Without the second, the
/// kernel would count its retransmissions (`tcp_retries2`), which at a one-second ceiling
/// run out after about 15 s and end a link its idle timeout would have kept.
pub fn tune_tcp(socket: &tokio::net::TcpStream, idle: std::time::Duration) {
    if crate::sockinfo::cap_retransmit_timeout(socket, TCP_RTO_MAX) {
        let _ = socket2::SockRef::from(socket).set_tcp_user_timeout(Some(idle));
    }
}

pub use chunks::{Abort, ChunkRecv, ChunkSend, End};

/// ALPN of the TLS/TCP device link (PROTOCOL.md §2b).
pub const TCP_ALPN: &[u8] = b"cloudlink-tcp/1";

/// Which transport a device link uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS over TCP, tunnels as HTTP/2 streams.
    Tcp,
}

impl Transport {
    /// The name used in the API, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sending half of a tunnel stream.
pub enum LinkSend {
    /// A QUIC stream.
    Quic(quinn::SendStream),
    /// An HTTP/2 stream.
    H2(::h2::SendStream<Bytes>),
}

/// The receiving half of a tunnel stream.
pub enum LinkRecv {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// An HTTP/2 stream.
    H2(::h2::RecvStream),
}

impl LinkSend {
    /// Resets the stream with `code` (QUIC) or `CANCEL` (HTTP/2, which has no room for
    /// our codes; PROTOCOL.md §2b).
    pub fn reset(&mut self, code: u32) {
        match self {
            LinkSend::Quic(s) => {
                let _ = s.reset(VarInt::from_u32(code));
            }
            LinkSend::H2(s) => s.send_reset(::h2::Reason::CANCEL),
        }
    }
}

impl LinkRecv {
    /// Tells the sender to stop (QUIC); on HTTP/2 the reset of the send half covers both.
    pub fn stop(&mut self, code: u32) {
        if let LinkRecv::Quic(r) = self {
            let _ = r.stop(VarInt::from_u32(code));
        }
    }
}

impl Abort for LinkSend {
    fn abort(&mut self, code: u32) {
        self.reset(code);
    }
}

impl Abort for LinkRecv {
    fn abort(&mut self, code: u32) {
        self.stop(code);
    }
}

impl ChunkSend for LinkSend {
    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), End> {
        match self {
            LinkSend::Quic(s) => ChunkSend::write_chunk(s, chunk).await,
            LinkSend::H2(s) => h2::write_chunk(s, chunk).await,
        }
    }

    fn finish(&mut self) {
        match self {
            LinkSend::Quic(s) => ChunkSend::finish(s),
            LinkSend::H2(s) => h2::finish(s),
        }
    }
}

impl ChunkRecv for LinkRecv {
    async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
        match self {
            LinkRecv::Quic(r) => ChunkRecv::read_chunks(r, bufs).await,
            LinkRecv::H2(r) => h2::read_chunks(r, bufs).await,
        }
    }
}

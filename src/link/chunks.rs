//! What the hot path drives, whichever transport carries a tunnel stream: its two halves
//! as chunk traits, and how a stream ended.

use std::future::Future;

use bytes::Bytes;

/// How a joined pair of streams ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides closed cleanly (FIN both ways).
    Closed,
    /// The device link's side reset its stream (or stopped reading ours).
    LinkReset,
    /// The socket failed or was reset.
    SocketReset,
    /// The device link's connection itself was lost.
    ConnectionLost(String),
    /// No byte moved either way for the idle timeout.
    Idle,
    /// Cut from outside (revocation, shutdown); the canceller knows why.
    Cancelled,
}

impl End {
    /// A short label for logs, metrics and the audit row.
    pub fn reason(&self) -> String {
        match self {
            End::Closed => "closed".into(),
            // The label predates the TLS/TCP link; audit rows and metrics keep it.
            End::LinkReset => "reset_by_quic_peer".into(),
            End::SocketReset => "reset_by_socket_peer".into(),
            End::ConnectionLost(_) => "connection_lost".into(),
            End::Idle => "idle".into(),
            End::Cancelled => "cancelled".into(),
        }
    }

    /// Whether the socket should be reset (RST) rather than closed.
    pub fn resets_socket(&self) -> bool {
        !matches!(self, End::Closed)
    }
}

/// The sending half of a tunnel stream, as the hot path uses it. A trait so that the loops
/// can be driven by in-memory streams in tests (the allocation test counts what the loops
/// themselves allocate, without quinn's own work).
pub trait ChunkSend {
    /// Queues one chunk, waiting for flow-control credit.
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), End>>;
    /// Ends the stream (FIN).
    fn finish(&mut self);
}

/// The receiving half of a tunnel stream, as the hot path uses it.
pub trait ChunkRecv {
    /// Fills `bufs` with the chunks that have arrived (at least one, waiting if none has);
    /// how many, or `None` at FIN.
    fn read_chunks(
        &mut self,
        bufs: &mut [Bytes],
    ) -> impl Future<Output = Result<Option<usize>, End>>;
}

/// Ends one half of a stream abnormally, with `code` where the transport has room for it:
/// a reset of the sending half, a stop of the receiving half.
pub trait Abort {
    /// Resets or stops this half.
    fn abort(&mut self, code: u32);
}

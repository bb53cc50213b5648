//! What every part of the CONNECT edge shares: the client connection (plain TCP, TLS, or
//! in-process), its places under the edge caps while unauthenticated, and the refusal
//! answer.

use std::time::Duration;

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;

use super::refusal::Refusal;
use crate::forward;
use crate::relay::limits::SourceSlot;
use crate::relay::state::Shared;

/// A client connection the proxy serves: plain TCP or TLS over TCP.
pub trait ClientConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// A client inside this process, which gets no HTTP answer: it learns the outcome
    /// from admission's typed result.
    const IN_PROCESS: bool = false;
    /// The read half after the head.
    type R: AsyncRead + Unpin + Send;
    /// The write half.
    type W: AsyncWrite + Unpin + Send;
    /// The TCP socket underneath (for the reset-on-crash linger setting); `None` for a
    /// client inside this process.
    fn tcp(&self) -> Option<&TcpStream>;
    /// The socket itself when the client speaks plain TCP (a forwarded tunnel can then
    /// `splice` it); `None` over TLS.
    fn plain_halves<'a>(r: &'a Self::R, w: &'a Self::W) -> Option<&'a TcpStream>;
    /// Splits for the two directions of a tunnel.
    fn halves(self) -> (Self::R, Self::W);
    /// Closes the connection after a tunnel: with a TCP RST when `reset`, otherwise with an
    /// orderly FIN (the linger armed by [`forward::arm_reset`] is disarmed first).
    fn close(r: Self::R, w: Self::W, reset: bool);
}

impl ClientConn for TcpStream {
    type R = OwnedReadHalf;
    type W = OwnedWriteHalf;
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn plain_halves<'a>(r: &'a Self::R, _w: &'a Self::W) -> Option<&'a TcpStream> {
        Some(r.as_ref())
    }
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn close(r: Self::R, w: Self::W, reset: bool) {
        if reset {
            forward::reset_tcp(r, w);
        } else {
            forward::disarm_reset(r.as_ref());
        }
    }
}

impl ClientConn for TlsStream<TcpStream> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
    fn plain_halves<'a>(_r: &'a Self::R, _w: &'a Self::W) -> Option<&'a TcpStream> {
        None
    }
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn close(r: Self::R, w: Self::W, reset: bool) {
        let stream = r.unsplit(w);
        if reset {
            forward::arm_reset(stream.get_ref().0);
        } else {
            forward::disarm_reset(stream.get_ref().0);
        }
    }
}

/// A client inside this process (the browser terminal): one end of an in-memory pipe.
impl ClientConn for DuplexStream {
    const IN_PROCESS: bool = true;
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
    fn plain_halves<'a>(_r: &'a Self::R, _w: &'a Self::W) -> Option<&'a TcpStream> {
        None
    }
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn close(_r: Self::R, _w: Self::W, _reset: bool) {
        // Dropping the halves ends the pipe; the other end reads EOF either way.
    }
}

/// What an unauthenticated connection holds: its place under the total cap, and its place
/// under its source address's cap (`None` when that source had none left). Both are given
/// back once the caller has authenticated, or when the connection ends.
pub struct Pending {
    /// The place under `limits.proxy_unauthenticated_max`.
    pub(super) _total: OwnedSemaphorePermit,
    /// The place under `limits.proxy_unauthenticated_per_source`.
    pub(super) slot: Option<SourceSlot>,
}

impl Pending {
    /// Places for a connection from `ip` that has not authenticated yet, if there are
    /// any: for connections that do not wait in a CONNECT listener's accept queue (the
    /// terminal's in-process tunnels, the SSH gateway).
    pub fn take(state: &Shared, ip: std::net::IpAddr) -> Result<Pending, Refusal> {
        let Ok(total) = state.proxy_pending.clone().try_acquire_owned() else {
            return Err(Refusal::TooMany(1, "connections waiting to be admitted"));
        };
        let Some(slot) = state.proxy_sources.take(ip) else {
            return Err(Refusal::TooMany(1, "connections from your address"));
        };
        Ok(Pending {
            _total: total,
            slot: Some(slot),
        })
    }
}

/// Answers `refusal` and closes.
pub async fn refuse<C: ClientConn>(client: C, state: &Shared, version: &str, refusal: Refusal) {
    let (status, _, side) = refusal.status();
    tracing::info!(
        status,
        side = side.as_str(),
        "CONNECT refused: {}",
        crate::logsafe::Peer(&refusal.message())
    );
    state
        .metrics
        .proxy_responses
        .with_label_values(&[&status.to_string(), side.as_str()])
        .inc();
    answer_and_close(client, &refusal.response(version)).await;
}

/// Writes a whole error answer and closes, without letting a RST overtake it.
async fn answer_and_close<C: ClientConn>(mut client: C, answer: &[u8]) {
    let _ = client.write_all(answer).await;
    let _ = client.shutdown().await;
    // Closing with unread bytes from the client would send a RST that can overtake the
    // answer; read (and drop) what is still coming for a moment first, within bounds.
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

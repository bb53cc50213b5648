//! The hot path: one device-link stream (QUIC, or HTTP/2 over TLS/TCP; [`crate::link`])
//! joined to one byte stream (a TCP socket, or TLS over one).
//!
//! Both directions run at once and each ends on its own: a FIN on one side becomes a
//! half-close on the other while the other direction keeps flowing. A reset on either side
//! ends both, and the caller resets the socket. Per chunk there is one `read_chunk` or one
//! buffer split, one write and one relaxed atomic add: no lock, no log, no copy.
//!
//! # A crash must not look like a clean end
//!
//! When a process dies, the kernel closes its sockets. A socket closed with nothing unread
//! sends a FIN, and the far end reads a clean end of stream: a download cut short by a
//! relay crash would look complete. So from the moment the far end can see a tunnel socket
//! (before the `200` is written, before the handshake of a socket we dial:
//! [`connect_armed`]) it has `SO_LINGER` set to zero ([`arm_reset`]): closing it, by us or
//! by the kernel when the process dies, sends a RST. Only an orderly end (both directions finished with FINs, [`End::Closed`])
//! disarms it ([`disarm_reset`]) before the socket is dropped. A half-close does not
//! disarm: `shutdown(Write)` sends its FIN at once whatever the linger setting, and a crash
//! while the other direction still flows must still reset. This costs nothing per chunk and
//! needs no cooperation from the peer; the alternatives (a trailer or length framing on
//! the user side) would break plain CONNECT clients.
//!
//! On the link's side a crashed peer sends nothing; the survivor notices by the idle timeout
//! (keep-alive 10 s, idle 30 s by default), ends the tunnel as [`End::ConnectionLost`]
//! and resets its socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::future::Future;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::credit::{Gate, Grant, UserQueue, Wait};
use crate::link::{ChunkRecv, ChunkSend, End, LinkRecv, LinkSend};
use crate::proto::messages::codes;

/// The most bytes moved per read: 64 KiB cut CPU per GB by a quarter to a third against
/// 8 KiB (measured with the tunnel benchmark on a 2-core machine).
pub const CHUNK: usize = 64 * 1024;

/// How much the socket-to-QUIC buffer holds; reads are carved from it and handed to quinn
/// as `Bytes`, and the allocation is reused once quinn has released every piece of it.
const BUFFER: usize = 4 * CHUNK;

/// The socket-to-link buffer until a read fills half of it.
const FIRST_BUFFER: usize = 16 * 1024;

/// Bytes moved each way, readable while the tunnel runs (for idle checks) and summed into
/// the audit row and metrics when it ends.
#[derive(Debug, Default)]
pub struct Counters {
    /// From the user towards the device.
    pub up: AtomicU64,
    /// From the device towards the user.
    pub down: AtomicU64,
}

impl Counters {
    /// Bytes moved both ways so far.
    pub fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }

    /// The counters of a pump whose socket is on `side`: (socket to link, link to socket).
    pub fn ways(&self, side: Side) -> (&AtomicU64, &AtomicU64) {
        match side {
            Side::User => (&self.up, &self.down),
            Side::Device => (&self.down, &self.up),
        }
    }
}

/// Whose socket a pump joins to the device link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The user's (the relay's CONNECT client): what it sends goes up.
    User,
    /// The device's service (the agent's local connection): what it sends goes down.
    Device,
}

/// How one direction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Dir {
    /// A clean end of stream, passed on as a FIN.
    Eof,
    /// Anything else; ends the whole tunnel.
    Abnormal(End),
}

/// How a tunnel's device → user direction is paced (PROTOCOL.md §2d).
pub enum Credit<'a> {
    /// No credit (a peer without the feature): the transports' windows bound it.
    None,
    /// The agent's side: read from the service only what the relay has granted.
    Obey(&'a Gate),
    /// The relay's side: grant as the user's socket takes the bytes; `user` says how many
    /// bytes the user socket's kernel holds unsent and how much its queue takes.
    Grant {
        /// The tunnel's grant.
        grant: &'a mut Grant,
        /// The user socket's kernel queue.
        user: &'a (dyn Fn() -> UserQueue + Send + Sync),
    },
}

/// Socket to link: reads into one reused buffer and hands each read to the stream as
/// `Bytes` (no copy); the buffer's allocation is reclaimed once the link releases the
/// pieces. Adds what it moves to `counter`. With a `gate` (the agent under credit) it reads
/// only what the gate allows, waiting for the relay's credit when none is left.
pub async fn socket_to_link<R: AsyncRead + Unpin, S: ChunkSend>(
    socket: &mut R,
    send: &mut S,
    counter: &AtomicU64,
    gate: Option<&Gate>,
) -> Dir {
    // Small until the socket shows it sends more than a few packets at a time: a tunnel
    // whose user only types (or only reads) costs 16 KiB here, not 256.
    let mut buf = BytesMut::new();
    let mut size = FIRST_BUFFER;
    let mut sent = 0u64;
    loop {
        // Never a read with no room: it would return 0, which reads as the end.
        let room = match gate {
            Some(gate) => {
                // Out of credit: how long the relay kept the agent waiting, for tracing.
                let out = (gate.limit() <= sent).then(std::time::Instant::now);
                let room = gate.room(sent).await;
                if let Some(since) = out {
                    tracing::trace!(sent, waited = ?since.elapsed(), "waited for credit");
                }
                usize::try_from(room).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        if buf.capacity() - buf.len() < size.min(CHUNK) {
            buf.reserve(size);
        }
        match socket.read_buf(&mut (&mut buf).limit(room)).await {
            Ok(0) => {
                send.finish();
                return Dir::Eof;
            }
            Ok(n) => {
                if n >= FIRST_BUFFER / 2 {
                    size = BUFFER;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
                sent += n as u64;
                if let Err(end) = send.write_chunk(buf.split().freeze()).await {
                    return Dir::Abnormal(end);
                }
            }
            Err(_) => return Dir::Abnormal(End::SocketReset),
        }
    }
}

/// Chunks taken from quinn per read. Each chunk is one STREAM frame (at most a packet), so
/// writing them one by one would cost a syscall per packet; a batch goes out in one
/// vectored write.
pub const BATCH: usize = 64;

/// Link to socket: the chunks the link hands over go to the socket as they are, a batch
/// per vectored write, with no copy in between. Adds what it moves to `counter`.
pub async fn link_to_socket<C: ChunkRecv, W: AsyncWrite + Unpin>(
    recv: &mut C,
    socket: &mut W,
    counter: &AtomicU64,
) -> Dir {
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let len: usize = chunks[..n].iter().map(Bytes::len).sum();
                counter.fetch_add(len as u64, Ordering::Relaxed);
                if write_all_chunks(socket, &mut chunks[..n]).await.is_err() {
                    return Dir::Abnormal(End::SocketReset);
                }
            }
            Ok(None) => {
                // FIN: half-close the socket; the other direction keeps going.
                return match socket.shutdown().await {
                    Ok(()) => Dir::Eof,
                    Err(_) => Dir::Abnormal(End::SocketReset),
                };
            }
            Err(end) => return Dir::Abnormal(end),
        }
    }
}

/// Link to a user's socket under credit (the relay's side, PROTOCOL.md §2d): the chunks
/// go to the socket as they are when it takes them at once; what it does not take waits in
/// one compact buffer, and the link is read on meanwhile (credit bounds it), so nothing
/// pins the link's receive batches. After each step the grant is brought up to date from
/// what the socket's kernel has sent. Adds what it moves to `counter`.
pub async fn link_to_user<C: ChunkRecv, W: AsyncWrite + Unpin>(
    recv: &mut C,
    socket: &mut W,
    counter: &AtomicU64,
    grant: &mut Grant,
    user: &(dyn Fn() -> UserQueue + Send + Sync),
) -> Dir {
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    let budget = grant.budget().clone();
    let mut held = Held::new(&budget);
    let (mut received, mut written) = (0u64, 0u64);
    let mut fin = false;
    // A tunnel opened while the budget was short starts with less than a window, maybe
    // none: it waits for the budget from the start.
    let mut wait = grant.update(0, 0, user);
    loop {
        if fin && held.is_empty() {
            // FIN: half-close the socket; the other direction keeps going.
            return match socket.shutdown().await {
                Ok(()) => Dir::Eof,
                Err(_) => Dir::Abnormal(End::SocketReset),
            };
        }
        let poll = match wait {
            Wait::Poll(d) => Some(d),
            Wait::Budget => Some(Duration::from_millis(50)),
            Wait::Nothing => None,
        };
        tokio::select! {
            r = recv.read_chunks(&mut chunks), if !fin => match r {
                Ok(Some(n)) => {
                    let len: u64 = chunks[..n].iter().map(|c| c.len() as u64).sum();
                    counter.fetch_add(len, Ordering::Relaxed);
                    received += len;
                    if received > grant.limit() {
                        tracing::warn!(received, limit = grant.limit(), "the agent sent past its credit; resetting the tunnel");
                        return Dir::Abnormal(End::LinkReset);
                    }
                    if held.is_empty() {
                        match try_write_chunks(socket, &mut chunks[..n]).await {
                            Ok(w) => written += w as u64,
                            Err(_) => return Dir::Abnormal(End::SocketReset),
                        }
                    }
                    // What the socket did not take waits, compact, behind what waits already.
                    held.append(&mut chunks[..n]);
                }
                Ok(None) => fin = true,
                Err(end) => return Dir::Abnormal(end),
            },
            w = socket.write(&held.bytes), if !held.is_empty() => match w {
                Ok(0) | Err(_) => return Dir::Abnormal(End::SocketReset),
                Ok(n) => {
                    held.advance(n);
                    written += n as u64;
                }
            },
            _ = sleep_or_never(poll) => {}
            _ = budget.freed(), if wait == Wait::Budget => {}
        }
        wait = grant.update(received, written, user);
    }
}

/// Bytes a user's socket would not take yet, in one compact buffer, counted in the relay's
/// budget (for `cloudlink_tunnel_held_bytes`) while they wait.
struct Held<'a> {
    bytes: BytesMut,
    budget: &'a crate::credit::Budget,
}

impl<'a> Held<'a> {
    fn new(budget: &'a crate::credit::Budget) -> Held<'a> {
        Held {
            bytes: BytesMut::new(),
            budget,
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Moves what is left of `chunks` behind what waits already, releasing the chunks
    /// (and the receive batches they pin).
    fn append(&mut self, chunks: &mut [Bytes]) {
        let len: usize = chunks.iter().map(Bytes::len).sum();
        if len == 0 {
            return;
        }
        let free = self.bytes.capacity() - self.bytes.len();
        if free < len {
            // A quarter's slack, not a doubling: a backlog may be megabytes. (`reserve`
            // would double, as `Vec` does.)
            let held = self.bytes.len();
            let mut grown = BytesMut::with_capacity(held + len.max(held / 4));
            grown.extend_from_slice(&self.bytes);
            self.bytes = grown;
        }
        for chunk in chunks.iter_mut() {
            self.bytes.extend_from_slice(chunk);
            *chunk = Bytes::new();
        }
        self.budget.hold(len as u64);
    }

    /// Forgets the first `n` bytes, written; a backlog that has drained gives its memory
    /// back.
    fn advance(&mut self, n: usize) {
        self.bytes.advance(n);
        self.budget.release(n as u64);
        if self.bytes.is_empty() && self.bytes.capacity() > CHUNK {
            self.bytes = BytesMut::new();
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes.len() as u64);
    }
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Writes as much of `chunks` as the socket takes without waiting, with vectored writes,
/// releasing each chunk once written; the bytes written. What is left stays in `chunks`.
async fn try_write_chunks<W: AsyncWrite + Unpin>(
    socket: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<usize> {
    let mut first = 0;
    let mut total = 0;
    while first < chunks.len() {
        let written = {
            let mut slices = [std::io::IoSlice::new(&[]); BATCH];
            let pending = &chunks[first..];
            for (slice, chunk) in slices.iter_mut().zip(pending) {
                *slice = std::io::IoSlice::new(chunk);
            }
            let slices = &slices[..pending.len().min(BATCH)];
            match poll_write_now(socket, slices).await {
                Some(r) => r?,
                None => return Ok(total),
            }
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        total += written;
        first = advance(chunks, first, written);
    }
    Ok(total)
}

/// One vectored write if the socket takes it now; `None` if it would wait.
async fn poll_write_now<W: AsyncWrite + Unpin>(
    socket: &mut W,
    slices: &[std::io::IoSlice<'_>],
) -> Option<std::io::Result<usize>> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(
            match std::pin::Pin::new(&mut *socket).poll_write_vectored(cx, slices) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            },
        )
    })
    .await
}

/// Writes every byte of `chunks` with vectored writes, releasing each chunk once written.
///
/// A chunk from the link is a slice of the buffer it arrived in (a QUIC receive batch, an
/// HTTP/2 read buffer), and keeps all of that buffer alive. While the socket takes bytes
/// at once that costs nothing; when it cannot (its reader is slow or has stopped), what is
/// left is copied into one buffer of exactly its size first, so a stalled tunnel holds the
/// bytes it holds and not the whole batches they came in (docs/memory.md).
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    socket: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    try_write_chunks(socket, chunks).await?;
    if chunks.iter().any(|c| !c.is_empty()) {
        return socket.write_all(&compact(chunks)).await;
    }
    Ok(())
}

/// Releases the first `written` bytes of `chunks[first..]`; the index of the first chunk
/// with bytes left (or `chunks.len()`).
fn advance(chunks: &mut [Bytes], mut first: usize, written: usize) -> usize {
    let mut left = written;
    while left > 0 && first < chunks.len() {
        let len = chunks[first].len();
        if len <= left {
            left -= len;
            chunks[first] = Bytes::new();
            first += 1;
        } else {
            Buf::advance(&mut chunks[first], left);
            left = 0;
        }
    }
    // Skip chunks that were empty to begin with.
    while first < chunks.len() && chunks[first].is_empty() {
        first += 1;
    }
    first
}

/// Moves the bytes of `chunks` into one buffer of their exact size (the chunks are left
/// empty), and so lets go of the buffers they pinned.
fn compact(chunks: &mut [Bytes]) -> Bytes {
    let len: usize = chunks.iter().map(Bytes::len).sum();
    let mut one = BytesMut::with_capacity(len);
    for chunk in chunks.iter_mut() {
        one.extend_from_slice(chunk);
        *chunk = Bytes::new();
    }
    one.freeze()
}

/// Joins a device-link stream (QUIC or HTTP/2) to a socket on `side` until both
/// directions end, one side resets, `cancel` fires, or nothing moves for `idle` (when
/// set), paced by `credit`. On any end but [`End::Closed`] the link's stream is reset both
/// ways; the caller resets the socket (see [`End::resets_socket`]).
#[allow(clippy::too_many_arguments)]
pub async fn join<R, W>(
    mut send: LinkSend,
    mut recv: LinkRecv,
    socket_r: &mut R,
    socket_w: &mut W,
    counters: &Counters,
    side: Side,
    cancel: &CancellationToken,
    idle: Option<Duration>,
    credit: Credit<'_>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (into_link, out_of_link) = counters.ways(side);
    let end = match credit {
        Credit::Grant { grant, user } => {
            join_dirs(
                socket_to_link(socket_r, &mut send, into_link, None),
                link_to_user(&mut recv, socket_w, out_of_link, grant, user),
                counters,
                cancel,
                idle,
            )
            .await
        }
        Credit::Obey(gate) => {
            join_dirs(
                socket_to_link(socket_r, &mut send, into_link, Some(gate)),
                link_to_socket(&mut recv, socket_w, out_of_link),
                counters,
                cancel,
                idle,
            )
            .await
        }
        Credit::None => {
            join_dirs(
                socket_to_link(socket_r, &mut send, into_link, None),
                link_to_socket(&mut recv, socket_w, out_of_link),
                counters,
                cancel,
                idle,
            )
            .await
        }
    };
    if end != End::Closed {
        let code = match end {
            End::Cancelled | End::Idle => codes::STREAM_CANCELLED,
            _ => codes::STREAM_RESET,
        };
        send.reset(code);
        recv.stop(code);
    }
    end
}

/// Runs the two directions of a tunnel until both end cleanly ([`End::Closed`]), one ends
/// abnormally (that end), `cancel` fires, or no byte moves for `idle`. Each direction
/// passes its own FIN on as a half-close and the other keeps flowing; a `select!` over two
/// whole copies would cut the reply after a half-close.
pub async fn join_dirs(
    up: impl Future<Output = Dir>,
    down: impl Future<Output = Dir>,
    counters: &Counters,
    cancel: &CancellationToken,
    idle: Option<Duration>,
) -> End {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut idle_tick = idle.map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
    let mut last_total = counters.total();
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Dir::Eof => up_done = true,
                Dir::Abnormal(end) => return end,
            },
            r = &mut down, if !down_done => match r {
                Dir::Eof => down_done = true,
                Dir::Abnormal(end) => return end,
            },
            _ = cancel.cancelled() => return End::Cancelled,
            _ = tick_or_never(&mut idle_tick) => {
                let total = counters.total();
                if total == last_total {
                    return End::Idle;
                }
                last_total = total;
            }
        }
        if up_done && down_done {
            return End::Closed;
        }
    }
}

/// Copies one direction between two byte streams (the TLS side of a forwarded tunnel):
/// a FIN becomes a half-close of `w`; anything else ends the tunnel.
pub async fn copy_dir<R, W>(r: &mut R, w: &mut W, counter: &AtomicU64) -> Dir
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                return match w.shutdown().await {
                    Ok(()) => Dir::Eof,
                    Err(_) => Dir::Abnormal(End::SocketReset),
                }
            }
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return Dir::Abnormal(End::SocketReset);
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return Dir::Abnormal(End::SocketReset),
        }
    }
}

async fn tick_or_never(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Makes closing `stream` (by us, or by the kernel when this process dies) send a TCP RST
/// instead of a FIN. Failing to set it only weakens crash reporting, so it is not an error.
pub fn arm_reset(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(error = %e, "cannot arm SO_LINGER 0");
    }
}

/// Connects to `addr` with the reset armed before the handshake (see [`arm_reset`]): the
/// far end may see the connection as soon as the kernel completes it, before this process
/// has run another line, and a crash from that moment on must reset it too.
pub async fn connect_armed(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Err(e) = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot arm SO_LINGER 0");
    }
    socket.connect(addr).await
}

/// Undoes [`arm_reset`]: closing `stream` sends an orderly FIN again.
pub fn disarm_reset(stream: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(None) {
        tracing::debug!(error = %e, "cannot disarm SO_LINGER");
    }
}

/// Closes a split TCP socket with a RST. Dropping a write half would send a FIN first,
/// which the peer would read as a clean end, so the write half is forgotten instead.
pub fn reset_tcp(r: tokio::net::tcp::OwnedReadHalf, w: tokio::net::tcp::OwnedWriteHalf) {
    arm_reset(r.as_ref());
    w.forget();
    drop(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most 7 bytes per (vectored) write.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(7 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 7 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_vectored_writes_lose_and_reorder_nothing() {
        let mut chunks = [
            Bytes::from_static(b"hello "),
            Bytes::new(),
            Bytes::from_static(b"partial "),
            Bytes::from_static(b"vectored world"),
        ];
        let mut out = Trickle(Vec::new());
        write_all_chunks(&mut out, &mut chunks).await.unwrap();
        assert_eq!(out.0, b"hello partial vectored world");
        assert!(
            chunks.iter().all(Bytes::is_empty),
            "written chunks are released"
        );
    }

    /// Eight small slices of one 64 KiB receive batch, to a socket that cannot take them
    /// yet: while the write waits, the batch is no longer pinned (only a compact copy of
    /// the 8,000 bytes is held), and the reader still gets every byte in order.
    #[tokio::test]
    async fn a_write_that_must_wait_holds_its_bytes_not_their_batch() {
        let batch = Bytes::from((0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let mut expected = Vec::new();
        let mut chunks: Vec<Bytes> = (0..8)
            .map(|k| {
                let piece = batch.slice(k * 8000..k * 8000 + 1000);
                expected.extend_from_slice(&piece);
                piece
            })
            .collect();
        let (mut writer, mut reader) = tokio::io::duplex(100);
        let writing = tokio::spawn(async move {
            write_all_chunks(&mut writer, &mut chunks).await.unwrap();
        });
        let mut tries = 0;
        while !batch.is_unique() {
            tries += 1;
            assert!(tries < 10_000, "the waiting write still pins the batch");
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let mut buf = [0u8; 4096];
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        writing.await.unwrap();
        assert_eq!(got, expected);
    }

    /// The link's sending half in memory: what the pump sends, `None` for its FIN.
    struct MemSend(tokio::sync::mpsc::UnboundedSender<Option<Bytes>>);

    impl ChunkSend for MemSend {
        async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), End> {
            self.0.send(Some(chunk)).map_err(|_| End::LinkReset)
        }
        fn finish(&mut self) {
            let _ = self.0.send(None);
        }
    }

    /// The link's receiving half in memory: chunks, `Ok(None)` for the far end's FIN, or
    /// how the far end broke off.
    struct MemRecv(tokio::sync::mpsc::UnboundedReceiver<Result<Option<Bytes>, End>>);

    impl ChunkRecv for MemRecv {
        async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
            match self.0.recv().await {
                Some(Ok(Some(chunk))) => {
                    bufs[0] = chunk;
                    Ok(Some(1))
                }
                Some(Ok(None)) | None => Ok(None),
                Some(Err(end)) => Err(end),
            }
        }
    }

    /// A pump between an in-memory socket (`user` is the far end of it) and an in-memory
    /// link (`to_link` shows what it sent, `from_link` feeds it), run until it ends.
    struct Rig {
        user: tokio::io::DuplexStream,
        to_link: tokio::sync::mpsc::UnboundedReceiver<Option<Bytes>>,
        from_link: tokio::sync::mpsc::UnboundedSender<Result<Option<Bytes>, End>>,
        cancel: CancellationToken,
        ended: tokio::task::JoinHandle<(End, u64, u64)>,
    }

    fn rig(idle: Option<Duration>) -> Rig {
        let (user, socket) = tokio::io::duplex(64 * 1024);
        let (send_tx, to_link) = tokio::sync::mpsc::unbounded_channel();
        let (from_link, recv_rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let ended = tokio::spawn(async move {
            let counters = Counters::default();
            let (mut r, mut w) = tokio::io::split(socket);
            let (mut send, mut recv) = (MemSend(send_tx), MemRecv(recv_rx));
            let (into_link, out_of_link) = counters.ways(Side::User);
            let end = join_dirs(
                socket_to_link(&mut r, &mut send, into_link, None),
                link_to_socket(&mut recv, &mut w, out_of_link),
                &counters,
                &token,
                idle,
            )
            .await;
            let up = counters.up.load(Ordering::Relaxed);
            let down = counters.down.load(Ordering::Relaxed);
            (end, up, down)
        });
        Rig {
            user,
            to_link,
            from_link,
            cancel,
            ended,
        }
    }

    /// How the pump ended, failing the test if it has not within two (paused) days.
    async fn ended(ended: tokio::task::JoinHandle<(End, u64, u64)>) -> (End, u64, u64) {
        tokio::time::timeout(Duration::from_secs(48 * 3600), ended)
            .await
            .expect("the pump did not end")
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_fin_each_way_is_a_half_close_and_the_other_way_keeps_flowing() {
        let mut t = rig(None);
        // The user sends and half-closes: the link gets the bytes, then its FIN.
        t.user.write_all(b"request").await.unwrap();
        t.user.shutdown().await.unwrap();
        assert_eq!(
            t.to_link.recv().await,
            Some(Some(Bytes::from_static(b"request")))
        );
        assert_eq!(t.to_link.recv().await, Some(None), "the FIN went on");
        // The reply still flows after the user's FIN, long after, then ends with one.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        t.from_link
            .send(Ok(Some(Bytes::from_static(b"reply"))))
            .unwrap();
        t.from_link.send(Ok(None)).unwrap();
        let mut back = Vec::new();
        t.user.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        let (end, up, down) = ended(t.ended).await;
        assert_eq!((end, up, down), (End::Closed, 7, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_from_the_link_ends_both_ways_at_once() {
        let mut t = rig(None);
        t.user.write_all(b"up").await.unwrap();
        assert_eq!(
            t.to_link.recv().await,
            Some(Some(Bytes::from_static(b"up")))
        );
        t.from_link.send(Err(End::LinkReset)).unwrap();
        let (end, ..) = ended(t.ended).await;
        assert_eq!(
            end,
            End::LinkReset,
            "the user's direction, still open, did not hold it"
        );
        assert!(end.resets_socket());
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_gone_mid_reply_is_a_socket_reset() {
        let t = rig(None);
        drop(t.user);
        // Bytes for a socket whose far end is gone cannot be written.
        t.from_link
            .send(Ok(Some(Bytes::from_static(b"reply"))))
            .unwrap();
        let (end, ..) = ended(t.ended).await;
        assert_eq!(end, End::SocketReset);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_ends_idle_and_a_trickle_keeps_it_open() {
        let idle = Duration::from_secs(60);
        let mut t = rig(Some(idle));
        // A byte every 40 s: never a whole idle period without one.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            t.user.write_all(b".").await.unwrap();
            assert!(t.to_link.recv().await.is_some());
            assert!(!t.ended.is_finished(), "ended while bytes moved");
        }
        // Then nothing: it ends within two idle periods.
        let started = tokio::time::Instant::now();
        let (end, up, _) = ended(t.ended).await;
        assert_eq!((end, up), (End::Idle, 5));
        assert!(started.elapsed() <= 2 * idle, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_without_an_idle_timeout_stays_open() {
        let t = rig(None);
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!t.ended.is_finished());
        t.cancel.cancel();
        let (end, ..) = ended(t.ended).await;
        assert_eq!(end, End::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_ends_a_busy_tunnel() {
        let mut t = rig(Some(Duration::from_secs(60)));
        t.user.write_all(b"busy").await.unwrap();
        assert!(t.to_link.recv().await.is_some());
        t.cancel.cancel();
        let (end, up, _) = ended(t.ended).await;
        assert_eq!((end, up), (End::Cancelled, 4));
        assert!(End::Cancelled.resets_socket());
    }
}

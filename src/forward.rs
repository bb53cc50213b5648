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
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::credit::{Budget, Gate, Grant, UserQueue, Wait};
use crate::link::{Abort, ChunkRecv, ChunkSend, End};
use crate::proto::messages::codes;
use crate::resume::{Acked, Resume, Ring, Written, ACK_DELAY};

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

/// The outgoing direction's part of a resumable tunnel's state (PROTOCOL.md §2e), for
/// one stream.
pub struct Outgoing<'a> {
    /// What was sent and not yet acknowledged.
    pub ring: &'a mut Ring,
    /// The other side's acks.
    pub acked: &'a Acked,
    /// Where this stream starts: the other side's `written`.
    pub from: u64,
    /// The relay's tunnel buffer budget, which the ring's bytes beyond [`RING_FREE`] are
    /// drawn from (the relay's side: its replay buffers count against
    /// `tunnel_buffer_bytes`); `None` on the agent, whose direction the relay's credit
    /// bounds.
    pub budget: Option<Arc<Budget>>,
}

/// What a replay buffer may hold without drawing from the relay's budget: the least
/// window a tunnel has (as for credit). Without it an upload could wait for budget that
/// only its own answer would free: the relay's grants keep what their users have not
/// taken, and a service answers once the upload is in.
pub const RING_FREE: u64 = crate::credit::MIN_WINDOW;

impl Outgoing<'_> {
    /// Frees what the other side has acknowledged, and gives back the budget that no
    /// longer covers anything; a violation ends the tunnel.
    fn apply_acks(&mut self) -> Result<(), Dir> {
        let (written, _) = self.acked.get();
        self.ring.ack(written).map_err(violated)?;
        if let Some(budget) = &self.budget {
            budget.give(self.ring.budget_surplus(RING_FREE));
            let (added, freed) = self.ring.held_change();
            budget.replay_change(added, freed);
        }
        Ok(())
    }

    /// Room for the next read, at most `want` (> 0): what the ring may hold undrawn,
    /// budget drawn now, or (none left) waited for: an ack frees the ring's own, a give
    /// anywhere the budget's.
    async fn budgeted(&mut self, want: usize) -> Result<usize, Dir> {
        let Some(budget) = self.budget.clone() else {
            return Ok(want);
        };
        loop {
            if self.ring.budget_spare(RING_FREE) == 0 {
                let got = budget.take(want.min(BUFFER) as u64);
                self.ring.budget_add(got);
            }
            let spare = self.ring.budget_spare(RING_FREE);
            if spare > 0 {
                return Ok(want.min(usize::try_from(spare).unwrap_or(usize::MAX)));
            }
            // `freed` wakes only those already waiting: the short sleep covers a give
            // between the draw above and the wait.
            let seen = self.acked.get();
            tokio::select! {
                () = budget.freed() => {}
                () = self.acked.changed(seen) => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            self.apply_acks()?;
        }
    }

    /// Waits for the other side's ack of this direction's FIN (the tunnel is not over
    /// until it comes: a link lost before it may still owe the other side bytes).
    ///
    /// Meanwhile acks free the ring and give its budget back: a tunnel whose upload is
    /// done keeps nothing it need not.
    async fn fin_acked(&mut self) -> Dir {
        loop {
            let seen = self.acked.get();
            if let (written, true) = seen {
                if written != self.ring.sent() {
                    return violated(crate::resume::Violation(format!(
                        "FIN acknowledged after {written} bytes of {}",
                        self.ring.sent()
                    )));
                }
            }
            if let Err(dir) = self.apply_acks() {
                return dir;
            }
            if seen.1 {
                return Dir::Eof;
            }
            self.acked.changed(seen).await;
        }
    }
}

fn violated(v: crate::resume::Violation) -> Dir {
    tracing::warn!(error = %v, "the far side broke the resume offsets; resetting the tunnel");
    Dir::Abnormal(End::LinkReset)
}

/// Socket to link: reads into one reused buffer and hands each read to the stream as
/// `Bytes` (no copy); the buffer's allocation is reclaimed once the link releases the
/// pieces. Adds what it moves to `counter`. With a `gate` (the agent under credit) it reads
/// only what the gate allows, waiting for the relay's credit when none is left. With `out`
/// (a resumable tunnel) it first sends again what the ring holds from `out.from` on, and
/// keeps each read in the ring, reading no more while the ring is full.
pub async fn socket_to_link<R: AsyncRead + Unpin, S: ChunkSend>(
    socket: &mut R,
    send: &mut S,
    counter: &AtomicU64,
    gate: Option<&Gate>,
    mut out: Option<Outgoing<'_>>,
) -> Dir {
    if let Some(o) = out.as_mut() {
        if let Err(v) = o.ring.ack(o.from) {
            return violated(v);
        }
        let replay = match o.ring.replay_from(o.from) {
            Ok(replay) => replay,
            Err(v) => return violated(v),
        };
        for piece in replay {
            if let Err(end) = send.write_chunk(piece).await {
                return Dir::Abnormal(end);
            }
        }
        if o.ring.finished() {
            send.finish();
            return o.fin_acked().await;
        }
    }
    // Small until the socket shows it sends more than a few packets at a time: a tunnel
    // whose user only types (or only reads) costs 16 KiB here, not 256.
    let mut buf = BytesMut::new();
    let mut size = FIRST_BUFFER;
    let mut sent = out.as_ref().map_or(0, |o| o.ring.sent());
    loop {
        // Never a read with no room: it would return 0, which reads as the end.
        // Acks that arrive while this direction waits (for credit, or for its socket)
        // free the ring at once: a tunnel that went quiet must not keep what it sent.
        let acked = out.as_ref().map(|o| o.acked);
        let mut room = match gate {
            Some(gate) => {
                // Out of credit: how long the relay kept the agent waiting, for tracing.
                let waiting = (gate.limit() <= sent).then(std::time::Instant::now);
                let room = match acked {
                    Some(acked) => {
                        let seen = acked.get();
                        tokio::select! {
                            room = gate.room(sent) => Some(room),
                            () = acked.changed(seen) => None,
                        }
                    }
                    None => Some(gate.room(sent).await),
                };
                let Some(room) = room else {
                    if let Some(Err(dir)) = out.as_mut().map(Outgoing::apply_acks) {
                        return dir;
                    }
                    continue;
                };
                if let Some(since) = waiting {
                    tracing::trace!(sent, waited = ?since.elapsed(), "waited for credit");
                }
                usize::try_from(room).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        if let Some(o) = out.as_mut() {
            if let Err(dir) = o.apply_acks() {
                return dir;
            }
            while o.ring.room() == 0 {
                o.acked.changed(o.acked.get()).await;
                if let Err(dir) = o.apply_acks() {
                    return dir;
                }
            }
            room = room.min(usize::try_from(o.ring.room()).unwrap_or(usize::MAX));
            room = match o.budgeted(room).await {
                Ok(room) => room,
                Err(dir) => return dir,
            };
        }
        if buf.capacity() - buf.len() < size.min(CHUNK) {
            buf.reserve(size);
        }
        let mut limited = (&mut buf).limit(room);
        let read = socket.read_buf(&mut limited);
        let read = match acked {
            // `read_buf` is cancel safe: an ack first means nothing was read.
            Some(acked) => {
                let seen = acked.get();
                tokio::select! {
                    r = read => Some(r),
                    () = acked.changed(seen) => None,
                }
            }
            None => Some(read.await),
        };
        let Some(read) = read else {
            if let Some(Err(dir)) = out.as_mut().map(Outgoing::apply_acks) {
                return dir;
            }
            continue;
        };
        match read {
            Ok(0) => {
                send.finish();
                return match out.as_mut() {
                    Some(o) => {
                        o.ring.finish();
                        o.fin_acked().await
                    }
                    None => Dir::Eof,
                };
            }
            Ok(n) => {
                if n >= FIRST_BUFFER / 2 {
                    size = BUFFER;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
                sent += n as u64;
                let chunk = buf.split().freeze();
                // Into the ring before the stream: a stream abandoned mid-write loses
                // nothing, since the next one replays from the ring.
                if let Some(o) = out.as_mut() {
                    o.ring.push(chunk.clone());
                    if let Some(budget) = &o.budget {
                        let (added, freed) = o.ring.held_change();
                        budget.replay_change(added, freed);
                    }
                }
                if let Err(end) = send.write_chunk(chunk).await {
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
/// per vectored write, with no copy in between. Adds what it writes to `counter`. With
/// `written` (a resumable tunnel) it counts every byte written there, and acks as
/// PROTOCOL.md §2e asks.
pub async fn link_to_socket<C: ChunkRecv, W: AsyncWrite + Unpin>(
    recv: &mut C,
    socket: &mut W,
    counter: &AtomicU64,
    mut written: Option<&mut Written>,
) -> Dir {
    if written.as_deref().is_some_and(Written::fin) {
        return fin_again(recv).await;
    }
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    // When the oldest advance no ack covers yet must be acked.
    let mut ack_due = None;
    loop {
        tokio::select! {
            r = recv.read_chunks(&mut chunks) => match r {
                Ok(Some(n)) => {
                    let wrote = |k| count_written(counter, written.as_deref_mut(), k, &mut ack_due);
                    if write_all_chunks(socket, &mut chunks[..n], wrote).await.is_err() {
                        return Dir::Abnormal(End::SocketReset);
                    }
                }
                Ok(None) => return pass_fin(socket, written).await,
                Err(end) => return Dir::Abnormal(end),
            },
            _ = sleep_until_or_never(ack_due) => {
                ack_due = None;
                if let Some(w) = written.as_deref_mut() {
                    w.flush();
                }
            }
        }
    }
}

/// The link's FIN as a half-close of the socket (the other direction keeps going), acked
/// at once on a resumable tunnel.
async fn pass_fin<W: AsyncWrite + Unpin>(socket: &mut W, progress: Option<&mut Written>) -> Dir {
    match socket.shutdown().await {
        Ok(()) => {
            if let Some(w) = progress {
                w.finished();
            }
            Dir::Eof
        }
        Err(_) => Dir::Abnormal(End::SocketReset),
    }
}

/// Counts `n` bytes written to the socket, and on a resumable tunnel acks them: at once
/// past the ack threshold, else by `ack_due` (PROTOCOL.md §2e).
fn count_written(
    counter: &AtomicU64,
    progress: Option<&mut Written>,
    n: usize,
    ack_due: &mut Option<tokio::time::Instant>,
) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
    if let Some(w) = progress {
        if w.wrote(n as u64) {
            ack_due.get_or_insert_with(|| tokio::time::Instant::now() + ACK_DELAY);
        } else {
            *ack_due = None;
        }
    }
}

/// A resumed stream of a direction whose FIN was already passed on: nothing but the FIN
/// may come.
async fn fin_again<C: ChunkRecv>(recv: &mut C) -> Dir {
    let mut chunks: [Bytes; 4] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(None) => return Dir::Eof,
            Ok(Some(n)) if chunks[..n].iter().all(Bytes::is_empty) => {}
            Ok(Some(_)) => {
                return violated(crate::resume::Violation(
                    "bytes after a FIN already passed on".into(),
                ))
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
    mut progress: Option<&mut Written>,
) -> Dir {
    if progress.as_deref().is_some_and(Written::fin) {
        return fin_again(recv).await;
    }
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    let budget = grant.budget().clone();
    let mut held = Held::new(&budget);
    // Offsets count from the tunnel's first byte, over every stream it has lived on.
    let start = progress.as_deref().map_or(0, Written::written);
    let (mut received, mut written) = (start, start);
    let mut fin = false;
    let mut ack_due = None;
    // A tunnel opened while the budget was short starts with less than a window, maybe
    // none: it waits for the budget from the start.
    let mut wait = grant.update(0, 0, user);
    loop {
        if fin && held.is_empty() {
            return pass_fin(socket, progress).await;
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
                    received += len;
                    if received > grant.limit() {
                        tracing::warn!(received, limit = grant.limit(), "the agent sent past its credit; resetting the tunnel");
                        return Dir::Abnormal(End::LinkReset);
                    }
                    if held.is_empty() {
                        match try_write_chunks(socket, &mut chunks[..n]).await {
                            Ok(w) => {
                                written += w as u64;
                                count_written(counter, progress.as_deref_mut(), w, &mut ack_due);
                            }
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
                    count_written(counter, progress.as_deref_mut(), n, &mut ack_due);
                }
            },
            _ = sleep_or_never(poll) => {}
            _ = sleep_until_or_never(ack_due) => {
                ack_due = None;
                if let Some(w) = progress.as_deref_mut() {
                    w.flush();
                }
            }
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

async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
///
/// `wrote` hears every write's byte count as it completes, so a caller whose write is
/// abandoned (a resumable tunnel's stream replaced) knows exactly what the socket has.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    socket: &mut W,
    chunks: &mut [Bytes],
    mut wrote: impl FnMut(usize),
) -> std::io::Result<()> {
    let first = try_write_chunks(socket, chunks).await?;
    wrote(first);
    if chunks.iter().any(|c| !c.is_empty()) {
        let mut rest = compact(chunks);
        while !rest.is_empty() {
            let n = socket.write(&rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            rest.advance(n);
            wrote(n);
        }
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
///
/// With `resume` (a resumable tunnel, PROTOCOL.md §2e) the stream starts each direction
/// at the offsets it names, and ends as [`End::ConnectionLost`] when its link is gone;
/// the caller then keeps the socket and waits for the next stream instead.
#[allow(clippy::too_many_arguments)]
pub async fn join<S, C, R, W>(
    mut send: S,
    mut recv: C,
    socket_r: &mut R,
    socket_w: &mut W,
    counters: &Counters,
    side: Side,
    cancel: &CancellationToken,
    idle: Option<Duration>,
    credit: Credit<'_>,
    resume: Option<Resume<'_>>,
) -> End
where
    S: ChunkSend + Abort,
    C: ChunkRecv + Abort,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (into_link, out_of_link) = counters.ways(side);
    let (out, progress, lost) = match resume {
        Some(r) => (
            Some(Outgoing {
                ring: r.ring,
                acked: r.acked,
                from: r.from,
                budget: None,
            }),
            Some(r.written),
            Some(r.lost),
        ),
        None => (None, None, None),
    };
    let dirs = async {
        match credit {
            Credit::Grant { grant, user } => {
                // The relay's replay buffer draws from the budget its grants draw from.
                let out = out.map(|o| Outgoing {
                    budget: Some(grant.budget().clone()),
                    ..o
                });
                join_dirs(
                    socket_to_link(socket_r, &mut send, into_link, None, out),
                    link_to_user(&mut recv, socket_w, out_of_link, grant, user, progress),
                    counters,
                    cancel,
                    idle,
                )
                .await
            }
            Credit::Obey(gate) => {
                join_dirs(
                    socket_to_link(socket_r, &mut send, into_link, Some(gate), out),
                    link_to_socket(&mut recv, socket_w, out_of_link, progress),
                    counters,
                    cancel,
                    idle,
                )
                .await
            }
            Credit::None => {
                join_dirs(
                    socket_to_link(socket_r, &mut send, into_link, None, out),
                    link_to_socket(&mut recv, socket_w, out_of_link, progress),
                    counters,
                    cancel,
                    idle,
                )
                .await
            }
        }
    };
    let end = match lost {
        Some(lost) => tokio::select! {
            end = dirs => end,
            () = lost.cancelled() => End::ConnectionLost("the link is gone".into()),
        },
        None => dirs.await,
    };
    if end != End::Closed {
        let code = match end {
            End::Cancelled | End::Idle => codes::STREAM_CANCELLED,
            _ => codes::STREAM_RESET,
        };
        send.abort(code);
        recv.abort(code);
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
        write_all_chunks(&mut out, &mut chunks, |_| {})
            .await
            .unwrap();
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
            write_all_chunks(&mut writer, &mut chunks, |_| {})
                .await
                .unwrap();
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
                socket_to_link(&mut r, &mut send, into_link, None, None),
                link_to_socket(&mut recv, &mut w, out_of_link, None),
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

    /// Two sides of a resumable tunnel joined by in-memory links that the test loses at
    /// will (PROTOCOL.md §2e with the transport and the control stream taken out).
    mod two_sides {
        use crate::forward::{join, Counters, Credit, Side};
        use crate::link::{Abort, ChunkRecv, ChunkSend, End};
        use crate::resume::*;
        use bytes::Bytes;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::mpsc;
        use tokio_util::sync::CancellationToken;

        /// One direction of an in-memory link: chunks, `None` for the FIN. The link is
        /// lost (`lost` fires, the chunk with it) once the bytes written on it both ways
        /// pass its `budget`.
        struct PipeSend {
            tx: mpsc::UnboundedSender<Option<Bytes>>,
            budget: Arc<std::sync::atomic::AtomicI64>,
            lost: CancellationToken,
        }
        struct PipeRecv(mpsc::UnboundedReceiver<Option<Bytes>>);

        impl ChunkSend for PipeSend {
            async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), End> {
                let len = chunk.len() as i64;
                if self.budget.fetch_sub(len, Ordering::Relaxed) < len {
                    self.lost.cancel();
                }
                if self.lost.is_cancelled() {
                    return Err(End::ConnectionLost("the link broke".into()));
                }
                self.tx
                    .send(Some(chunk))
                    .map_err(|_| End::ConnectionLost("pipe gone".into()))
            }
            fn finish(&mut self) {
                // A FIN costs one byte of the budget.
                if self.budget.fetch_sub(1, Ordering::Relaxed) < 1 {
                    self.lost.cancel();
                }
                if !self.lost.is_cancelled() {
                    let _ = self.tx.send(None);
                }
            }
        }

        impl ChunkRecv for PipeRecv {
            async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
                match self.0.recv().await {
                    Some(Some(chunk)) => {
                        bufs[0] = chunk;
                        Ok(Some(1))
                    }
                    Some(None) => Ok(None),
                    None => Err(End::ConnectionLost("pipe gone".into())),
                }
            }
        }

        impl Abort for PipeSend {
            fn abort(&mut self, _: u32) {}
        }

        impl Abort for PipeRecv {
            fn abort(&mut self, _: u32) {
                self.0.close();
            }
        }

        /// Acks that travel on the "control stream" of one link: lost with it.
        struct Control(mpsc::UnboundedSender<(u64, bool)>);

        impl AckSink for Control {
            fn post(&self, written: u64, fin: bool) {
                let _ = self.0.send((written, fin));
            }
        }

        /// One link's share for one side.
        struct Link {
            send: PipeSend,
            recv: PipeRecv,
            /// The other side's `written` at the resume, and its FIN passed on.
            from: (u64, bool),
            acks: Arc<dyn AckSink>,
            lost: CancellationToken,
            /// Under credit: the relay's outbox on this link, the agent's gate on it.
            outbox: Arc<crate::credit::Outbox>,
            gate: Arc<crate::credit::Gate>,
        }

        /// How a side paces the device's direction.
        #[derive(Clone, Copy, PartialEq)]
        enum Pace {
            /// No credit.
            Free,
            /// The relay grants credit, the agent obeys it.
            Credit,
        }

        /// Runs one side's tunnel over the links it is given, reporting its `written` (and
        /// the relay its credit limit) each time a link is lost; how it ended.
        async fn side(
            socket: tokio::io::DuplexStream,
            who: Side,
            pace: Pace,
            mut carried: Carried,
            mut links: mpsc::UnboundedReceiver<Link>,
            report: mpsc::UnboundedSender<((u64, bool), u64)>,
        ) -> (End, (u64, bool)) {
            use crate::credit::{Budget, Grant, Outbox, UserQueue};
            let (mut r, mut w) = tokio::io::split(socket);
            let counters = Counters::default();
            let cancel = CancellationToken::new();
            let budget = Arc::new(Budget::new(1 << 30));
            let mut grant = Grant::open("t", Arc::new(Outbox::default()), budget);
            let user = || UserQueue::IN_PROCESS;
            while let Some(link) = links.recv().await {
                carried.written.set_sink(link.acks);
                grant.move_to(link.outbox);
                let credit = match (pace, who) {
                    (Pace::Free, _) => Credit::None,
                    (Pace::Credit, Side::User) => Credit::Grant {
                        grant: &mut grant,
                        user: &user,
                    },
                    (Pace::Credit, Side::Device) => Credit::Obey(&link.gate),
                };
                let end = join(
                    link.send,
                    link.recv,
                    &mut r,
                    &mut w,
                    &counters,
                    who,
                    &cancel,
                    None,
                    credit,
                    Some(carried.on(link.from, &link.lost)),
                )
                .await;
                let written = &carried.written;
                let offsets = (written.written(), written.fin());
                if !matches!(end, End::ConnectionLost(_)) {
                    return (end, offsets);
                }
                let _ = report.send((offsets, grant.limit()));
            }
            (End::ConnectionLost("no more links".into()), (0, false))
        }

        /// A side that has ended cleanly, as its tombstone answers a resume (PROTOCOL.md
        /// §2e): its final offsets (the link's `from`), its FIN again, and the other's
        /// replay read to its end.
        fn tombstone(mut link: Link) {
            tokio::spawn(async move {
                link.send.finish();
                let mut chunks = [Bytes::new()];
                while let Ok(Some(_)) = link.recv.read_chunks(&mut chunks).await {}
            });
        }

        fn data(seed: u64, len: usize) -> Vec<u8> {
            let mut x = seed;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }

        /// Writes `out` and half-closes, while reading everything until the far end's FIN.
        async fn talk(mut socket: tokio::io::DuplexStream, out: Vec<u8>) -> Vec<u8> {
            let (mut r, mut w) = tokio::io::split(&mut socket);
            let write = async {
                for piece in out.chunks(7919) {
                    w.write_all(piece).await.unwrap();
                }
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            let ((), n) = tokio::join!(write, read);
            n.unwrap();
            got
        }

        /// A new link between the sides: pipes both ways, a control stream each way whose
        /// acks raise the other side's `Acked` until the link is lost, and the relay's
        /// credit reaching the agent's gate (which starts at `limit`) on it.
        fn link(
            from: ((u64, bool), (u64, bool)),
            acked: (&Arc<Acked>, &Arc<Acked>),
            limit: u64,
            budget: i64,
        ) -> (Link, Link) {
            let lost = CancellationToken::new();
            let budget = Arc::new(std::sync::atomic::AtomicI64::new(budget));
            let (up_tx, up_rx) = mpsc::unbounded_channel();
            let (down_tx, down_rx) = mpsc::unbounded_channel();
            let control = |to: &Arc<Acked>| {
                let (tx, mut rx) = mpsc::unbounded_channel::<(u64, bool)>();
                let to = to.clone();
                let lost = lost.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            a = rx.recv() => match a {
                                Some((written, fin)) => to.raise(written, fin),
                                None => return,
                            },
                            () = lost.cancelled() => return,
                        }
                    }
                });
                Arc::new(Control(tx)) as Arc<dyn AckSink>
            };
            let outbox = Arc::new(crate::credit::Outbox::default());
            let gate = Arc::new(crate::credit::Gate::new(limit));
            {
                let (outbox, gate, lost) = (outbox.clone(), gate.clone(), lost.clone());
                tokio::spawn(async move {
                    let mut posted = Vec::new();
                    loop {
                        tokio::select! {
                            () = outbox.next(&mut posted) => {
                                for (_, limit) in posted.drain(..) {
                                    gate.raise(limit);
                                }
                            }
                            () = lost.cancelled() => return,
                        }
                    }
                });
            }
            let user_end = Link {
                send: PipeSend {
                    tx: up_tx,
                    budget: budget.clone(),
                    lost: lost.clone(),
                },
                recv: PipeRecv(down_rx),
                from: from.0,
                // The user end's acks are of the down direction: the device end's ring.
                acks: control(acked.1),
                lost: lost.clone(),
                outbox: outbox.clone(),
                gate: gate.clone(),
            };
            let device_end = Link {
                send: PipeSend {
                    tx: down_tx,
                    budget,
                    lost: lost.clone(),
                },
                recv: PipeRecv(up_rx),
                from: from.1,
                acks: control(acked.0),
                lost: lost.clone(),
                outbox,
                gate,
            };
            (user_end, device_end)
        }

        /// 16 MiB each way through a tunnel whose link is lost again and again, at
        /// random moments: every byte arrives once and in order, both sockets see a
        /// clean FIN, and the tunnel ends closed at both ends.
        async fn outlives_its_links(pace: Pace, len: usize, budgets: &[i64]) {
            let (up, down) = (data(1, len), data(2, len));
            let (user, relay_socket) = tokio::io::duplex(64 * 1024);
            let (service, agent_socket) = tokio::io::duplex(64 * 1024);
            let ignore: Arc<dyn AckSink> = Arc::new(Control(mpsc::unbounded_channel().0));
            let relay = Carried::new(ignore.clone());
            let agent = Carried::new(ignore);
            let acked = (relay.acked.clone(), agent.acked.clone());
            let (relay_links, relay_rx) = mpsc::unbounded_channel();
            let (agent_links, agent_rx) = mpsc::unbounded_channel();
            let (relay_report, mut relay_said) = mpsc::unbounded_channel();
            let (agent_report, mut agent_said) = mpsc::unbounded_channel();
            let mut relay = tokio::spawn(side(
                relay_socket,
                Side::User,
                pace,
                relay,
                relay_rx,
                relay_report,
            ));
            let mut agent = tokio::spawn(side(
                agent_socket,
                Side::Device,
                pace,
                agent,
                agent_rx,
                agent_report,
            ));
            let user = tokio::spawn(talk(user, up.clone()));
            let service = tokio::spawn(talk(service, down.clone()));

            let mut from = ((0, false), (0, false));
            // The first window of a user inside the process (credit.rs, MIN_WINDOW).
            let mut limit = 64 * 1024;
            let mut losses = 0;
            let mut tombstoned = false;
            let (mut relay_end, mut agent_end) = (None, None);
            loop {
                // Each link breaks once it has carried its budget, the last never.
                let budget = budgets.get(losses).copied().unwrap_or(i64::MAX);
                let (u, d) = link(from, (&acked.0, &acked.1), limit, budget);
                relay_links.send(u).unwrap();
                agent_links.send(d).unwrap();
                // Each side resumes the other from what it has written; the agent's
                // credit is the relay's limit, whatever reached it on the lost link.
                let said = (relay_said.recv().await, agent_said.recv().await);
                let (relay_w, agent_w, relay_limit) = match said {
                    (Some((relay_w, relay_limit)), Some((agent_w, _))) => {
                        (relay_w, agent_w, relay_limit)
                    }
                    (None, None) => break,
                    // One side ended as the link was lost, and its last ack with it: the
                    // other resumes against its tombstone.
                    (None, Some((agent_w, _))) => {
                        let (end, relay_w) = (&mut relay).await.unwrap();
                        relay_end = Some(end);
                        let (u, d) = link((agent_w, relay_w), (&acked.0, &acked.1), 0, i64::MAX);
                        tombstone(u);
                        agent_links.send(d).unwrap();
                        assert!(agent_said.recv().await.is_none(), "the agent ended");
                        tombstoned = true;
                        break;
                    }
                    (Some((relay_w, _)), None) => {
                        let (end, agent_w) = (&mut agent).await.unwrap();
                        agent_end = Some(end);
                        let (u, d) = link((agent_w, relay_w), (&acked.0, &acked.1), 0, i64::MAX);
                        tombstone(d);
                        relay_links.send(u).unwrap();
                        assert!(relay_said.recv().await.is_none(), "the relay ended");
                        tombstoned = true;
                        break;
                    }
                };
                losses += 1;
                from = (agent_w, relay_w);
                limit = relay_limit;
            }
            // A tombstone ends the series early: the links after it are not needed.
            if tombstoned {
                assert!(losses < budgets.len(), "a tombstone after the last loss");
            } else {
                assert_eq!(losses, budgets.len(), "every link but the last was lost");
            }
            let got_by_service = service.await.unwrap();
            let got_by_user = user.await.unwrap();
            assert!(got_by_service == up, "the service got the upload intact");
            assert!(got_by_user == down, "the user got the download intact");
            let relay_end = match relay_end {
                Some(end) => end,
                None => relay.await.unwrap().0,
            };
            let agent_end = match agent_end {
                Some(end) => end,
                None => agent.await.unwrap().0,
            };
            assert_eq!((relay_end, agent_end), (End::Closed, End::Closed));
        }

        /// The test, failing rather than hanging when a side waits for what never comes.
        async fn within_a_minute(pace: Pace, len: usize, budgets: &[i64]) {
            let test = outlives_its_links(pace, len, budgets);
            tokio::time::timeout(Duration::from_secs(60), test)
                .await
                .expect("the tunnel hung");
        }

        /// 16 MiB each way, over 13 links of which 12 break in mid-flight.
        async fn many_losses(pace: Pace) {
            const LEN: usize = 16 << 20;
            within_a_minute(pace, LEN, &[2 * LEN as i64 / 13; 12]).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_tunnel_outlives_its_links_losing_duplicating_and_reordering_nothing() {
            many_losses(Pace::Free).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_tunnel_under_credit_outlives_its_links_and_its_credit_follows() {
            many_losses(Pace::Credit).await;
        }

        /// Links lost around the FINs: the first FIN lost with its link (it goes again);
        /// the first passed on and the second lost (the side that passed one on reads
        /// nothing more but a FIN, and its ack may or may not have got through).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_fin_lost_with_its_link_goes_again_and_one_passed_on_stays_passed() {
            const LEN: usize = 1000;
            for pace in [Pace::Free, Pace::Credit] {
                within_a_minute(pace, LEN, &[2 * LEN as i64]).await;
                within_a_minute(pace, LEN, &[2 * LEN as i64 + 1]).await;
                within_a_minute(pace, LEN, &[2 * LEN as i64 + 1, 1, 0]).await;
            }
        }
    }
}

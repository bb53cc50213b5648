//! The peer hop of a resumable tunnel (PROTOCOL.md §2e, "Through another relay"): the
//! connection between the relay that holds the user's socket (the *entry*) and the relay
//! that holds the device's session (the *owner*) carries records instead of raw bytes, so
//! that acks and credit pass both ways beside the data and a lost connection can be told
//! from a tunnel's end.
//!
//! One task reads the connection and one writes it. The reader hands acks and credit on at
//! once, whatever data waits (so an upload that the device does not take never holds up
//! the acks of the download), and queues data for [`PeerRecv`]; the queue is bounded by
//! the credit this side granted, and a record past it is a protocol error. [`PeerSend`]
//! sends only within the credit the other side granted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::credit::Outbox;
use crate::link::{Abort, ChunkRecv, ChunkSend, End};
use crate::resume::AckSink;

/// The most data one record carries.
pub const MAX_DATA: usize = 64 * 1024;

/// How far past what it has handed to the device stream the owner lets the entry send
/// (PROTOCOL.md §2e): what the owner may have to buffer of a user's upload.
pub const UPLOAD_WINDOW: u64 = 1 << 20;

/// How long a clean close waits for the last records to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

const DATA: u8 = 0;
const ACK: u8 = 1;
const ACK_FIN: u8 = 2;
const CREDIT: u8 = 3;
const FIN: u8 = 4;
const RESET: u8 = 5;

/// A record's header: its type and its payload's length.
const HEADER: usize = 5;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain values; a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What waits for the writer.
#[derive(Default)]
struct Out {
    data: VecDeque<Bytes>,
    /// This side's direction ends after `data`.
    fin: bool,
    /// A reset, sent before anything else still queued.
    reset: Option<u32>,
    /// The latest ack of the other direction not sent yet.
    ack: Option<(u64, bool)>,
    /// Close after writing what waits.
    close: bool,
}

/// What both halves and both tasks share.
struct Hop {
    out: Mutex<Out>,
    wake_writer: Notify,
    /// The credit this side's data may use, from the other side's type 3 records.
    limit: AtomicU64,
    limit_raised: Notify,
    /// The credit this side granted the other side's data.
    granted: AtomicU64,
    /// This side's credit for the other direction, drained by the writer.
    credit: Arc<Outbox>,
    /// Fires when the connection is gone (or given up).
    lost: CancellationToken,
    /// Fires to end both tasks at once, the connection reset.
    abort: CancellationToken,
}

impl Hop {
    fn queue(&self, f: impl FnOnce(&mut Out)) {
        f(&mut lock(&self.out));
        self.wake_writer.notify_one();
    }
}

/// What the reader hands to [`PeerRecv`].
enum Item {
    Data(Bytes),
    Fin,
    Reset,
    Lost(String),
}

/// What a side does with what the other side says beside data.
pub struct Inbound {
    /// Where the other side's acks of this side's direction go.
    pub acks: Arc<dyn AckSink>,
    /// Where the other side's credit goes besides gating this side's data (the owner
    /// passes it on to the agent).
    pub credit: Option<Box<dyn Fn(u64) + Send + Sync>>,
}

/// Where each direction of a framed connection starts (PROTOCOL.md §2e offsets).
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// The offset of this side's next data byte.
    pub send: u64,
    /// The offset of the other side's next data byte.
    pub recv: u64,
    /// The credit this side grants the other at once (an absolute offset).
    pub grant: u64,
}

/// One framed peer connection: its two halves and the handle for acks, credit and its end.
pub struct Framed {
    /// This side's direction.
    pub send: PeerSend,
    /// The other side's direction.
    pub recv: PeerRecv,
    /// Acks, credit, and the connection's end.
    pub hop: HopHandle,
}

/// Frames `stream` (after a `200` with `Cloudlink-Resume: 1`); `early` holds bytes already
/// read past the answer head. Spawns the reader and the writer.
pub fn framed(stream: TcpStream, early: BytesMut, start: Start, inbound: Inbound) -> Framed {
    keep_alive(&stream);
    // An abandoned connection resets (the other side must not read a clean end); a clean
    // close lifts this first (`write_records`).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    let (r, w) = stream.into_split();
    let hop = Arc::new(Hop {
        out: Mutex::default(),
        wake_writer: Notify::new(),
        limit: AtomicU64::new(start.send),
        limit_raised: Notify::new(),
        granted: AtomicU64::new(start.grant),
        credit: Arc::new(Outbox::default()),
        lost: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    let (items, queued) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_records(w, hop.clone(), start.grant));
    tokio::spawn(read_records(
        r,
        early,
        hop.clone(),
        items,
        start.recv,
        inbound,
    ));
    Framed {
        send: PeerSend {
            hop: hop.clone(),
            sent: start.send,
        },
        recv: PeerRecv { queued, next: None },
        hop: HopHandle {
            hop,
            writer: Mutex::new(Some(writer)),
        },
    }
}

/// TCP keep-alive on the peer connection (5 s idle, 1 s apart, 3 probes; PROTOCOL.md §2e),
/// so that a relay that vanished without a reset is noticed within about 8 s.
fn keep_alive(stream: &TcpStream) {
    let alive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    let socket = socket2::SockRef::from(stream);
    let _ = socket.set_tcp_keepalive(&alive);
    let _ = socket.set_tcp_user_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
}

/// The handle of a framed connection beside its halves.
pub struct HopHandle {
    hop: Arc<Hop>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl HopHandle {
    /// Fires when the connection is gone.
    pub fn lost(&self) -> &CancellationToken {
        &self.hop.lost
    }

    /// Where this side's credit for the other direction goes ([`crate::credit::Grant`]
    /// posts there; the writer sends the latest).
    pub fn credit(&self) -> Arc<Outbox> {
        self.hop.credit.clone()
    }

    /// Grants the other side's data up to `limit` (an absolute offset).
    pub fn grant(&self, limit: u64) {
        self.hop.credit.post(&Arc::from(""), limit);
    }

    /// A sink for this side's acks of the other direction.
    pub fn acks(&self) -> Arc<dyn AckSink> {
        Arc::new(AckOut(self.hop.clone()))
    }

    /// Resets the connection at once (the owner moving a tunnel, or giving it up).
    pub fn abort(&self) {
        self.hop.abort.cancel();
        self.hop.lost.cancel();
    }

    /// Closes the connection after what waits has been written (a tunnel that ended: its
    /// last ack, or its reset, must reach the other side), then waits for the other side's
    /// end, within [`CLOSE_WAIT`]; so neither end closes with unread bytes, which would
    /// reset the connection and could drop the records still on their way.
    pub async fn close(&self) {
        self.hop.queue(|out| out.close = true);
        let writer = lock(&self.writer).take();
        let done = async {
            if let Some(writer) = writer {
                let _ = writer.await;
            }
            self.hop.lost.cancelled().await;
        };
        if tokio::time::timeout(CLOSE_WAIT, done).await.is_err() {
            self.abort();
        }
    }
}

impl Drop for HopHandle {
    fn drop(&mut self) {
        // Both tasks end with the tunnel, whatever state it left them in.
        self.hop.abort.cancel();
        self.hop.lost.cancel();
    }
}

struct AckOut(Arc<Hop>);

impl AckSink for AckOut {
    fn post(&self, written: u64, fin: bool) {
        self.0.queue(|out| {
            let ack = out.ack.unwrap_or_default().max((written, fin));
            out.ack = Some(ack);
        });
    }
}

/// This side's direction on a framed connection.
pub struct PeerSend {
    hop: Arc<Hop>,
    /// The offset of the next byte to send.
    sent: u64,
}

impl ChunkSend for PeerSend {
    async fn write_chunk(&mut self, mut chunk: Bytes) -> Result<(), End> {
        while !chunk.is_empty() {
            let limit = loop {
                let raised = self.hop.limit_raised.notified();
                if self.hop.lost.is_cancelled() {
                    return Err(End::ConnectionLost("the peer connection is gone".into()));
                }
                let limit = self.hop.limit.load(Ordering::Acquire);
                if limit > self.sent {
                    break limit;
                }
                tokio::select! {
                    _ = raised => {}
                    _ = self.hop.lost.cancelled() => {}
                }
            };
            let n = chunk.len().min((limit - self.sent) as usize).min(MAX_DATA);
            let piece = chunk.split_to(n);
            self.sent += n as u64;
            self.hop.queue(|out| out.data.push_back(piece));
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.hop.queue(|out| out.fin = true);
    }
}

impl Abort for PeerSend {
    fn abort(&mut self, code: u32) {
        self.hop.queue(|out| {
            if out.reset.is_none() {
                out.reset = Some(code);
            }
        });
    }
}

/// The other side's direction on a framed connection.
pub struct PeerRecv {
    queued: mpsc::UnboundedReceiver<Item>,
    /// An item taken while filling a batch, for the next read.
    next: Option<Item>,
}

impl ChunkRecv for PeerRecv {
    async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
        let first = match self.next.take() {
            Some(item) => item,
            None => self
                .queued
                .recv()
                .await
                .unwrap_or(Item::Lost("the peer connection is gone".into())),
        };
        let chunk = match first {
            Item::Data(chunk) => chunk,
            Item::Fin => return Ok(None),
            Item::Reset => return Err(End::LinkReset),
            Item::Lost(why) => return Err(End::ConnectionLost(why)),
        };
        let mut n = 0;
        if let Some(slot) = bufs.first_mut() {
            *slot = chunk;
            n = 1;
        }
        while n < bufs.len() {
            match self.queued.try_recv() {
                Ok(Item::Data(chunk)) => {
                    bufs[n] = chunk;
                    n += 1;
                }
                Ok(other) => {
                    self.next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(Some(n))
    }
}

impl Abort for PeerRecv {
    fn abort(&mut self, _code: u32) {
        // The send half's reset record speaks for both directions.
    }
}

/// Writes what waits, credit and acks first, until the connection closes or fails.
async fn write_records(mut w: OwnedWriteHalf, hop: Arc<Hop>, granted: u64) {
    let mut credits = Vec::new();
    let mut buf = BytesMut::new();
    let mut granted_sent = 0;
    if granted > 0 {
        put_u64(&mut buf, CREDIT, granted);
        granted_sent = granted;
    }
    loop {
        let (reset, close) = {
            let mut out = lock(&hop.out);
            match out.reset.take() {
                Some(code) => {
                    // Nothing else matters once the tunnel is reset.
                    buf.clear();
                    buf.put_u8(RESET);
                    buf.put_u32(4);
                    buf.put_u32(code);
                    (true, false)
                }
                None => {
                    if let Some((written, fin)) = out.ack.take() {
                        put_u64(&mut buf, if fin { ACK_FIN } else { ACK }, written);
                    }
                    for (_, limit) in credits.drain(..) {
                        granted_sent = granted_sent.max(limit);
                    }
                    if granted_sent > hop.granted.load(Ordering::Acquire) {
                        hop.granted.store(granted_sent, Ordering::Release);
                        put_u64(&mut buf, CREDIT, granted_sent);
                    }
                    // Data up to a few records a write; the rest on the next turn, after
                    // any ack that arrived meanwhile.
                    while buf.len() < 4 * MAX_DATA {
                        let Some(piece) = out.data.pop_front() else {
                            break;
                        };
                        buf.put_u8(DATA);
                        buf.put_u32(piece.len() as u32);
                        buf.extend_from_slice(&piece);
                    }
                    if out.data.is_empty() && out.fin {
                        out.fin = false;
                        buf.put_u8(FIN);
                        buf.put_u32(0);
                    }
                    (false, out.close && out.data.is_empty())
                }
            }
        };
        let wrote = !buf.is_empty();
        if wrote {
            let ok = tokio::select! {
                r = w.write_all(&buf) => r.is_ok(),
                _ = hop.abort.cancelled() => false,
            };
            buf.clear();
            if !ok {
                hop.lost.cancel();
                return;
            }
        }
        if close || reset {
            // Everything went out: end with a FIN, not a reset.
            let _ = socket2::SockRef::from(w.as_ref()).set_linger(None);
            let _ = w.shutdown().await;
            return;
        }
        if wrote {
            continue;
        }
        tokio::select! {
            _ = hop.wake_writer.notified() => {}
            _ = hop.credit.next(&mut credits) => {}
            _ = hop.abort.cancelled() => return,
        }
    }
}

fn put_u64(buf: &mut BytesMut, kind: u8, value: u64) {
    buf.put_u8(kind);
    buf.put_u32(8);
    buf.put_u64(value);
}

/// Reads records until the connection ends: acks and credit at once, data and ends queued
/// for [`PeerRecv`].
async fn read_records(
    mut r: OwnedReadHalf,
    mut buf: BytesMut,
    hop: Arc<Hop>,
    items: mpsc::UnboundedSender<Item>,
    mut received: u64,
    inbound: Inbound,
) {
    let ended = loop {
        // Every whole record in the buffer.
        while buf.len() >= HEADER {
            let kind = buf[0];
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            let valid = match kind {
                DATA => (1..=MAX_DATA).contains(&len),
                ACK | ACK_FIN | CREDIT => len == 8,
                FIN => len == 0,
                RESET => len == 4,
                _ => false,
            };
            if !valid {
                tracing::warn!(
                    kind,
                    len,
                    "malformed record on the peer hop; resetting the tunnel"
                );
                let _ = items.send(Item::Reset);
                hop.abort.cancel();
                hop.lost.cancel();
                return;
            }
            if buf.len() < HEADER + len {
                break;
            }
            buf.advance(HEADER);
            let payload = buf.split_to(len).freeze();
            match kind {
                DATA => {
                    received += len as u64;
                    if received > hop.granted.load(Ordering::Acquire) {
                        tracing::warn!(
                            received,
                            "data past the credit on the peer hop; resetting the tunnel"
                        );
                        let _ = items.send(Item::Reset);
                        hop.abort.cancel();
                        hop.lost.cancel();
                        return;
                    }
                    let _ = items.send(Item::Data(payload));
                }
                ACK | ACK_FIN => {
                    let written = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
                    inbound.acks.post(written, kind == ACK_FIN);
                }
                CREDIT => {
                    let limit = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
                    if hop.limit.fetch_max(limit, Ordering::AcqRel) < limit {
                        hop.limit_raised.notify_waiters();
                        if let Some(pass_on) = &inbound.credit {
                            pass_on(limit);
                        }
                    }
                }
                FIN => {
                    let _ = items.send(Item::Fin);
                }
                _ => {
                    let _ = items.send(Item::Reset);
                    // Nothing follows a reset.
                    hop.abort.cancel();
                    hop.lost.cancel();
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < MAX_DATA + HEADER {
            buf.reserve(MAX_DATA + HEADER);
        }
        tokio::select! {
            read = r.read_buf(&mut buf) => match read {
                Ok(0) => break "the peer connection closed".to_owned(),
                Ok(_) => {}
                Err(e) => break format!("the peer connection failed: {e}"),
            },
            _ = hop.abort.cancelled() => break "the peer connection was given up".to_owned(),
        }
    };
    let _ = items.send(Item::Lost(ended));
    hop.lost.cancel();
    hop.limit_raised.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resume::Acked;

    /// Two framed ends on loopback, acks raising an [`Acked`] each.
    async fn pair(window: u64) -> ((Framed, Arc<Acked>), (Framed, Arc<Acked>)) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let end = |s: TcpStream| {
            let acked = Arc::new(Acked::default());
            let start = Start {
                send: 0,
                recv: 0,
                grant: window,
            };
            let f = framed(
                s,
                BytesMut::new(),
                start,
                Inbound {
                    acks: acked.clone(),
                    credit: None,
                },
            );
            (f, acked)
        };
        (end(a.unwrap()), end(b.unwrap().0))
    }

    #[tokio::test]
    async fn data_acks_and_fin_cross_in_order() {
        let ((mut a, a_acked), (mut b, _)) = pair(256 * 1024).await;
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        a.send.write_chunk(Bytes::from(data.clone())).await.unwrap();
        a.send.finish();
        let mut got = Vec::new();
        let mut bufs: [Bytes; 8] = Default::default();
        while let Some(n) = b.recv.read_chunks(&mut bufs).await.unwrap() {
            for c in &bufs[..n] {
                assert!(c.len() <= MAX_DATA);
                got.extend_from_slice(c);
            }
        }
        assert_eq!(got, data);
        // b's ack of all of it, FIN included, reaches a.
        b.hop.acks().post(200_000, true);
        a_acked.changed((0, false)).await;
        assert_eq!(a_acked.get(), (200_000, true));
        // A clean close reads as the end of the connection, not a reset.
        let started = std::time::Instant::now();
        tokio::join!(a.hop.close(), b.hop.close());
        assert!(
            started.elapsed() < CLOSE_WAIT,
            "a close waited for its timeout"
        );
        assert!(matches!(
            a.recv.read_chunks(&mut bufs).await,
            Err(End::ConnectionLost(why)) if why.contains("closed")
        ));
    }

    #[tokio::test]
    async fn a_sender_waits_for_credit_and_acks_pass_while_it_waits() {
        let ((mut a, a_acked), (mut b, _)) = pair(64 * 1024).await;
        let sent = tokio::spawn(async move {
            a.send
                .write_chunk(Bytes::from(vec![7u8; 128 * 1024]))
                .await
                .unwrap();
            a
        });
        // The first 64 KiB arrive; the rest waits for credit.
        let mut bufs: [Bytes; 4] = Default::default();
        let n = b.recv.read_chunks(&mut bufs).await.unwrap().unwrap();
        let first: usize = bufs[..n].iter().map(Bytes::len).sum();
        assert_eq!(first, 64 * 1024);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sent.is_finished(), "sent past the credit");
        // An ack crosses while the data waits.
        b.hop.acks().post(5, false);
        a_acked.changed((0, false)).await;
        assert_eq!(a_acked.get(), (5, false));
        b.hop.grant(128 * 1024);
        let _a = sent.await.unwrap();
        let n = b.recv.read_chunks(&mut bufs).await.unwrap().unwrap();
        let second: usize = bufs[..n].iter().map(Bytes::len).sum();
        assert_eq!(second, 64 * 1024);
    }

    #[tokio::test]
    async fn a_reset_and_a_lost_connection_read_differently() {
        let ((mut a, _), (mut b, _)) = pair(1024).await;
        a.send.abort(16);
        let mut bufs: [Bytes; 1] = Default::default();
        assert_eq!(b.recv.read_chunks(&mut bufs).await, Err(End::LinkReset));

        let ((a, _), (mut b, _)) = pair(1024).await;
        a.hop.abort();
        assert!(matches!(
            b.recv.read_chunks(&mut bufs).await,
            Err(End::ConnectionLost(_))
        ));
        b.hop.lost().cancelled().await;
    }

    #[tokio::test]
    async fn data_past_the_credit_is_a_reset() {
        let ((a, _), (mut b, _)) = pair(10).await;
        // Bypass the sender's own gate: 20 bytes against a 10-byte grant.
        a.hop.hop.limit.store(1 << 20, Ordering::Release);
        let mut send = a.send;
        send.write_chunk(Bytes::from(vec![1u8; 20])).await.unwrap();
        let mut bufs: [Bytes; 1] = Default::default();
        assert_eq!(b.recv.read_chunks(&mut bufs).await, Err(End::LinkReset));
    }
}

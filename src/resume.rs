//! Resumable tunnels (PROTOCOL.md §2e): what one side of a tunnel keeps so that the
//! tunnel outlives the stream, and the link, it runs on.
//!
//! Each side holds a real socket (the entry relay the user's, the agent the service's)
//! and keeps, across streams:
//!
//! - a [`Ring`]: the bytes of its own direction it has sent and the other side has not
//!   yet acknowledged, and its FIN once sent. One copy: the ring holds the same `Bytes`
//!   the transport sends from.
//! - [`Acked`]: what the other side has said it wrote to its socket (its `ack` frames,
//!   raised by the control stream's reader whichever link they arrive on).
//! - [`Written`]: how much of the other direction it has written to its own socket, and
//!   whether it has passed the other's FIN on; the pumps update it after every write, so
//!   that it is exact whenever a stream is abandoned, and post acks as it advances.
//!
//! A stream's pumps ([`crate::forward::join`] with a [`Resume`]) start the outgoing
//! direction at the other side's `written` (replaying the ring from there) and the
//! incoming one at this side's. Everything a stream delivered that was not yet written
//! is dropped with the stream and sent again on the next one, so an abandoned stream
//! loses, duplicates and reorders nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The most a tunnel's replay buffer holds (PROTOCOL.md §2e): the largest window (4 MiB)
/// plus what a 40 Mbit/s tunnel sends in an ack's delay and a 200 ms round trip, twice
/// over, so that on a healthy link it never limits a tunnel.
pub const REPLAY_MAX: u64 = 8 * 1024 * 1024;

/// A side acknowledges once its `written` has advanced this far since its last ack...
pub const ACK_BYTES: u64 = 256 * 1024;

/// ...or this long after an advance no ack covers yet.
pub const ACK_DELAY: Duration = Duration::from_millis(50);

/// How long a tunnel whose link is gone waits for a new one, by default (PROTOCOL.md
/// §2e, `tunnel_resume_secs`).
pub const DEFAULT_RESUME_SECS: u64 = 120;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain values; a panic elsewhere cannot leave one half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one side of a tunnel stands on the other's direction: bytes written to its
/// socket, and whether it has passed the FIN on (an ack, a `resume`, a `resumed`).
pub type Offsets = (u64, bool);

/// A peer broke §2e's offset rules; the tunnel is reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The replay buffer of one direction: the bytes from the last offset the other side
/// acknowledged up to everything sent, in the pieces they were sent in.
#[derive(Debug)]
pub struct Ring {
    pieces: VecDeque<Bytes>,
    /// The offset of the first byte held: what the other side has acknowledged.
    start: u64,
    /// The offset after the last byte held: everything sent.
    end: u64,
    /// Whether this direction's FIN has been sent (after `end`).
    fin: bool,
    cap: u64,
    /// Bytes sent again after resumes, in all.
    replayed: u64,
    /// Bytes drawn from an outside budget for what this ring holds beyond a free floor
    /// (the relay's tunnel buffer budget: its replay buffers count, PROTOCOL.md §2e); the
    /// caller draws and gives back, the ring only keeps the count.
    budgeted: u64,
    /// What the caller last counted of `held()` (for a gauge of all rings).
    counted: u64,
}

impl Ring {
    /// An empty ring holding at most `cap` bytes.
    pub fn new(cap: u64) -> Ring {
        Ring {
            pieces: VecDeque::new(),
            start: 0,
            end: 0,
            fin: false,
            cap,
            replayed: 0,
            budgeted: 0,
            counted: 0,
        }
    }

    /// How `held()` moved since the last call, as (bytes added, bytes freed): for a
    /// gauge over all rings, whatever changed them.
    pub fn held_change(&mut self) -> (u64, u64) {
        let held = self.held();
        let change = (
            held.saturating_sub(self.counted),
            self.counted.saturating_sub(held),
        );
        self.counted = held;
        change
    }

    /// Room to read into: the drawn budget plus `free` (what a ring may hold undrawn)
    /// beyond what is held.
    pub fn budget_spare(&self, free: u64) -> u64 {
        (self.budgeted + free).saturating_sub(self.held())
    }

    /// Counts `n` more bytes drawn for this ring.
    pub fn budget_add(&mut self, n: u64) {
        self.budgeted += n;
    }

    /// The drawn bytes that what is held beyond `free` no longer needs (after an ack),
    /// to give back.
    pub fn budget_surplus(&mut self, free: u64) -> u64 {
        let needed = self.held().saturating_sub(free);
        let surplus = self.budgeted.saturating_sub(needed);
        self.budgeted -= surplus;
        surplus
    }

    /// Every drawn byte, to give back when the tunnel ends.
    pub fn budget_all(&mut self) -> u64 {
        std::mem::take(&mut self.budgeted)
    }

    /// Bytes handed out again by [`Ring::replay_from`] over the ring's life.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// Bytes sent in all (`sent` in PROTOCOL.md §2e).
    pub fn sent(&self) -> u64 {
        self.end
    }

    /// Bytes the other side has acknowledged.
    pub fn acked(&self) -> u64 {
        self.start
    }

    /// Bytes held for a replay.
    pub fn held(&self) -> u64 {
        self.end - self.start
    }

    /// How many more bytes may be sent before an ack must free room.
    pub fn room(&self) -> u64 {
        self.cap.saturating_sub(self.held())
    }

    /// Whether this direction's FIN has been sent.
    pub fn finished(&self) -> bool {
        self.fin
    }

    /// Keeps `piece`, which is being sent.
    pub fn push(&mut self, piece: Bytes) {
        debug_assert!(!self.fin, "nothing is sent after a FIN");
        self.end += piece.len() as u64;
        if !piece.is_empty() {
            self.pieces.push_back(piece);
        }
    }

    /// Notes that the FIN has been sent.
    pub fn finish(&mut self) {
        self.fin = true;
    }

    /// Forgets what the other side has written (`written` from its ack or `resumed`);
    /// the bytes freed. An offset beyond what was sent is a violation; one at or below
    /// what was acknowledged already frees nothing.
    pub fn ack(&mut self, written: u64) -> Result<u64, Violation> {
        if written > self.end {
            return Err(Violation(format!(
                "acknowledged {written} bytes of {} sent",
                self.end
            )));
        }
        let mut drop = written.saturating_sub(self.start);
        let freed = drop;
        while drop > 0 {
            let front = self.pieces.front_mut().expect("held bytes are in pieces");
            let len = front.len() as u64;
            if len <= drop {
                self.pieces.pop_front();
                drop -= len;
            } else {
                front.advance(drop as usize);
                drop = 0;
            }
        }
        self.start = self.start.max(written);
        Ok(freed)
    }

    /// What to send again from `offset` (the other side's `written`), in order: an
    /// offset the ring no longer holds, or beyond what was sent, is a violation.
    pub fn replay_from(&mut self, offset: u64) -> Result<Vec<Bytes>, Violation> {
        if offset < self.start || offset > self.end {
            return Err(Violation(format!(
                "resume from {offset}, but bytes {}..{} are held",
                self.start, self.end
            )));
        }
        let mut skip = offset - self.start;
        let mut out = Vec::new();
        for piece in &self.pieces {
            let len = piece.len() as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            out.push(piece.slice(skip as usize..));
            skip = 0;
        }
        self.replayed += self.end - offset;
        Ok(out)
    }
}

/// What the other side has acknowledged of this side's direction: raised by `ack`
/// frames (and a `resumed`), never lowered, on whatever link they arrive.
#[derive(Debug, Default)]
pub struct Acked {
    written: AtomicU64,
    fin: AtomicBool,
    raised: Notify,
}

impl Acked {
    /// Applies an ack; a lower offset is ignored, a `fin` stays.
    pub fn raise(&self, written: u64, fin: bool) {
        let before = self.written.fetch_max(written, Ordering::AcqRel);
        let fin_before = fin && self.fin.swap(true, Ordering::AcqRel);
        if before < written || (fin && !fin_before) {
            self.raised.notify_waiters();
        }
    }

    /// The offset acknowledged so far, and whether the FIN was.
    pub fn get(&self) -> (u64, bool) {
        // `fin` first: it is set after the last offset, so a fin seen means its offset is.
        let fin = self.fin.load(Ordering::Acquire);
        (self.written.load(Ordering::Acquire), fin)
    }

    /// Waits until an ack beyond `seen` arrives.
    pub async fn changed(&self, seen: (u64, bool)) {
        loop {
            let raised = self.raised.notified();
            if self.get() != seen {
                return;
            }
            raised.await;
        }
    }
}

/// Where a side's acks go: the link's control stream (the relay's [`Acks`] outbox, the
/// agent's), or anything a test wires up.
pub trait AckSink: Send + Sync {
    /// Queues an ack for the tunnel; a later one makes an earlier one moot.
    fn post(&self, written: u64, fin: bool);
}

/// Acks that arrive where this side reads them directly (the peer hop's records, PROTOCOL.md
/// §2e) raise the tunnel's [`Acked`] at once.
impl AckSink for Acked {
    fn post(&self, written: u64, fin: bool) {
        self.raise(written, fin);
    }
}

/// This side's progress on the other direction: how much it has written to its socket
/// and whether it has passed the FIN on, and the acks that say so.
pub struct Written {
    written: u64,
    fin: bool,
    /// What the last ack said.
    posted: u64,
    sink: Arc<dyn AckSink>,
}

impl Written {
    /// Nothing written yet; acks go to `sink`.
    pub fn new(sink: Arc<dyn AckSink>) -> Written {
        Written {
            written: 0,
            fin: false,
            posted: 0,
            sink,
        }
    }

    /// Bytes of the other direction written to the socket.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the other direction's FIN has been passed on.
    pub fn fin(&self) -> bool {
        self.fin
    }

    /// Acks now go to `sink` (the new link's control stream, after a resume).
    pub fn set_sink(&mut self, sink: Arc<dyn AckSink>) {
        self.sink = sink;
    }

    /// Counts `n` more bytes written; acks at once once [`ACK_BYTES`] have gone unacked.
    /// True if an ack is still owed (the caller flushes it within [`ACK_DELAY`]).
    pub fn wrote(&mut self, n: u64) -> bool {
        self.written += n;
        if self.written - self.posted >= ACK_BYTES {
            self.flush();
        }
        self.owed()
    }

    /// Whether written bytes have not been acknowledged yet.
    pub fn owed(&self) -> bool {
        self.written > self.posted
    }

    /// Acks everything written so far.
    pub fn flush(&mut self) {
        self.posted = self.written;
        self.sink.post(self.written, self.fin);
    }

    /// Notes that the FIN has been passed on, and acks it at once.
    pub fn finished(&mut self) {
        self.fin = true;
        self.flush();
    }
}

/// A side's state of one resumable tunnel, carried from stream to stream.
pub struct Carried {
    /// Its own direction, for replays.
    pub ring: Ring,
    /// What the other side acknowledged of it.
    pub acked: Arc<Acked>,
    /// Its progress on the other direction.
    pub written: Written,
}

impl Carried {
    /// A new tunnel's state, its acks going to `sink`.
    pub fn new(sink: Arc<dyn AckSink>) -> Carried {
        Carried::with_acked(Arc::default(), sink)
    }

    /// A new tunnel's state whose acks arrive in `acked` (a peer hop's reader raises it,
    /// and is set up before the state is).
    pub fn with_acked(acked: Arc<Acked>, sink: Arc<dyn AckSink>) -> Carried {
        Carried {
            ring: Ring::new(REPLAY_MAX),
            acked,
            written: Written::new(sink),
        }
    }

    /// The pumps' view for one stream, which starts this side's direction at `from` (the
    /// other side's `written`, and whether it had passed this side's FIN on, as its
    /// `resume` or `resumed` said), and ends as lost when `lost` fires.
    pub fn on<'a>(
        &'a mut self,
        (from, fin): (u64, bool),
        lost: &'a CancellationToken,
    ) -> Resume<'a> {
        // What the other side said counts as its ack: the one it sent last may have been
        // lost with the link.
        self.acked.raise(from, fin);
        Resume {
            ring: &mut self.ring,
            acked: &self.acked,
            from,
            written: &mut self.written,
            lost,
        }
    }
}

/// What the pumps of one stream of a resumable tunnel use ([`crate::forward::join`]).
pub struct Resume<'a> {
    /// This side's direction, for replays.
    pub ring: &'a mut Ring,
    /// The other side's acks of it.
    pub acked: &'a Acked,
    /// Where the stream starts this side's direction (the other side's `written`).
    pub from: u64,
    /// This side's progress on the other direction, where the stream starts it.
    pub written: &'a mut Written,
    /// Fires when the link the stream is on is gone.
    pub lost: &'a CancellationToken,
}

/// The acks of every tunnel on one link waiting to go on its control stream, the latest
/// per tunnel (a later ack makes an earlier one moot).
#[derive(Debug, Default)]
pub struct Acks {
    pending: Mutex<HashMap<Arc<str>, (u64, bool)>>,
    posted: Notify,
}

impl Acks {
    /// Queues an ack for `tunnel`.
    pub fn post(&self, tunnel: &Arc<str>, written: u64, fin: bool) {
        {
            let mut pending = lock(&self.pending);
            let slot = pending.entry(tunnel.clone()).or_default();
            // An offset never goes down, and a FIN comes after the last offset.
            *slot = (*slot).max((written, fin));
        }
        self.posted.notify_one();
    }

    /// Moves everything queued into `out`, waiting until something is. Cancel-safe.
    pub async fn next(&self, out: &mut Vec<(Arc<str>, (u64, bool))>) {
        loop {
            out.extend(lock(&self.pending).drain());
            if !out.is_empty() {
                return;
            }
            self.posted.notified().await;
        }
    }

    /// A sink that queues one tunnel's acks here.
    pub fn sink(self: &Arc<Self>, tunnel: &str) -> Arc<dyn AckSink> {
        Arc::new(TunnelAcks {
            acks: self.clone(),
            tunnel: tunnel.into(),
        })
    }
}

struct TunnelAcks {
    acks: Arc<Acks>,
    tunnel: Arc<str>,
}

impl AckSink for TunnelAcks {
    fn post(&self, written: u64, fin: bool) {
        self.acks.post(&self.tunnel, written, fin);
    }
}

/// The [`Acked`] of every resumable tunnel a side holds, by tunnel id, for the control
/// stream's reader to raise whichever link an ack arrives on.
#[derive(Debug, Default)]
pub struct AckBoard {
    tunnels: Mutex<HashMap<String, Arc<Acked>>>,
}

impl AckBoard {
    /// Registers tunnel `id`'s acks until the returned entry is dropped.
    pub fn enter(self: &Arc<Self>, id: &str, acked: &Arc<Acked>) -> AckEntry {
        lock(&self.tunnels).insert(id.to_owned(), acked.clone());
        AckEntry {
            board: self.clone(),
            id: id.to_owned(),
            acked: acked.clone(),
        }
    }

    /// Applies an `ack` frame; one for a tunnel not held is ignored (it may have just
    /// ended).
    pub fn raise(&self, id: &str, written: u64, fin: bool) {
        let acked = lock(&self.tunnels).get(id).cloned();
        if let Some(acked) = acked {
            acked.raise(written, fin);
        }
    }

    /// Tunnels registered.
    pub fn len(&self) -> usize {
        lock(&self.tunnels).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tunnel's place on an [`AckBoard`].
#[derive(Debug)]
pub struct AckEntry {
    board: Arc<AckBoard>,
    id: String,
    acked: Arc<Acked>,
}

impl Drop for AckEntry {
    fn drop(&mut self) {
        let mut tunnels = lock(&self.board.tunnels);
        if tunnels
            .get(&self.id)
            .is_some_and(|a| Arc::ptr_eq(a, &self.acked))
        {
            tunnels.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(range: std::ops::Range<u8>) -> Bytes {
        Bytes::from(range.collect::<Vec<u8>>())
    }

    fn joined(pieces: Vec<Bytes>) -> Vec<u8> {
        pieces.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn a_ring_replays_from_any_unacknowledged_offset_and_frees_what_is_acked() {
        let mut ring = Ring::new(1000);
        ring.push(bytes(0..10));
        ring.push(bytes(10..25));
        ring.push(Bytes::new());
        ring.push(bytes(25..30));
        assert_eq!((ring.sent(), ring.held(), ring.room()), (30, 30, 970));
        assert_eq!(
            joined(ring.replay_from(0).unwrap()),
            (0..30).collect::<Vec<u8>>()
        );
        assert_eq!(
            joined(ring.replay_from(12).unwrap()),
            (12..30).collect::<Vec<u8>>()
        );
        assert!(ring.replay_from(30).unwrap().is_empty());
        assert_eq!(ring.ack(12), Ok(12));
        assert_eq!((ring.acked(), ring.held()), (12, 18));
        assert_eq!(
            joined(ring.replay_from(12).unwrap()),
            (12..30).collect::<Vec<u8>>()
        );
        assert_eq!(
            joined(ring.replay_from(26).unwrap()),
            (26..30).collect::<Vec<u8>>()
        );
        // An old ack frees nothing and is no error.
        assert_eq!(ring.ack(5), Ok(0));
        assert_eq!(ring.acked(), 12);
        assert_eq!(ring.ack(30), Ok(18));
        assert_eq!(ring.held(), 0);
    }

    #[test]
    fn offsets_outside_what_a_ring_holds_are_violations() {
        let mut ring = Ring::new(1000);
        ring.push(bytes(0..20));
        ring.ack(8).unwrap();
        assert!(ring.replay_from(7).is_err(), "already freed");
        assert!(ring.replay_from(21).is_err(), "never sent");
        assert!(ring.ack(21).is_err(), "never sent");
        assert_eq!(ring.acked(), 8, "a violation changes nothing");
    }

    #[test]
    fn a_full_ring_has_no_room_until_an_ack() {
        let mut ring = Ring::new(16);
        ring.push(bytes(0..16));
        assert_eq!(ring.room(), 0);
        ring.ack(4).unwrap();
        assert_eq!(ring.room(), 4);
    }

    #[test]
    fn acks_are_queued_latest_per_tunnel_and_a_fin_sorts_after_its_offset() {
        let acks = Arc::new(Acks::default());
        let a = acks.sink("a");
        a.post(10, false);
        a.post(40, false);
        a.post(40, true);
        a.post(30, false);
        acks.sink("b").post(7, false);
        let mut out = Vec::new();
        block_on(acks.next(&mut out));
        out.sort();
        assert_eq!(
            out,
            vec![("a".into(), (40, true)), ("b".into(), (7, false))]
        );
    }

    #[test]
    fn acked_only_rises_and_keeps_its_fin() {
        let acked = Acked::default();
        acked.raise(10, false);
        acked.raise(5, false);
        assert_eq!(acked.get(), (10, false));
        acked.raise(10, true);
        acked.raise(10, false);
        assert_eq!(acked.get(), (10, true));
    }

    #[test]
    fn written_acks_at_the_threshold_and_owes_the_rest() {
        struct Log(Mutex<Vec<(u64, bool)>>);
        impl AckSink for Log {
            fn post(&self, written: u64, fin: bool) {
                lock(&self.0).push((written, fin));
            }
        }
        let log = Arc::new(Log(Mutex::new(Vec::new())));
        let mut w = Written::new(log.clone());
        assert!(w.wrote(1000), "a small advance is owed, not sent");
        assert!(lock(&log.0).is_empty());
        assert!(!w.wrote(ACK_BYTES), "past the threshold it goes at once");
        assert_eq!(*lock(&log.0), vec![(ACK_BYTES + 1000, false)]);
        w.wrote(5);
        w.finished();
        assert_eq!(lock(&log.0).last(), Some(&(ACK_BYTES + 1005, true)));
        assert!(!w.owed());
    }

    #[test]
    fn an_ack_board_reaches_a_registered_tunnel_until_it_leaves() {
        let board = Arc::new(AckBoard::default());
        let acked = Arc::new(Acked::default());
        let entry = board.enter("t", &acked);
        board.raise("t", 9, false);
        board.raise("other", 99, true);
        assert_eq!(acked.get(), (9, false));
        drop(entry);
        assert!(board.is_empty());
        board.raise("t", 20, false);
        assert_eq!(acked.get(), (9, false));
    }

    /// Polls a future that is ready at once.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(f)
    }
}

//! Tunnel credit (PROTOCOL.md §2d): how many bytes an agent may send the relay on one
//! tunnel, so that a user who stops reading costs the relay a small window instead of the
//! transport's.
//!
//! - The agent's side: a [`Gate`] per tunnel, raised by the relay's `credit` frames
//!   through its link's [`Board`]; the pump reads from the device's service only what the
//!   gate allows.
//! - The relay's side: a [`Grant`] per tunnel decides the limit from what the user's
//!   socket has taken and posts it in the session's [`Outbox`], which the session's
//!   control loop sends; every byte granted and not yet taken is drawn from the relay-wide
//!   [`Budget`] first.
//!
//! Nothing here runs per chunk but a comparison: a grant is decided at most once per read
//! batch, and only once a quarter of the window is used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The least a window shrinks to, and the window a tunnel starts with when its user has
/// no kernel queue (a user inside the relay) or a smaller one: a few packets' worth on a
/// slow path, and what a terminal session ever needs.
pub const MIN_WINDOW: u64 = 64 * 1024;

/// The most a window grows to: the transports' own per-stream windows (4 MiB, sized for
/// 40 Mbit/s × 200 ms plus a round trip of loss recovery), which therefore never bind a
/// tunnel under credit.
pub const MAX_WINDOW: u64 = 4 << 20;

/// The most a window takes from the user's queue alone (at admission, or while the user
/// takes bytes; see [`Grant::open_for`]): 40 Mbit/s × 200 ms, a first flight that fills a
/// long path. Past it only the agent running out of credit grows a window. A user who never
/// reads, on loopback or a LAN where the queue takes 3.75 MiB at once, so holds 1 MiB of
/// kernel memory, not 3.75: with 3.75 MiB, 200 such readers beside their agents took the
/// test machine past the kernel's TCP pressure mark, the kernel shrank the relay's send
/// buffers, and 40 MB of granted bytes waited in the relay's own memory.
pub const QUEUE_WINDOW_MAX: u64 = 1 << 20;

/// How soon a relay looks again at a user socket's unsent queue when nothing else will
/// wake it (the agent has used its credit, the user's kernel still holds bytes), and the
/// most it waits between looks once the user has stopped reading.
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_secs(1);
/// How long a user with a whole window waiting must have taken nothing before the window
/// shrinks: far longer than a burst takes to leave a local queue, far shorter than a user
/// who has stopped stays stopped.
const STALL: Duration = Duration::from_millis(100);
/// A new limit is sent once the window less this is left (a quarter of it used): the
/// credit in flight then stays between ¾ and all of the window. (Half, as first built, left
/// ¾ of it on average; on a 150 ms path with 1 % loss, where a lost packet holds a round
/// trip's bytes back, downloads ran at 0.7 × plain TCP.) At 0.3 GB/s and a 4 MiB window
/// that is a few hundred small frames a second.
const REFILL: u64 = 4;
/// How many of the latest limits a relay remembers to tell that the agent ran out of
/// credit: with a grant per quarter window, two windows' worth, more than are ever on
/// their way at once.
const RECENT: usize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain values; a panic elsewhere cannot leave one half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's side of one tunnel: the limit the relay has granted so far.
#[derive(Debug)]
pub struct Gate {
    /// Bytes the agent may send on the tunnel in all.
    limit: AtomicU64,
    /// Woken whenever the limit rises.
    raised: Notify,
}

impl Gate {
    /// A gate at `limit` (the `open`'s initial credit).
    pub fn new(limit: u64) -> Gate {
        Gate {
            limit: AtomicU64::new(limit),
            raised: Notify::new(),
        }
    }

    /// Raises the limit; a lower one is ignored (the limit never goes down).
    pub fn raise(&self, limit: u64) {
        if self.limit.fetch_max(limit, Ordering::AcqRel) < limit {
            self.raised.notify_waiters();
        }
    }

    /// The limit now.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// How many bytes past `sent` may go, waiting until there is at least one.
    pub async fn room(&self, sent: u64) -> u64 {
        loop {
            // Created before the check, so a raise in between is not missed.
            let raised = self.raised.notified();
            let limit = self.limit();
            if limit > sent {
                return limit - sent;
            }
            raised.await;
        }
    }
}

/// The agent's side of one link: the gates of its tunnels, by tunnel id, for the control
/// stream's reader to raise.
#[derive(Debug, Default)]
pub struct Board {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl Board {
    /// Registers tunnel `id` with its initial credit; it leaves the board when the
    /// returned entry is dropped.
    pub fn open(self: &Arc<Self>, id: &str, initial: u64) -> BoardEntry {
        let gate = Arc::new(Gate::new(initial));
        lock(&self.gates).insert(id.to_owned(), gate.clone());
        BoardEntry {
            board: self.clone(),
            id: id.to_owned(),
            gate,
        }
    }

    /// Applies a `credit` frame; one for a tunnel not on the board is ignored (it may have
    /// just ended).
    pub fn raise(&self, id: &str, limit: u64) {
        let gate = lock(&self.gates).get(id).cloned();
        if let Some(gate) = gate {
            gate.raise(limit);
        }
    }

    /// Tunnels on the board.
    pub fn len(&self) -> usize {
        lock(&self.gates).len()
    }

    /// Whether no tunnel is on the board.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tunnel's place on a [`Board`].
#[derive(Debug)]
pub struct BoardEntry {
    board: Arc<Board>,
    id: String,
    gate: Arc<Gate>,
}

impl BoardEntry {
    /// The tunnel's gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl Drop for BoardEntry {
    fn drop(&mut self) {
        let mut gates = lock(&self.board.gates);
        // Only our own gate: a tunnel id reused on the link has a gate of its own.
        if gates
            .get(&self.id)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            gates.remove(&self.id);
        }
    }
}

/// The relay-wide limit on tunnel bytes granted and not yet taken by users (`[limits]
/// tunnel_buffer_bytes`). Grants draw from it; taken bytes and ended tunnels give back.
#[derive(Debug)]
pub struct Budget {
    /// The limit, bytes.
    limit: u64,
    /// Drawn now, bytes; never above `limit`.
    used: AtomicU64,
    /// Times a draw found less left than it wanted (for the metric).
    exhausted: AtomicU64,
    /// Of `used`, the bytes waiting in the relay's own memory for user sockets that would
    /// not take them (the rest is in flight or in the kernel's queues).
    held: AtomicU64,
    /// Tunnels under credit now (for [`Budget::fair_window`]).
    tunnels: AtomicU64,
    /// Bytes the relay's replay buffers hold now (PROTOCOL.md §2e): beyond a small floor
    /// each, drawn from `used`.
    replay: AtomicU64,
    /// Woken whenever bytes are given back.
    freed: Notify,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            held: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            replay: AtomicU64::new(0),
            freed: Notify::new(),
        }
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes drawn now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// How many times a draw found less left than it wanted.
    pub fn times_exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }

    /// The largest window a tunnel may have now: an equal share of half the limit among
    /// the tunnels under credit, and never less than [`MIN_WINDOW`]. With few tunnels it
    /// is past [`MAX_WINDOW`] and binds nothing; with thousands it keeps the windows that
    /// stalled users hold (which cannot be taken back) to half the budget in all, so that
    /// every other tunnel still finds room for a window as large as theirs.
    pub fn fair_window(&self) -> u64 {
        let tunnels = self.tunnels.load(Ordering::Relaxed).max(1);
        (self.limit / 2 / tunnels).max(MIN_WINDOW)
    }

    /// Bytes the relay's replay buffers hold now.
    pub fn replay(&self) -> u64 {
        self.replay.load(Ordering::Relaxed)
    }

    /// Counts a replay buffer's change: `added` bytes kept, `freed` let go.
    pub fn replay_change(&self, added: u64, freed: u64) {
        self.replay.fetch_add(added, Ordering::Relaxed);
        self.replay.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Bytes waiting in the relay's memory for user sockets now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes waiting in the relay's memory.
    pub fn hold(&self, n: u64) {
        self.held.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` bytes that no longer wait in the relay's memory.
    pub fn release(&self, n: u64) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }

    /// Draws up to `want` bytes; how many it got (0 when the budget is exhausted).
    pub fn take(&self, want: u64) -> u64 {
        self.draw(want, false)
    }

    /// Draws exactly `want` bytes, or nothing (false).
    pub fn take_all(&self, want: u64) -> bool {
        want == 0 || self.draw(want, true) == want
    }

    fn draw(&self, want: u64, whole: bool) -> u64 {
        if want == 0 {
            return 0;
        }
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let left = self.limit.saturating_sub(used);
            let got = want.min(left);
            if got == 0 || (whole && got < want) {
                self.exhausted.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + got,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if got < want {
                        self.exhausted.fetch_add(1, Ordering::Relaxed);
                    }
                    return got;
                }
                Err(now) => used = now,
            }
        }
    }

    /// Gives `n` bytes back.
    pub fn give(&self, n: u64) {
        if n > 0 {
            let before = self.used.fetch_sub(n, Ordering::AcqRel);
            debug_assert!(before >= n, "gave back more than was drawn");
            self.freed.notify_waiters();
        }
    }

    /// Resolves once bytes have been given back (after this call).
    pub async fn freed(&self) {
        self.freed.notified().await
    }
}

/// A share of a [`Budget`] held for as long as this lives (a tunnel without credit
/// holds its transport's whole window).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    /// Reserves exactly `bytes`, or `None` when the budget cannot cover them.
    pub fn take(budget: &Arc<Budget>, bytes: u64) -> Option<Reservation> {
        budget.take_all(bytes).then(|| Reservation {
            budget: budget.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// The relay's side of one device session: new limits waiting to be sent on its control
/// stream, the latest per tunnel (a later limit makes an earlier one moot).
#[derive(Debug, Default)]
pub struct Outbox {
    /// Keyed by the tunnel's shared id: posting after the control loop has drained the
    /// map allocates nothing (the map keeps its table, the key is a reference count).
    pending: Mutex<HashMap<Arc<str>, u64>>,
    posted: Notify,
}

impl Outbox {
    /// Queues `limit` for `tunnel`.
    pub fn post(&self, tunnel: &Arc<str>, limit: u64) {
        {
            let mut pending = lock(&self.pending);
            let slot = pending.entry(tunnel.clone()).or_default();
            *slot = (*slot).max(limit);
        }
        self.posted.notify_one();
    }

    /// Moves everything queued into `out` (which the caller reuses), waiting until
    /// something is. Cancel-safe: nothing is taken but in the poll that returns it.
    pub async fn next(&self, out: &mut Vec<(Arc<str>, u64)>) {
        loop {
            out.extend(lock(&self.pending).drain());
            if !out.is_empty() {
                return;
            }
            self.posted.notified().await;
        }
    }
}

/// What a user's socket says when a grant is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserQueue {
    /// Bytes written to it that its kernel has not sent yet.
    pub unsent: u64,
    /// The most its kernel queue takes (see [`UserQueue::capacity_of`]); `u64::MAX` for a
    /// user in this process, which has no kernel queue.
    pub capacity: u64,
}

impl UserQueue {
    /// The bytes a TCP socket's send queue takes, from its `SO_SNDBUF` as read back: all
    /// but a sixteenth. The kernel counts its per-buffer overhead against that figure, and
    /// measured on Linux 6.x a stalled reader's sender queues 97–99 % of it in data, from
    /// 1,200-byte writes as from 256 KiB ones, autotuned or set (the kernel doubles a set
    /// value for its overhead, so the figure read back is what it holds). Half, as first
    /// assumed, cut every window to 2 MiB on this machine.
    pub fn capacity_of(send_buffer: u64) -> u64 {
        send_buffer - send_buffer / 16
    }

    /// What a user's TCP socket says now.
    pub fn of(socket: &socket2::Socket) -> UserQueue {
        UserQueue {
            unsent: crate::sockinfo::unsent_bytes(socket).unwrap_or(0),
            capacity: socket
                .send_buffer_size()
                .map_or(0, |b| UserQueue::capacity_of(b as u64)),
        }
    }

    /// The window this queue alone stands for (see [`QUEUE_WINDOW_MAX`]): what it takes,
    /// between [`MIN_WINDOW`] and [`QUEUE_WINDOW_MAX`]; none for a user without a kernel
    /// queue.
    fn window(&self) -> Option<u64> {
        (self.capacity < u64::MAX).then(|| self.capacity.clamp(MIN_WINDOW, QUEUE_WINDOW_MAX))
    }

    /// A user inside the relay (the browser terminal, a gateway session).
    pub const IN_PROCESS: UserQueue = UserQueue {
        unsent: 0,
        capacity: u64::MAX,
    };
}

/// What a relay's pump waits for besides its link and its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing: the next read or write will bring the grant up to date.
    Nothing,
    /// A look at the user's unsent queue after this long: the agent may be out of credit,
    /// and only the user's kernel sending can free more.
    Poll(Duration),
    /// The relay-wide budget: it had less than this tunnel wanted.
    Budget,
}

/// The relay's side of one tunnel under credit: the limit granted, the window, and the
/// tunnel's share of the relay's budget.
#[derive(Debug)]
pub struct Grant {
    tunnel: Arc<str>,
    outbox: Arc<Outbox>,
    budget: Arc<Budget>,
    /// The agent may send this many bytes in all.
    limit: u64,
    /// The limits granted last, the latest at `posted[grants % RECENT]`: what the agent
    /// may still be working to while newer ones are on their way.
    posted: [u64; RECENT],
    /// Grants so far.
    grants: usize,
    /// Whether the agent's bytes have ended exactly at a limit since the last grant: its
    /// reads were cut short by its credit, so the window, not the device, bound them.
    starved: bool,
    /// How far ahead of what the user has taken the limit is kept, as the user's pace
    /// allows.
    window: u64,
    /// The window in force: `window`, or less when the user's kernel queue cannot take
    /// that much (so what a stalled user was granted fits in its queue, not the relay).
    effective: u64,
    /// Taken bytes already given back to the budget (the tunnel holds `limit - given`).
    given: u64,
    /// The next [`Wait::Poll`] interval; doubles while the user's queue does not move.
    poll: Duration,
    /// The most the user had taken when last asked, and when that last grew.
    taken: u64,
    taken_grew: Instant,
    /// When the last [`Wait::Poll`] was handed out.
    polled: Instant,
}

impl Grant {
    /// The tunnel has moved to another link (a resume, PROTOCOL.md §2e): later limits go
    /// to that link's control stream. The resume itself tells the agent the limit in
    /// force ([`Grant::limit`]).
    pub fn move_to(&mut self, outbox: Arc<Outbox>) {
        self.outbox = outbox;
    }

    /// A tunnel's credit for a user without a kernel queue of their own (inside the relay,
    /// or behind a peer hop): see [`Grant::open_for`].
    pub fn open(tunnel: &str, outbox: Arc<Outbox>, budget: Arc<Budget>) -> Grant {
        Grant::open_for(tunnel, outbox, budget, UserQueue::IN_PROCESS)
    }

    /// A tunnel's credit for a user whose socket's queue is `user` at admission. Its first
    /// window is what that queue takes (a user who stops at once leaves all of it in the
    /// kernel), between [`MIN_WINDOW`] and [`QUEUE_WINDOW_MAX`], within a fair share; a user
    /// without a queue starts at [`MIN_WINDOW`]. The initial limit (for the `open`) is
    /// drawn from `budget`, and may be less than the window, or 0, when the budget is
    /// short.
    pub fn open_for(
        tunnel: &str,
        outbox: Arc<Outbox>,
        budget: Arc<Budget>,
        user: UserQueue,
    ) -> Grant {
        budget.tunnels.fetch_add(1, Ordering::Relaxed);
        // A first window of 64 KiB for a user who could take megabytes leaves the agent
        // sending a little and then waiting a round trip for the first grant: on an idle
        // TLS/TCP link the kernel's BBR took a sample of that pause as the link's
        // bandwidth (ss: 38.7 Mbit/s before, 0.3 after) and a 150 ms, 1 % download ran at
        // 9.8 Mbit/s.
        // (A fair share is never below MIN_WINDOW.)
        let window = user
            .window()
            .map_or(MIN_WINDOW, |w| w.min(budget.fair_window()));
        let limit = budget.take(window);
        Grant {
            tunnel: tunnel.into(),
            outbox,
            budget,
            limit,
            posted: [limit; RECENT],
            grants: 0,
            starved: false,
            window,
            effective: window,
            given: 0,
            poll: POLL_FIRST,
            taken: 0,
            taken_grew: Instant::now(),
            polled: Instant::now(),
        }
    }

    /// The limit granted so far.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The budget this tunnel draws on.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Brings the grant up to date after progress: `received` bytes have come from the
    /// agent, `written` of them went to the user's socket, and `user` tells how many of
    /// those its kernel has not sent yet and how much its queue takes (asked only when a
    /// grant is due). Posts a new limit once a quarter of the window is used; says what
    /// to wait for.
    pub fn update(
        &mut self,
        received: u64,
        written: u64,
        user: impl FnOnce() -> UserQueue,
    ) -> Wait {
        self.update_at(Instant::now(), received, written, user)
    }

    /// [`Grant::update`] at `now`.
    fn update_at(
        &mut self,
        now: Instant,
        received: u64,
        written: u64,
        user: impl FnOnce() -> UserQueue,
    ) -> Wait {
        // An agent reads its service in pieces cut at its limit, so arriving bytes that end
        // exactly at a limit (this one, or one before grants still on their way) mean the
        // credit, not the service, set the pace.
        if received > 0 && self.posted.contains(&received) {
            self.starved = true;
        }
        if self.limit.saturating_sub(written) >= self.ahead() {
            // Most of a window is granted past what is written: nothing due, and the pump
            // is woken by the bytes still to come.
            return Wait::Nothing;
        }
        let queue = user();
        let fair = self.budget.fair_window();
        let unsent = queue.unsent.min(written);
        let taken = written - unsent;
        self.budget.give(taken.saturating_sub(self.given));
        self.given = self.given.max(taken);
        // Not yet taken by the user: unsent in the kernel, and not even written (a user in
        // this process has no kernel queue; its backlog waits in the relay).
        let backlog = unsent + received.saturating_sub(written);
        if taken > self.taken {
            self.taken = taken;
            self.taken_grew = now;
            self.poll = POLL_FIRST;
            if let Some(queue_window) = queue.window() {
                // A user behind a socket who is taking bytes: the window is at least what
                // their kernel queue takes, which the kernel sizes from that socket's own
                // path (about twice its congestion window), so it follows the user's TCP
                // as it ramps up, and a user who stops leaves everything granted in that
                // queue, none of it in the relay. Growing only by doubling from 64 KiB
                // kept an idle TLS/TCP link's BBR, on its first transfer in a while, below
                // its old rate for seconds; its first loss then reset its bandwidth
                // estimate to that rate (downloads at 200 ms and 1 % loss: 0.2–0.6 ×
                // plain TCP).
                self.window = self.window.max(queue_window);
            }
        }
        if backlog >= self.window && now.duration_since(self.taken_grew) >= STALL {
            // The user is the limit: a whole window waits for them, and they have taken
            // nothing for a while. (Not less: a reader that is only descheduled for a moment
            // leaves a partial window behind, and shrinking for that would cap a busy
            // tunnel at a window per credit round trip. Not at once: on a lossy path the
            // bytes held up behind a lost packet arrive together, a window's worth in the
            // user's queue for an instant, and shrinking for that caps the tunnel at a
            // window per loss.) Once more per further `STALL` without progress.
            self.window = (self.window / 2).max(MIN_WINDOW);
            self.taken_grew = now;
            tracing::trace!(window = self.window, backlog, "credit window shrinks");
        } else if self.starved && backlog < self.effective / 4 {
            // The agent ran out of credit while the user kept up (a quarter window waiting
            // at most: what is still on its way out): the window was the limit. Not past a
            // fair share, though (below).
            self.window = (self.window * 2).min(MAX_WINDOW).min(fair).max(self.window);
            tracing::trace!(window = self.window, backlog, "credit window grows");
        }
        // Never more ahead than the user's kernel queue takes: if the user stops now,
        // everything granted still fits there, and the relay keeps (almost) none of it.
        // Nor more than a fair share of half the budget: what a user who stops keeps cannot
        // be taken back, so no tunnel's window may grow into the room other tunnels need.
        self.effective = self.window.min(queue.capacity.max(MIN_WINDOW)).min(fair);
        if self.limit - taken >= self.ahead() {
            // The user's kernel still holds what would free more.
            return self.backoff(now);
        }
        let want = taken + self.effective - self.limit;
        let got = self.budget.take(want);
        // The tunnel's span names it; one line per grant, a few hundred a second at most.
        tracing::trace!(
            received,
            taken,
            backlog,
            starved = self.starved,
            effective = self.effective,
            capacity = queue.capacity,
            limit = self.limit + got,
            "credit granted"
        );
        if got > 0 {
            self.limit += got;
            self.grants += 1;
            self.posted[self.grants % RECENT] = self.limit;
            self.starved = false;
            self.outbox.post(&self.tunnel, self.limit);
            self.poll = POLL_FIRST;
        }
        if got < want {
            return Wait::Budget;
        }
        Wait::Nothing
    }

    /// How far ahead of the user the limit may be with no grant due: the window in force
    /// less the part [`REFILL`] waits for.
    fn ahead(&self) -> u64 {
        self.effective - self.effective / REFILL
    }

    /// A look at the user's queue after the poll interval, which doubles only when a whole
    /// interval has passed since the last one was handed out: when the look itself found
    /// nothing taken. The pump also asks after every chunk from the agent, and a burst of
    /// them (a window's worth arriving after a lost packet) must not stretch the interval
    /// to a second while the user empties the queue in a millisecond.
    fn backoff(&mut self, now: Instant) -> Wait {
        let wait = self.poll;
        if now.duration_since(self.polled) >= self.poll {
            self.poll = (self.poll * 2).min(POLL_MAX);
        }
        self.polled = now;
        Wait::Poll(wait)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.tunnels.fetch_sub(1, Ordering::Relaxed);
        self.budget.give(self.limit - self.given);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user socket with `unsent` bytes waiting and a queue that takes anything.
    fn q(unsent: u64) -> UserQueue {
        UserQueue {
            unsent,
            capacity: u64::MAX,
        }
    }

    #[test]
    fn the_window_in_force_never_passes_what_the_user_s_queue_takes() {
        let (mut g, _outbox, _budget) = grant(1 << 30);
        let small = UserQueue {
            unsent: 0,
            capacity: 256 * 1024,
        };
        for _ in 0..20 {
            let limit = g.limit();
            g.update(limit, limit, || small);
        }
        assert_eq!(
            g.window(),
            MAX_WINDOW,
            "the user keeps up: the window grows"
        );
        // But what is granted past what was written fits in the user's queue.
        let limit = g.limit();
        g.update(limit, limit, || small);
        assert!(g.limit() - limit <= small.capacity, "{}", g.limit() - limit);
    }

    /// `rounds` grants to a user who takes every byte at once, the agent using all its
    /// credit each time.
    fn keep_up(g: &mut Grant, rounds: usize) {
        for _ in 0..rounds {
            let limit = g.limit();
            g.update(limit, limit, || q(0));
        }
    }

    /// A tunnel on a large budget whose user kept up for ten grants, its budget, and the
    /// window it grew to.
    fn grown() -> (Grant, Arc<Budget>, u64) {
        let (mut g, _outbox, budget) = grant(1 << 30);
        keep_up(&mut g, 10);
        let window = g.window();
        (g, budget, window)
    }

    fn grant(limit: u64) -> (Grant, Arc<Outbox>, Arc<Budget>) {
        let outbox = Arc::new(Outbox::default());
        let budget = Arc::new(Budget::new(limit));
        (
            Grant::open("t", outbox.clone(), budget.clone()),
            outbox,
            budget,
        )
    }

    #[test]
    fn a_reader_that_keeps_up_grows_the_window_to_its_cap() {
        let (mut g, outbox, budget) = grant(1 << 30);
        assert_eq!(g.limit(), MIN_WINDOW);
        // The agent uses all its credit and the user takes every byte at once.
        keep_up(&mut g, 20);
        assert_eq!(g.window(), MAX_WINDOW);
        let mut posted = Vec::new();
        futures_now(outbox.next(&mut posted));
        assert_eq!(posted, vec![(Arc::from("t"), g.limit())]);
        assert_eq!(budget.used(), g.limit() - g.given);
    }

    #[test]
    fn a_stalled_reader_shrinks_the_window_and_stops_the_grants() {
        let (mut g, budget, big) = grown();
        assert!(big >= 1 << 20);
        // The user stops: everything written stays unsent.
        let stalled_at = g.limit();
        let t0 = Instant::now();
        let wait = g.update_at(t0, stalled_at, stalled_at, || q(big));
        assert!(matches!(wait, Wait::Poll(_)), "{wait:?}");
        // A whole window waits, but for an instant only, as after a burst: no shrinking.
        assert_eq!(g.window(), big);
        // Nothing taken for a while: it shrinks, once per further while, to the minimum.
        let mut at = t0;
        for _ in 0..10 {
            at += STALL;
            g.update_at(at, stalled_at, stalled_at, || q(big));
        }
        assert_eq!(g.limit(), stalled_at, "no credit while nothing is taken");
        assert_eq!(g.window(), MIN_WINDOW);
        // Held: at most the window the tunnel had, all of it in the user's kernel queue.
        assert!(budget.used() <= big);
        // The poll backs off to its cap, as each look finds nothing taken.
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            at += last;
            if let Wait::Poll(d) = g.update_at(at, stalled_at, stalled_at, || q(big)) {
                last = d;
            }
        }
        assert_eq!(last, POLL_MAX);
    }

    #[test]
    fn a_burst_of_arrivals_does_not_stretch_the_poll() {
        let (mut g, _budget, big) = grown();
        // A window's worth arrives in 100 chunks within a millisecond, all written and
        // unsent: the pump asks after each one.
        let t0 = Instant::now();
        let start = g.limit() - big;
        let mut wait = Wait::Nothing;
        for i in 1..=100u64 {
            let at = start + big * i / 100;
            let unsent = at - start;
            wait = g.update_at(t0 + STALL / 10_000 * i as u32, at, at, || q(unsent));
        }
        // The look after the last one comes within a couple of milliseconds, not a second.
        match wait {
            Wait::Poll(d) => assert!(d <= 2 * POLL_FIRST, "{d:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_burst_that_drains_at_once_keeps_the_window() {
        let (mut g, _budget, big) = grown();
        // Bytes held up behind a lost packet arrive together: a window waits in the user's
        // queue, and a millisecond later it has gone.
        let t0 = Instant::now();
        let at = g.limit();
        g.update_at(t0, at, at, || q(big));
        g.update_at(t0 + STALL / 50, at, at, || q(0));
        // Again, a while later: still no whole STALL without progress.
        g.update_at(t0 + STALL, at, at, || q(big));
        assert_eq!(g.window(), big);
    }

    #[test]
    fn a_socket_user_s_window_is_at_least_what_its_queue_takes_up_to_a_mib() {
        for (capacity, start) in [
            (700 * 1024, 700 * 1024),
            (90 * 1024, 90 * 1024),
            (16 * 1024, MIN_WINDOW),
            (64 << 20, QUEUE_WINDOW_MAX),
            (u64::MAX, MIN_WINDOW),
        ] {
            let (mut g, _outbox, _budget) = grant(1 << 30);
            // The first look, once a quarter of the first window is written and taken.
            let written = MIN_WINDOW / 2;
            g.update(written, written, || UserQueue {
                unsent: 0,
                capacity,
            });
            assert_eq!(g.window(), start, "capacity {capacity}");
            assert_eq!(g.limit(), written + start, "capacity {capacity}");
            // The user stops at once: everything granted past what was taken fits the queue
            // (a user inside the relay has none, and keeps the least window).
            assert!(g.limit() - written <= capacity.max(MIN_WINDOW));
        }
        // A distant user: their queue grows as their connection ramps up, and the window
        // follows it while they take bytes.
        let (mut g, _outbox, _budget) = grant(1 << 30);
        let mut taken = 0;
        for capacity in [60 << 10, 200 << 10, 1 << 20] {
            // (Not at a limit granted: that would say the agent ran out of credit.)
            taken = g.limit() - MIN_WINDOW / 2 - 1;
            g.update(taken, taken, || UserQueue {
                unsent: 0,
                capacity,
            });
            assert_eq!(g.window(), capacity.max(MIN_WINDOW));
        }
        // They stop: their queue grows no window while nothing more is taken.
        let written = g.limit();
        for _ in 0..3 {
            g.update(written, written, || UserQueue {
                unsent: written - taken,
                capacity: 4 << 20,
            });
        }
        assert_eq!(g.window(), 1 << 20);
        assert_eq!(g.limit(), written);
    }

    #[test]
    fn a_socket_user_s_first_window_is_what_its_queue_takes() {
        for (capacity, first) in [
            (700 * 1024, 700 * 1024),
            (16 * 1024, MIN_WINDOW),
            (64 << 20, QUEUE_WINDOW_MAX),
            (u64::MAX, MIN_WINDOW),
        ] {
            let budget = Arc::new(Budget::new(1 << 30));
            let g = Grant::open_for(
                "t",
                Arc::new(Outbox::default()),
                budget.clone(),
                UserQueue {
                    unsent: 0,
                    capacity,
                },
            );
            assert_eq!(
                (g.window(), g.limit()),
                (first, first),
                "capacity {capacity}"
            );
            assert_eq!(budget.used(), first);
        }
        // A short budget gives what it has.
        let budget = Arc::new(Budget::new(48 * 1024));
        let g = Grant::open_for(
            "t",
            Arc::new(Outbox::default()),
            budget,
            UserQueue {
                unsent: 0,
                capacity: 1 << 20,
            },
        );
        assert_eq!(g.limit(), 48 * 1024);
    }

    #[test]
    fn a_reader_that_keeps_up_always_has_most_of_a_window_granted_ahead() {
        let (mut g, _budget, window) = grown();
        // The agent sends in 16 KiB pieces and the user takes each at once: the credit
        // ahead of what is written never falls below three quarters of the window, so a
        // lost packet that holds a round trip's bytes back does not also starve the agent.
        let mut sent = g.limit() - window;
        for _ in 0..1_000 {
            sent = (sent + 16 * 1024).min(g.limit());
            g.update(sent, sent, || q(0));
            assert!(
                g.limit() - sent >= window - window / REFILL,
                "{} ahead of a {window}-byte window",
                g.limit() - sent
            );
        }
    }

    #[test]
    fn an_agent_out_of_a_limit_granted_grants_ago_grows_the_window() {
        let (mut g, _outbox, _budget) = grant(1 << 30);
        // A long path: each limit reaches the agent 40 ticks after it is posted, while the
        // agent could send 16 KiB a tick (640 KiB a credit round trip), and the user takes
        // everything at once. Several grants are on their way when the agent runs out.
        const LAG: usize = 40;
        const PER_TICK: u64 = 16 * 1024;
        let mut limits = vec![g.limit()];
        let mut received = 0;
        let mut last_ticks = 0;
        for tick in 0..2_000usize {
            let heard = limits[tick.saturating_sub(LAG)];
            let before = received;
            received = (received + PER_TICK).min(heard);
            g.update(received, received, || q(0));
            limits.push(g.limit());
            if tick >= 1_900 {
                last_ticks += received - before;
            }
        }
        assert!(g.window() >= PER_TICK * LAG as u64, "{}", g.window());
        assert_eq!(last_ticks, 100 * PER_TICK, "the agent still runs out");
    }

    #[test]
    fn grants_never_pass_the_budget_and_ended_tunnels_give_it_back() {
        let budget = Arc::new(Budget::new(3 * MIN_WINDOW / 2));
        let outbox = Arc::new(Outbox::default());
        let a = Grant::open("a", outbox.clone(), budget.clone());
        let mut b = Grant::open("b", outbox.clone(), budget.clone());
        assert_eq!((a.limit(), b.limit()), (MIN_WINDOW, MIN_WINDOW / 2));
        assert_eq!(budget.used(), budget.limit());
        // b's user took its half window; it wants a full window past that: only what b
        // gave back is there.
        let wait = b.update(MIN_WINDOW / 2, MIN_WINDOW / 2, || q(0));
        assert_eq!(wait, Wait::Budget);
        assert!(budget.used() <= budget.limit());
        assert!(budget.times_exhausted() > 0);
        // a ends: what it held is b's to draw, a window's worth (b is alone now, and a
        // budget this small holds no more than a minimum window as a fair share).
        drop(a);
        let before = b.limit();
        b.update(before, before, || q(0));
        assert_eq!(b.limit(), before + MIN_WINDOW);
        assert!(budget.used() <= budget.limit());
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn windows_grow_only_to_a_fair_share_of_half_the_budget() {
        let budget = Arc::new(Budget::new(64 * MIN_WINDOW));
        let outbox = Arc::new(Outbox::default());
        // Eight tunnels: half the budget shared eight ways is four minimum windows each.
        let mut others: Vec<Grant> = (0..7)
            .map(|i| Grant::open(&format!("t{i}"), outbox.clone(), budget.clone()))
            .collect();
        let mut g = Grant::open("fast", outbox.clone(), budget.clone());
        assert_eq!(budget.fair_window(), 4 * MIN_WINDOW);
        keep_up(&mut g, 20);
        // The reader keeps up and gets credit as fast as it takes it, a fair window ahead.
        assert_eq!(g.window(), 4 * MIN_WINDOW);
        assert!(g.limit() >= 20 * MIN_WINDOW, "limit {}", g.limit());
        // So does every other one, however long the first has been there.
        for t in &mut others {
            for _ in 0..20 {
                let limit = t.limit();
                t.update(limit, limit, || q(0));
            }
            assert_eq!(t.window(), 4 * MIN_WINDOW);
        }
        assert!(budget.used() <= budget.limit() / 2);
        // Six end: two left, a fair share is 16 minimum windows, and the window grows to it.
        others.truncate(1);
        keep_up(&mut g, 5);
        assert_eq!(g.window(), 16 * MIN_WINDOW);
        // Never below the minimum, however many there are.
        let crowd: Vec<Grant> = (0..100)
            .map(|i| Grant::open(&format!("c{i}"), outbox.clone(), budget.clone()))
            .collect();
        assert_eq!(budget.fair_window(), MIN_WINDOW);
        drop(crowd);
    }

    #[test]
    fn a_reservation_is_whole_or_nothing() {
        let budget = Arc::new(Budget::new(MAX_WINDOW + 1));
        let held = Reservation::take(&budget, MAX_WINDOW).expect("room for one");
        assert!(Reservation::take(&budget, MAX_WINDOW).is_none());
        drop(held);
        assert!(Reservation::take(&budget, MAX_WINDOW).is_some());
    }

    #[tokio::test]
    async fn a_gate_waits_for_credit_and_a_board_raises_only_its_own() {
        let board = Arc::new(Board::default());
        let entry = board.open("t1", 0);
        board.raise("unknown", 10);
        board.raise("t1", 5);
        board.raise("t1", 3);
        assert_eq!(entry.gate().room(0).await, 5);
        assert_eq!(entry.gate().limit(), 5, "a lower limit is ignored");
        {
            let gate_wait = entry.gate().room(5);
            tokio::pin!(gate_wait);
            assert!(
                futures_poll(gate_wait.as_mut()).is_none(),
                "no room at the limit"
            );
            board.raise("t1", 9);
            assert_eq!(gate_wait.await, 4);
        }
        drop(entry);
        assert!(board.is_empty());
    }

    /// Polls `f` once.
    fn futures_poll<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(&mut f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    /// `f`'s output, which must be ready at once.
    fn futures_now<F: std::future::Future>(f: F) -> F::Output {
        let f = std::pin::pin!(f);
        futures_poll(f).expect("ready")
    }
}

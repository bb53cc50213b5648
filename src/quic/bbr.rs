//! The device link's congestion controller: BBR's model (bottleneck bandwidth times the
//! path's round trip) on quinn's `Controller` trait.
//!
//! Why our own: on a mobile path (40 Mbit/s, 50 ms, 1 % random loss) each of quinn's
//! controllers runs a tunnel at a tenth of what the kernel's BBR gives plain TCP over the
//! same path (docs/field.md has the measurements). Cubic and NewReno halve their window
//! on every loss, and a random loss is not congestion; quinn's BBR (a port of an old
//! Chromium BBR, marked experimental) leaves Startup at its first loss with a bandwidth
//! estimate of a few packets per round trip, then holds its window down in loss recovery,
//! and its bandwidth samples are the rate between two consecutive acks, which are noisy.
//!
//! This controller does what the kernel's BBR (v1) does, within what quinn lets a
//! controller decide (the congestion window only: quinn paces at 1.25 × window per
//! smoothed RTT):
//!
//! - **Bandwidth**: delivery-rate samples as the kernel takes them (bytes delivered
//!   between a packet's send and its ack, over the longer of the send and ack intervals),
//!   the maximum over the last 10 round trips. App-limited samples count only when they
//!   raise the estimate.
//! - **Round trip**: the minimum RTT sample of the last 10 s; when it has not been seen
//!   again for 10 s, *ProbeRTT* holds half a bandwidth-delay product in flight for 200 ms
//!   and a round trip (as BBRv3 does; BBRv1's four packets cost twice as much throughput
//!   on long paths), so that a queue of our own making does not pass for the path's delay.
//! - **Window**: *Startup* grows it by what is acknowledged (doubling per round trip)
//!   until the bandwidth stops growing by a quarter for three rounds; *Drain* holds one
//!   bandwidth-delay product until the queue Startup built has left; then the window is
//!   twice the bandwidth-delay product (room for delayed acks, as BBR's `cwnd_gain`),
//!   which also makes it probe: more bandwidth shows as faster deliveries within the
//!   window, and the window follows.
//! - **Ack aggregation**: acks that come in bursts (Wi-Fi and cellular links, delayed
//!   acks, and on a busy machine the scheduler) deliver more in a short time than the
//!   bandwidth explains; the largest such excess of the last 10 rounds (at most 100 ms of
//!   bandwidth) is added to the window, as the kernel's BBR does. Without it a link on
//!   loopback, whose round trip under load is the scheduler's, ran at a third of its
//!   speed.
//! - **Loss** is not taken as congestion, except where it clearly is: Startup ends early
//!   in a round that lost more than a fifth of what it delivered, and a round that lost
//!   more than [`LOSS_THRESHOLD`] lowers the window's gain until rounds come back clean,
//!   so a bottleneck that overflows (a device's other traffic sharing its uplink) is not
//!   kept full. Persistent congestion (everything lost for a while: a blackout, a new path)
//!   starts over from Startup.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};

/// Gain in Startup: the smallest that doubles the delivery rate each round (2 / ln 2).
const STARTUP_GAIN: f64 = 2.885;
/// The window in steady state, in bandwidth-delay products.
const CWND_GAIN: f64 = 2.0;
/// The lowest the window's gain falls to while rounds lose more than the threshold.
const CWND_GAIN_MIN: f64 = 1.25;
/// Round trips the bandwidth maximum is taken over.
const BW_ROUNDS: usize = 10;
/// How long a minimum RTT sample stands before ProbeRTT looks for a new one.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long ProbeRTT holds the window at [`PROBE_RTT_GAIN`].
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// ProbeRTT's window, in bandwidth-delay products: below one, so the queue drains.
const PROBE_RTT_GAIN: f64 = 0.5;
/// The smallest window, in packets.
const MIN_PIPE_PACKETS: u64 = 4;
/// Rounds without 25 % more bandwidth after which Startup is over.
const FULL_BW_ROUNDS: u32 = 3;
/// The share of a round's deliveries lost above which the round counts as congested.
pub const LOSS_THRESHOLD: f64 = 0.05;
/// The loss share that ends Startup at once (a buffer overflowing).
const STARTUP_LOSS_EXIT: f64 = 0.2;
/// The shortest round trip the window is sized for. Below a couple of milliseconds (a LAN,
/// loopback) the round trip a user-space stack sees is its own scheduling, not the path:
/// a window of twice a 50 µs minimum throttled a loopback link to 0.28 GB/s where an
/// unbounded one moved 0.35; two milliseconds of bandwidth cost a LAN a queue of as much
/// at worst.
const BDP_RTT_FLOOR: Duration = Duration::from_millis(2);
/// How far above the minimum RTT the smoothed RTT may raise the window's pacing floor: a
/// busy machine's scheduling delay (a few milliseconds), not a queue on the path.
const PACING_FLOOR_QUEUE: Duration = Duration::from_millis(10);
/// Ack aggregation is counted up to this much time's worth of bandwidth.
const EXTRA_ACKED_MAX: Duration = Duration::from_millis(100);
/// Sent-packet records kept at most (what a 4 MiB window needs is far below it).
const RECORDS_MAX: usize = 65_536;
/// The initial window: RFC 9002's 10 packets of 1,472 bytes, as quinn's controllers.
const INITIAL_WINDOW: u64 = 14_720;

/// Builds [`Bbr`] controllers for quinn.
#[derive(Debug, Default)]
pub struct BbrFactory;

impl ControllerFactory for BbrFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr(Model::new(now, current_mtu)))
    }
}

/// The controller quinn drives: a thin adapter over [`Model`].
#[derive(Debug, Clone)]
pub struct Bbr(Model);

impl Controller for Bbr {
    fn on_sent(&mut self, now: Instant, _bytes: u64, _last_packet_number: u64) {
        // quinn passes the bytes of the whole datagram batch so far; the model counts
        // bytes when they are acknowledged instead.
        self.0.on_sent(now);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited, rtt.get());
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.0.on_end_acks(now, in_flight, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.0.on_loss(now, lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.on_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        self.0.window()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The controller's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Finding the bandwidth: the window doubles each round trip.
    Startup,
    /// Letting the queue Startup built drain.
    Drain,
    /// Steady state: twice the bandwidth-delay product.
    ProbeBw,
    /// Four packets in flight, to measure the path's own round trip.
    ProbeRtt,
}

/// What is remembered of each send instant (every packet quinn sends at one instant shares
/// it), for the delivery rate of its acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Sent {
    time: Instant,
    /// Bytes delivered when it was sent.
    delivered: u64,
    /// When that much had been delivered.
    delivered_time: Instant,
    /// When the packet whose ack started this sample's interval was sent.
    first_sent_time: Instant,
}

/// The rate sample being built from one batch of acks.
#[derive(Debug, Clone, Copy)]
struct Sample {
    prior_delivered: u64,
    send_elapsed: Duration,
    ack_elapsed: Duration,
}

/// The model and the window, without quinn's types (so tests can drive it).
#[derive(Debug, Clone)]
pub struct Model {
    mtu: u64,
    cwnd: u64,
    mode: Mode,
    /// Bytes acknowledged so far, and when the last were.
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    /// In flight after the last batch of acks; 0 with nothing sent since means a new flight.
    in_flight: u64,
    sent_since_acks: bool,
    records: VecDeque<Sent>,
    sample: Option<Sample>,
    /// Bytes acknowledged in the current batch.
    batch_acked: u64,
    /// Round trips: one ends when a packet sent after the last one ended is acknowledged.
    round: u64,
    next_round_delivered: u64,
    round_delivered: u64,
    round_lost: u64,
    /// The largest sample of each of the last [`BW_ROUNDS`] rounds, and its round.
    bw_rounds: [(u64, u64); BW_ROUNDS],
    /// Bytes per second.
    max_bw: u64,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,
    /// quinn's smoothed RTT, which its pacer divides the window by.
    srtt: Duration,
    full_bw: u64,
    full_bw_rounds: u32,
    filled_pipe: bool,
    cwnd_gain: f64,
    probe_rtt_done: Option<Instant>,
    probe_rtt_round: Option<u64>,
    prior_cwnd: u64,
    /// Ack aggregation: the interval being measured, what it delivered, and the largest
    /// excess of each of the last [`BW_ROUNDS`] rounds.
    extra_acked_start: Instant,
    extra_acked_delivered: u64,
    extra_acked_rounds: [(u64, u64); BW_ROUNDS],
}

impl Model {
    /// A fresh model at `now`.
    pub fn new(now: Instant, mtu: u16) -> Model {
        Model {
            mtu: u64::from(mtu),
            cwnd: INITIAL_WINDOW,
            mode: Mode::Startup,
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
            in_flight: 0,
            sent_since_acks: false,
            records: VecDeque::new(),
            sample: None,
            batch_acked: 0,
            round: 0,
            next_round_delivered: 0,
            round_delivered: 0,
            round_lost: 0,
            bw_rounds: [(0, 0); BW_ROUNDS],
            max_bw: 0,
            min_rtt: None,
            min_rtt_stamp: now,
            srtt: Duration::ZERO,
            full_bw: 0,
            full_bw_rounds: 0,
            filled_pipe: false,
            cwnd_gain: CWND_GAIN,
            probe_rtt_done: None,
            probe_rtt_round: None,
            prior_cwnd: 0,
            extra_acked_start: now,
            extra_acked_delivered: 0,
            extra_acked_rounds: [(0, 0); BW_ROUNDS],
        }
    }

    /// The phase, for tests and logs.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> u64 {
        self.max_bw
    }

    /// The minimum RTT estimate.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The congestion window, bytes.
    pub fn window(&self) -> u64 {
        if self.mode == Mode::ProbeRtt {
            return self.probe_rtt_cwnd();
        }
        self.cwnd
    }

    fn probe_rtt_cwnd(&self) -> u64 {
        self.bdp(PROBE_RTT_GAIN).min(self.cwnd).max(self.min_cwnd())
    }

    fn min_cwnd(&self) -> u64 {
        MIN_PIPE_PACKETS * self.mtu
    }

    /// One or more packets were sent at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        if self.in_flight == 0 && !self.sent_since_acks {
            // A new flight after an idle period: its rate starts here, not at the last ack.
            self.first_sent_time = now;
            self.delivered_time = now;
        }
        self.sent_since_acks = true;
        if self.records.back().is_some_and(|r| r.time == now) {
            return;
        }
        if self.records.len() >= RECORDS_MAX {
            self.records.pop_front();
        }
        self.records.push_back(Sent {
            time: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent_time: self.first_sent_time,
        });
    }

    /// A packet sent at `sent` was acknowledged at `now`; `srtt` is the sender's smoothed
    /// round trip (what quinn paces by).
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        srtt: Duration,
    ) {
        self.srtt = srtt;
        self.delivered += bytes;
        self.delivered_time = now;
        self.batch_acked += bytes;
        self.round_delivered += bytes;
        let rtt = now.saturating_duration_since(sent);
        self.update_min_rtt(now, rtt);
        // Records are in send order; the ones before this ack's are done with (acked, or
        // lost and resent as newer packets).
        let at = self.records.partition_point(|r| r.time < sent);
        self.records.drain(..at);
        // A burst (the handshake, a transfer) grows the records; an idle link keeps one
        // or two. Give the rest back, or each of a relay's idle devices holds kilobytes.
        if self.records.len() < self.records.capacity() / 4 {
            self.records.shrink_to(2 * self.records.len().max(4));
        }
        let Some(record) = self.records.front().filter(|r| r.time == sent).copied() else {
            return;
        };
        if record.delivered >= self.next_round_delivered && self.delivered > record.delivered {
            self.next_round_delivered = self.delivered;
            self.round += 1;
            self.end_round();
        }
        let newer = self
            .sample
            .is_none_or(|s| record.delivered > s.prior_delivered);
        if newer {
            self.sample = Some(Sample {
                prior_delivered: record.delivered,
                send_elapsed: record
                    .time
                    .saturating_duration_since(record.first_sent_time),
                ack_elapsed: now.saturating_duration_since(record.delivered_time),
            });
            self.first_sent_time = record.time;
        }
    }

    /// Lost bytes were detected at `now`; `persistent` when everything sent for a while
    /// was lost.
    pub fn on_loss(&mut self, now: Instant, lost: u64, persistent: bool) {
        self.round_lost += lost;
        if persistent {
            // The path went away or changed: start over, as for a new connection.
            let mtu = self.mtu as u16;
            *self = Model::new(now, mtu);
        }
    }

    /// The path's MTU changed.
    pub fn on_mtu(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
        self.cwnd = self.cwnd.max(self.min_cwnd());
    }

    /// A batch of acks (all at `now`) is done; `in_flight` is what remains outstanding.
    pub fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        self.in_flight = in_flight;
        self.sent_since_acks = false;
        let acked = std::mem::take(&mut self.batch_acked);
        if let Some(s) = self.sample.take() {
            let interval = s.send_elapsed.max(s.ack_elapsed);
            let bytes = self.delivered - s.prior_delivered;
            // Intervals shorter than the round trip come from compressed acks and
            // overstate the rate (as the kernel, we skip them).
            let long_enough = self.min_rtt.is_none_or(|m| interval >= m);
            if !interval.is_zero() && long_enough {
                let bw = (bytes as f64 / interval.as_secs_f64()) as u64;
                if !app_limited || bw > self.max_bw {
                    self.take_bw_sample(bw);
                }
            }
        }
        if acked == 0 {
            return;
        }
        self.update_ack_aggregation(now, acked);
        self.update_mode(now, in_flight);
        self.update_cwnd(acked);
    }

    /// How much more than the bandwidth explains has been acknowledged since the current
    /// interval began (a new interval begins whenever deliveries fall behind the rate).
    fn update_ack_aggregation(&mut self, now: Instant, acked: u64) {
        if self.max_bw == 0 || !self.filled_pipe {
            return;
        }
        let elapsed = now.saturating_duration_since(self.extra_acked_start);
        let mut expected = (self.max_bw as f64 * elapsed.as_secs_f64()) as u64;
        if self.extra_acked_delivered <= expected {
            self.extra_acked_delivered = 0;
            self.extra_acked_start = now;
            expected = 0;
        }
        self.extra_acked_delivered += acked;
        let cap = (self.max_bw as f64 * EXTRA_ACKED_MAX.as_secs_f64()) as u64;
        let extra = (self.extra_acked_delivered - expected)
            .min(self.cwnd)
            .min(cap);
        let slot = (self.round as usize) % BW_ROUNDS;
        if self.extra_acked_rounds[slot].0 != self.round {
            self.extra_acked_rounds[slot] = (self.round, 0);
        }
        self.extra_acked_rounds[slot].1 = self.extra_acked_rounds[slot].1.max(extra);
    }

    fn extra_acked(&self) -> u64 {
        let oldest = self.round.saturating_sub(BW_ROUNDS as u64 - 1);
        self.extra_acked_rounds
            .iter()
            .filter(|(r, _)| *r >= oldest)
            .map(|(_, e)| *e)
            .max()
            .unwrap_or(0)
    }

    fn update_min_rtt(&mut self, now: Instant, rtt: Duration) {
        let expired = now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW;
        if self.min_rtt.is_none_or(|m| rtt <= m) || expired {
            if expired && self.mode != Mode::ProbeRtt && self.min_rtt.is_some() {
                self.enter_probe_rtt();
            }
            self.min_rtt = Some(rtt);
            self.min_rtt_stamp = now;
        }
    }

    fn take_bw_sample(&mut self, bw: u64) {
        let slot = (self.round as usize) % BW_ROUNDS;
        if self.bw_rounds[slot].0 != self.round {
            self.bw_rounds[slot] = (self.round, 0);
        }
        self.bw_rounds[slot].1 = self.bw_rounds[slot].1.max(bw);
        let oldest = self.round.saturating_sub(BW_ROUNDS as u64 - 1);
        self.max_bw = self
            .bw_rounds
            .iter()
            .filter(|(r, _)| *r >= oldest)
            .map(|(_, b)| *b)
            .max()
            .unwrap_or(0);
    }

    /// A round trip ended: Startup's plateau check, the loss response.
    fn end_round(&mut self) {
        let (delivered, lost) = (
            std::mem::take(&mut self.round_delivered),
            std::mem::take(&mut self.round_lost),
        );
        let loss = if delivered + lost == 0 {
            0.0
        } else {
            lost as f64 / (delivered + lost) as f64
        };
        if !self.filled_pipe {
            if self.max_bw >= self.full_bw + self.full_bw / 4 {
                self.full_bw = self.max_bw;
                self.full_bw_rounds = 0;
            } else {
                self.full_bw_rounds += 1;
            }
            // A round with enough packets to judge that lost a fifth: the buffer is full.
            let judged = delivered >= 10 * self.mtu;
            if self.full_bw_rounds >= FULL_BW_ROUNDS || (judged && loss > STARTUP_LOSS_EXIT) {
                self.filled_pipe = true;
            }
            return;
        }
        if loss > LOSS_THRESHOLD {
            self.cwnd_gain = (self.cwnd_gain * 0.85).max(CWND_GAIN_MIN);
        } else {
            self.cwnd_gain = (self.cwnd_gain + 0.05).min(CWND_GAIN);
        }
    }

    fn bdp(&self, gain: f64) -> u64 {
        match self.min_rtt {
            Some(rtt) if self.max_bw > 0 => {
                let rtt = rtt.max(BDP_RTT_FLOOR);
                (self.max_bw as f64 * rtt.as_secs_f64() * gain) as u64 + 3 * self.mtu
            }
            _ => INITIAL_WINDOW,
        }
    }

    /// The window below which quinn's pacer (1.25 windows per smoothed RTT) would send
    /// slower than the bandwidth estimate. Where the smoothed RTT is far above the
    /// minimum without a queue on the path (a busy machine's scheduler, a loopback link),
    /// a window from the minimum RTT alone would throttle the sender; on a real path the
    /// window's gain keeps it above this anyway.
    ///
    /// The smoothed RTT counts only up to [`PACING_FLOOR_QUEUE`] above the minimum: past
    /// that, the delay is a queue (a cellular modem's deep buffer, a device's own uploads
    /// filling its uplink), and a window that followed it would grow with the queue it
    /// fills, without end.
    fn pacing_floor(&self) -> u64 {
        let rtt = match self.min_rtt {
            Some(min) => self.srtt.min(min + PACING_FLOOR_QUEUE),
            None => self.srtt,
        };
        (self.max_bw as f64 * rtt.as_secs_f64()) as u64
    }

    fn enter_probe_rtt(&mut self) {
        self.prior_cwnd = self.cwnd.max(self.prior_cwnd);
        self.mode = Mode::ProbeRtt;
        self.probe_rtt_done = None;
        self.probe_rtt_round = None;
    }

    fn update_mode(&mut self, now: Instant, in_flight: u64) {
        match self.mode {
            Mode::Startup if self.filled_pipe => self.mode = Mode::Drain,
            Mode::Drain if in_flight <= self.bdp(1.0) => self.mode = Mode::ProbeBw,
            Mode::ProbeRtt => {
                // Wait for the flight to shrink to the probe's window, then hold it for
                // PROBE_RTT_TIME and at least a round trip.
                if self.probe_rtt_done.is_none() && in_flight <= self.probe_rtt_cwnd() {
                    self.probe_rtt_done = Some(now + PROBE_RTT_TIME);
                    self.probe_rtt_round = Some(self.round);
                }
                let held = self.probe_rtt_done.is_some_and(|t| now >= t)
                    && self.probe_rtt_round.is_some_and(|r| self.round > r);
                if held {
                    self.min_rtt_stamp = now;
                    self.cwnd = self.cwnd.max(self.prior_cwnd);
                    self.prior_cwnd = 0;
                    self.mode = if self.filled_pipe {
                        Mode::ProbeBw
                    } else {
                        Mode::Startup
                    };
                }
            }
            _ => {}
        }
    }

    fn update_cwnd(&mut self, acked: u64) {
        let target = match self.mode {
            Mode::Startup => self.bdp(STARTUP_GAIN),
            Mode::Drain => self.bdp(1.0),
            Mode::ProbeBw | Mode::ProbeRtt => {
                (self.bdp(self.cwnd_gain) + self.extra_acked()).max(self.pacing_floor())
            }
        };
        self.cwnd = match self.mode {
            // Grow by what was acknowledged (doubling per round) while below the target,
            // as the kernel's BBR does before the pipe is full.
            Mode::Startup if self.cwnd < target || self.delivered < INITIAL_WINDOW => {
                self.cwnd + acked
            }
            Mode::Startup => self.cwnd,
            Mode::Drain => target,
            Mode::ProbeBw | Mode::ProbeRtt => (self.cwnd + acked).min(target),
        }
        .max(self.min_cwnd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated path: a bottleneck of `rate` bytes/s with a FIFO queue of `queue`
    /// bytes, `rtt` of propagation, and a random loss of one packet in `loss_one_in`
    /// (0: none). The sender always has data and sends what the window allows. Returns the
    /// bytes delivered in `secs` and the model at the end.
    fn simulate(rate: f64, rtt: Duration, queue: u64, loss_one_in: u64, secs: f64) -> (u64, Model) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        const MTU: u64 = 1200;
        let start = Instant::now();
        let mut m = Model::new(start, MTU as u16);
        // Events: (when the sender learns, sequence, sent at, lost).
        let mut events: BinaryHeap<Reverse<(Instant, u64, Instant, bool)>> = BinaryHeap::new();
        let mut bottleneck_free = start;
        let mut now = start;
        let (mut delivered, mut in_flight, mut seq) = (0u64, 0u64, 0u64);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let step = Duration::from_micros(100);
        let end = start + Duration::from_secs_f64(secs);
        let per_packet = Duration::from_secs_f64(MTU as f64 / rate);
        while now < end {
            let mut acked_any = false;
            while events.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
                let Reverse((_, _, sent, lost)) = events.pop().unwrap();
                in_flight -= MTU;
                if lost {
                    m.on_loss(now, MTU, false);
                } else {
                    m.on_ack(now, sent, MTU, false, now - sent);
                    delivered += MTU;
                    acked_any = true;
                }
            }
            if acked_any {
                m.on_end_acks(now, in_flight, false);
            }
            while in_flight + MTU <= m.window() {
                m.on_sent(now);
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let random_loss = loss_one_in > 0 && rng.is_multiple_of(loss_one_in);
                let queued = bottleneck_free.saturating_duration_since(now).as_secs_f64() * rate;
                let at = if queued as u64 > queue {
                    // Dropped at the queue: noticed about a round trip later.
                    events.push(Reverse((now + rtt + rtt / 8, seq, now, true)));
                    None
                } else {
                    bottleneck_free = bottleneck_free.max(now) + per_packet;
                    Some(bottleneck_free + rtt)
                };
                if let Some(at) = at {
                    events.push(Reverse((at, seq, now, random_loss)));
                }
                seq += 1;
                in_flight += MTU;
            }
            now += step;
        }
        (delivered, m)
    }

    const MBIT40: f64 = 40e6 / 8.0;

    #[test]
    fn fills_a_clean_path() {
        let rtt = Duration::from_millis(50);
        let (delivered, m) = simulate(MBIT40, rtt, 250_000, 0, 10.0);
        let rate = delivered as f64 / 10.0;
        assert!(rate > 0.85 * MBIT40, "{:.1} Mbit/s", rate * 8.0 / 1e6);
        assert_eq!(m.mode(), Mode::ProbeBw);
        let bw = m.bandwidth() as f64;
        assert!(bw > 0.9 * MBIT40 && bw < 1.2 * MBIT40, "estimate {bw}");
    }

    #[test]
    fn random_loss_does_not_collapse_the_window() {
        for rtt_ms in [50, 150] {
            let rtt = Duration::from_millis(rtt_ms);
            // 1 % of packets lost at random, a BDP of buffer.
            let bdp = (MBIT40 * rtt.as_secs_f64()) as u64;
            let (delivered, _) = simulate(MBIT40, rtt, bdp, 100, 10.0);
            let rate = delivered as f64 / 10.0;
            assert!(
                rate > 0.8 * MBIT40,
                "{rtt_ms} ms: {:.1} Mbit/s",
                rate * 8.0 / 1e6
            );
        }
    }

    #[test]
    fn a_small_buffer_is_not_kept_overflowing() {
        // A queue of a tenth of the BDP: the window's gain must come down so that the
        // loss rate stays moderate while throughput stays high.
        let rtt = Duration::from_millis(50);
        let (delivered, m) = simulate(MBIT40, rtt, 25_000, 0, 10.0);
        let rate = delivered as f64 / 10.0;
        assert!(rate > 0.8 * MBIT40, "{:.1} Mbit/s", rate * 8.0 / 1e6);
        assert!(m.cwnd_gain < CWND_GAIN, "gain {}", m.cwnd_gain);
    }

    #[test]
    fn probe_rtt_comes_and_goes() {
        let rtt = Duration::from_millis(50);
        // Long enough for the 10 s minimum-RTT window to expire at least once.
        let (delivered, m) = simulate(MBIT40, rtt, 250_000, 0, 25.0);
        assert!(delivered as f64 / 25.0 > 0.8 * MBIT40);
        let min = m.min_rtt().unwrap();
        assert!(
            min < Duration::from_millis(60),
            "min RTT {min:?} took our own queue for the path"
        );
    }

    #[test]
    fn a_queue_others_built_does_not_grow_the_window() {
        // On a clean 50 ms path, then a device's own uploads fill the bottleneck's queue:
        // the smoothed RTT climbs to 250 ms while the minimum stays 50 ms. The window must
        // stay what the path needs (twice its BDP and the aggregation allowance), not
        // follow the queue.
        let rtt = Duration::from_millis(50);
        let (_, mut m) = simulate(MBIT40, rtt, 250_000, 0, 10.0);
        assert_eq!(m.mode(), Mode::ProbeBw);
        m.srtt = Duration::from_millis(250);
        for _ in 0..1_000 {
            m.update_cwnd(12_000);
        }
        let bound = m.bdp(CWND_GAIN) + m.extra_acked();
        assert!(
            m.window() <= bound,
            "window {} past {bound} (BDP {})",
            m.window(),
            m.bdp(1.0)
        );
    }

    #[test]
    fn an_idle_link_gives_its_records_back() {
        // A transfer's worth of sends, each its own instant, then their acks.
        let start = Instant::now();
        let mut m = Model::new(start, 1200);
        let sends: Vec<Instant> = (0..5_000u32)
            .map(|i| start + Duration::from_micros(u64::from(i) * 10))
            .collect();
        for &at in &sends {
            m.on_sent(at);
        }
        let grown = m.records.capacity();
        assert!(grown >= 5_000);
        let now = start + Duration::from_millis(100);
        for &at in &sends {
            m.on_ack(now, at, 1200, false, Duration::from_millis(50));
        }
        m.on_end_acks(now, 0, false);
        // Then the link idles: a keep-alive now and then.
        for i in 1..=3u64 {
            let at = now + Duration::from_secs(25 * i);
            m.on_sent(at);
            m.on_ack(
                at + Duration::from_millis(50),
                at,
                60,
                true,
                Duration::from_millis(50),
            );
        }
        assert!(
            m.records.capacity() <= 16,
            "{} records' room kept after a transfer of {grown}",
            m.records.capacity()
        );
    }

    #[test]
    fn persistent_congestion_starts_over() {
        let now = Instant::now();
        let mut m = Model::new(now, 1200);
        m.cwnd = 1_000_000;
        m.mode = Mode::ProbeBw;
        m.on_loss(now, 1200, true);
        assert_eq!(m.mode(), Mode::Startup);
        assert_eq!(m.window(), INITIAL_WINDOW);
    }
}

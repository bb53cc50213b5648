//! Prometheus metrics of one relay, served at `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets of the tunnel set-up histogram, in seconds: the alert's 5 ms sits on one.
const SETUP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// The `kind` values of `cloudlink_tunnels_admitted_total`, as the audit rows name them.
pub const TUNNEL_KINDS: [&str; 4] = ["connect", "terminal", "jump", "ssh-gateway"];

/// The `reason` values of `cloudlink_tunnel_resume_failures_total`: the device did not come
/// back within `tunnel_resume_secs`, its agent no longer held the tunnel, it came back
/// without the feature, the agent broke the protocol, or the tunnel was cut while it
/// waited.
pub const RESUME_FAILURES: [&str; 5] = ["expired", "gone", "unsupported", "protocol", "cut"];

/// The `kind` values of `cloudlink_store_errors_total`.
pub const STORE_ERROR_KINDS: [&str; 2] = ["unavailable", "database"];
/// The `reason` values of `cloudlink_device_disconnects_total` ([`disconnect_reason`]).
pub const DISCONNECT_REASONS: [&str; 6] = [
    "shutdown", "replaced", "timeout", "closed", "reset", "error",
];
/// Buckets of the store query histogram, in seconds.
const STORE_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Every metric the relay keeps. Counters are bumped when something ends, never per chunk.
pub struct Metrics {
    /// The registry `/metrics` renders.
    registry: Registry,
    /// API responses by status code.
    pub api_responses: IntCounterVec,
    /// CONNECT answers by status code and the side that caused it (`user`, `device`, `relay`).
    pub proxy_responses: IntCounterVec,
    /// Devices connected to this relay now, by `transport` (`quic`, `tcp`).
    pub devices_connected: IntGaugeVec,
    /// Device hellos accepted, by `transport`.
    pub device_hellos: IntCounterVec,
    /// Device hellos rejected, by reject code.
    pub device_rejects: IntCounterVec,
    /// Tunnels open now.
    pub tunnels_open: IntGauge,
    /// Tunnels ended, by close reason.
    pub tunnels_closed: IntCounterVec,
    /// Resumable tunnels carried over to a new device link (PROTOCOL.md §2e).
    pub tunnel_resumes: IntCounter,
    /// Resumable tunnels that waited for their device and ended, by why
    /// ([`RESUME_FAILURES`]).
    pub tunnel_resume_failures: IntCounterVec,
    /// Tunnels waiting for their device's link now.
    pub tunnels_waiting: IntGauge,
    /// Devices this relay reports `reconnecting` (PROTOCOL.md §2e, "Presence").
    pub devices_reconnecting: IntGauge,
    /// Presence rows the periodic reconciliation repaired, by what it did.
    pub presence_repairs: IntCounterVec,
    /// Seconds tunnels have spent waiting for their device's link, in all.
    pub tunnel_wait_seconds: prometheus::Counter,
    /// Bytes of the user's direction sent again after a resume.
    pub tunnel_replayed_bytes: IntCounter,
    /// Tunnels admitted by the relay the user came to, by what opened them
    /// ([`TUNNEL_KINDS`]).
    pub tunnels_admitted: IntCounterVec,
    /// Bytes carried by tunnels, by direction (`up` = user to device), running ones
    /// included: brought up to date from the tunnels' own counters at each scrape.
    tunnel_bytes: IntCounterVec,
    /// Bytes of tunnels that have ended, up and down; the running ones are read live.
    ended_bytes: [AtomicU64; 2],
    /// What `tunnel_bytes` last reported, up and down (it never goes back).
    reported_bytes: Mutex<[u64; 2]>,
    /// Seconds from a CONNECT head read to its 200 written.
    pub tunnel_setup: HistogramVec,
    /// Device links that ended, by a small set of reasons.
    pub device_disconnects: IntCounterVec,
    /// Store calls by operation, and how long they took.
    pub store_queries: HistogramVec,
    /// Store calls that failed, by kind (`unavailable`, `database`); the operation is in
    /// the log line.
    pub store_errors: IntCounterVec,
    /// Failed authentications (API and proxy).
    pub auth_failures: IntCounter,
    /// What the QUIC listener did with new connections: `accept`, `retry`, `refuse`.
    pub quic_admissions: IntCounterVec,
    /// Device sessions superseded by a newer session of the same device (here or on
    /// another relay).
    pub presence_conflicts: IntCounter,
    /// Relays of the cluster whose heartbeat is fresh, as this relay last saw.
    pub relays_alive: IntGauge,
    /// Tunnels that came in over the peer link (this relay holds the device).
    pub peer_tunnels_in: IntCounter,
    /// Tunnels this relay forwarded over the peer link (another relay holds the device).
    pub peer_tunnels_out: IntCounter,
    /// 1 while this relay drains (after SIGTERM), else 0.
    pub draining: IntGauge,
    /// 1 while `/readyz` would answer 200 (not draining, the store takes writes), as the
    /// last heartbeat or readiness probe found.
    pub ready: IntGauge,
    /// Store writes that failed where the relay carried on without them (`last_used`,
    /// presence, audit rows), by what was being written.
    pub store_write_failures: IntCounterVec,
    /// UDP probes (PROTOCOL.md §2c) by `outcome` (`answered`, `dropped`), brought up to date
    /// Tunnel bytes granted to devices and not yet taken by users (PROTOCOL.md §2d).
    pub tunnel_buffer: IntGauge,
    /// The limit on them.
    pub tunnel_buffer_limit: IntGauge,
    /// Grants that found the limit reached and waited.
    tunnel_buffer_short: IntCounter,
    /// Of the buffer, the bytes waiting in the relay's own memory for users' sockets.
    pub tunnel_held: IntGauge,
    /// Bytes the relay's replay buffers hold (PROTOCOL.md §2e).
    pub tunnel_replay: IntGauge,
    /// from the QUIC socket's own counters at each scrape.
    udp_probes: IntCounterVec,
    /// The QUIC socket's probe counters.
    pub probe_stats: std::sync::Arc<crate::quic::probes::ProbeStats>,
    /// What `udp_probes` last reported, answered and dropped.
    reported_probes: Mutex<[u64; 2]>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                name,
                IntCounterVec::new(Opts::new(name, help), labels),
            )
        };
        let gauge = |name: &str, help: &str| register(&registry, name, IntGauge::new(name, help));
        let counter =
            |name: &str, help: &str| register(&registry, name, IntCounter::new(name, help));
        let api_responses = counter_vec(
            "cloudlink_api_responses_total",
            "API responses by status",
            &["status"],
        );
        let proxy_responses = counter_vec(
            "cloudlink_proxy_responses_total",
            "CONNECT answers by status and the side that caused them",
            &["status", "side"],
        );
        let device_rejects = counter_vec(
            "cloudlink_device_rejects_total",
            "Device hellos rejected, by code",
            &["code"],
        );
        let tunnels_closed = counter_vec(
            "cloudlink_tunnels_closed_total",
            "Tunnels ended, by reason",
            &["reason"],
        );
        let tunnel_resumes = counter(
            "cloudlink_tunnel_resumes_total",
            "Resumable tunnels carried over to a new device link",
        );
        let tunnel_resume_failures = counter_vec(
            "cloudlink_tunnel_resume_failures_total",
            "Resumable tunnels that waited for their device and ended, by why: expired, \
             gone, unsupported, protocol or cut",
            &["reason"],
        );
        for reason in RESUME_FAILURES {
            tunnel_resume_failures.with_label_values(&[reason]);
        }
        let devices_reconnecting = gauge(
            "cloudlink_devices_reconnecting",
            "Devices this relay holds tunnels for while their link is gone or silent",
        );
        let presence_repairs = counter_vec(
            "cloudlink_presence_repairs_total",
            "Presence the periodic reconciliation repaired: a session superseded, a lost row rewritten, a stale row removed",
            &["action"],
        );
        let tunnels_waiting = gauge(
            "cloudlink_tunnels_waiting",
            "Resumable tunnels waiting for their device's link now",
        );
        let tunnel_wait_seconds = register(
            &registry,
            "cloudlink_tunnel_wait_seconds_total",
            prometheus::Counter::new(
                "cloudlink_tunnel_wait_seconds_total",
                "Seconds resumable tunnels have spent waiting for their device's link",
            ),
        );
        let tunnel_replayed_bytes = counter(
            "cloudlink_tunnel_replayed_bytes_total",
            "Bytes of the users' direction sent again after a resume",
        );
        let tunnels_admitted = counter_vec(
            "cloudlink_tunnels_admitted_total",
            "Tunnels admitted here for the users who came here, by kind: connect, terminal, \
             jump (ProxyJump) or ssh-gateway (host and enter sessions)",
            &["kind"],
        );
        for kind in TUNNEL_KINDS {
            tunnels_admitted.with_label_values(&[kind]);
        }
        let tunnel_bytes = counter_vec(
            "cloudlink_tunnel_bytes_total",
            "Bytes carried by ended tunnels, by direction",
            &["direction"],
        );
        let quic_admissions = counter_vec(
            "cloudlink_quic_admissions_total",
            "New QUIC connections by what the listener did: accept, retry or refuse",
            &["action"],
        );
        let store_write_failures = counter_vec(
            "cloudlink_store_write_failures_total",
            "Store writes that failed while the relay carried on, by what was written",
            &["what"],
        );
        let presence_conflicts = counter(
            "cloudlink_presence_conflicts_total",
            "Device sessions superseded by a newer session of the same device",
        );
        let relays_alive = gauge("cloudlink_relays_alive", "Relays with a fresh heartbeat");
        let peer_tunnels_in = counter(
            "cloudlink_peer_tunnels_in_total",
            "Tunnels forwarded to this relay by another relay",
        );
        let peer_tunnels_out = counter(
            "cloudlink_peer_tunnels_out_total",
            "Tunnels this relay forwarded to the relay holding the device",
        );
        let draining = gauge("cloudlink_draining", "1 while this relay drains");
        let ready = gauge(
            "cloudlink_ready",
            "1 while the relay is ready: not draining, and its store takes writes",
        );
        let devices_connected = register(
            &registry,
            "cloudlink_devices_connected",
            IntGaugeVec::new(
                Opts::new(
                    "cloudlink_devices_connected",
                    "Devices connected now, by transport",
                ),
                &["transport"],
            ),
        );
        let tunnels_open = gauge("cloudlink_tunnels_open", "Tunnels open now");
        let device_hellos = counter_vec(
            "cloudlink_device_hellos_total",
            "Device hellos accepted, by transport",
            &["transport"],
        );
        let auth_failures = counter("cloudlink_auth_failures_total", "Failed authentications");
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            register(&registry, name, HistogramVec::new(opts, labels))
        };
        let tunnel_setup = histogram(
            "cloudlink_tunnel_setup_seconds",
            "From a CONNECT head read to its 200 written, by route (local or peer)",
            &["route"],
            SETUP_BUCKETS,
        );
        let device_disconnects = counter_vec(
            "cloudlink_device_disconnects_total",
            "Device links that ended, by reason",
            &["reason"],
        );
        let store_queries = histogram(
            "cloudlink_store_query_seconds",
            "Store calls by operation and how long they took",
            &["op"],
            STORE_BUCKETS,
        );
        let store_errors = counter_vec(
            "cloudlink_store_errors_total",
            "Store calls that failed, by kind",
            &["kind"],
        );
        // Every label value at 0 from the start: a dashboard or alert sees "none yet" as 0,
        // not as no data.
        for kind in STORE_ERROR_KINDS {
            store_errors.with_label_values(&[kind]);
        }
        for reason in DISCONNECT_REASONS {
            device_disconnects.with_label_values(&[reason]);
        }
        let tunnel_buffer = gauge(
            "cloudlink_tunnel_buffer_bytes",
            "Tunnel bytes granted to devices and not yet taken by users, over all tunnels",
        );
        let tunnel_buffer_limit = gauge(
            "cloudlink_tunnel_buffer_limit_bytes",
            "The limit on cloudlink_tunnel_buffer_bytes ([limits] tunnel_buffer_bytes)",
        );
        let tunnel_buffer_short = counter(
            "cloudlink_tunnel_buffer_short_total",
            "Grants of tunnel credit that found the tunnel buffer limit reached (new credit \
             waits until users take bytes)",
        );
        let tunnel_held = gauge(
            "cloudlink_tunnel_held_bytes",
            "Of cloudlink_tunnel_buffer_bytes, the bytes waiting in the relay's own memory for \
             users' sockets that would not take them yet (the rest is in flight or in kernel \
             socket queues)",
        );
        let tunnel_replay = gauge(
            "cloudlink_tunnel_replay_bytes",
            "Bytes the relay's replay buffers hold: users' bytes sent and not yet written by \
             the agent (beyond 64 KiB a tunnel, part of cloudlink_tunnel_buffer_bytes)",
        );
        let udp_probes = counter_vec(
            "cloudlink_udp_probes_total",
            "UDP probes on the QUIC port, by outcome",
            &["outcome"],
        );
        for outcome in ["answered", "dropped"] {
            udp_probes.with_label_values(&[outcome]);
        }
        let build_info = register(
            &registry,
            "cloudlink_build_info",
            IntGaugeVec::new(
                Opts::new("cloudlink_build_info", "Always 1: the running version"),
                &["version"],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // CPU, memory, open files of this process (Linux only: it reads /proc).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .unwrap_or_else(|e| panic!("process metrics: {e}"));
        Metrics {
            registry,
            api_responses,
            proxy_responses,
            devices_connected,
            device_hellos,
            device_rejects,
            tunnels_open,
            tunnels_closed,
            tunnel_resumes,
            tunnel_resume_failures,
            tunnels_waiting,
            devices_reconnecting,
            presence_repairs,
            tunnel_wait_seconds,
            tunnel_replayed_bytes,
            tunnels_admitted,
            tunnel_bytes,
            ended_bytes: Default::default(),
            reported_bytes: Mutex::new([0; 2]),
            tunnel_setup,
            device_disconnects,
            store_queries,
            store_errors,
            auth_failures,
            quic_admissions,
            store_write_failures,
            presence_conflicts,
            relays_alive,
            peer_tunnels_in,
            peer_tunnels_out,
            draining,
            ready,
            tunnel_buffer,
            tunnel_buffer_limit,
            tunnel_buffer_short,
            tunnel_held,
            tunnel_replay,
            udp_probes,
            probe_stats: Default::default(),
            reported_probes: Mutex::new([0; 2]),
        }
    }

    /// Adds an ended tunnel's bytes, once it has left the registry (a scrape in between
    /// misses them for a moment, which [`Metrics::render`] never lets show as a drop).
    pub fn tunnel_ended(&self, up: u64, down: u64) {
        self.ended_bytes[0].fetch_add(up, Ordering::Relaxed);
        self.ended_bytes[1].fetch_add(down, Ordering::Relaxed);
    }

    /// Records a tunnel's set-up time; `route` is `local` or `peer`.
    pub fn tunnel_set_up(&self, route: &str, took: Duration) {
        self.tunnel_setup
            .with_label_values(&[route])
            .observe(took.as_secs_f64());
    }

    /// The text exposition format, with the byte counters brought up to date from `live`,
    /// the (up, down) counts of the tunnels running now.
    pub fn render(&self, live: impl Iterator<Item = (u64, u64)>) -> String {
        self.refresh_bytes(live);
        self.refresh_probes();
        let mut out = Vec::new();
        // Encoding registered metrics into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Metrics {
    /// Brings the tunnel buffer's gauges and counter up to date from `budget` (before a
    /// scrape is rendered).
    pub fn tunnel_buffer_from(&self, budget: &crate::credit::Budget) {
        self.tunnel_buffer.set(budget.used() as i64);
        self.tunnel_buffer_limit.set(budget.limit() as i64);
        self.tunnel_held.set(budget.held() as i64);
        self.tunnel_replay.set(budget.replay() as i64);
        let short = budget.times_exhausted();
        let counted = self.tunnel_buffer_short.get();
        if short > counted {
            self.tunnel_buffer_short.inc_by(short - counted);
        }
    }

    /// The gauge of devices connected over `transport`.
    pub fn connected_over(&self, transport: crate::link::Transport) -> prometheus::IntGauge {
        self.devices_connected
            .with_label_values(&[transport.as_str()])
    }
}

impl Metrics {
    /// Moves `tunnel_bytes` to ended + running bytes, never backwards: while a tunnel is
    /// between the two (or counted in both) the last figure is held until the true one
    /// reaches it.
    fn refresh_bytes(&self, live: impl Iterator<Item = (u64, u64)>) {
        let (mut up, mut down) = (
            self.ended_bytes[0].load(Ordering::Relaxed),
            self.ended_bytes[1].load(Ordering::Relaxed),
        );
        for (u, d) in live {
            up += u;
            down += d;
        }
        let mut reported = self
            .reported_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (i, (now, label)) in [(up, "up"), (down, "down")].into_iter().enumerate() {
            if now > reported[i] {
                self.tunnel_bytes
                    .with_label_values(&[label])
                    .inc_by(now - reported[i]);
                reported[i] = now;
            }
        }
    }
}

impl Metrics {
    fn refresh_probes(&self) {
        let now = [
            self.probe_stats.answered.load(Ordering::Relaxed),
            self.probe_stats.dropped.load(Ordering::Relaxed),
        ];
        let mut reported = self
            .reported_probes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (i, label) in ["answered", "dropped"].into_iter().enumerate() {
            if now[i] > reported[i] {
                self.udp_probes
                    .with_label_values(&[label])
                    .inc_by(now[i] - reported[i]);
                reported[i] = now[i];
            }
        }
    }
}

/// The label for a device link's end: a handful of values, whatever the peer's words.
pub fn disconnect_reason(reason: &str, draining: bool) -> &'static str {
    let reason = reason.to_ascii_lowercase();
    if draining {
        "shutdown"
    } else if reason.starts_with("replaced") {
        "replaced"
    } else if reason.contains("timed out") || reason.contains("timeout") {
        "timeout"
    } else if reason.contains("closed") || reason.contains("drain") {
        "closed"
    } else if reason.contains("reset") {
        "reset"
    } else {
        "error"
    }
}

/// Registers a freshly made metric. The names and labels are constants of this file, so a
/// failure here is a programming error caught by any test that starts a relay.
fn register<M>(registry: &Registry, name: &str, made: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = made.unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    }

    #[test]
    fn bytes_count_running_tunnels_and_never_go_back() {
        let m = Metrics::new();
        let up = "cloudlink_tunnel_bytes_total{direction=\"up\"}";
        let down = "cloudlink_tunnel_bytes_total{direction=\"down\"}";
        let text = m.render([(100, 7), (50, 3)].into_iter());
        assert_eq!((value(&text, up), value(&text, down)), (150, 10));
        // The second tunnel ends: counted as ended while still listed as running.
        m.tunnel_ended(60, 4);
        let text = m.render([(100, 7), (60, 4)].into_iter());
        assert_eq!((value(&text, up), value(&text, down)), (220, 15));
        // It leaves the registry: the true total (160) is below what was shown; held.
        let text = m.render([(100, 7)].into_iter());
        assert_eq!((value(&text, up), value(&text, down)), (220, 15));
        // The first one moves on past it.
        let text = m.render([(200, 20)].into_iter());
        assert_eq!((value(&text, up), value(&text, down)), (260, 24));
    }

    #[test]
    fn disconnect_reasons_are_few() {
        assert_eq!(
            disconnect_reason("replaced by a newer session", false),
            "replaced"
        );
        assert_eq!(disconnect_reason("timed out", false), "timeout");
        assert_eq!(disconnect_reason("closed by peer: 0", false), "closed");
        assert_eq!(disconnect_reason("connection reset", false), "reset");
        assert_eq!(disconnect_reason("anything at all \u{7}", false), "error");
        assert_eq!(disconnect_reason("timed out", true), "shutdown");
    }

    #[test]
    fn build_info_and_process_metrics_are_exposed() {
        let text = Metrics::new().render(std::iter::empty());
        assert!(text.contains(&format!(
            "cloudlink_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}

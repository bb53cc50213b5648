//! Prometheus metrics of one relay, served at `/metrics`.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    /// Bytes carried by ended tunnels, by direction (`up` = user to device).
    pub tunnel_bytes: IntCounterVec,
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
    /// Store writes that failed where the relay carried on without them (`last_used`,
    /// presence, audit rows), by what was being written.
    pub store_write_failures: IntCounterVec,
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
        Metrics {
            registry,
            api_responses,
            proxy_responses,
            devices_connected,
            device_hellos,
            device_rejects,
            tunnels_open,
            tunnels_closed,
            tunnel_bytes,
            auth_failures,
            quic_admissions,
            store_write_failures,
            presence_conflicts,
            relays_alive,
            peer_tunnels_in,
            peer_tunnels_out,
            draining,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding registered metrics into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
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

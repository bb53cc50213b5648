//! What every part of a running relay shares.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::authcache::AuthCache;
use super::limits::AuthFailures;
use super::metrics::Metrics;
use super::registry::Registry;
use crate::auth::tokens::JwtKeys;
use crate::config::RelayConfig;
use crate::store::Store;

/// The relay's shared state, behind one `Arc`.
pub struct Shared {
    /// The effective configuration.
    pub config: RelayConfig,
    /// Users, fleets, devices, presence, audit.
    pub store: Arc<dyn Store>,
    /// Signs and checks user JWTs.
    pub jwt: JwtKeys,
    /// This relay's id in `relays` and `presence`.
    pub relay_id: String,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Failed authentications per source address.
    pub auth_failures: AuthFailures,
    /// Device sessions and open tunnels on this relay.
    pub registry: Registry,
    /// Recent authorization answers for CONNECT.
    pub auth_cache: AuthCache,
    /// Cancelled once, on SIGTERM/SIGINT: every listener stops accepting.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Shares `config` and `store` with the rest of the relay.
    pub fn new(
        config: RelayConfig,
        store: Arc<dyn Store>,
        jwt: JwtKeys,
        relay_id: String,
    ) -> Arc<Shared> {
        let auth_failures = AuthFailures::new(config.limits.auth_failures_per_minute);
        let auth_cache = AuthCache::new(std::time::Duration::from_millis(
            config.limits.auth_cache_ms,
        ));
        Arc::new(Shared {
            config,
            store,
            jwt,
            relay_id,
            metrics: Metrics::new(),
            auth_failures,
            registry: Registry::default(),
            auth_cache,
            shutdown: CancellationToken::new(),
        })
    }

    /// Ends a deleted device's session at once: its key no longer works.
    pub fn device_deleted(&self, uuid: &str) {
        if let Some(session) = self.registry.take_device(uuid) {
            self.metrics.devices_connected.dec();
            session.conn.close(
                quinn::VarInt::from_u32(crate::proto::messages::codes::DELETED),
                b"device deleted",
            );
        }
    }
}

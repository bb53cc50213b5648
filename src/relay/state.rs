//! What every part of a running relay shares.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::limits::AuthFailures;
use super::metrics::Metrics;
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
        Arc::new(Shared {
            config,
            store,
            jwt,
            relay_id,
            metrics: Metrics::new(),
            auth_failures,
            shutdown: CancellationToken::new(),
        })
    }
}

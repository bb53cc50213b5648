//! What every part of a running relay shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::authcache::AuthCache;
use super::limits::{AuthFailures, SourceSlots};
use super::metrics::Metrics;
use super::presence::Presence;
use super::registry::Registry;
use crate::auth::tokens::JwtKeys;
use crate::auth::Principal;
use crate::config::RelayConfig;
use crate::store::{Id, Store};

/// How often an API key's `last_used` is written: at most once a minute per key.
const KEY_USE_EVERY: Duration = Duration::from_secs(60);

/// The user-facing listeners as bound, for `GET /v1/endpoints`.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// The plain CONNECT listener.
    pub proxy: Option<std::net::SocketAddr>,
    /// The TLS CONNECT listener.
    pub proxy_tls: Option<std::net::SocketAddr>,
    /// The SSH gateway, with its host key (OpenSSH line) and that key's fingerprint.
    pub ssh: Option<(std::net::SocketAddr, String, String)>,
}

/// The relay's shared state, behind one `Arc`.
pub struct Shared {
    /// The effective configuration.
    pub config: RelayConfig,
    /// Users, fleets, devices, presence, audit.
    pub store: Arc<dyn Store>,
    /// Signs and checks user JWTs.
    pub jwt: JwtKeys,
    /// Signs and checks peer tokens (cluster mode only).
    pub peer_keys: Option<crate::auth::peer::PeerKeys>,
    /// This relay's id in `relays` and `presence`.
    pub relay_id: String,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Failed authentications per source address.
    pub auth_failures: AuthFailures,
    /// Where devices are: the sessions on this relay and the cluster's others.
    pub presence: Arc<Presence>,
    /// Open tunnels on this relay.
    pub registry: Registry,
    /// Tunnel bytes granted to devices and not yet taken by users, over all tunnels, and
    /// the limit on them (PROTOCOL.md §2d).
    pub budget: Arc<crate::credit::Budget>,
    /// The agents' acks of every resumable tunnel entered here, by tunnel id (PROTOCOL.md
    /// §2e), raised by whichever session's control stream they arrive on.
    pub acks: Arc<crate::resume::AckBoard>,
    /// Recent authorization answers for CONNECT.
    pub auth_cache: AuthCache,
    /// Cancelled once, on SIGTERM/SIGINT: the relay drains. The CONNECT and peer listeners
    /// stop accepting, the device listener rejects new devices with `draining`, devices
    /// are told to reconnect elsewhere, `/readyz` answers 503; open tunnels run on.
    pub draining: CancellationToken,
    /// Cancelled last, when the drain is over: the API and the background loops stop.
    pub shutdown: CancellationToken,
    /// The tasks that serve tunnels (CONNECTs from outside, from peers, and the browser
    /// terminal's from inside): shutdown waits for them so that audit rows are completed.
    pub tunnel_tasks: tokio_util::task::TaskTracker,
    /// Places for CONNECT connections that have not authenticated yet, in total.
    pub proxy_pending: Arc<Semaphore>,
    /// Places for CONNECT connections that have not authenticated yet, per source.
    pub proxy_sources: SourceSlots,
    /// The listeners users connect to, set once they are bound.
    pub endpoints: std::sync::OnceLock<Endpoints>,
    /// When each API key's use was last sent to the store, so a busy key costs one write
    /// a minute and a failing store one attempt a minute, not one per request.
    key_uses: Mutex<HashMap<Id, Instant>>,
}

impl Shared {
    /// Shares `config` and `store` with the rest of the relay.
    pub fn new(
        config: RelayConfig,
        store: Arc<dyn Store>,
        jwt: JwtKeys,
        peer_keys: Option<crate::auth::peer::PeerKeys>,
        relay_id: String,
        metrics: Metrics,
    ) -> Arc<Shared> {
        let auth_failures = AuthFailures::new(config.limits.auth_failures_per_minute);
        let cache_ttl = std::time::Duration::from_millis(config.limits.auth_cache_ms);
        let cluster = peer_keys.is_some();
        let presence = Arc::new(Presence::new(
            store.clone(),
            relay_id.clone(),
            cluster,
            cache_ttl,
            &metrics,
        ));
        Arc::new(Shared {
            presence,
            store,
            jwt,
            peer_keys,
            relay_id,
            metrics,
            auth_failures,
            registry: Registry::default(),
            budget: Arc::new(crate::credit::Budget::new(config.limits.tunnel_buffer())),
            acks: Arc::default(),
            auth_cache: AuthCache::new(cache_ttl),
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            tunnel_tasks: tokio_util::task::TaskTracker::new(),
            proxy_pending: Arc::new(Semaphore::new(config.limits.proxy_unauthenticated_max)),
            proxy_sources: SourceSlots::new(config.limits.proxy_unauthenticated_per_source),
            key_uses: Mutex::new(HashMap::new()),
            endpoints: std::sync::OnceLock::new(),
            config,
        })
    }

    /// What this relay announces in its `welcome` (PROTOCOL.md §2, "Features"): UDP
    /// probes are answered on the QUIC listener, so only with one.
    pub fn features(&self) -> Vec<String> {
        let mut features = Vec::new();
        if self.config.device_listen.addr().is_some() {
            features.push(crate::proto::messages::features::UDP_PROBE.to_owned());
        }
        if self.resumes() {
            features.push(crate::proto::messages::features::RESUME.to_owned());
        }
        features
    }

    /// Whether this relay keeps tunnels through the loss of their link (PROTOCOL.md §2e).
    pub fn resumes(&self) -> bool {
        self.config.limits.tunnel_resume_secs > 0
    }

    /// What the heartbeat reports: draining, devices and tunnels now.
    pub fn status(&self) -> crate::store::RelayStatus {
        crate::store::RelayStatus {
            draining: self.draining.is_cancelled(),
            devices: self.presence.count() as i64,
            tunnels: self.registry.tunnel_count() as i64,
        }
    }

    /// Counts a credential that proved nobody, from `ip` when known; the seconds to wait
    /// when that address is now throttled. The one place every entrance (the API, CONNECT,
    /// the terminal) records a failed authentication: only failures are throttled, so a
    /// valid key from the same address goes through whatever else that address did.
    pub fn auth_failed(&self, ip: Option<std::net::IpAddr>) -> Option<u64> {
        self.metrics.auth_failures.inc();
        ip.and_then(|ip| self.auth_failures.record(ip))
            .map(|wait| wait.as_secs().max(1))
    }

    /// Records in the background that the API key behind `principal` was used. A store
    /// that cannot take the write is logged and counted; it never fails the request (a
    /// valid key keeps working on a full disk).
    pub fn record_key_use(self: &Arc<Self>, principal: &Principal) {
        let crate::auth::Credential::ApiKey(key) = principal.credential else {
            return;
        };
        {
            let mut uses = self.key_uses.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if uses
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < KEY_USE_EVERY)
            {
                return;
            }
            if uses.len() >= 100_000 {
                uses.retain(|_, at| now.duration_since(*at) < KEY_USE_EVERY);
            }
            uses.insert(key, now);
        }
        let state = self.clone();
        tokio::spawn(async move {
            if let Err(e) = state.store.touch_api_key(key, crate::store::now_ms()).await {
                tracing::warn!(error = %e, key, "cannot record an API key's last use");
                state
                    .metrics
                    .store_write_failures
                    .with_label_values(&["api_key_last_used"])
                    .inc();
            }
        });
    }

    /// Ends a deleted device's session at once: its key no longer works.
    pub fn device_deleted(&self, uuid: &str) {
        self.presence.evict(
            uuid,
            crate::proto::messages::codes::DELETED,
            "device deleted",
        );
    }
}

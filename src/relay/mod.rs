//! The relay server: wires the listeners to the shared state and stops them together.
//!
//! [`Relay::start`] does everything that can fail before serving (data directory, store,
//! migrations, bootstrap admin, binding every socket) so a bad setting fails fast with
//! nothing half-started; [`Relay::run`] serves until the shutdown future resolves, then
//! drains.

pub mod api;
pub mod authcache;
pub mod cluster;
pub mod datadir;
pub mod device_shell;
pub mod devices;
mod error;
mod gateway;
pub mod github;
pub mod hop;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod peer;
pub mod presence;
pub mod proxy;
pub mod registry;
pub mod revalidate;
pub mod state;
pub mod tls;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use listen::{Listeners, Service};
use tokio_util::task::TaskTracker;

use crate::auth::tokens::{self, JwtKeys};
use crate::config::{Listen, RelayConfig};
use crate::store;
use state::Shared;

pub use cluster::ADMIN_KEY_FILE;
use cluster::{bootstrap_admin, heartbeat, shared_secret};
pub use error::RelayError;

/// The addresses the relay actually listens on (port 0 in the config becomes a real port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    /// REST API, plain HTTP.
    pub api: SocketAddr,
    /// REST API over TLS, if enabled.
    pub api_tls: Option<SocketAddr>,
    /// Plain CONNECT proxy.
    pub proxy: SocketAddr,
    /// TLS CONNECT proxy, if enabled.
    pub proxy_tls: Option<SocketAddr>,
    /// The peer link, in cluster mode.
    pub peer: Option<SocketAddr>,
    /// QUIC device listener (UDP), unless off.
    pub device: Option<SocketAddr>,
    /// TLS/TCP device listener, unless off.
    pub device_tcp: Option<SocketAddr>,
    /// The metrics listener, when `/metrics` has its own.
    pub metrics: Option<SocketAddr>,
    /// The SSH gateway, unless off.
    pub ssh: Option<SocketAddr>,
}

/// A relay that has bound its sockets and is ready to serve.
pub struct Relay {
    /// State shared with every listener.
    shared: Arc<Shared>,
    /// The API listeners (plain and HTTPS).
    api: Listeners,
    /// The CONNECT listeners (plain and TLS).
    proxy: Listeners,
    /// The peer listener (cluster mode).
    peer: Option<TcpListener>,
    /// The metrics listener, when `/metrics` is off the API.
    metrics: Option<TcpListener>,
    /// The SSH gateway's listener and server settings, unless off.
    gateway: Option<(TcpListener, Arc<russh::server::Config>)>,
    /// The served certificate, reloaded when its files change.
    tls: tls::Material,
    /// The QUIC endpoint devices dial, unless off.
    devices: Option<quinn::Endpoint>,
    /// The TLS/TCP device listener, unless off.
    devices_tcp: Listeners,
    /// Routers of TLS addresses that several services share.
    routers: Vec<listen::Router>,
    /// Where the bootstrap admin's key was written on this start, if it was.
    pub admin_key_path: Option<PathBuf>,
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RelayError> {
    listen::bind(addr)
        .await
        .map_err(|source| RelayError::Bind { what, addr, source })
}

impl Relay {
    /// Prepares the data directory and store and binds every listener. A start that fails
    /// leaves nothing half-made: what can be checked without writing (ports, the files
    /// the settings name) is checked first, and a data directory this start created is
    /// removed again, unless it holds the key of an admin already in an outside store.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        raise_fd_limit();
        preflight_binds(&config)?;
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            tls::Material::from_files(cert, key)?;
        }
        JwtKeys::new(
            b"checking the public key only",
            config.jwt_public_key.as_deref(),
        )?;
        let fresh = !config.data_dir.exists();
        let sqlite_inside = config.database_url() == store::sqlite::default_url(&config.data_dir);
        let data_dir = config.data_dir.clone();
        let started = Relay::start_in(config).await;
        if started.is_err() && fresh && (sqlite_inside || !data_dir.join(ADMIN_KEY_FILE).exists()) {
            if let Err(e) = std::fs::remove_dir_all(&data_dir) {
                tracing::warn!(dir = %data_dir.display(), error = %e, "cannot remove the data directory of a failed start");
            }
        }
        started
    }

    async fn start_in(config: RelayConfig) -> Result<Relay, RelayError> {
        datadir::ensure(&config.data_dir)?;
        let relay_id = match &config.relay_id {
            Some(id) => id.clone(),
            None => datadir::persistent(&config.data_dir, "relay-id", || {
                format!("relay-{}", &tokens::new_device_uuid()[..12])
            })?,
        };
        let metrics = metrics::Metrics::new();
        let store: Arc<dyn store::Store> = Arc::new(store::metered::Metered::new(
            store::open(&config.database_url()).await?,
            metrics.store_queries.clone(),
            metrics.store_errors.clone(),
        ));
        tracing::info!(backend = store.backend(), "store open, migrations applied");
        // Relays starting together on an empty database take turns at the writes every
        // relay must agree on.
        let lock = store.startup_lock().await?;
        let admin_key_path = bootstrap_admin(store.as_ref(), &config).await?;
        let secret = match &config.jwt_secret {
            Some(secret) => secret.0.clone(),
            None => shared_secret(store.as_ref(), &config, "jwt-secret").await?,
        };
        let jwt = JwtKeys::new(secret.as_bytes(), config.jwt_public_key.as_deref())?;
        let peer_keys = match config.peer_listen {
            Listen::Off => None,
            Listen::At(_) => {
                let secret = match &config.cluster_secret {
                    Some(secret) => secret.0.clone(),
                    None => shared_secret(store.as_ref(), &config, "cluster-secret").await?,
                };
                Some(crate::auth::peer::PeerKeys::new(secret.as_bytes()))
            }
        };
        let material = tls::material(&config, store.as_ref()).await?;
        let host_key = match config.ssh_listen {
            Listen::Off => None,
            Listen::At(_) => Some(
                gateway::host_key(store.as_ref())
                    .await
                    .map_err(RelayError::HostKey)?,
            ),
        };
        lock.release().await;

        let limits = &config.limits;
        let transport = crate::quic::transport(&crate::quic::Settings {
            keep_alive: (limits.keep_alive_ms > 0)
                .then(|| Duration::from_millis(limits.keep_alive_ms)),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            // The agent opens only its control stream; a few more are allowed so that a
            // stray one can be refused with a clear code instead of stalling.
            peer_bidi_streams: 4,
            mtu_max: limits.quic_mtu_max,
            congestion: limits.quic_congestion,
        });
        let bind_err = |what, addr| move |source| RelayError::Bind { what, addr, source };
        let devices = match config.device_listen.addr() {
            Some(addr) => {
                let server = tls::quic_server(&material, transport)?;
                let socket =
                    crate::quic::udp_socket(addr).map_err(bind_err("devices (UDP)", addr))?;
                Some(
                    crate::quic::relay_endpoint(socket, server, metrics.probe_stats.clone())
                        .map_err(bind_err("devices (UDP)", addr))?,
                )
            }
            None => None,
        };
        let quic_bound = match &devices {
            Some(endpoint) => Some(endpoint.local_addr().map_err(|source| {
                RelayError::Bind {
                    what: "devices (UDP)",
                    addr: config
                        .device_listen
                        .addr()
                        .unwrap_or(([0, 0, 0, 0], 0).into()),
                    source,
                }
            })?),
            None => None,
        };
        let device_tcp = device_tcp_addr(config.device_tcp_listen, quic_bound);
        let api = bind_tcp("the API", config.api_listen).await?;
        let proxy = bind_tcp("CONNECT", config.proxy_listen).await?;
        let mut wanted = Vec::new();
        if let Some(addr) = config.api_tls_listen.addr() {
            wanted.push((
                Service::Api,
                addr,
                tls::tcp_server(&material, &[b"http/1.1"])?,
            ));
        }
        if let Some(addr) = config.proxy_tls_listen.addr() {
            wanted.push((Service::Proxy, addr, tls::tcp_server(&material, &[])?));
        }
        if let Some(addr) = device_tcp {
            wanted.push((Service::Device, addr, tls::device_tcp_server(&material)?));
        }
        let mut bound = listen::bind_tls(wanted)
            .await
            .map_err(|(service, addr, source)| RelayError::Bind {
                what: service.what(),
                addr,
                source,
            })?;
        let peer = match config.peer_listen.addr() {
            Some(addr) => Some(bind_tcp("the peer link", addr).await?),
            None => None,
        };
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(bind_tcp("metrics", addr).await?),
            None => None,
        };
        let gateway = match (config.ssh_listen.addr(), host_key) {
            (Some(addr), Some(key)) => Some((
                bind_tcp("the SSH gateway", addr).await?,
                gateway::server_config(key),
            )),
            _ => None,
        };
        listen::unclaimed_inherited();
        tracing::info!(cert = %material.cert_path.display(), "TLS certificate loaded");
        // Other relays dial the peer address; a single relay publishes its API address so
        // operators can tell which relay a row is.
        let published = match (&config.peer_advertise, &peer) {
            (Some(advertised), _) => advertised.clone(),
            (None, Some(listener)) => listener
                .local_addr()
                .map_err(|source| RelayError::Bind {
                    what: "the peer link",
                    addr: config.peer_listen.addr().unwrap_or(config.api_listen),
                    source,
                })?
                .to_string(),
            (None, None) => api
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| config.api_listen.to_string()),
        };
        store.register_relay(&relay_id, &published).await?;
        store.clear_relay_presence(&relay_id).await?;
        tracing::info!(relay = %relay_id, peer_addr = %published, cluster = peer.is_some(), "relay registered");
        let shared = Shared::new(config, store, jwt, peer_keys, relay_id, metrics);
        let relay = Relay {
            shared,
            api: Listeners {
                plain: Some(api),
                tls: bound.take(Service::Api),
            },
            proxy: Listeners {
                plain: Some(proxy),
                tls: bound.take(Service::Proxy),
            },
            devices_tcp: Listeners {
                plain: None,
                tls: bound.take(Service::Device),
            },
            routers: bound.routers,
            peer,
            devices,
            metrics: metrics_listener,
            gateway,
            tls: material,
            admin_key_path,
        };
        let addrs = relay.addrs();
        let ssh = relay
            .gateway
            .as_ref()
            .zip(addrs.ssh)
            .map(|((_, config), addr)| {
                let key = config.keys[0].public_key();
                (
                    addr,
                    key.to_openssh().unwrap_or_default(),
                    key.fingerprint(russh::keys::HashAlg::Sha256).to_string(),
                )
            });
        let _ = relay.shared.endpoints.set(state::Endpoints {
            proxy: Some(addrs.proxy),
            proxy_tls: addrs.proxy_tls,
            ssh,
        });
        Ok(relay)
    }

    /// Where each listener is bound.
    pub fn addrs(&self) -> BoundAddrs {
        let c = &self.shared.config;
        BoundAddrs {
            api: self.api.addrs().0.unwrap_or(c.api_listen),
            api_tls: self.api.addrs().1,
            proxy: self.proxy.addrs().0.unwrap_or(c.proxy_listen),
            proxy_tls: self.proxy.addrs().1,
            peer: self.peer.as_ref().and_then(|l| l.local_addr().ok()),
            device: self.devices.as_ref().and_then(|e| e.local_addr().ok()),
            device_tcp: self.devices_tcp.addrs().1,
            metrics: self.metrics.as_ref().and_then(|l| l.local_addr().ok()),
            ssh: self.gateway.as_ref().and_then(|(l, _)| l.local_addr().ok()),
        }
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` says 503 at once (the API
    /// keeps answering), the CONNECT listeners stop, devices are told to reconnect
    /// elsewhere and new hellos are rejected with `draining`, while open tunnels (local and
    /// forwarded) run on until they end or the grace period passes. Then the relay removes
    /// its rows from the store and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let shared = self.shared;
        let tunnels = shared.tunnel_tasks.clone();
        let background = TaskTracker::new();
        let api = background.spawn(api::run(self.api, shared.clone()));
        background.spawn(proxy::run(self.proxy, shared.clone(), tunnels.clone()));
        if let Some(listener) = self.peer {
            background.spawn(peer::run(listener, shared.clone(), tunnels.clone()));
        }
        if let Some((listener, config)) = self.gateway {
            background.spawn(gateway::run(listener, shared.clone(), config));
        }
        if let Some(endpoint) = self.devices {
            background.spawn(devices::quic::run(endpoint, shared.clone()));
        }
        background.spawn(devices::tcp::run(self.devices_tcp, shared.clone()));
        background.spawn(devices::announce_drain(shared.clone()));
        for router in self.routers {
            let timeout = shared.config.limits.hello_timeout();
            background.spawn(router.run(timeout, shared.shutdown.clone()));
        }
        {
            let shared = shared.clone();
            background.spawn(async move { shared.presence.watch(shared.shutdown.clone()).await });
        }
        {
            let shared = shared.clone();
            let every = Duration::from_secs(shared.config.limits.presence_reconcile_secs.max(1));
            background.spawn(async move {
                shared
                    .presence
                    .reconcile_every(every, shared.shutdown.clone())
                    .await
            });
        }
        {
            let every = Duration::from_millis(shared.config.limits.tls_reload_check_ms.max(100));
            let stop = shared.shutdown.clone();
            let material = self.tls;
            background.spawn(async move { tls::watch(&material, every, stop).await });
        }
        if let Some(listener) = self.metrics {
            let stop = shared.shutdown.clone();
            let app = api::metrics_router(shared.clone());
            background.spawn(async move {
                let serve = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::warn!(error = %e, "metrics listener failed");
                }
            });
        }
        background.spawn(heartbeat(shared.clone()));
        background.spawn(revalidate::revalidate(shared.clone()));
        background.spawn(give_back_freed_memory(shared.clone()));

        tokio::select! {
            _ = shutdown => {}
            _ = shared.shutdown.cancelled() => {}
        }
        tracing::info!("draining: devices move to other relays, open tunnels run on");
        shared.draining.cancel();
        shared.metrics.draining.set(1);
        shared.metrics.ready.set(0);
        // Tell the cluster at once, not at the next heartbeat.
        if let Err(e) = shared
            .store
            .heartbeat(&shared.relay_id, shared.status())
            .await
        {
            tracing::warn!(error = %e, "could not report draining");
        }
        let grace = Duration::from_secs(shared.config.limits.shutdown_grace_secs);
        if tokio::time::timeout(grace, drained(&shared)).await.is_err() {
            tracing::warn!(?grace, "grace period over; cutting what is still open");
            revalidate::cut_all(&shared, "shutdown");
        }
        tunnels.close();
        // Cut tunnels end at once; their audit rows are completed in their own tasks.
        let _ = tokio::time::timeout(Duration::from_secs(5), tunnels.wait()).await;
        shared.shutdown.cancel();
        background.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
        if let Err(e) = shared.store.remove_relay(&shared.relay_id).await {
            tracing::warn!(error = %e, "could not remove this relay's rows on exit");
        }
        match api.await {
            Ok(Err(source)) => Err(RelayError::Serve {
                what: "API",
                source,
            }),
            _ => Ok(()),
        }
    }
}

/// Binds every fixed address the relay will listen on and lets go at once, so that a busy
/// port is reported before start-up changes anything. Port 0 always binds; addresses
/// several TLS services share are tried once.
fn preflight_binds(config: &RelayConfig) -> Result<(), RelayError> {
    let fixed = |addr: SocketAddr| (addr.port() != 0).then_some(addr);
    let quic = config.device_listen.addr().and_then(fixed);
    if let Some(addr) = quic {
        std::net::UdpSocket::bind(addr).map_err(|source| RelayError::Bind {
            what: "devices (UDP)",
            addr,
            source,
        })?;
    }
    let tcp = [
        ("the API", Some(config.api_listen)),
        ("CONNECT", Some(config.proxy_listen)),
        ("the API (TLS)", config.api_tls_listen.addr()),
        ("CONNECT (TLS)", config.proxy_tls_listen.addr()),
        (
            "devices (TLS over TCP)",
            device_tcp_addr(config.device_tcp_listen, config.device_listen.addr()),
        ),
        ("the peer link", config.peer_listen.addr()),
        ("metrics", config.metrics_listen),
    ];
    let mut tried = std::collections::BTreeSet::new();
    for (what, addr) in tcp {
        let Some(addr) = addr.and_then(fixed) else {
            continue;
        };
        if !tried.insert(addr) {
            continue;
        }
        // std's bind does not set SO_REUSEADDR, so a port in TIME_WAIT from an earlier run
        // would look busy: the same socket options as the real listener.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        socket
            .and_then(|s| {
                s.set_reuseaddr(true)?;
                s.bind(addr)?;
                s.listen(1)
            })
            .map_err(|source| RelayError::Bind { what, addr, source })?;
    }
    Ok(())
}

/// Where the TLS/TCP device listener goes: as configured, else the TCP twin of the bound
/// QUIC address (same IP and port number, so one firewall rule and one `HOST:PORT` serve
/// both), else (QUIC off) 0.0.0.0:4433.
fn device_tcp_addr(configured: Option<Listen>, quic: Option<SocketAddr>) -> Option<SocketAddr> {
    match (configured, quic) {
        (Some(listen), _) => listen.addr(),
        (None, Some(quic)) => Some(quic),
        (None, None) => Some(([0, 0, 0, 0], 4433).into()),
    }
}

/// Resolves once a draining relay holds nothing worth waiting for: no open tunnel and, in
/// a cluster, no device (devices move to other relays; a single relay's devices have
/// nowhere to go and reconnect once it is back).
async fn drained(shared: &Shared) {
    let cluster = shared.peer_keys.is_some();
    loop {
        let tunnels = shared.registry.tunnel_count();
        let devices = if cluster { shared.presence.count() } else { 0 };
        if tunnels == 0 && devices == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises the soft limit on open files to the hard limit: a relay holds a socket per
/// tunnel and per waiting client, and the common default soft limit of 1024 would make it
/// refuse connections (the API first) long before memory or CPU run short.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, ?before, "cannot raise the open-files limit");
            return;
        }
    }
    let shown = |v: Option<u64>| v.map_or("unlimited".to_owned(), |n| n.to_string());
    tracing::info!(
        open_files = %shown(limit.current),
        was = %shown(before),
        "open-files limit"
    );
}

/// How often the relay looks whether tunnels ended, to hand their freed memory back.
const GIVE_BACK_EVERY: Duration = Duration::from_secs(2);

/// Hands the heap's free pages back to the kernel ([`crate::heap`]) within
/// [`GIVE_BACK_EVERY`] of tunnels ending, and twice more after the last one ended (a tunnel's
/// transport state and audit row go a little after it leaves the registry), and not
/// otherwise: a relay whose tunnels come and go trims once per interval, an idle or steady
/// one never.
async fn give_back_freed_memory(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(GIVE_BACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = shared.registry.ended();
    let mut trailing = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let ended = shared.registry.ended();
        if ended != seen {
            seen = ended;
            trailing = 2;
        } else if trailing > 0 {
            trailing -= 1;
        } else {
            continue;
        }
        // It walks every arena under its lock: off the runtime's worker threads.
        if let Err(e) = tokio::task::spawn_blocking(crate::heap::give_back).await {
            tracing::warn!(error = %e, "giving freed memory back failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_device_listener_defaults_to_the_quic_address_twin() {
        let quic: SocketAddr = "10.0.0.1:4433".parse().unwrap();
        assert_eq!(device_tcp_addr(None, Some(quic)), Some(quic));
        assert_eq!(
            device_tcp_addr(None, None),
            Some("0.0.0.0:4433".parse().unwrap())
        );
        assert_eq!(device_tcp_addr(Some(Listen::Off), Some(quic)), None);
        let at: SocketAddr = "0.0.0.0:443".parse().unwrap();
        assert_eq!(device_tcp_addr(Some(Listen::At(at)), Some(quic)), Some(at));
    }
}

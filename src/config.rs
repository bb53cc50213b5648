//! Relay settings: defaults < TOML file < `CLOUDLINK_*` env < flags.
//!
//! The flags and env live in [`RelayArgs`] (clap reads both, flags winning); every one is an
//! `Option`, so a value the person did not give leaves the file's (or the default) in place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::logsafe::Secret;

/// An optional listener: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Not listening.
    Off,
    /// Listening here.
    At(SocketAddr),
}

impl Listen {
    /// The address, unless off.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(a) => Some(a),
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|_| format!("{s:?} is neither HOST:PORT (an IP address) nor `off`"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Off => f.write_str("off"),
            Listen::At(a) => a.fmt(f),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Errors in loading or checking the configuration, before anything is bound.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        source: toml::de::Error,
    },
    /// The settings given as flags or environment do not fit together with the file's.
    #[error("invalid settings: {0}")]
    Given(String),
    /// A value is out of range.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        message: String,
    },
}

/// Limits and timeouts; docs/configuration.md lists them. Every one can be set
/// in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// How long a CONNECT client has to send its request head.
    pub head_timeout_ms: u64,
    /// The largest CONNECT request head accepted.
    pub head_max_bytes: usize,
    /// How long a device has to answer a tunnel stream's `open`.
    pub open_timeout_ms: u64,
    /// How long a device has to send its `hello`.
    pub hello_timeout_ms: u64,
    /// QUIC keep-alive the relay sends on a silent link, ms; 0 (the default): none. The
    /// agent keeps its own link alive (it knows its NAT and its data plan); a relay PING
    /// would only spend the device's bytes and restart QUIC's idle timer, which makes a
    /// vanished device show online longer.
    pub keep_alive_ms: u64,
    /// QUIC idle timeout: a device silent this long is gone (above the agents' 25 s
    /// keep-alive, with room for it to arrive).
    pub idle_timeout_ms: u64,
    /// HTTP/2 PING the relay sends on a silent TLS/TCP link, ms; 0 (the default): none,
    /// as on QUIC.
    pub tcp_keep_alive_ms: u64,
    /// TLS/TCP link idle timeout: a device silent this long is gone (above the agents'
    /// 60 s keep-alive on this link).
    pub tcp_idle_timeout_ms: u64,
    /// Close a tunnel that carried no byte either way for this long; 0 = never.
    pub tunnel_idle_timeout_secs: u64,
    /// How long a resumable tunnel whose device link is lost keeps the user's connection
    /// open for the device to come back, seconds (PROTOCOL.md §2e); 0 turns resumable
    /// tunnels off (the relay does not announce `resume`).
    pub tunnel_resume_secs: u64,
    /// How often the relay checks its presence rows against the sessions it holds, seconds
    /// (PROTOCOL.md §3, "Reconciliation"): it supersedes a session whose device connected
    /// elsewhere while the relay's LISTEN connection was down (that NOTIFY was lost), and
    /// repairs rows a failed write left wrong.
    pub presence_reconcile_secs: u64,
    /// Open tunnels per user, over all devices.
    pub tunnels_per_user: usize,
    /// Open tunnels per device, over all users.
    pub tunnels_per_device: usize,
    /// Open tunnels of one user to one device: below the per-device limit, so that one
    /// user cannot hold a device against everyone else.
    pub tunnels_per_user_device: usize,
    /// Open tunnels on this relay.
    pub tunnels_per_relay: usize,
    /// Tunnel bytes the relay may have granted devices and not yet seen its users take,
    /// and that its replay buffers hold beyond 64 KiB a tunnel (PROTOCOL.md §2d, §2e),
    /// over all tunnels; past it new credit waits, and so do users' uploads beyond that
    /// floor. 0 (the default): a
    /// quarter of the machine's memory, or of the relay's cgroup limit when that is lower,
    /// and at most half the kernel's TCP memory low mark (docs/memory.md).
    pub tunnel_buffer_bytes: u64,
    /// Failed authentications per source (IPv4 address or IPv6 /64) per minute; further
    /// failures answer 429. Valid credentials are never refused by it.
    pub auth_failures_per_minute: u32,
    /// CONNECT connections not yet authenticated, in total; more wait in the kernel's
    /// accept queue.
    pub proxy_unauthenticated_max: usize,
    /// CONNECT connections not yet authenticated, per source address; more answer 429.
    pub proxy_unauthenticated_per_source: usize,
    /// How long an API client has to send a request's headers.
    pub api_header_timeout_ms: u64,
    /// How long an API client has to send a request's body.
    pub api_body_timeout_ms: u64,
    /// Open API connections (plain and TLS together); more wait in the accept queue.
    pub api_connections_max: usize,
    /// QUIC handshakes in progress (connections not yet through their hello) above which
    /// a new connection from an address that has not proven it can receive is sent a
    /// Retry first, so a flood of spoofed Initials costs one stateless packet each.
    pub quic_retry_above_pending: usize,
    /// The largest QUIC packet path-MTU discovery tries (UDP payload bytes). The default,
    /// 1452, is safe on the internet; raise it for devices on jumbo-frame or loopback paths.
    pub quic_mtu_max: u16,
    /// The congestion controller for what the relay sends over QUIC: `bbr` (ours, the
    /// default), `quinn-bbr`, `cubic` or `newreno` (docs/field.md compares them).
    pub quic_congestion: crate::quic::Congestion,
    /// QUIC handshakes (connections not yet through their hello) in progress at most; past
    /// it new connections are refused at once, cheaply, and their agents back off, rather
    /// than started and left to time out when a whole relay's devices arrive together.
    pub handshakes_max: usize,
    /// The largest control frame.
    pub frame_max_bytes: usize,
    /// How long an authorization answer may be reused.
    pub auth_cache_ms: u64,
    /// How long open tunnels may run on after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Devices connected at once.
    pub max_devices: usize,
    /// How often the TLS certificate and key files are checked for a change (SIGHUP
    /// reloads them at once).
    pub tls_reload_check_ms: u64,
    /// Audit rows deleted per statement when old ones are dropped.
    pub audit_prune_batch: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_timeout_ms: 10_000,
            head_max_bytes: 8 * 1024,
            open_timeout_ms: 10_000,
            hello_timeout_ms: 10_000,
            keep_alive_ms: 0,
            idle_timeout_ms: 35_000,
            tcp_keep_alive_ms: 0,
            tcp_idle_timeout_ms: 70_000,
            tunnel_idle_timeout_secs: 0,
            tunnel_resume_secs: crate::resume::DEFAULT_RESUME_SECS,
            presence_reconcile_secs: 30,
            tunnels_per_user: 256,
            tunnels_per_device: 64,
            tunnels_per_user_device: 32,
            tunnels_per_relay: 65_536,
            tunnel_buffer_bytes: 0,
            auth_failures_per_minute: 20,
            proxy_unauthenticated_max: 10_000,
            proxy_unauthenticated_per_source: 256,
            api_header_timeout_ms: 10_000,
            api_body_timeout_ms: 30_000,
            api_connections_max: 10_000,
            quic_retry_above_pending: 1_000,
            quic_mtu_max: crate::quic::MTU_MAX_DEFAULT,
            quic_congestion: crate::quic::Congestion::Bbr,
            handshakes_max: 2_000,
            frame_max_bytes: 64 * 1024,
            auth_cache_ms: 2_000,
            shutdown_grace_secs: 30,
            max_devices: 100_000,
            tls_reload_check_ms: 10_000,
            audit_prune_batch: 500,
        }
    }
}

impl Limits {
    /// [`Limits::head_timeout_ms`] as a duration.
    pub fn head_timeout(&self) -> Duration {
        Duration::from_millis(self.head_timeout_ms)
    }
    /// [`Limits::open_timeout_ms`] as a duration.
    pub fn open_timeout(&self) -> Duration {
        Duration::from_millis(self.open_timeout_ms)
    }
    /// [`Limits::hello_timeout_ms`] as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    /// [`Limits::api_header_timeout_ms`] as a duration.
    pub fn api_header_timeout(&self) -> Duration {
        Duration::from_millis(self.api_header_timeout_ms)
    }
    /// [`Limits::api_body_timeout_ms`] as a duration.
    pub fn api_body_timeout(&self) -> Duration {
        Duration::from_millis(self.api_body_timeout_ms)
    }
    /// [`Limits::tunnel_buffer_bytes`] in force: as set, or a quarter of the memory this
    /// process may use (the machine's, or its cgroup's limit when lower), and no more than
    /// half the kernel's TCP memory low mark.
    ///
    /// The second bound is because granted bytes a user has not taken wait in the user
    /// sockets' kernel queues, and past `net.ipv4.tcp_mem`'s pressure mark the kernel
    /// shrinks every TCP socket's buffers, the device links' included: tunnels on the
    /// TLS/TCP link then crawl, and what the relay granted lands in its own memory
    /// instead (docs/memory.md). Half the low mark leaves room for the kernel's overhead
    /// on those bytes and for the relay's other sockets.
    pub fn tunnel_buffer(&self) -> u64 {
        match self.tunnel_buffer_bytes {
            0 => {
                let memory = memory_available().map_or(DEFAULT_TUNNEL_BUFFER, |m| m / 4);
                kernel_tcp_low_mark().map_or(memory, |low| memory.min(low / 2))
            }
            n => n,
        }
    }
}

/// The tunnel buffer limit when the machine's memory cannot be read: 1 GiB.
const DEFAULT_TUNNEL_BUFFER: u64 = 1 << 30;

/// The kernel's TCP memory low mark, bytes: the first of `net.ipv4.tcp_mem`'s three
/// figures (pages), below which it does not regulate TCP buffers at all.
fn kernel_tcp_low_mark() -> Option<u64> {
    let marks = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
    let low: u64 = marks.split_whitespace().next()?.parse().ok()?;
    Some(low.saturating_mul(page_size()))
}

/// The kernel's page size (the unit of `tcp_mem`), as `/proc/self/smaps` states it; 4 KiB
/// when it cannot be read.
fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|smaps| {
            let line = smaps.lines().find(|l| l.starts_with("KernelPageSize:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(4096)
}

/// The memory this process may use: the machine's (`MemTotal`), or its cgroup's limit
/// (v2 `memory.max`, v1 `memory.limit_in_bytes`) when that is lower.
fn memory_available() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    // "max" (v2) and a huge number (v1) both mean no limit.
    .filter_map(|v| v.trim().parse::<u64>().ok())
    .find(|&v| v < (1 << 60));
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// `--audit-retention`: a duration in seconds, or `off` (0: keep every row).
fn parse_retention(s: &str) -> Result<u64, String> {
    match s.trim() {
        "off" | "0" => Ok(0),
        other => crate::duration::parse_duration(other),
    }
}

/// File name of the generated dev certificate in the data directory (the relay writes it,
/// the healthcheck trusts it).
pub const DEV_CERT: &str = "relay-cert.pem";
/// File name of its private key.
pub const DEV_KEY: &str = "relay-key.pem";

/// Everything a relay needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Where the SQLite database, the JWT secret, the dev certificate and `admin.key` live.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default `sqlite://<data_dir>/cloudlink.db`.
    pub database_url: Option<String>,
    /// The REST API, `/metrics`, `/healthz`, in plain HTTP: for balena's CLI on a trusted
    /// network and for a TLS-terminating load balancer in front.
    pub api_listen: SocketAddr,
    /// The REST API over TLS (HTTPS); what the CLI and agents use.
    pub api_tls_listen: Listen,
    /// The plain-TCP CONNECT proxy: for balena's CLI and a TLS-terminating load balancer.
    pub proxy_listen: SocketAddr,
    /// The CONNECT proxy over TLS.
    pub proxy_tls_listen: Listen,
    /// The QUIC (UDP) listener devices dial, or `off`.
    pub device_listen: Listen,
    /// The TLS-over-TCP device listener (PROTOCOL.md §2b), for devices whose network blocks
    /// UDP, or `off`; default: the TCP twin of the bound QUIC address (same IP and port
    /// number), or 0.0.0.0:4433 when QUIC is off. It may share an address with the TLS API
    /// and TLS CONNECT listeners: ALPN then picks the service.
    pub device_tcp_listen: Option<Listen>,
    /// Serve `/metrics` here, plain HTTP, instead of on the API listeners.
    pub metrics_listen: Option<SocketAddr>,
    /// The SSH gateway (balena's `host`/`enter` and ProxyJump for plain OpenSSH), or
    /// `off`. 2222, not 22: unprivileged, and not the host's own sshd; deployments put 22
    /// in front of it (a published port, a Service, or a systemd socket).
    pub ssh_listen: Listen,
    /// Audit rows (tunnels) older than this many seconds are deleted; 0 keeps them all.
    pub audit_retention_secs: u64,
    /// Signs user JWTs; default: generated once and kept in the store, shared by every
    /// relay of a cluster.
    pub jwt_secret: Option<Secret>,
    /// The relay-to-relay listener (TCP, plain: keep it on a private network); `off` (the
    /// default) is a single relay. On, it makes this relay a cluster member.
    pub peer_listen: Listen,
    /// The address other relays dial for this one, `HOST:PORT`; default: the peer
    /// listener's bound address when that is a specific address.
    pub peer_advertise: Option<String>,
    /// Where users reach the CONNECT proxy, `HOST:PORT`, as `GET /v1/endpoints` tells
    /// `cloudlink login`; default: the host the caller reached the API by, and the TLS
    /// proxy's bound port. For a relay behind a port mapping.
    pub proxy_advertise: Option<String>,
    /// Where users reach the SSH gateway, `HOST:PORT`, as `GET /v1/endpoints` says;
    /// default: the host the caller reached the API by, and the gateway's bound port.
    pub ssh_advertise: Option<String>,
    /// This relay's id in `relays` and `presence`; default: generated once into the data dir.
    pub relay_id: Option<String>,
    /// Signs peer tokens between relays; default: generated once and kept in the store.
    pub cluster_secret: Option<Secret>,
    /// An outside identity service's public key (PEM, RS256 or EdDSA) for the JWTs it mints.
    pub jwt_public_key: Option<PathBuf>,
    /// Lifetime of JWTs from `POST /v1/auth/token`, seconds.
    pub jwt_ttl_secs: u64,
    /// TLS certificate chain (PEM) for the device and TLS proxy listeners.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Extra names for the generated dev certificate.
    pub tls_names: Vec<String>,
    /// Suffixes accepted after a uuid in a CONNECT target (`<uuid>.balena:22222`).
    pub device_domains: Vec<String>,
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// Where `POST /v1/ssh-keys/import` fetches `<login>.keys` from.
    pub github_keys_url: String,
    /// What the browser terminal runs for a service (`{service}` is replaced by its name).
    pub service_command: String,
    /// Limits and timeouts.
    pub limits: Limits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            data_dir: PathBuf::from("./cloudlink-data"),
            database_url: None,
            api_listen: ([0, 0, 0, 0], 8080).into(),
            api_tls_listen: Listen::At(([0, 0, 0, 0], 8443).into()),
            proxy_listen: ([0, 0, 0, 0], 3128).into(),
            proxy_tls_listen: Listen::At(([0, 0, 0, 0], 3129).into()),
            device_listen: Listen::At(([0, 0, 0, 0], 4433).into()),
            device_tcp_listen: None,
            metrics_listen: None,
            ssh_listen: Listen::At(([0, 0, 0, 0], 2222).into()),
            audit_retention_secs: 90 * 86_400,
            jwt_secret: None,
            peer_listen: Listen::Off,
            peer_advertise: None,
            proxy_advertise: None,
            ssh_advertise: None,
            relay_id: None,
            cluster_secret: None,
            jwt_public_key: None,
            jwt_ttl_secs: 3600,
            tls_cert: None,
            tls_key: None,
            tls_names: Vec::new(),
            device_domains: ["balena", "cloudlink", "resin", "vpn"]
                .map(String::from)
                .to_vec(),
            worker_threads: 0,
            github_keys_url: "https://github.com".to_owned(),
            service_command: crate::balena::DEFAULT_SERVICE_COMMAND.to_owned(),
            limits: Limits::default(),
        }
    }
}

/// Flags and environment for `cloudlink relay`; each overrides the file when given. They
/// serialize under [`RelayConfig`]'s keys, only those given, for [`crate::overlay::layer`].
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct RelayArgs {
    /// TOML file with any of the settings below (and `[limits]`).
    #[arg(long, env = "CLOUDLINK_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./cloudlink-data].
    #[arg(long, env = "CLOUDLINK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// sqlite://PATH or postgres://… [default: sqlite://<data-dir>/cloudlink.db].
    #[arg(long, env = "CLOUDLINK_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Plain-HTTP REST API [default: 0.0.0.0:8080]. Secrets cross it in the clear: keep it
    /// for balena's CLI on a trusted network or behind a TLS-terminating load balancer.
    #[arg(long, env = "CLOUDLINK_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// HTTPS REST API, ADDR or `off` [default: 0.0.0.0:8443].
    #[arg(long, env = "CLOUDLINK_API_TLS_LISTEN")]
    pub api_tls_listen: Option<Listen>,
    /// Plain CONNECT proxy [default: 0.0.0.0:3128]. Keys cross it in the clear: keep it for
    /// balena's CLI or behind a TLS-terminating load balancer.
    #[arg(long, env = "CLOUDLINK_PROXY_LISTEN")]
    pub proxy_listen: Option<SocketAddr>,
    /// CONNECT proxy over TLS, ADDR or `off` [default: 0.0.0.0:3129].
    #[arg(long, env = "CLOUDLINK_PROXY_TLS_LISTEN")]
    pub proxy_tls_listen: Option<Listen>,
    /// QUIC device listener, UDP, ADDR or `off` [default: 0.0.0.0:4433].
    #[arg(long, env = "CLOUDLINK_DEVICE_LISTEN")]
    pub device_listen: Option<Listen>,
    /// TLS-over-TCP device listener, for networks that block UDP, ADDR or `off` [default:
    /// the QUIC address's TCP twin]. May share the TLS API's or TLS proxy's address (ALPN
    /// picks the service), e.g. everything on 443.
    #[arg(long, env = "CLOUDLINK_DEVICE_TCP_LISTEN")]
    pub device_tcp_listen: Option<Listen>,
    /// Serve `/metrics` on this address (plain HTTP) and not on the API listeners
    /// [default: on the API listeners].
    #[arg(long, env = "CLOUDLINK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// SSH gateway (`host`/`enter`, ProxyJump `ssh -J USER@RELAY:PORT`), ADDR or `off`
    /// [default: 0.0.0.0:2222].
    #[arg(long, env = "CLOUDLINK_SSH_LISTEN")]
    pub ssh_listen: Option<Listen>,
    /// Delete audit rows older than this (`90d`, `12h`…) or keep them (`off`)
    /// [default: 90d].
    #[arg(long, env = "CLOUDLINK_AUDIT_RETENTION", value_parser = parse_retention)]
    #[serde(rename = "audit_retention_secs")]
    pub audit_retention: Option<u64>,
    /// HS256 secret for user JWTs [default: generated once into the store, shared by the
    /// cluster].
    #[arg(long, env = "CLOUDLINK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Relay-to-relay listener, ADDR or `off` [default: off]. Turns on cluster mode (needs a
    /// postgres:// store). Plain TCP: it must sit on a private network.
    #[arg(long, env = "CLOUDLINK_PEER_LISTEN")]
    pub peer_listen: Option<Listen>,
    /// Address other relays dial for this one, HOST:PORT [default: the peer listener's
    /// bound address, when it is not 0.0.0.0 or ::].
    #[arg(long, env = "CLOUDLINK_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Where users reach the CONNECT proxy, HOST:PORT, as the relay tells `cloudlink
    /// login` [default: the API's host and the TLS proxy's bound port].
    #[arg(long, env = "CLOUDLINK_PROXY_ADVERTISE")]
    pub proxy_advertise: Option<String>,
    /// Where users reach the SSH gateway, HOST:PORT [default: the API's host and the
    /// gateway's bound port].
    #[arg(long, env = "CLOUDLINK_SSH_ADVERTISE")]
    pub ssh_advertise: Option<String>,
    /// This relay's id [default: generated once into the data dir].
    #[arg(long, env = "CLOUDLINK_RELAY_ID")]
    pub relay_id: Option<String>,
    /// HS256 secret for peer tokens between relays [default: generated once into the
    /// store].
    #[arg(long, env = "CLOUDLINK_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// PEM public key (RS256 or EdDSA) of an outside service that mints user JWTs.
    #[arg(long, env = "CLOUDLINK_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// TLS certificate chain, PEM [default: a self-signed dev certificate in the data dir].
    #[arg(long, env = "CLOUDLINK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key, PEM.
    #[arg(long, env = "CLOUDLINK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS name or IP for the dev certificate (repeatable).
    #[arg(long = "tls-name", env = "CLOUDLINK_TLS_NAMES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_names: Vec<String>,
    /// The limits that have flags.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Runtime worker threads (0 = one per core) [default: 0].
    #[arg(long, env = "CLOUDLINK_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Where SSH key imports fetch `<login>.keys` [default: https://github.com].
    #[arg(long, env = "CLOUDLINK_GITHUB_KEYS_URL")]
    pub github_keys_url: Option<String>,
    /// What the browser terminal runs for a service; `{service}` is replaced by its name
    /// [default: the balena-engine exec that `device ssh --service` uses].
    #[arg(long, env = "CLOUDLINK_SERVICE_COMMAND")]
    pub service_command: Option<String>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

/// The `[limits]` that have flags too.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct LimitArgs {
    /// Close tunnels idle this many seconds (0 = never) [default: 0].
    #[arg(long, env = "CLOUDLINK_TUNNEL_IDLE_TIMEOUT")]
    #[serde(rename = "tunnel_idle_timeout_secs")]
    pub tunnel_idle_timeout: Option<u64>,
    /// Seconds open tunnels may run on after SIGTERM [default: 30].
    #[arg(long, env = "CLOUDLINK_SHUTDOWN_GRACE")]
    #[serde(rename = "shutdown_grace_secs")]
    pub shutdown_grace: Option<u64>,
}

impl RelayConfig {
    /// Layers defaults, the file (if any), then env and flags, and validates the result.
    pub fn load(args: &RelayArgs) -> Result<RelayConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => RelayConfig::read_table(path)?,
            None => toml::Table::new(),
        };
        let config: RelayConfig = crate::overlay::layer(file, args).map_err(ConfigError::Given)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file; unknown keys are errors, missing keys take their defaults.
    pub fn from_file(path: &Path) -> Result<RelayConfig, ConfigError> {
        let table = RelayConfig::read_table(path)?;
        crate::overlay::layer(table, &toml::Table::new()).map_err(ConfigError::Given)
    }

    /// A config file as a table, checked against these settings first so that a mistake
    /// is reported with its line and column.
    fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        };
        toml::from_str::<RelayConfig>(&text).map_err(parse)?;
        toml::from_str(&text).map_err(parse)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert", "tls_cert and tls_key go together");
        }
        for (key, secret) in [
            ("jwt_secret", &self.jwt_secret),
            ("cluster_secret", &self.cluster_secret),
        ] {
            if secret.as_ref().is_some_and(|s| s.0.len() < 32) {
                return invalid(key, "must be at least 32 characters");
            }
        }
        if let Some(id) = &self.relay_id {
            if !crate::store::is_valid_name(id) {
                return invalid(
                    "relay_id",
                    "must be 1 to 63 characters of a-z, 0-9, _ and -, starting with a letter or digit",
                );
            }
        }
        if self.device_listen == Listen::Off && self.device_tcp_listen == Some(Listen::Off) {
            return invalid(
                "device_listen",
                "with both device_listen and device_tcp_listen off, no device can connect",
            );
        }
        if let Listen::At(addr) = self.peer_listen {
            if !self.database_url().starts_with("postgres") {
                return invalid(
                    "peer_listen",
                    "cluster mode needs a shared postgres:// store (--database-url); SQLite \
                     serves a single relay",
                );
            }
            if addr.ip().is_unspecified() && self.peer_advertise.is_none() {
                return invalid(
                    "peer_advertise",
                    "the peer listener is on an unspecified address; say which address other \
                     relays dial (--peer-advertise HOST:PORT)",
                );
            }
        }
        for (name, adv) in [
            ("peer_advertise", &self.peer_advertise),
            ("proxy_advertise", &self.proxy_advertise),
            ("ssh_advertise", &self.ssh_advertise),
        ] {
            let Some(adv) = adv else { continue };
            if adv.rsplit_once(':').is_none_or(|(host, port)| {
                host.is_empty() || crate::proto::connect::parse_port(port).is_err()
            }) {
                return invalid(name, "must be HOST:PORT");
            }
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return invalid("database_url", "must start with sqlite:// or postgres://");
            }
        }
        if self.jwt_ttl_secs == 0 {
            return invalid("jwt_ttl_secs", "must be positive");
        }
        if !self.service_command.contains("{service}") {
            return invalid(
                "service_command",
                "must contain {service}, which is replaced by the service name",
            );
        }
        if !(self.github_keys_url.starts_with("https://")
            || self.github_keys_url.starts_with("http://"))
        {
            return invalid("github_keys_url", "must start with https:// or http://");
        }
        let l = &self.limits;
        if l.head_max_bytes < 256 {
            return invalid("limits.head_max_bytes", "must be at least 256");
        }
        if l.frame_max_bytes < 1024 || l.frame_max_bytes > 16 * 1024 * 1024 {
            return invalid("limits.frame_max_bytes", "must be between 1 KiB and 16 MiB");
        }
        if !crate::quic::MTU_MAX_RANGE.contains(&l.quic_mtu_max) {
            return invalid("limits.quic_mtu_max", "must be between 1200 and 65527");
        }
        if l.keep_alive_ms >= l.idle_timeout_ms {
            return invalid(
                "limits.keep_alive_ms",
                "must be below limits.idle_timeout_ms (0: the relay sends none)",
            );
        }
        if l.tcp_keep_alive_ms >= l.tcp_idle_timeout_ms {
            return invalid(
                "limits.tcp_keep_alive_ms",
                "must be below limits.tcp_idle_timeout_ms (0: the relay sends none)",
            );
        }
        for (key, v) in [
            ("limits.head_timeout_ms", l.head_timeout_ms),
            ("limits.open_timeout_ms", l.open_timeout_ms),
            ("limits.hello_timeout_ms", l.hello_timeout_ms),
            ("limits.api_header_timeout_ms", l.api_header_timeout_ms),
            ("limits.api_body_timeout_ms", l.api_body_timeout_ms),
        ] {
            if v == 0 {
                return invalid(key, "must be positive");
            }
        }
        for (key, v) in [
            ("limits.tunnels_per_user", l.tunnels_per_user),
            ("limits.tunnels_per_device", l.tunnels_per_device),
            ("limits.tunnels_per_user_device", l.tunnels_per_user_device),
            ("limits.tunnels_per_relay", l.tunnels_per_relay),
            (
                "limits.proxy_unauthenticated_max",
                l.proxy_unauthenticated_max,
            ),
            (
                "limits.proxy_unauthenticated_per_source",
                l.proxy_unauthenticated_per_source,
            ),
            ("limits.api_connections_max", l.api_connections_max),
            ("limits.handshakes_max", l.handshakes_max),
        ] {
            if v == 0 {
                return invalid(key, "must be positive");
            }
        }
        if l.proxy_unauthenticated_max > tokio::sync::Semaphore::MAX_PERMITS
            || l.api_connections_max > tokio::sync::Semaphore::MAX_PERMITS
        {
            return invalid("limits", "connection caps are too large");
        }
        if self.device_domains.iter().any(|d| d.is_empty()) {
            return invalid("device_domains", "entries must not be empty");
        }
        Ok(())
    }

    /// The database URL in force.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| crate::store::sqlite::default_url(&self.data_dir))
    }

    /// The effective configuration as TOML, secrets masked, for `--print-config`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if let Some(url) = &mut shown.database_url {
            *url = mask_url_password(url);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot show config: {e}\n"))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((creds, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_in_order_and_masks_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "api_listen = \"127.0.0.1:9000\"\nproxy_listen = \"127.0.0.1:9001\"\n\
             database_url = \"postgres://u:hunter2@db/cl\"\n[limits]\ntunnels_per_user = 3\n",
        )
        .unwrap();
        let args = RelayArgs {
            config: Some(file.clone()),
            proxy_listen: Some("127.0.0.1:9002".parse().unwrap()),
            jwt_secret: Some("x".repeat(40)),
            ..RelayArgs::default()
        };
        let config = RelayConfig::load(&args).unwrap();
        assert_eq!(config.api_listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.proxy_listen, "127.0.0.1:9002".parse().unwrap());
        assert_eq!(config.limits.tunnels_per_user, 3);
        assert_eq!(config.limits.tunnels_per_device, 64);
        let shown = config.to_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains(&"x".repeat(40)), "{shown}");
        assert!(format!("{config:?}").contains("***"));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "api_lissen = \"127.0.0.1:9000\"\n").unwrap();
        assert!(matches!(
            RelayConfig::from_file(&file),
            Err(ConfigError::Parse { .. })
        ));
        let config = RelayConfig {
            tls_cert: Some("c.pem".into()),
            ..RelayConfig::default()
        };
        assert!(config.validate().is_err());
        let config = RelayConfig {
            database_url: Some("mysql://x".into()),
            ..RelayConfig::default()
        };
        assert!(config.validate().is_err());
        for (mtu, ok) in [(1199, false), (1200, true), (9000, true), (65528, false)] {
            let mut config = RelayConfig::default();
            config.limits.quic_mtu_max = mtu;
            let err = config.validate().err().map(|e| e.to_string());
            assert_eq!(err.is_none(), ok, "quic_mtu_max {mtu}: {err:?}");
            if let Some(err) = err {
                assert!(err.contains("limits.quic_mtu_max"), "{err}");
            }
        }
    }

    #[test]
    fn every_default_a_flag_states_is_the_declared_one() {
        let load = |args: &RelayArgs| RelayConfig::load(args).map_err(|e| e.to_string());
        let prose = [
            "database-url",
            "device-tcp-listen",
            "metrics-listen",
            "jwt-secret",
            "peer-advertise",
            "proxy-advertise",
            "ssh-advertise",
            "relay-id",
            "cluster-secret",
            "tls-cert",
            "service-command",
        ];
        let checked = crate::overlay::check_stated_defaults(load, &prose);
        assert!(checked >= 12, "only {checked} flags state a default");
    }
}

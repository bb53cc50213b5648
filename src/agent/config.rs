//! Agent settings: `/etc/cloudlink/agent.toml` (or `--config`) < env < flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::link::Transport;
use crate::logsafe::Secret;

/// The default config file; read when it exists and `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/cloudlink/agent.toml";

/// Everything the agent (and `agent authorized-keys`) needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Relays to dial, tried in turn (a name may resolve to many addresses):
    /// `HOST:PORT` (both transports, same port), `quic://HOST:PORT` or `tcp://HOST:PORT`.
    pub relay: Vec<String>,
    /// Which device link to use: `auto` (QUIC, falling back to TLS over TCP where UDP is
    /// blocked), `quic` or `tcp`.
    pub transport: TransportChoice,
    /// While on TCP in `auto`, the longest pause between UDP probes of the relay's QUIC
    /// port, seconds (the probes back off from 5 s to this, jittered; a QUIC handshake
    /// follows only a probe that got through: PROTOCOL.md §2c). The agent is back on QUIC
    /// within about this long of UDP working again.
    pub quic_probe_secs: u64,
    /// How long a tunnel whose link is lost keeps the service's connection open for the
    /// relay to resume it on a new link, seconds (PROTOCOL.md §2e); 0 turns resumable
    /// tunnels off (the agent does not announce `resume`).
    pub tunnel_resume_secs: u64,
    /// The largest QUIC packet path-MTU discovery tries (UDP payload bytes); 1452, safe on
    /// the internet, unless the path is known to carry more.
    pub quic_mtu_max: u16,
    /// The congestion controller for what the agent sends over QUIC: `bbr` (ours, the
    /// default), `quinn-bbr`, `cubic` or `newreno` (docs/field.md compares them).
    pub quic_congestion: crate::quic::Congestion,
    /// This device's uuid.
    pub uuid: String,
    /// This device's key.
    pub key: Secret,
    /// CA (or pinned dev certificate) to verify the relay with; default: system roots.
    pub ca: Option<PathBuf>,
    /// Accept any relay certificate (development only).
    pub insecure_skip_verify: bool,
    /// The name to verify the relay's certificate against; default: the relay's host.
    pub server_name: Option<String>,
    /// Local ports tunnels may reach; empty means every port.
    pub allow_ports: Vec<u16>,
    /// The relay's API, for `authorized-keys`.
    pub api: Option<String>,
    /// QUIC keep-alive, ms: how long an idle link stays silent before the agent sends a
    /// PING. It holds the NAT's UDP binding open (25 s: below the 30 s that the shortest
    /// common UDP binding timeouts allow) and costs ~130 bytes each (docs/operations.md, "Liveness
    /// and data cost").
    pub keep_alive_ms: u64,
    /// QUIC idle timeout, ms: a relay silent this long is gone (the keep-alive and its
    /// answer's time to arrive). The link uses the smaller of this and the relay's.
    pub idle_timeout_ms: u64,
    /// TLS/TCP link keep-alive, ms: how long the link stays silent before the agent sends
    /// an HTTP/2 PING. TCP bindings in NATs and proxies last minutes, so this is set by
    /// how soon a vanished relay should be noticed, against ~230 bytes per PING.
    pub tcp_keep_alive_ms: u64,
    /// TLS/TCP link idle timeout, ms: a relay silent this long is gone.
    pub tcp_idle_timeout_ms: u64,
    /// Longest backoff between reconnect attempts, ms.
    pub max_backoff_ms: u64,
    /// `authorized-keys`: how long to wait for the relay, seconds.
    pub authorized_keys_timeout_secs: u64,
    /// `authorized-keys`: keep the last good answer per user here and serve it when the
    /// relay cannot be reached. Off by default: a cached key keeps working after it was
    /// removed in the cloud, for as long as the relay stays unreachable.
    pub authorized_keys_cache_dir: Option<PathBuf>,
    /// balenaOS's production behaviour: `fleet-members` lets every cloud user who may reach
    /// this device log in as `root` with their own keys (`authorized-keys root` returns
    /// them all, each commented with its owner's cloud username). `off` (the default): a
    /// cloud user's keys open only the local account of the same name.
    pub root_login: RootLogin,
    /// The account the browser terminal logs users in as, told to the relay in the hello;
    /// default: `root` with root logins on, otherwise each user's own cloud username.
    pub ssh_login: Option<String>,
    /// The local port of this device's sshd: tunnels to the SSH port 22222 (what
    /// `device ssh` and the browser terminal reach) connect here. Default 22222, as on
    /// balenaOS; 22 for an sshd in its stock place.
    pub ssh_port: u16,
    /// A file the agent keeps saying whether its link is up (`up RELAY TRANSPORT`,
    /// `down REASON` or `starting`), for `cloudlink healthcheck`.
    pub status_file: Option<PathBuf>,
}

/// Who may log in as `root` with cloud keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootLogin {
    /// Nobody: cloud keys open only the account named like the cloud user.
    #[default]
    Off,
    /// Every user who may reach this device (fleet members and admins).
    FleetMembers,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            relay: Vec::new(),
            transport: TransportChoice::Auto,
            quic_probe_secs: 45,
            tunnel_resume_secs: crate::resume::DEFAULT_RESUME_SECS,
            quic_mtu_max: crate::quic::MTU_MAX_DEFAULT,
            quic_congestion: crate::quic::Congestion::Bbr,
            uuid: String::new(),
            key: Secret::default(),
            ca: None,
            insecure_skip_verify: false,
            server_name: None,
            allow_ports: Vec::new(),
            api: None,
            keep_alive_ms: 25_000,
            idle_timeout_ms: 35_000,
            tcp_keep_alive_ms: 60_000,
            tcp_idle_timeout_ms: 70_000,
            max_backoff_ms: 60_000,
            authorized_keys_timeout_secs: 5,
            authorized_keys_cache_dir: None,
            root_login: RootLogin::Off,
            ssh_login: None,
            ssh_port: crate::proto::SSH_PORT,
            status_file: None,
        }
    }
}

/// Which device link the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP when no QUIC handshake completes within 3 s.
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl TransportChoice {
    /// As written in agent.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Quic => "quic",
            TransportChoice::Tcp => "tcp",
        }
    }
}

/// One `relay` entry: where, and which transports it may be reached with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySpec {
    /// `HOST:PORT`.
    pub addr: String,
    /// The scheme given, if any.
    pub only: Option<Transport>,
}

impl RelaySpec {
    /// Parses `HOST:PORT`, `quic://HOST:PORT` or `tcp://HOST:PORT`.
    pub fn parse(raw: &str) -> Result<RelaySpec, String> {
        let (only, addr) = match raw.split_once("://") {
            Some(("quic", rest)) => (Some(Transport::Quic), rest),
            Some(("tcp", rest)) => (Some(Transport::Tcp), rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "relay {raw}: unknown scheme {scheme}:// (use quic://, tcp:// or none)"
                ))
            }
            None => (None, raw),
        };
        let addr = addr.trim_end_matches('/');
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(format!("relay {raw} is not HOST:PORT")),
        }
        Ok(RelaySpec {
            addr: addr.to_owned(),
            only,
        })
    }

    /// The transports to try, in order, under `choice`.
    pub fn transports(&self, choice: TransportChoice) -> Vec<Transport> {
        let allowed = |t| self.only.is_none_or(|only| only == t);
        let wanted: &[Transport] = match choice {
            TransportChoice::Auto => &[Transport::Quic, Transport::Tcp],
            TransportChoice::Quic => &[Transport::Quic],
            TransportChoice::Tcp => &[Transport::Tcp],
        };
        wanted.iter().copied().filter(|t| allowed(*t)).collect()
    }
}

/// Flags and env for `cloudlink agent`; each overrides the file when given. They serialize
/// under [`AgentConfig`]'s keys, only those given, for [`crate::overlay::layer`].
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct AgentArgs {
    /// TOML config [default: /etc/cloudlink/agent.toml when it exists].
    #[arg(long, global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Relay HOST:PORT, quic://HOST:PORT or tcp://HOST:PORT (repeatable; tried in turn).
    #[arg(long = "relay")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relay: Vec<String>,
    /// Device link: auto (QUIC, else TLS over TCP), quic or tcp [default: auto].
    #[arg(long, env = "CLOUDLINK_TRANSPORT")]
    pub transport: Option<TransportChoice>,
    /// Largest QUIC packet to probe for, 1200-65527; safe on the internet [default: 1452].
    #[arg(long, env = "CLOUDLINK_QUIC_MTU_MAX")]
    pub quic_mtu_max: Option<u16>,
    /// Congestion controller for what the agent sends over QUIC [default: bbr].
    #[arg(long, env = "CLOUDLINK_QUIC_CONGESTION")]
    pub quic_congestion: Option<crate::quic::Congestion>,
    /// Device uuid.
    #[arg(long, env = "CLOUDLINK_DEVICE_UUID")]
    pub uuid: Option<String>,
    /// Device key.
    #[arg(long, env = "CLOUDLINK_DEVICE_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// CA or pinned certificate (PEM) to verify the relay with.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Accept any relay certificate (development only).
    #[arg(long)]
    #[serde(skip_serializing_if = "crate::overlay::is_false")]
    pub insecure_skip_verify: bool,
    /// Name to verify the relay certificate against [default: the relay's host].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Local port tunnels may reach (repeatable) [default: every port].
    #[arg(long = "allow-port")]
    #[serde(rename = "allow_ports", skip_serializing_if = "Vec::is_empty")]
    pub allow_port: Vec<u16>,
    /// The relay's API URL (for authorized-keys).
    #[arg(long)]
    pub api: Option<String>,
    /// Keep the link's state in this file, for `cloudlink healthcheck`.
    #[arg(long, global = true, env = "CLOUDLINK_AGENT_STATUS_FILE")]
    pub status_file: Option<PathBuf>,
}

/// Errors loading the agent's configuration.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// A required setting is missing or invalid.
    #[error("{0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Layers the file, env and flags.
    pub fn load(args: &AgentArgs) -> Result<AgentConfig, AgentConfigError> {
        let file = match &args.config {
            Some(path) => AgentConfig::read_table(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => {
                AgentConfig::read_table(Path::new(DEFAULT_CONFIG))?
            }
            None => toml::Table::new(),
        };
        crate::overlay::layer(file, args).map_err(AgentConfigError::Invalid)
    }

    /// A config file as a table, checked against these settings first so that a mistake
    /// is reported with its line and column.
    fn read_table(path: &Path) -> Result<toml::Table, AgentConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |source| AgentConfigError::Parse {
            path: path.to_owned(),
            source,
        };
        toml::from_str::<AgentConfig>(&text).map_err(parse)?;
        toml::from_str(&text).map_err(parse)
    }

    /// Checks what running the agent needs.
    pub fn validate_for_agent(&self) -> Result<(), AgentConfigError> {
        self.validate_identity()?;
        if self.relay.is_empty() {
            return Err(AgentConfigError::Invalid(
                "no relay given (--relay HOST:PORT or `relay` in the config)".into(),
            ));
        }
        for relay in &self.relay {
            let spec = RelaySpec::parse(relay).map_err(AgentConfigError::Invalid)?;
            if spec.transports(self.transport).is_empty() {
                return Err(AgentConfigError::Invalid(format!(
                    "relay {relay} cannot be reached with transport {}",
                    self.transport.as_str()
                )));
            }
        }
        if !crate::quic::MTU_MAX_RANGE.contains(&self.quic_mtu_max) {
            return Err(AgentConfigError::Invalid(
                "quic_mtu_max must be between 1200 and 65527".into(),
            ));
        }
        if self.ssh_port == 0 {
            return Err(AgentConfigError::Invalid(
                "ssh_port must be a port (1-65535)".into(),
            ));
        }
        if self.quic_probe_secs == 0 {
            return Err(AgentConfigError::Invalid(
                "quic_probe_secs must be positive".into(),
            ));
        }
        if self.ca.is_some() && self.insecure_skip_verify {
            return Err(AgentConfigError::Invalid(
                "give either a CA file or --insecure-skip-verify, not both".into(),
            ));
        }
        if self.keep_alive_ms == 0 || self.keep_alive_ms >= self.idle_timeout_ms {
            return Err(AgentConfigError::Invalid(
                "keep_alive_ms must be positive and below idle_timeout_ms".into(),
            ));
        }
        if self.tcp_keep_alive_ms == 0 || self.tcp_keep_alive_ms >= self.tcp_idle_timeout_ms {
            return Err(AgentConfigError::Invalid(
                "tcp_keep_alive_ms must be positive and below tcp_idle_timeout_ms".into(),
            ));
        }
        Ok(())
    }

    /// The account this device's sshd logs users in as, for the hello's `ssh_login`.
    pub fn advertised_login(&self) -> Option<String> {
        match (&self.ssh_login, self.root_login) {
            (Some(login), _) => Some(login.clone()),
            (None, RootLogin::FleetMembers) => Some("root".to_owned()),
            (None, RootLogin::Off) => None,
        }
    }

    /// Checks the device identity.
    pub fn validate_identity(&self) -> Result<(), AgentConfigError> {
        if self
            .ssh_login
            .as_deref()
            .is_some_and(|l| !crate::proto::messages::is_valid_login(l))
        {
            return Err(AgentConfigError::Invalid(
                "ssh_login must be an account name (a-z, 0-9, _ and -, up to 32)".into(),
            ));
        }
        if crate::proto::device_uuid(&self.uuid).is_none() {
            return Err(AgentConfigError::Invalid(
                "the device uuid (--uuid or CLOUDLINK_DEVICE_UUID) must be 32 hex characters"
                    .into(),
            ));
        }
        if self.key.0.is_empty() {
            return Err(AgentConfigError::Invalid(
                "the device key (--key or CLOUDLINK_DEVICE_KEY) is missing".into(),
            ));
        }
        Ok(())
    }

    /// Which relay certificates to trust: the CA file, nothing (insecure), or the system's.
    pub fn trust(&self) -> crate::tls_client::Trust<'_> {
        use crate::tls_client::Trust;
        match (&self.ca, self.insecure_skip_verify) {
            (Some(ca), _) => Trust::CaFile(ca),
            (None, true) => Trust::Insecure,
            (None, false) => Trust::System,
        }
    }

    /// The local port a tunnel to `port` connects to: [`AgentConfig::ssh_port`] for the
    /// SSH port, otherwise the same port.
    pub fn local_port(&self, port: u16) -> u16 {
        if port == crate::proto::SSH_PORT {
            self.ssh_port
        } else {
            port
        }
    }

    /// Whether tunnels may reach `port`.
    pub fn allows(&self, port: u16) -> bool {
        self.allow_ports.is_empty() || self.allow_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_entries_name_their_transports() {
        let bare = RelaySpec::parse("relay.example.com:4433").unwrap();
        assert_eq!(
            bare.transports(TransportChoice::Auto),
            vec![Transport::Quic, Transport::Tcp]
        );
        assert_eq!(bare.transports(TransportChoice::Tcp), vec![Transport::Tcp]);
        let tcp = RelaySpec::parse("tcp://[::1]:443").unwrap();
        assert_eq!(tcp.addr, "[::1]:443");
        assert_eq!(tcp.transports(TransportChoice::Auto), vec![Transport::Tcp]);
        assert!(tcp.transports(TransportChoice::Quic).is_empty());
        let quic = RelaySpec::parse("quic://10.0.0.1:4433").unwrap();
        assert_eq!(
            quic.transports(TransportChoice::Auto),
            vec![Transport::Quic]
        );
        for bad in ["http://x:1", "x", "tcp://x", "quic://:4433", "x:port"] {
            assert!(RelaySpec::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn quic_mtu_max_is_range_checked() {
        for (mtu, ok) in [(1199, false), (1200, true), (8952, true), (65528, false)] {
            let config = AgentConfig {
                relay: vec!["relay.example.com:4433".into()],
                uuid: "0123456789abcdef0123456789abcdef".into(),
                key: Secret("k".into()),
                quic_mtu_max: mtu,
                ..AgentConfig::default()
            };
            let err = config.validate_for_agent().err().map(|e| e.to_string());
            assert_eq!(err.is_none(), ok, "quic_mtu_max {mtu}: {err:?}");
            if let Some(err) = err {
                assert!(err.contains("quic_mtu_max"), "{err}");
            }
        }
    }

    #[test]
    fn every_default_a_flag_states_is_the_declared_one() {
        let load = |args: &AgentArgs| AgentConfig::load(args).map_err(|e| e.to_string());
        let prose = ["config", "server-name", "allow-port"];
        let checked = crate::overlay::check_stated_defaults(load, &prose);
        assert!(checked >= 3, "only {checked} flags state a default");
    }
}

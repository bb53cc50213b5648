//! `cloudlink healthcheck`: exits 0 when the relay or agent of this host (or container) is
//! healthy, 1 with one line saying why not. It is the image's `HEALTHCHECK`, so it needs
//! nothing but the binary and reads the same settings (flags aside: env and files) as the
//! process it checks.
//!
//! - relay: `GET /readyz` on the plain API listener, and on the TLS API listener when that
//!   is on, verifying the relay's own certificate (TLS aware: a broken certificate fails
//!   the check);
//! - agent: the link state the agent keeps in its status file (`--status-file`) is `up`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, FromArgMatches, Parser};

use crate::agent::{AgentArgs, AgentConfig};
#[cfg(feature = "relay")]
use crate::config::{RelayArgs, RelayConfig};

/// Which process to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The agent when its status file exists, else the relay.
    Auto,
    /// The relay.
    Relay,
    /// The device agent.
    Agent,
}

/// `cloudlink healthcheck [ROLE]`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// What to check.
    #[arg(value_enum, default_value = "auto")]
    pub role: Role,
    /// Name to verify the relay's certificate against on the TLS API [default: the first
    /// `--tls-name`, else localhost, which the dev certificate carries].
    #[arg(long, env = "CLOUDLINK_HEALTHCHECK_NAME")]
    pub server_name: Option<String>,
}

/// How long the whole check may take.
#[cfg_attr(not(feature = "relay"), allow(dead_code))]
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the check; prints what it found.
pub async fn run(args: HealthArgs) -> Result<()> {
    let agent = AgentConfig::load(&from_env::<AgentArgs>()?)?;
    let role = match args.role {
        Role::Auto if agent.status_file.as_ref().is_some_and(|p| p.exists()) => Role::Agent,
        Role::Auto => Role::Relay,
        role => role,
    };
    match role {
        Role::Agent => {
            let path = agent
                .status_file
                .ok_or_else(|| anyhow!("the agent has no status file (--status-file)"))?;
            let line = agent_status(&path)?;
            println!("agent: {line}");
            Ok(())
        }
        #[cfg(not(feature = "relay"))]
        _ => bail!("this is the agent build of cloudlink: it has no relay to check"),
        #[cfg(feature = "relay")]
        _ => {
            let config = RelayConfig::load(&from_env::<RelayArgs>()?)?;
            let checked =
                tokio::time::timeout(TIMEOUT, relay_role::relay(&config, args.server_name))
                    .await
                    .map_err(|_| anyhow!("no answer within {TIMEOUT:?}"))??;
            println!("relay: {checked}");
            Ok(())
        }
    }
}

/// Settings from the environment alone (and the files they name), as the checked process
/// would read them.
fn from_env<A: Args + FromArgMatches>() -> Result<A> {
    let parsed =
        Wrap::<A>::try_parse_from(["cloudlink"]).context("settings from the environment")?;
    Ok(parsed.inner)
}

/// A parser of nothing but `A`'s flags, to fill them from the environment.
#[derive(clap::Parser)]
struct Wrap<A: Args> {
    #[command(flatten)]
    inner: A,
}

/// The agent's status line, if it says `up`.
pub fn agent_status(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the agent status file {}", path.display()))?;
    let line = text.lines().next().unwrap_or_default().trim().to_owned();
    match line.split_whitespace().next() {
        Some("up") => Ok(line),
        _ if line.is_empty() => bail!("agent status file {} is empty", path.display()),
        _ => bail!("agent link is not up: {line}"),
    }
}

/// The relay's side of the check (the full build only).
#[cfg(feature = "relay")]
mod relay_role {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::path::PathBuf;

    use anyhow::{anyhow, bail, Context, Result};

    use super::TIMEOUT;
    use crate::config::RelayConfig;
    use crate::tls_client::{self, Trust};

    /// The address to reach a listener bound at `bound` from this host.
    pub fn local(bound: SocketAddr) -> SocketAddr {
        let ip = match bound.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, bound.port())
    }

    pub async fn relay(config: &RelayConfig, server_name: Option<String>) -> Result<String> {
        let plain = format!("http://{}/readyz", local(config.api_listen));
        ready(&plain, Trust::System, None).await?;
        let Some(tls) = config.api_tls_listen.addr() else {
            return Ok(format!("ready ({plain})"));
        };
        let cert: PathBuf = config
            .tls_cert
            .clone()
            .unwrap_or_else(|| config.data_dir.join(crate::config::DEV_CERT));
        let name = server_name
            .or_else(|| config.tls_names.first().cloned())
            .unwrap_or_else(|| "localhost".into());
        let url = format!("https://{name}:{}/readyz", tls.port());
        ready(&url, Trust::CaFile(&cert), Some(local(tls))).await?;
        Ok(format!("ready ({plain}, {url})"))
    }

    /// `GET url` answers 200; `at` connects there whatever the URL's host says.
    async fn ready(url: &str, trust: Trust<'_>, at: Option<SocketAddr>) -> Result<()> {
        let mut builder = tls_client::http_client_builder(url, trust, TIMEOUT)?;
        if let (Some(addr), Some(host)) = (at, crate::addr::url(url).map(|u| u.host)) {
            builder = builder.resolve(host, addr);
        }
        let client = builder.build().context("HTTP client")?;
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| anyhow!("{url}: {}", tls_client::chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{url}: {status} {}", body.trim());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_up_line_is_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        std::fs::write(&path, "up 127.0.0.1:4433 quic\n").unwrap();
        assert_eq!(agent_status(&path).unwrap(), "up 127.0.0.1:4433 quic");
        for bad in ["starting\n", "down connection refused\n", ""] {
            std::fs::write(&path, bad).unwrap();
            assert!(agent_status(&path).is_err(), "{bad:?}");
        }
        assert!(agent_status(&dir.path().join("missing")).is_err());
    }

    #[cfg(feature = "relay")]
    #[test]
    fn listeners_on_every_address_are_reached_on_loopback() {
        use relay_role::local;
        assert_eq!(
            local("0.0.0.0:8080".parse().unwrap()).to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            local("[::]:8443".parse().unwrap()).to_string(),
            "[::1]:8443"
        );
        assert_eq!(
            local("10.0.0.5:80".parse().unwrap()).to_string(),
            "10.0.0.5:80"
        );
    }
}

//! `cloudlink device tunnel` (local listeners) and `cloudlink proxy` (stdin/stdout bridge).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::settings::Settings;
use super::{connect, resolve, ApiClient};
use crate::forward::{Counters, Side};
use crate::link::End;
use crate::splice;

/// One `-p` spec: which device port, and where to listen for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The device port.
    pub remote: u16,
    /// The local address to listen on.
    pub local: SocketAddr,
}

/// Parses the balena CLI's forms: `R`, `R:L`, `R:ADDR`, `R:ADDR:L`.
pub fn parse_spec(spec: &str) -> Result<PortSpec> {
    let port = |s: &str| -> Result<u16> {
        match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(anyhow!("{s:?} in -p {spec} is not a port (1-65535)")),
        }
    };
    // A local port of 0 asks the OS for a free one; the listener line shows which.
    let local_port = |s: &str| -> Result<u16> {
        s.parse::<u16>()
            .map_err(|_| anyhow!("{s:?} in -p {spec} is not a port (0-65535)"))
    };
    let addr = |s: &str| -> Result<IpAddr> {
        let s = if s == "localhost" { "127.0.0.1" } else { s };
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| anyhow!("{s:?} in -p {spec} is not an IP address"))
    };
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let parts: Vec<&str> = spec.split(':').collect();
    let (remote, ip, local) = match parts.as_slice() {
        [r] => (port(r)?, loopback, port(r)?),
        [r, x] if x.chars().all(|c| c.is_ascii_digit()) => (port(r)?, loopback, local_port(x)?),
        [r, a] => (port(r)?, addr(a)?, port(r)?),
        [r, a, l] => (port(r)?, addr(a)?, local_port(l)?),
        _ => return Err(anyhow!("-p {spec}: expected R, R:L, R:ADDR or R:ADDR:L")),
    };
    Ok(PortSpec {
        remote,
        local: SocketAddr::new(ip, local),
    })
}

/// Listens on every spec's local address and tunnels each connection to the device. The
/// login, the device (uuid, short uuid or name), that it is online and that each port is
/// allowed are checked first: a tunnel that cannot work never starts listening.
pub async fn tunnel(target: &str, specs: &[String]) -> Result<()> {
    let settings = Arc::new(Settings::load()?);
    let specs = specs
        .iter()
        .map(|s| parse_spec(s))
        .collect::<Result<Vec<_>>>()?;
    if specs.is_empty() {
        return Err(anyhow!("give at least one -p PORT spec"));
    }
    let client = Arc::new(ApiClient::from_settings(&settings)?);
    let remotes: Vec<u16> = specs.iter().map(|s| s.remote).collect();
    let device = resolve::reachable(&client, target, &remotes).await?;
    let uuid: Arc<str> = Arc::from(device.uuid.as_str());
    let mut listeners = Vec::new();
    for spec in specs {
        let listener = TcpListener::bind(spec.local)
            .await
            .with_context(|| format!("cannot listen on {}", spec.local))?;
        let local = listener.local_addr()?;
        println!("Listening on {local} => {uuid}:{}", spec.remote);
        listeners.push((listener, spec.remote));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, remote) in listeners {
        let target = Target {
            settings: settings.clone(),
            client: client.clone(),
            uuid: uuid.clone(),
            port: remote,
        };
        tasks.spawn(accept_loop(listener, target));
    }
    tokio::select! {
        done = tasks.join_next() => match done {
            Some(Ok(Err(e))) => Err(e),
            _ => Ok(()),
        },
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Where one listener's connections go.
#[derive(Clone)]
struct Target {
    settings: Arc<Settings>,
    client: Arc<ApiClient>,
    uuid: Arc<str>,
    port: u16,
}

async fn accept_loop(listener: TcpListener, target: Target) -> Result<()> {
    let local = listener.local_addr()?;
    let (uuid, remote) = (target.uuid.clone(), target.port);
    loop {
        let (client, peer) = listener.accept().await.context("accept failed")?;
        let _ = client.set_nodelay(true);
        // Until both directions end cleanly, a failure (a refused open included) or this
        // process dying resets the local client instead of ending it with a FIN that reads
        // like a complete, empty transfer (forward.rs explains the linger trick). Armed at
        // once: the client already sees the connection.
        crate::forward::arm_reset(&client);
        println!("{peer} => {local} ===> {uuid}:{remote}");
        let target = target.clone();
        tokio::spawn(async move {
            match bridge(client, &target).await {
                Ok((up, down)) => println!("{peer} closed: {up} bytes up, {down} down"),
                // One failed connection does not stop the tunnel.
                Err(e) => eprintln!("{peer} => {}:{}: {e:#}", target.uuid, target.port),
            }
        });
    }
}

/// Joins one local client to the device through the relay's proxy, with the relay's own
/// join ([`crate::splice::join`]): half-close both ways, bytes counted, and over a
/// plain-TCP proxy the bytes move inside the kernel (`splice`: the CLI's CPU per GB fell
/// from 0.41-0.66 s to 0.27-0.37); over TLS they are copied. No idle timeout of its own:
/// the relay's ends an idle tunnel, which arrives here as a reset. Returns what moved.
async fn bridge(mut client: TcpStream, target: &Target) -> Result<(u64, u64)> {
    let device = match connect::open(&target.settings, &target.uuid, target.port, false).await {
        Ok(device) => device,
        // The client, armed on accept, is reset when it is dropped.
        Err(e) => return Err(resolve::diagnose(&target.client, e).await),
    };
    // The relay's side likewise, from here until an orderly end.
    crate::forward::arm_reset(device.tcp());
    let counters = Counters::default();
    let never = tokio_util::sync::CancellationToken::new();
    let end = match device.into_plain() {
        Ok((mut relay, early)) => {
            if !early.is_empty() {
                client.write_all(&early).await.context("tunnel broke")?;
                counters.down.fetch_add(early.len() as u64, Relaxed);
            }
            let (mut r, mut w) = client.into_split();
            let end = splice::join(
                (&mut r, &mut w),
                splice::owned_halves,
                Side::User,
                &mut relay,
                &counters,
                &never,
                None,
            )
            .await;
            if end == End::Closed {
                crate::forward::disarm_reset(r.as_ref());
                crate::forward::disarm_reset(&relay);
            } else {
                // Dropped as they are, the halves would send a FIN first (tokio shuts
                // down the write half on drop), which reads like a complete answer.
                crate::forward::reset_tcp(r, w);
            }
            end
        }
        Err(device) => {
            let (mut r, mut w) = tokio::io::split(device);
            let end = splice::join(
                (&mut r, &mut w),
                splice::never_plain,
                Side::Device,
                &mut client,
                &counters,
                &never,
                None,
            )
            .await;
            if end == End::Closed {
                crate::forward::disarm_reset(&client);
                crate::forward::disarm_reset(r.unsplit(w).tcp());
            }
            end
        }
    };
    if end != End::Closed {
        // Both sockets stayed armed: dropping them reset them.
        return Err(anyhow!("tunnel broke ({})", end.reason()));
    }
    Ok((counters.up.load(Relaxed), counters.down.load(Relaxed)))
}

/// Bridges stdin/stdout to `uuid:port` (for ssh's `ProxyCommand`), with half-close: stdin's
/// EOF half-closes the tunnel and the device's answer still arrives. A refusal is explained
/// on stderr and, when `report` is given, written there too for `device ssh` to repeat
/// after ssh's own complaint. `no_proxy`: ignore `HTTPS_PROXY`.
pub async fn proxy(
    uuid: &str,
    port: u16,
    no_proxy: bool,
    report: Option<&std::path::Path>,
) -> Result<()> {
    let settings = Settings::load()?;
    let uuid = normalise_uuid(uuid)?;
    let device = match connect::open(&settings, &uuid, port, no_proxy).await {
        Ok(device) => device,
        Err(e) => {
            let e = match ApiClient::from_settings(&settings) {
                Ok(client) => resolve::diagnose(&client, e).await,
                Err(_) => e,
            };
            if let Some(path) = report {
                let _ = std::fs::write(path, format!("{e:#}"));
            }
            return Err(e);
        }
    };
    let (mut from_device, mut to_device) = tokio::io::split(device);
    let up = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                return to_device.shutdown().await;
            }
            to_device.write_all(&buf[..n]).await?;
        }
    };
    let up = tokio::spawn(up);
    let mut stdout = tokio::io::stdout();
    let copied = tokio::io::copy(&mut from_device, &mut stdout).await;
    stdout.flush().await?;
    // The device side is done: nothing more can be answered, so stop reading stdin too.
    up.abort();
    copied.map(drop).context("tunnel broke")
}

/// A uuid as the relay expects it: 32 hex characters, lowercase.
pub fn normalise_uuid(uuid: &str) -> Result<String> {
    crate::proto::device_uuid(uuid).ok_or_else(|| {
        anyhow!("{uuid:?} is not a device uuid (32 hex characters; see `cloudlink device list`)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_forms() {
        let s = parse_spec("22222").unwrap();
        assert_eq!(
            (s.remote, s.local),
            (22222, "127.0.0.1:22222".parse().unwrap())
        );
        let s = parse_spec("22222:4321").unwrap();
        assert_eq!(
            (s.remote, s.local),
            (22222, "127.0.0.1:4321".parse().unwrap())
        );
        let s = parse_spec("8080:0.0.0.0").unwrap();
        assert_eq!((s.remote, s.local), (8080, "0.0.0.0:8080".parse().unwrap()));
        let s = parse_spec("8080:127.0.0.2:9000").unwrap();
        assert_eq!(
            (s.remote, s.local),
            (8080, "127.0.0.2:9000".parse().unwrap())
        );
        let s = parse_spec("22:localhost:0").unwrap();
        assert_eq!((s.remote, s.local), (22, "127.0.0.1:0".parse().unwrap()));
        let s = parse_spec("22:localhost:x").unwrap_err();
        assert!(s.to_string().contains("not a port"));
        assert!(parse_spec("0").is_err());
        assert!(parse_spec("70000").is_err());
        assert!(parse_spec("22:nonsense").is_err());
        assert!(parse_spec("1:2:3:4").is_err());
    }
}

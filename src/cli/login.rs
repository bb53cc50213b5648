//! `cloudlink login`, `logout` and `whoami`: one saved login per profile.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use reqwest::Method;

use super::settings::{self, Settings};
use super::{ApiClient, ApiFailure, Output};
use crate::proto::api::{EndpointsView, UserView};

/// `cloudlink login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The relay's API: a host (HTTPS on port 8443), or a URL such as
    /// https://relay.example.com:8443. An http:// URL sends the key unencrypted
    /// [default: the profile's relay, when logging in again].
    #[arg(long)]
    pub api: Option<String>,
    /// The relay's CONNECT proxy, HOST:PORT [default: the API host, port 3129 over TLS for
    /// an https API, 3128 for an http one].
    #[arg(long)]
    pub proxy: Option<String>,
    /// The proxy address is a TLS listener [default: yes when --proxy is not given and the
    /// API is https].
    #[arg(long)]
    pub proxy_tls: bool,
    /// CA or pinned certificate (PEM) to verify the relay's API and TLS proxy with
    /// [default: the system's roots].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The API key, or `-` to read it from stdin [default: $CLOUDLINK_API_KEY, else asked
    /// for on a terminal].
    #[arg(long, conflicts_with = "key_file")]
    pub key: Option<String>,
    /// A file holding the API key (e.g. the relay's admin.key).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// Where the key comes from: the flag or environment, stdin, a file, or a prompt.
fn read_key(args: &LoginArgs) -> Result<String> {
    let key = match (&args.key, &args.key_file) {
        (Some(key), _) if key == "-" => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the API key from stdin")?;
            line
        }
        (Some(key), _) => key.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?,
        // The environment only when no flag says otherwise (so it never conflicts with one).
        (None, None) if std::env::var_os("CLOUDLINK_API_KEY").is_some() => {
            std::env::var("CLOUDLINK_API_KEY")
                .map_err(|_| anyhow!("CLOUDLINK_API_KEY is not valid UTF-8"))?
        }
        (None, None) if std::io::stdin().is_terminal() => prompt("API key: ")?,
        (None, None) => {
            return Err(anyhow!(
                "no API key: give --key KEY, --key - (read from stdin), --key-file FILE or \
                 CLOUDLINK_API_KEY, or run login on a terminal to be asked"
            ))
        }
    };
    let key = key.trim().to_owned();
    if key.is_empty() {
        return Err(anyhow!("the API key is empty"));
    }
    Ok(key)
}

/// Asks on the terminal without echoing what is typed.
fn prompt(question: &str) -> Result<String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("cannot open the terminal to ask for the API key")?;
    let saved = tcgetattr(&tty).context("cannot read the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    quiet.local_modes.insert(LocalModes::ECHONL);
    // Echo off before the question shows, so nothing typed after it is echoed.
    tcsetattr(&tty, OptionalActions::Flush, &quiet)
        .context("cannot turn off the terminal's echo")?;
    let asked = tty
        .write_all(question.as_bytes())
        .and_then(|()| tty.flush());
    let mut line = String::new();
    let read = asked.and_then(|()| std::io::BufReader::new(&tty).read_line(&mut line));
    let restored = tcsetattr(&tty, OptionalActions::Flush, &saved);
    read.context("cannot read the API key from the terminal")?;
    restored.context("cannot restore the terminal's echo")?;
    Ok(line)
}

/// Checks the key against the API and saves the login in the selected profile.
pub async fn login(args: LoginArgs, out: Output) -> Result<()> {
    let previous = Settings::load_profile(settings::profile())?;
    let api = match (&args.api, &previous) {
        (Some(api), _) => normalise_api(api)?,
        (None, Some(old)) => old.api.clone(),
        (None, None) => {
            return Err(anyhow!(
                "give the relay's API with --api (a host, or a URL such as \
                 https://relay.example.com:8443)"
            ))
        }
    };
    let key = read_key(&args)?;
    let tls_api = api.starts_with("https://");
    if !tls_api {
        eprintln!(
            "warning: {api} is plain HTTP: your API key crosses the network unencrypted. \
             Use https:// (the relay serves HTTPS on port 8443) unless a TLS-terminating \
             proxy sits in between."
        );
    }
    let same_relay = previous.as_ref().filter(|old| old.api == api);
    let ca = args
        .ca
        .or_else(|| same_relay.and_then(|old| old.ca.clone()));
    let client = ApiClient::new(&api, &key, ca.as_deref(), false)?;
    let me: UserView = client.call(Method::GET, "/v1/me", None).await?;
    // Where the relay says its proxy and gateway are; a relay from before it said so
    // answers 404, and its proxy is guessed from the API's host as before.
    let endpoints = match client
        .call::<EndpointsView>(Method::GET, "/v1/endpoints", None)
        .await
    {
        Ok(endpoints) => Some(endpoints),
        Err(e) if ApiFailure::status_of(&e) == Some(reqwest::StatusCode::NOT_FOUND) => None,
        // With the proxy given, the login does not depend on the answer.
        Err(e) if args.proxy.is_some() => {
            eprintln!("warning: the relay did not say where its SSH gateway is: {e:#}");
            None
        }
        Err(e) => return Err(e.context("cannot ask the relay where its proxy is")),
    };
    let discovered = endpoints.as_ref().and_then(|e| {
        let tls = e.proxy_tls.clone().map(|p| (p, true));
        let plain = e.proxy.clone().map(|p| (p, false));
        // TLS for an https API; the plain proxy beside a plain API, as before.
        if tls_api {
            tls.or(plain)
        } else {
            plain.or(tls)
        }
    });
    let (proxy, proxy_tls) = match (args.proxy, discovered, same_relay) {
        (Some(p), _, _) => (p, args.proxy_tls),
        (None, Some((p, tls)), _) => (p, tls),
        // Logging in again to the same relay keeps the proxy it was given.
        (None, None, Some(old)) if old.proxy.is_some() => (
            old.proxy.clone().unwrap_or_default(),
            old.proxy_tls || args.proxy_tls,
        ),
        (None, None, _) => (default_proxy(&api, tls_api)?, tls_api || args.proxy_tls),
    };
    let gateway = endpoints.and_then(|e| e.ssh_gateway);
    let settings = Settings {
        api,
        proxy: Some(proxy),
        proxy_tls,
        ca,
        key,
        username: Some(me.username.clone()),
        gateway: gateway.as_ref().map(|g| g.address.clone()),
        gateway_host_key: gateway.map(|g| g.host_key),
        // A setting the person made by hand survives logging in again.
        service_command: previous
            .as_ref()
            .and_then(|old| old.service_command.clone()),
    };
    let (path, replaced) = settings.save()?;
    if let Some(old) = replaced.filter(|old| out == Output::Table && *old != settings) {
        eprintln!(
            "replaced profile {}'s login ({} at {}); other relays can have profiles of their \
             own: --profile NAME",
            settings::profile(),
            old.username.as_deref().unwrap_or("?"),
            old.api
        );
    }
    let (mut json, mut rows) = session(&me, &settings);
    json["saved_to"] = serde_json::json!(path);
    rows.push(("saved to", path.display().to_string()));
    out.record(&json, &rows)
}

/// Forgets the selected profile's login.
pub fn logout(out: Output) -> Result<()> {
    let profile = settings::profile();
    let old = Settings::remove()?;
    let message = match &old {
        Some(old) => format!(
            "logged out of {} (profile {profile}); the API key itself still works until \
             revoked (`cloudlink api-key revoke`)",
            old.api
        ),
        None => format!("profile {profile} was not logged in"),
    };
    match out {
        Output::Json => out.record(
            &serde_json::json!({ "profile": profile, "logged_out": old.is_some() }),
            &[],
        ),
        Output::Table => {
            println!("{message}");
            Ok(())
        }
    }
}

/// The API base URL: a bare host (or HOST:PORT) means HTTPS, on port 8443 unless given.
fn normalise_api(api: &str) -> Result<String> {
    let api = api.trim().trim_end_matches('/');
    if api.is_empty() {
        return Err(anyhow!("--api is empty"));
    }
    if api.contains("://") {
        if !(api.starts_with("https://") || api.starts_with("http://")) {
            return Err(anyhow!(
                "--api must be an https:// (or http://) URL or a host"
            ));
        }
        return Ok(api.to_owned());
    }
    let has_port = match api.rsplit_once(':') {
        Some((host, port)) => {
            port.chars().all(|c| c.is_ascii_digit()) && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    Ok(if has_port {
        format!("https://{api}")
    } else {
        format!("https://{api}:8443")
    })
}

/// `https://host:8443` → `host:3129` (TLS), `http://host:8080` → `host:3128`.
fn default_proxy(api: &str, tls: bool) -> Result<String> {
    let url = crate::addr::url(api)
        .ok_or_else(|| anyhow!("--api must be a URL such as http://relay.example.com:8080"))?;
    Ok(crate::addr::join(url.host, if tls { 3129 } else { 3128 }))
}

/// Shows the logged-in user, the relay's addresses and the profile.
pub async fn whoami(out: Output) -> Result<()> {
    let settings = Settings::load()?;
    let client = ApiClient::from_settings(&settings)?;
    let me: UserView = client.call(Method::GET, "/v1/me", None).await?;
    let (json, rows) = session(&me, &settings);
    out.record(&json, &rows)
}

/// Who is logged in where, in which profile: `whoami`'s record, and `login`'s before the
/// file it saved.
fn session(me: &UserView, settings: &Settings) -> (serde_json::Value, Vec<(&'static str, String)>) {
    let proxy = settings.proxy.clone().unwrap_or_else(|| "-".into());
    let json = serde_json::json!({
        "username": me.username,
        "admin": me.admin,
        "profile": settings::profile(),
        "api": settings.api,
        "proxy": settings.proxy,
        "proxy_tls": settings.proxy_tls,
        "ssh_gateway": settings.gateway,
        "ssh_gateway_fingerprint": gateway_fingerprint(settings),
    });
    let rows = vec![
        ("username", me.username.clone()),
        ("admin", me.admin.to_string()),
        ("profile", settings::profile().to_owned()),
        ("api", settings.api.clone()),
        (
            "proxy",
            if settings.proxy_tls {
                format!("{proxy} (TLS)")
            } else {
                proxy
            },
        ),
        (
            "ssh gateway",
            match (&settings.gateway, gateway_fingerprint(settings)) {
                (Some(gateway), Some(fingerprint)) => format!("{gateway} ({fingerprint})"),
                (Some(gateway), None) => gateway.clone(),
                (None, _) => "-".into(),
            },
        ),
    ];
    (json, rows)
}

/// The saved gateway host key's SHA-256 fingerprint, as `ssh-keygen -l` prints it.
fn gateway_fingerprint(settings: &Settings) -> Option<String> {
    let key = settings.gateway_host_key.as_deref()?;
    let key = ssh_key::PublicKey::from_openssh(key).ok()?;
    Some(key.fingerprint(ssh_key::HashAlg::Sha256).to_string())
}

/// `cloudlink ssh-config`: an ssh_config snippet with which plain `ssh <uuid>.balena`
/// (and scp, sftp, rsync, VS Code, Ansible) goes through the relay's SSH gateway, with
/// the gateway's host key pinned as the relay gave it at login.
pub fn ssh_config() -> Result<()> {
    let settings = Settings::load()?;
    print!("{}", ssh_config_text(&settings, settings::profile())?);
    Ok(())
}

fn ssh_config_text(settings: &Settings, profile: &str) -> Result<String> {
    let (Some(gateway), Some(host_key)) = (&settings.gateway, &settings.gateway_host_key) else {
        return Err(anyhow!(
            "this profile knows no SSH gateway: the relay did not announce one at login \
             (it may run without --ssh-listen, or be older); log in again once it has one"
        ));
    };
    let user = settings
        .username
        .as_deref()
        .ok_or_else(|| anyhow!("this profile has no username; log in again"))?;
    let (host, Some(port)) = crate::addr::split(gateway) else {
        return Err(anyhow!(
            "the saved gateway address {gateway:?} is not HOST:PORT"
        ));
    };
    let alias = format!("cloudlink-{profile}");
    Ok(format!(
        "# cloudlink ssh-config, profile {profile}: `ssh <uuid>.balena` (or a short uuid or\n\
         # a device name, .balena) through the relay's SSH gateway, as {user}.\n\
         # Add it to ~/.ssh/config, or `Include` a file holding it.\n\
         Host {alias}\n\
         \x20 HostName {host}\n\
         \x20 Port {port}\n\
         \x20 User {user}\n\
         \x20 # The gateway's host key, as the relay's API gave it at login.\n\
         \x20 HostKeyAlias {alias}\n\
         \x20 KnownHostsCommand /bin/echo {alias} {host_key}\n\
         \x20 StrictHostKeyChecking yes\n\
         Host *.balena\n\
         \x20 User root\n\
         \x20 Port 22222\n\
         \x20 ProxyJump {alias}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssh_config_jumps_through_the_gateway_with_its_key_pinned() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O";
        let mut settings = Settings {
            api: "https://relay.example.com:8443".into(),
            proxy: None,
            proxy_tls: true,
            ca: None,
            key: "clk_x".into(),
            username: Some("alice".into()),
            gateway: Some("relay.example.com:22".into()),
            gateway_host_key: Some(key.into()),
            service_command: None,
        };
        let text = ssh_config_text(&settings, "work").unwrap();
        for line in [
            "Host cloudlink-work\n",
            "  HostName relay.example.com\n",
            "  Port 22\n",
            "  User alice\n",
            "  HostKeyAlias cloudlink-work\n",
            &format!("  KnownHostsCommand /bin/echo cloudlink-work {key}\n"),
            "  StrictHostKeyChecking yes\n",
            "Host *.balena\n",
            "  Port 22222\n",
            "  ProxyJump cloudlink-work\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(gateway_fingerprint(&settings)
            .unwrap()
            .starts_with("SHA256:"));
        settings.gateway = Some("[::1]:2222".into());
        let text = ssh_config_text(&settings, "work").unwrap();
        assert!(text.contains("  HostName ::1\n  Port 2222\n"), "{text}");
        settings.gateway = None;
        let e = ssh_config_text(&settings, "work").unwrap_err().to_string();
        assert!(e.contains("knows no SSH gateway"), "{e}");
    }

    #[test]
    fn default_proxy_uses_the_api_host() {
        assert_eq!(
            default_proxy("http://relay.example.com:8080", false).unwrap(),
            "relay.example.com:3128"
        );
        assert_eq!(
            default_proxy("https://relay.example.com/", true).unwrap(),
            "relay.example.com:3129"
        );
        assert_eq!(
            default_proxy("http://[::1]:8080", false).unwrap(),
            "[::1]:3128"
        );
        assert!(default_proxy("relay", true).is_err());
    }

    #[test]
    fn login_prefers_tls() {
        assert_eq!(
            normalise_api("relay.example.com").unwrap(),
            "https://relay.example.com:8443"
        );
        assert_eq!(
            normalise_api("127.0.0.1:9443").unwrap(),
            "https://127.0.0.1:9443"
        );
        assert_eq!(normalise_api("[::1]").unwrap(), "https://[::1]:8443");
        assert_eq!(normalise_api("[::1]:1").unwrap(), "https://[::1]:1");
        assert_eq!(
            normalise_api("http://relay:8080/").unwrap(),
            "http://relay:8080"
        );
        assert!(normalise_api("ftp://relay").is_err());
    }
}

//! The admin half of the CLI: login, users, API keys, fleets, members, devices, SSH keys.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::json;

use super::settings::Settings;
use super::{ApiClient, Output};
use crate::relay::api::devices::{DeviceView, RegisteredDevice, RotatedKey, TunnelView};
use crate::relay::api::fleets::{FleetView, MemberView};
use crate::relay::api::users::{
    ApiKeyView, CreatedApiKey, CreatedUser, ImportedSshKeys, SshKeyView, UserView,
};

/// `cloudlink login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The relay's API: a host (HTTPS on port 8443), or a URL such as
    /// https://relay.example.com:8443. An http:// URL sends the key unencrypted.
    #[arg(long)]
    pub api: String,
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
    /// The API key.
    #[arg(
        long,
        conflicts_with = "key_file",
        required_unless_present = "key_file"
    )]
    pub key: Option<String>,
    /// A file holding the API key (e.g. the relay's admin.key).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// Checks the key against the API and saves the login.
pub async fn login(args: LoginArgs, out: Output) -> Result<()> {
    let key = match (&args.key, &args.key_file) {
        (Some(key), _) => key.trim().to_owned(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .trim()
            .to_owned(),
        (None, None) => return Err(anyhow!("give --key or --key-file")),
    };
    let api = normalise_api(&args.api)?;
    let tls = api.starts_with("https://");
    if !tls {
        eprintln!(
            "warning: {api} is plain HTTP: your API key crosses the network unencrypted. \
             Use https:// (the relay serves HTTPS on port 8443) unless a TLS-terminating \
             proxy sits in between."
        );
    }
    let (proxy, proxy_tls) = match args.proxy {
        Some(p) => (p, args.proxy_tls),
        None => (default_proxy(&api, tls)?, tls || args.proxy_tls),
    };
    let client = ApiClient::new(&api, &key, args.ca.as_deref())?;
    let me: UserView = client.call(Method::GET, "/v1/me", None).await?;
    let settings = Settings {
        api,
        proxy: Some(proxy),
        proxy_tls,
        ca: args.ca,
        key,
        username: Some(me.username.clone()),
        // A setting the person made by hand survives logging in again.
        service_command: Settings::load().ok().and_then(|old| old.service_command),
    };
    let path = settings.save()?;
    out.record(
        &me,
        &[
            ("logged in as", me.username.clone()),
            ("saved to", path.display().to_string()),
        ],
    )
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
    let rest = api
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("--api must be a URL such as http://relay.example.com:8080"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    Ok(format!("{host}:{}", if tls { 3129 } else { 3128 }))
}

/// Shows the logged-in user and the relay they are logged in to.
pub async fn whoami(out: Output) -> Result<()> {
    let settings = Settings::load()?;
    let client = ApiClient::from_settings(&settings)?;
    let me: UserView = client.call(Method::GET, "/v1/me", None).await?;
    out.record(
        &me,
        &[
            ("username", me.username.clone()),
            ("admin", me.admin.to_string()),
            ("relay", settings.api.clone()),
        ],
    )
}

/// `cloudlink user …` (admins).
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user and print their first API key (shown once).
    Create {
        /// Login name.
        name: String,
        /// Make them an admin.
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    List,
    /// Delete a user with their keys and memberships.
    Rm {
        /// Login name.
        name: String,
    },
}

/// Runs a `user` command.
pub async fn user(cmd: UserCmd, out: Output) -> Result<()> {
    let client = ApiClient::from_settings(&Settings::load()?)?;
    match cmd {
        UserCmd::Create { name, admin } => {
            let body = json!({"username": name, "admin": admin});
            let u: CreatedUser = client.call(Method::POST, "/v1/users", Some(&body)).await?;
            out.record(
                &u,
                &[
                    ("username", u.username.clone()),
                    ("admin", u.admin.to_string()),
                    ("api key", u.api_key.clone()),
                ],
            )?;
            if out == Output::Table {
                eprintln!("The API key is shown only now; hand it to {name} safely.");
            }
            Ok(())
        }
        UserCmd::List => {
            let users: Vec<UserView> = client.call(Method::GET, "/v1/users", None).await?;
            out.list(&users, &["ID", "USERNAME", "ADMIN"], |u| {
                vec![u.id.to_string(), u.username.clone(), u.admin.to_string()]
            })
        }
        UserCmd::Rm { name } => {
            client
                .call_empty(Method::DELETE, &format!("/v1/users/{name}"))
                .await
        }
    }
}

/// `cloudlink api-key …`.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCmd {
    /// Create an API key and print it (shown once).
    Create {
        /// A label for it.
        name: String,
        /// Make it stop working after this long: 90s, 45m, 12h, 30d [default: never].
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
    },
    /// List your API keys.
    List,
    /// Revoke one of your API keys (effective at once).
    Revoke {
        /// The key's id (from `api-key list`).
        id: i64,
    },
}

/// Runs an `api-key` command.
pub async fn api_key(cmd: ApiKeyCmd, out: Output) -> Result<()> {
    let client = ApiClient::from_settings(&Settings::load()?)?;
    match cmd {
        ApiKeyCmd::Create { name, expires } => {
            let mut body = json!({"name": name});
            if let Some(secs) = expires {
                body["expires_in_secs"] = json!(secs);
            }
            let k: CreatedApiKey = client
                .call(Method::POST, "/v1/api-keys", Some(&body))
                .await?;
            out.record(
                &k,
                &[
                    ("id", k.id.to_string()),
                    ("name", k.name.clone()),
                    ("key", k.key.clone()),
                    (
                        "expires",
                        k.expires_at.clone().unwrap_or_else(|| "never".into()),
                    ),
                ],
            )
        }
        ApiKeyCmd::List => {
            let keys: Vec<ApiKeyView> = client.call(Method::GET, "/v1/api-keys", None).await?;
            out.list(
                &keys,
                &[
                    "ID",
                    "NAME",
                    "PREFIX",
                    "CREATED",
                    "LAST USED",
                    "EXPIRES",
                    "REVOKED",
                ],
                |k| {
                    vec![
                        k.id.to_string(),
                        k.name.clone(),
                        k.prefix.clone(),
                        k.created_at.clone(),
                        k.last_used_at.clone().unwrap_or_else(|| "-".into()),
                        k.expires_at.clone().unwrap_or_else(|| "never".into()),
                        k.revoked_at.clone().unwrap_or_else(|| "-".into()),
                    ]
                },
            )
        }
        ApiKeyCmd::Revoke { id } => {
            client
                .call_empty(Method::DELETE, &format!("/v1/api-keys/{id}"))
                .await
        }
    }
}

/// `cloudlink fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCmd {
    /// Create a fleet; you become its owner.
    Create {
        /// Fleet name.
        name: String,
        /// Only these device ports may be reached (repeatable) [default: every port].
        #[arg(long = "allow-port")]
        allow_ports: Vec<u16>,
    },
    /// List the fleets you can see.
    List,
    /// Replace a fleet's port allowlist (none = every port).
    Ports {
        /// Fleet name.
        name: String,
        /// Allowed ports.
        ports: Vec<u16>,
    },
    /// Delete a fleet with its devices.
    Rm {
        /// Fleet name.
        name: String,
    },
    /// Manage a fleet's members.
    #[command(subcommand)]
    Member(MemberCmd),
}

/// `cloudlink fleet member …`.
#[derive(Debug, Subcommand)]
pub enum MemberCmd {
    /// Add a member (or change their role).
    Add {
        /// Fleet name.
        fleet: String,
        /// User name.
        user: String,
        /// Make them an owner (manages members and devices).
        #[arg(long)]
        owner: bool,
    },
    /// Remove a member.
    Rm {
        /// Fleet name.
        fleet: String,
        /// User name.
        user: String,
    },
    /// List members.
    List {
        /// Fleet name.
        fleet: String,
    },
}

fn print_fleet(out: Output, f: &FleetView) -> Result<()> {
    out.record(
        f,
        &[
            ("name", f.name.clone()),
            ("allowed ports", ports_cell(&f.allowed_ports)),
        ],
    )
}

fn ports_cell(ports: &[u16]) -> String {
    if ports.is_empty() {
        "all".into()
    } else {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Runs a `fleet` command.
pub async fn fleet(cmd: FleetCmd, out: Output) -> Result<()> {
    let client = ApiClient::from_settings(&Settings::load()?)?;
    match cmd {
        FleetCmd::Create { name, allow_ports } => {
            let body = json!({"name": name, "allowed_ports": allow_ports});
            let f: FleetView = client.call(Method::POST, "/v1/fleets", Some(&body)).await?;
            print_fleet(out, &f)
        }
        FleetCmd::List => {
            let fleets: Vec<FleetView> = client.call(Method::GET, "/v1/fleets", None).await?;
            out.list(&fleets, &["NAME", "ALLOWED PORTS", "CREATED"], |f| {
                vec![
                    f.name.clone(),
                    ports_cell(&f.allowed_ports),
                    f.created_at.clone(),
                ]
            })
        }
        FleetCmd::Ports { name, ports } => {
            let body = json!({"allowed_ports": ports});
            let f: FleetView = client
                .call(Method::PATCH, &format!("/v1/fleets/{name}"), Some(&body))
                .await?;
            print_fleet(out, &f)
        }
        FleetCmd::Rm { name } => {
            client
                .call_empty(Method::DELETE, &format!("/v1/fleets/{name}"))
                .await
        }
        FleetCmd::Member(MemberCmd::Add { fleet, user, owner }) => {
            let role = if owner { "owner" } else { "member" };
            let body = json!({"username": user, "role": role});
            let m: MemberView = client
                .call(
                    Method::POST,
                    &format!("/v1/fleets/{fleet}/members"),
                    Some(&body),
                )
                .await?;
            out.record(
                &m,
                &[("username", m.username.clone()), ("role", role.into())],
            )
        }
        FleetCmd::Member(MemberCmd::Rm { fleet, user }) => {
            client
                .call_empty(
                    Method::DELETE,
                    &format!("/v1/fleets/{fleet}/members/{user}"),
                )
                .await
        }
        FleetCmd::Member(MemberCmd::List { fleet }) => {
            let members: Vec<MemberView> = client
                .call(Method::GET, &format!("/v1/fleets/{fleet}/members"), None)
                .await?;
            out.list(&members, &["USERNAME", "ROLE"], |m| {
                vec![m.username.clone(), m.role.as_str().to_owned()]
            })
        }
    }
}

/// `cloudlink device register|list|show|rm`.
#[derive(Debug, Subcommand)]
pub enum DeviceAdminCmd {
    /// Register a device in a fleet and print its uuid and key (shown once).
    Register {
        /// Fleet name.
        fleet: String,
        /// A label for the device.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the devices you can see.
    List,
    /// Show one device.
    Show {
        /// Device uuid.
        uuid: String,
    },
    /// Delete a device; its key stops working at once.
    Rm {
        /// Device uuid.
        uuid: String,
    },
    /// Give a device a new key (shown once). The old key keeps working until the agent
    /// connects with the new one, or the grace period ends.
    RotateKey {
        /// Device uuid.
        uuid: String,
        /// How long the old key keeps working at most: 90s, 45m, 12h, 30d.
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        grace: u64,
    },
    /// List recent tunnels (admins: everyone's; others: their own).
    Tunnels {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn device_row(d: &DeviceView) -> Vec<String> {
    vec![
        d.uuid.clone(),
        d.name.clone(),
        d.fleet.clone(),
        if d.online { "online" } else { "offline" }.into(),
        d.transport.clone().unwrap_or_else(|| "-".into()),
        d.last_seen.clone().unwrap_or_else(|| "never".into()),
    ]
}

const DEVICE_HEADERS: &[&str] = &["UUID", "NAME", "FLEET", "STATUS", "LINK", "LAST SEEN"];

/// Runs a device admin command.
pub async fn device(cmd: DeviceAdminCmd, out: Output) -> Result<()> {
    let client = ApiClient::from_settings(&Settings::load()?)?;
    match cmd {
        DeviceAdminCmd::Register { fleet, name } => {
            let body = match name {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            };
            let d: RegisteredDevice = client
                .call(
                    Method::POST,
                    &format!("/v1/fleets/{fleet}/devices"),
                    Some(&body),
                )
                .await?;
            out.record(
                &d,
                &[
                    ("uuid", d.uuid.clone()),
                    ("name", d.name.clone()),
                    ("fleet", d.fleet.clone()),
                    ("key", d.key.clone()),
                ],
            )?;
            if out == Output::Table {
                eprintln!("The device key is shown only now; put it in the agent's config.");
            }
            Ok(())
        }
        DeviceAdminCmd::List => {
            let devices: Vec<DeviceView> = client.call(Method::GET, "/v1/devices", None).await?;
            out.list(&devices, DEVICE_HEADERS, device_row)
        }
        DeviceAdminCmd::Show { uuid } => {
            let d: DeviceView = client
                .call(Method::GET, &format!("/v1/devices/{uuid}"), None)
                .await?;
            let cells = device_row(&d);
            let fields: Vec<(&str, String)> = DEVICE_HEADERS.iter().copied().zip(cells).collect();
            out.record(&d, &fields)
        }
        DeviceAdminCmd::Rm { uuid } => {
            client
                .call_empty(Method::DELETE, &format!("/v1/devices/{uuid}"))
                .await
        }
        DeviceAdminCmd::RotateKey { uuid, grace } => {
            let body = json!({ "grace_secs": grace });
            let r: RotatedKey = client
                .call(
                    Method::POST,
                    &format!("/v1/devices/{uuid}/rotate-key"),
                    Some(&body),
                )
                .await?;
            out.record(
                &r,
                &[
                    ("uuid", r.uuid.clone()),
                    ("key", r.key.clone()),
                    ("old key valid until", r.old_key_valid_until.clone()),
                ],
            )?;
            if out == Output::Table {
                eprintln!(
                    "Put the new key in the agent's config and restart it; the old key stops \
                     working once the agent has connected with the new one."
                );
            }
            Ok(())
        }
        DeviceAdminCmd::Tunnels { limit } => {
            let tunnels: Vec<TunnelView> = client
                .call(Method::GET, &format!("/v1/tunnels?limit={limit}"), None)
                .await?;
            out.list(
                &tunnels,
                &[
                    "OPENED", "USER", "DEVICE", "PORT", "UP", "DOWN", "CLOSED", "REASON",
                ],
                |t| {
                    vec![
                        t.opened_at.clone(),
                        t.user.clone(),
                        t.device.clone(),
                        t.port.to_string(),
                        t.bytes_up.to_string(),
                        t.bytes_down.to_string(),
                        t.closed_at.clone().unwrap_or_else(|| "open".into()),
                        t.close_reason.clone().unwrap_or_default(),
                    ]
                },
            )
        }
    }
}

/// `cloudlink key …` (SSH public keys).
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Add an OpenSSH public key from a file (e.g. ~/.ssh/id_ed25519.pub).
    Add {
        /// The .pub file.
        file: PathBuf,
        /// A label [default: the key's comment, else the file name].
        #[arg(long)]
        title: Option<String>,
    },
    /// Import the public keys of a GitHub account (https://github.com/<login>.keys, fetched
    /// by the relay); keys you have already are skipped.
    Import {
        /// The GitHub login whose keys to add.
        #[arg(long, value_name = "LOGIN")]
        github: String,
    },
    /// List your SSH keys.
    List,
    /// Remove one of your SSH keys.
    Rm {
        /// The key's id (from `key list`).
        id: i64,
    },
}

/// Runs a `key` command.
pub async fn key(cmd: KeyCmd, out: Output) -> Result<()> {
    let client = ApiClient::from_settings(&Settings::load()?)?;
    match cmd {
        KeyCmd::Add { file, title } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let text = text.trim();
            let title = title.unwrap_or_else(|| {
                text.split_whitespace()
                    .nth(2)
                    .map(str::to_owned)
                    .unwrap_or_else(|| file.display().to_string())
            });
            let body = json!({"title": title, "public_key": text});
            let k: SshKeyView = client
                .call(Method::POST, "/v1/ssh-keys", Some(&body))
                .await?;
            out.record(
                &k,
                &[
                    ("id", k.id.to_string()),
                    ("title", k.title.clone()),
                    ("fingerprint", k.fingerprint.clone()),
                ],
            )
        }
        KeyCmd::Import { github } => {
            let body = json!({ "github": github });
            let r: ImportedSshKeys = client
                .call(Method::POST, "/v1/ssh-keys/import", Some(&body))
                .await?;
            if out == Output::Json {
                return out.record(&r, &[]);
            }
            for fingerprint in &r.duplicates {
                eprintln!("skipped {fingerprint}: you have this key already");
            }
            for bad in &r.invalid {
                eprintln!(
                    "skipped line {} of {github}'s keys: {}",
                    bad.line, bad.error
                );
            }
            eprintln!(
                "added {} of {github}'s keys ({} already yours, {} invalid)",
                r.added.len(),
                r.duplicates.len(),
                r.invalid.len()
            );
            print_keys(&r.added, out)
        }
        KeyCmd::List => {
            let keys: Vec<SshKeyView> = client.call(Method::GET, "/v1/ssh-keys", None).await?;
            print_keys(&keys, out)
        }
        KeyCmd::Rm { id } => {
            client
                .call_empty(Method::DELETE, &format!("/v1/ssh-keys/{id}"))
                .await
        }
    }
}

fn print_keys(keys: &[SshKeyView], out: Output) -> Result<()> {
    out.list(keys, &["ID", "TITLE", "FINGERPRINT", "ADDED"], |k| {
        vec![
            k.id.to_string(),
            k.title.clone(),
            k.fingerprint.clone(),
            k.created_at.clone(),
        ]
    })
}

/// A duration for humans: `90s`, `45m`, `12h`, `30d` (or plain seconds), in seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 45m, 12h or 30d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(unit) {
        Some(0) | None => Err(format!("{s:?} must be positive and not absurdly long")),
        Some(secs) => Ok(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration("45m"), Ok(45 * 60));
        assert_eq!(parse_duration("90"), Ok(90));
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("-1d").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}

//! The admin half of the CLI: login, users, API keys, fleets, members, devices, SSH keys.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use reqwest::Method;

use super::settings::Settings;
use super::{resolve, ApiClient, JsonArg, Output};
use crate::proto::api::{
    ApiKeyView, CreatedApiKey, CreatedUser, DeviceView, FleetPatch, FleetView, ImportSshKeys,
    ImportedSshKeys, MemberView, NewApiKey, NewDevice, NewFleet, NewMember, NewSshKey, NewUser,
    RegisteredDevice, Role, RotateKey, RotatedKey, SshKeyView, TunnelView, UserView,
};

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
            let body = NewUser {
                username: name.clone(),
                admin,
            };
            let u: CreatedUser = client.send_body(Method::POST, "/v1/users", &body).await?;
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
        #[arg(long, value_parser = crate::duration::parse_duration)]
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
            let body = NewApiKey {
                name,
                expires_in_secs: expires,
            };
            let k: CreatedApiKey = client
                .send_body(Method::POST, "/v1/api-keys", &body)
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
            let body = NewFleet {
                name,
                allowed_ports: allow_ports,
            };
            let f: FleetView = client.send_body(Method::POST, "/v1/fleets", &body).await?;
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
            let body = FleetPatch {
                allowed_ports: ports,
            };
            let f: FleetView = client
                .send_body(Method::PATCH, &format!("/v1/fleets/{name}"), &body)
                .await?;
            print_fleet(out, &f)
        }
        FleetCmd::Rm { name } => {
            client
                .call_empty(Method::DELETE, &format!("/v1/fleets/{name}"))
                .await
        }
        FleetCmd::Member(MemberCmd::Add { fleet, user, owner }) => {
            let role = if owner { Role::Owner } else { Role::Member };
            let body = NewMember {
                username: user,
                role,
            };
            let m: MemberView = client
                .send_body(Method::POST, &format!("/v1/fleets/{fleet}/members"), &body)
                .await?;
            out.record(
                &m,
                &[
                    ("username", m.username.clone()),
                    ("role", role.as_str().into()),
                ],
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
        /// `--json`.
        #[command(flatten)]
        json: JsonArg,
    },
    /// List the devices you can see.
    List {
        /// `--json`.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show one device.
    Show {
        /// Device uuid, short uuid (7+ characters) or name.
        uuid: String,
        /// `--json`.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Delete a device; its key stops working at once.
    Rm {
        /// Device uuid, short uuid (7+ characters) or name.
        uuid: String,
        /// `--json`.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Give a device a new key (shown once). The old key keeps working until the agent
    /// connects with the new one, or the grace period ends.
    RotateKey {
        /// Device uuid, short uuid (7+ characters) or name.
        uuid: String,
        /// How long the old key keeps working at most: 90s, 45m, 12h, 30d.
        #[arg(long, value_parser = crate::duration::parse_duration, default_value = "24h")]
        grace: u64,
        /// `--json`.
        #[command(flatten)]
        json: JsonArg,
    },
    /// List recent tunnels (admins: everyone's; others: their own).
    Tunnels {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// `--json`.
        #[command(flatten)]
        json: JsonArg,
    },
}

impl DeviceAdminCmd {
    /// Whether JSON output was asked for.
    pub fn json(&self) -> bool {
        match self {
            DeviceAdminCmd::Register { json, .. }
            | DeviceAdminCmd::List { json }
            | DeviceAdminCmd::Show { json, .. }
            | DeviceAdminCmd::Rm { json, .. }
            | DeviceAdminCmd::RotateKey { json, .. }
            | DeviceAdminCmd::Tunnels { json, .. } => json.json,
        }
    }
}

fn device_row(d: &DeviceView) -> Vec<String> {
    vec![
        d.uuid.clone(),
        d.name.clone(),
        d.fleet.clone(),
        d.state.clone(),
        d.transport.clone().unwrap_or_else(|| "-".into()),
        d.last_seen.clone().unwrap_or_else(|| "never".into()),
    ]
}

const DEVICE_HEADERS: &[&str] = &["UUID", "NAME", "FLEET", "STATUS", "LINK", "LAST SEEN"];

/// Runs a device admin command.
pub async fn device(cmd: DeviceAdminCmd, out: Output) -> Result<()> {
    let client = ApiClient::from_settings(&Settings::load()?)?;
    match cmd {
        DeviceAdminCmd::Register { fleet, name, .. } => {
            let body = NewDevice { name };
            let d: RegisteredDevice = client
                .send_body(Method::POST, &format!("/v1/fleets/{fleet}/devices"), &body)
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
        DeviceAdminCmd::List { .. } => {
            let devices: Vec<DeviceView> = client.call(Method::GET, "/v1/devices", None).await?;
            out.list(&devices, DEVICE_HEADERS, device_row)
        }
        DeviceAdminCmd::Show { uuid, .. } => {
            let d = resolve::device(&client, &uuid).await?;
            let cells = device_row(&d);
            let fields: Vec<(&str, String)> = DEVICE_HEADERS.iter().copied().zip(cells).collect();
            out.record(&d, &fields)
        }
        DeviceAdminCmd::Rm { uuid, .. } => {
            let uuid = resolve::device(&client, &uuid).await?.uuid;
            client
                .call_empty(Method::DELETE, &format!("/v1/devices/{uuid}"))
                .await
        }
        DeviceAdminCmd::RotateKey { uuid, grace, .. } => {
            let uuid = resolve::device(&client, &uuid).await?.uuid;
            let body = RotateKey {
                grace_secs: Some(grace),
            };
            let r: RotatedKey = client
                .send_body(
                    Method::POST,
                    &format!("/v1/devices/{uuid}/rotate-key"),
                    &body,
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
        DeviceAdminCmd::Tunnels { limit, .. } => {
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
    /// Add an OpenSSH public key: `key add NAME [FILE]` (stdin when no FILE), or
    /// `key add FILE [--title NAME]`.
    Add {
        /// The key's name, or the .pub file in the `key add FILE` form.
        name: String,
        /// The .pub file (e.g. ~/.ssh/id_ed25519.pub) [default: read the key from stdin].
        file: Option<PathBuf>,
        /// A label, for the `key add FILE` form [default: the key's comment, else the file
        /// name].
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
        KeyCmd::Add { name, file, title } => {
            let (title, text) = key_to_add(name, file, title)?;
            let body = NewSshKey {
                title,
                public_key: text,
            };
            let k: SshKeyView = client
                .send_body(Method::POST, "/v1/ssh-keys", &body)
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
            let body = ImportSshKeys {
                github: github.clone(),
            };
            let r: ImportedSshKeys = client
                .send_body(Method::POST, "/v1/ssh-keys/import", &body)
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

/// The title and public key text `key add` sends. `NAME FILE`, `NAME` (the key on stdin)
/// and the older `FILE [--title T]` are told apart by whether the one argument is a file.
/// A private key is refused here, before anything leaves this machine.
fn key_to_add(
    name: String,
    file: Option<PathBuf>,
    title: Option<String>,
) -> Result<(String, String)> {
    let single_is_file = file.is_none()
        && (title.is_some() || std::path::Path::new(&name).is_file() || name.contains('/'));
    let (title, file) = match file {
        Some(file) => (Some(name), Some(file)),
        None if single_is_file => (title, Some(PathBuf::from(name))),
        None => (Some(name), None),
    };
    let (text, source) = match &file {
        Some(file) => (
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
            file.display().to_string(),
        ),
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("Paste the public key (one line), then press Enter:");
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the key from stdin")?;
            (line, "stdin".to_owned())
        }
    };
    if text.contains("PRIVATE KEY-----") {
        let public = file
            .as_ref()
            .map(|f| format!("{}.pub", f.display()))
            .unwrap_or_else(|| "the .pub file next to it".into());
        return Err(anyhow!(
            "{source} holds a PRIVATE key; it was not sent. Add the public key instead: \
             {public} (`ssh-keygen -y -f KEY` prints it)"
        ));
    }
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(anyhow!("{source} holds no key"));
    }
    let title = title.unwrap_or_else(|| {
        text.split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .unwrap_or_else(|| source.clone())
    });
    Ok((title, text))
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

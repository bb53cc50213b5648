//! The REST API's request and response bodies (`/v1/…`), shared by the relay that serves
//! them and the CLI that sends and reads them. The OpenAPI document is generated from
//! these types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A row id, as the store numbers rows.
pub type Id = i64;

/// A member's role in a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages the fleet's members and devices.
    Owner,
    /// Sees the fleet and reaches its devices.
    Member,
}

impl Role {
    /// The form stored in `fleet_members.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }

    /// Parses the stored form; anything else is a broken row.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// A device as the API shows it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    /// 32 lowercase hex characters.
    pub uuid: String,
    /// Its label.
    pub name: String,
    /// Its fleet.
    pub fleet: String,
    /// Whether a live relay holds its connection now, and hears from it.
    pub online: bool,
    /// `online`, `reconnecting` (a relay holds tunnels for it while its link is gone or
    /// has been silent for longer than its keep-alive; PROTOCOL.md §2e) or `offline`.
    /// Absent from an older relay: read `online` then.
    #[serde(default = "offline")]
    pub state: String,
    /// The id of the relay that holds it, or null.
    pub relay: Option<String>,
    /// How its agent reaches that relay: `quic`, or `tcp` (TLS over TCP, where UDP is
    /// blocked); null while offline.
    pub transport: Option<String>,
    /// When its agent last connected or disconnected (RFC 3339).
    pub last_seen: Option<String>,
}

fn offline() -> String {
    "offline".into()
}

/// `POST /v1/fleets/{name}/devices`.
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// A label; default: the first 7 characters of the uuid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A new device and its key (shown only here).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RegisteredDevice {
    /// 32 lowercase hex characters.
    pub uuid: String,
    /// Its label.
    pub name: String,
    /// Its fleet.
    pub fleet: String,
    /// The device key its agent presents; stored only as a hash.
    pub key: String,
}

/// A tunnel in the audit log.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TunnelView {
    /// Tunnel id.
    pub id: String,
    /// Who opened it.
    pub user: String,
    /// To which device.
    pub device: String,
    /// Which port on the device.
    pub port: i64,
    /// The relay the user came to (which keeps this row).
    pub relay: String,
    /// For a tunnel forwarded over the peer link: the relay that held the device.
    pub device_relay: Option<String>,
    /// When the device accepted it (RFC 3339).
    pub opened_at: String,
    /// When it ended; absent while open.
    pub closed_at: Option<String>,
    /// Bytes from the user to the device.
    pub bytes_up: i64,
    /// Bytes from the device to the user.
    pub bytes_down: i64,
    /// Why it ended.
    pub close_reason: Option<String>,
    /// What opened it: `connect` (a CONNECT) or `terminal` (the browser terminal).
    pub kind: String,
    /// How often it resumed on a new device link (PROTOCOL.md §2e).
    #[serde(default)]
    pub resumes: i64,
    /// Bytes the relay sent again after those resumes.
    #[serde(default)]
    pub replayed_bytes: i64,
    /// Milliseconds it spent waiting for the device to come back.
    #[serde(default)]
    pub waited_ms: i64,
    /// Why its last resume failed (`expired`, `gone`, `unsupported`, `protocol`, `cut`),
    /// if one did.
    #[serde(default)]
    pub resume_failure: Option<String>,
}

/// `POST /v1/devices/{uuid}/rotate-key`.
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old key keeps working, seconds (default 86,400: a day). It stops
    /// earlier, as soon as the agent connects with the new key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u64>,
}

/// A device's new key (shown only here).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    /// The device.
    pub uuid: String,
    /// The new device key; stored only as a hash.
    pub key: String,
    /// Until when the old key is still accepted (RFC 3339), unless the agent connects with
    /// the new one sooner.
    pub old_key_valid_until: String,
}

/// Where a relay's users connect, as `GET /v1/endpoints` says (what `cloudlink login`
/// saves instead of guessing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndpointsView {
    /// The CONNECT proxy over TLS, `HOST:PORT`, if this relay serves one.
    pub proxy_tls: Option<String>,
    /// The plain CONNECT proxy, `HOST:PORT` (for a private network, or a TLS-terminating
    /// load balancer).
    pub proxy: Option<String>,
    /// The SSH gateway, if this relay serves one.
    pub ssh_gateway: Option<SshEndpoint>,
    /// The domains a device target may carry (`<uuid>.balena`).
    pub device_domains: Vec<String>,
}

/// The SSH gateway's address and host key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshEndpoint {
    /// `HOST:PORT`.
    pub address: String,
    /// The host key, one OpenSSH public key line (every relay of a cluster has the same).
    pub host_key: String,
    /// Its SHA-256 fingerprint, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// A relay of the cluster.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RelayView {
    /// Its id.
    pub id: String,
    /// The address other relays dial (a single relay's API address).
    pub peer_addr: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its last heartbeat (RFC 3339).
    pub heartbeat_at: String,
    /// Whether its heartbeat is fresh (within 15 s).
    pub alive: bool,
    /// Whether it is draining (shutting down).
    pub draining: bool,
    /// Devices connected to it at its last heartbeat.
    pub devices: i64,
    /// Tunnels open on it at its last heartbeat.
    pub tunnels: i64,
}

/// A fleet as the API shows it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FleetView {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Ports members may reach; empty means every port.
    pub allowed_ports: Vec<u16>,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

/// `POST /v1/fleets`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewFleet {
    /// `[a-z0-9][a-z0-9_-]{0,62}`.
    pub name: String,
    /// Ports members may reach; omitted or empty means every port.
    #[serde(default)]
    pub allowed_ports: Vec<u16>,
}

/// `PATCH /v1/fleets/{name}`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetPatch {
    /// The new port allowlist; empty means every port.
    pub allowed_ports: Vec<u16>,
}

/// A fleet member.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    /// Their name.
    pub username: String,
    /// `owner` or `member`.
    #[schema(value_type = String)]
    pub role: Role,
}

/// `POST /v1/fleets/{name}/members`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    /// An existing user.
    pub username: String,
    /// `owner` or `member`.
    #[schema(value_type = String)]
    pub role: Role,
}

/// A user as the API shows them.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct UserView {
    /// Row id.
    pub id: Id,
    /// Login name.
    pub username: String,
    /// Whether they are an admin.
    pub admin: bool,
}

/// `POST /v1/users`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// `[a-z0-9][a-z0-9_-]{0,62}`.
    pub username: String,
    /// Make them an admin.
    #[serde(default)]
    pub admin: bool,
}

/// A new user and their first API key (shown only here).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedUser {
    /// Row id.
    pub id: Id,
    /// Login name.
    pub username: String,
    /// Whether they are an admin.
    pub admin: bool,
    /// Their first API key; stored only as a hash, so this is the one chance to copy it.
    pub api_key: String,
}

/// `POST /v1/api-keys`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// A label, `[a-z0-9][a-z0-9_-]{0,62}`.
    pub name: String,
    /// Seconds until the key stops working (at most 10 years); default: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// A new API key (the secret is shown only here).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    /// Row id, to revoke it.
    pub id: Id,
    /// Its label.
    pub name: String,
    /// The secret.
    pub key: String,
    /// What later listings show of it.
    pub prefix: String,
    /// When it stops working (RFC 3339), if it expires.
    pub expires_at: Option<String>,
}

/// An API key in a listing: never the secret.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApiKeyView {
    /// Row id.
    pub id: Id,
    /// Its label.
    pub name: String,
    /// Its first characters.
    pub prefix: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// When it was last used, to the minute.
    pub last_used_at: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<String>,
    /// When it stops (or stopped) working, if it expires.
    pub expires_at: Option<String>,
}

/// A short-lived JWT.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct IssuedToken {
    /// The JWT (HS256).
    pub token: String,
    /// Its expiry (RFC 3339).
    pub expires_at: String,
}

/// `POST /v1/ssh-keys`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSshKey {
    /// A label (free text, up to 200 characters).
    pub title: String,
    /// One OpenSSH public key line: ed25519, ecdsa, or rsa of at least 2048 bits.
    pub public_key: String,
}

/// An SSH key as the API shows it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SshKeyView {
    /// Row id.
    pub id: Id,
    /// Its label.
    pub title: String,
    /// `SHA256:…`.
    pub fingerprint: String,
    /// The key itself.
    pub public_key: String,
    /// When it was added (RFC 3339).
    pub created_at: String,
}

/// `POST /v1/ssh-keys/import`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportSshKeys {
    /// A GitHub login: its public keys (`https://github.com/<login>.keys`) are added.
    pub github: String,
}

/// What an import did.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ImportedSshKeys {
    /// The keys added.
    pub added: Vec<SshKeyView>,
    /// Fingerprints of keys the caller had already, left as they were.
    pub duplicates: Vec<String>,
    /// Lines that are not keys we accept.
    pub invalid: Vec<InvalidKeyLine>,
}

/// A line of an import that was not added.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct InvalidKeyLine {
    /// Its number, from 1.
    pub line: usize,
    /// Why it was refused.
    pub error: String,
}

//! Which device a person means: a full uuid, a short uuid, or a device name, as balena's
//! CLI takes them. Only the caller's devices are searched (the API scopes every listing),
//! so a device in someone else's fleet is "unknown", exactly like one that does not exist.

use anyhow::{anyhow, Result};
use reqwest::{Method, StatusCode};

use super::connect::Refused;
use super::{with_query, ApiClient, ApiFailure};
use crate::proto::api::DeviceView;
use crate::proto::api::FleetView;

/// The shortest uuid prefix taken, as balena's CLI (its short uuids are 7 characters).
pub const MIN_PREFIX: usize = 7;

/// Why a target names no single device.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Nothing of the caller's matches.
    #[error(
        "unknown device {target:?}: none of your devices has that uuid{prefix} or name \
         (see `cloudlink device list`)"
    )]
    Unknown {
        /// What was asked for.
        target: String,
        /// ", uuid prefix" when the target could be one.
        prefix: &'static str,
    },
    /// Several devices match.
    #[error(
        "{target:?} matches {} devices; give more of the uuid:\n{}",
        candidates.len(),
        candidates.join("\n")
    )]
    Ambiguous {
        /// What was asked for.
        target: String,
        /// One line per match: uuid, name, fleet.
        candidates: Vec<String>,
    },
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Finds the one device `target` names among the caller's: a full uuid, else a unique
/// prefix of at least [`MIN_PREFIX`] hex characters, else a unique device name.
pub async fn device(client: &ApiClient, target: &str) -> Result<DeviceView> {
    let target = target.trim();
    let unknown = |prefix| {
        anyhow::Error::from(ResolveError::Unknown {
            target: target.to_owned(),
            prefix,
        })
    };
    if let Some(uuid) = crate::proto::device_uuid(target) {
        return match client
            .call(Method::GET, &format!("/v1/devices/{uuid}"), None)
            .await
        {
            Err(e) if ApiFailure::status_of(&e) == Some(StatusCode::NOT_FOUND) => Err(unknown("")),
            other => other,
        };
    }
    let could_be_prefix = target.len() >= MIN_PREFIX && is_hex(target);
    if could_be_prefix {
        let found = list(client, "uuid_prefix", target).await?;
        if !found.is_empty() {
            return one(target, found);
        }
    }
    let found = list(client, "name", target).await?;
    if found.is_empty() {
        return Err(unknown(if could_be_prefix { ", uuid prefix" } else { "" }));
    }
    one(target, found)
}

async fn list(client: &ApiClient, key: &str, value: &str) -> Result<Vec<DeviceView>> {
    client
        .call(
            Method::GET,
            &with_query("/v1/devices", &[(key, value)]),
            None,
        )
        .await
}

fn one(target: &str, mut found: Vec<DeviceView>) -> Result<DeviceView> {
    if found.len() == 1 {
        return Ok(found.remove(0));
    }
    Err(ResolveError::Ambiguous {
        target: target.to_owned(),
        candidates: found
            .iter()
            .map(|d| format!("  {}  {}  (fleet {}, {})", d.uuid, d.name, d.fleet, d.state))
            .collect(),
    }
    .into())
}

/// Fails unless the device is online, saying since when it is not.
pub fn require_online(device: &DeviceView) -> Result<()> {
    if device.online {
        return Ok(());
    }
    Err(anyhow!(
        "device {} ({}) is offline: its agent is not connected to any relay{}",
        device.uuid,
        device.name,
        match &device.last_seen {
            Some(t) => format!(" (last seen {t})"),
            None => " (it has never connected)".into(),
        }
    ))
}

/// Fails unless the device's fleet lets anyone reach `port` (an empty allowlist: every port).
pub async fn check_port(client: &ApiClient, device: &DeviceView, port: u16) -> Result<()> {
    let fleet: FleetView = client
        .call(Method::GET, &format!("/v1/fleets/{}", device.fleet), None)
        .await?;
    if fleet.allowed_ports.is_empty() || fleet.allowed_ports.contains(&port) {
        return Ok(());
    }
    let allowed: Vec<String> = fleet.allowed_ports.iter().map(u16::to_string).collect();
    Err(anyhow!(
        "port {port} of device {} is not allowed: fleet {} allows only port{} {} \
         (a fleet owner changes that with `cloudlink fleet ports`)",
        device.uuid,
        fleet.name,
        if allowed.len() == 1 { "" } else { "s" },
        allowed.join(", ")
    ))
}

/// Everything that can be known before a tunnel opens: the device, that it is online, and
/// that its fleet allows each port. Also proves the login works.
pub async fn reachable(client: &ApiClient, target: &str, ports: &[u16]) -> Result<DeviceView> {
    let device = device(client, target).await?;
    require_online(&device)?;
    for port in ports {
        check_port(client, &device, *port).await?;
    }
    Ok(device)
}

/// A CONNECT refusal turned into its cause and its fix, asking the API what the status
/// alone does not say (the proxy gives one 403 for an unknown device and a port not
/// allowed, so as not to reveal devices). Other errors come back unchanged.
pub async fn diagnose(client: &ApiClient, e: anyhow::Error) -> anyhow::Error {
    let Some(refused) = e.downcast_ref::<Refused>() else {
        return e;
    };
    let (uuid, port) = (refused.uuid.clone(), refused.port);
    match refused.status {
        407 => anyhow!(
            "the relay refused your API key ({}): it was revoked or has expired; \
             log in again with a valid key (`cloudlink login`)",
            refused.sentence
        ),
        403 | 503 => match reachable(client, &uuid, &[port]).await {
            Err(cause) => cause,
            // Allowed and online by now: it changed in between; the relay's words stand.
            Ok(_) => e,
        },
        502 => anyhow!(
            "port {port} of device {uuid} is closed: nothing listens on it, or the device's \
             agent does not allow it (relay: 502 {})",
            refused.sentence
        ),
        504 => anyhow!(
            "device {uuid} did not answer in time; its link may be failing (relay: 504 {})",
            refused.sentence
        ),
        _ => e,
    }
}

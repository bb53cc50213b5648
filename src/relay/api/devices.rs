//! Devices, the tunnel audit log, and the device-facing authorized-keys lookup.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{bearer, Caller, Path};
use super::fields::{rfc3339, validate_name};
use super::fleets::{managed_fleet, visible_fleet, Standing};
use crate::auth::{policy, tokens};
use crate::proto::api::{
    DeviceView, NewDevice, RegisteredDevice, RelayView, RotateKey, RotatedKey, TunnelView,
};
use crate::proto::SSH_PORT;
use crate::relay::state::Shared;
use crate::store::{Device, TunnelSession};

impl From<Device> for DeviceView {
    fn from(d: Device) -> Self {
        let online = d.online();
        DeviceView {
            uuid: d.uuid,
            name: d.name,
            fleet: d.fleet,
            online,
            relay: d.relay,
            transport: d.transport,
            last_seen: d.last_seen.map(rfc3339),
        }
    }
}

/// A JSON body that may be left out (empty or blank: the defaults).
fn optional_json<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("Invalid JSON: {e}")))
    }
}

/// Normalises a uuid path segment: 32 hex characters, any case.
pub fn parse_uuid(raw: &str) -> Result<String, ApiError> {
    crate::proto::device_uuid(raw)
        .ok_or_else(|| ApiError::bad("A device uuid is 32 hex characters."))
}

/// Registers a device in a fleet (owners and admins).
#[utoipa::path(post, path = "/v1/fleets/{name}/devices", tag = "devices",
    params(("name" = String, Path)), request_body = NewDevice,
    responses((status = 201, body = RegisteredDevice), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn register_device(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(fleet_name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, axum::Json<RegisteredDevice>), ApiError> {
    // The body is optional: `device register FLEET` with no name sends none.
    let body: NewDevice = optional_json(&body)?;
    if let Some(name) = &body.name {
        validate_name("name", name)?;
    }
    let fleet = managed_fleet(&state, &caller, &fleet_name).await?;
    let uuid = tokens::new_device_uuid();
    let key = tokens::new_device_key();
    let name = body.name.unwrap_or_else(|| uuid[..7].to_owned());
    let device = state
        .store
        .create_device(&uuid, fleet.id, &name, &tokens::hash_secret(&key))
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(RegisteredDevice {
            uuid: device.uuid,
            name: device.name,
            fleet: device.fleet,
            key,
        }),
    ))
}

/// `GET /v1/devices` query: how the CLI finds a device by a short uuid or a name.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeviceQuery {
    /// Only devices whose uuid starts with this (1 to 32 hex characters, any case).
    pub uuid_prefix: Option<String>,
    /// Only devices with exactly this name (names need not be unique).
    pub name: Option<String>,
}

/// Lists the devices the caller may see (admins: all), optionally narrowed.
#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(DeviceQuery),
    responses((status = 200, body = [DeviceView]), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_devices(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    query: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Vec<DeviceView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let uuid_prefix = match query.uuid_prefix {
        Some(p) if (1..=32).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(p.to_ascii_lowercase())
        }
        Some(_) => return Err(ApiError::bad("uuid_prefix is 1 to 32 hex characters.")),
        None => None,
    };
    let filter = crate::store::DeviceFilter {
        uuid_prefix,
        name: query.name,
    };
    let member = (!caller.0.user.is_admin).then_some(caller.0.user.id);
    let devices = state.store.list_devices(member, &filter).await?;
    Ok(axum::Json(
        devices.into_iter().map(DeviceView::from).collect(),
    ))
}

/// The device and the caller's standing in its fleet, or 404.
async fn visible_device(
    state: &Shared,
    caller: &Caller,
    raw_uuid: &str,
) -> Result<(Device, Standing), ApiError> {
    let uuid = parse_uuid(raw_uuid)?;
    let not_found = || ApiError::not_found(format!("Device {uuid}"));
    let device = state.store.device(&uuid).await?.ok_or_else(not_found)?;
    match visible_fleet(state, caller, &device.fleet).await {
        Ok((_, standing)) => Ok((device, standing)),
        Err(ApiError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(e),
    }
}

/// Shows one device.
#[utoipa::path(get, path = "/v1/devices/{uuid}", tag = "devices", params(("uuid" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_device(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(uuid): Path<String>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let (device, _) = visible_device(&state, &caller, &uuid).await?;
    Ok(axum::Json(device.into()))
}

/// Deletes a device (owners and admins); its key stops working at once.
#[utoipa::path(delete, path = "/v1/devices/{uuid}", tag = "devices",
    params(("uuid" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_device(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(uuid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (device, standing) = visible_device(&state, &caller, &uuid).await?;
    if standing != Standing::Manager {
        return Err(ApiError::Forbidden(format!(
            "Only owners of fleet {} and admins may delete its devices.",
            device.fleet
        )));
    }
    state.store.delete_device(&device.uuid).await?;
    state.auth_cache.clear();
    state.device_deleted(&device.uuid);
    Ok(StatusCode::NO_CONTENT)
}

impl From<TunnelSession> for TunnelView {
    fn from(t: TunnelSession) -> Self {
        TunnelView {
            id: t.id,
            user: t.username,
            device: t.device_uuid,
            port: t.port,
            relay: t.relay_id,
            device_relay: t.device_relay,
            opened_at: rfc3339(t.opened_at),
            closed_at: t.closed_at.map(rfc3339),
            bytes_up: t.bytes_up,
            bytes_down: t.bytes_down,
            close_reason: t.close_reason,
            kind: t.kind,
        }
    }
}

/// `GET /v1/tunnels` query.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TunnelQuery {
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<i64>,
    /// Only tunnels to this device.
    pub device: Option<String>,
}

/// The newest tunnels: all of them for admins, one's own for everyone else.
#[utoipa::path(get, path = "/v1/tunnels", tag = "devices", params(TunnelQuery),
    responses((status = 200, body = [TunnelView])), security(("bearer" = [])))]
pub async fn list_tunnels(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    query: Result<Query<TunnelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Vec<TunnelView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let user = (!caller.0.user.is_admin).then_some(caller.0.user.id);
    let tunnels = state
        .store
        .list_tunnels(user, query.device.as_deref(), limit)
        .await?;
    Ok(axum::Json(
        tunnels.into_iter().map(TunnelView::from).collect(),
    ))
}

/// `GET /auth/v1/public-keys/{login}` query.
#[derive(Deserialize, utoipa::IntoParams, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PublicKeysQuery {
    /// Root logins (PROTOCOL.md §4): answer the keys of every user who may reach this
    /// device, each line commented with its owner's cloud username, instead of the keys of
    /// the user named `login`.
    #[serde(default)]
    pub all_members: bool,
}

/// The public SSH keys that may log in to this device as `login`, one per line, for the
/// device's sshd (`AuthorizedKeysCommand`). Authenticated with the device key.
///
/// By default: the keys of the cloud user named `login`, if that user may reach the device
/// (a user who does not exist or may not reach it gets an empty 200, so usernames cannot be
/// probed). With `all_members=true`: the keys of every user who may reach the device. Both
/// add the live keys of browser terminal sessions to this device for `login` (§5). Always
/// read fresh from the store: a removed key or membership stops working for the next login.
#[utoipa::path(get, path = "/auth/v1/public-keys/{login}", tag = "devices",
    params(("login" = String, Path), PublicKeysQuery),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 401, body = ErrorBody)),
    security(("device_key" = [])))]
pub async fn public_keys(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(login): Path<String>,
    query: Result<Query<PublicKeysQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let device = device_from_key(&state, &headers).await?;
    let store = state.store.as_ref();
    let mut body = String::new();
    let users = if query.all_members {
        policy::users_reaching(store, &device.uuid, SSH_PORT).await?
    } else {
        match store.user_by_name(&login).await? {
            // The same rule as a CONNECT to the device's sshd: one place decides reach.
            Some(user) if policy::user_may_reach(store, &user, &device.uuid, SSH_PORT).await? => {
                vec![user]
            }
            _ => Vec::new(),
        }
    };
    for user in users {
        for key in store.list_ssh_keys(user.id).await? {
            if query.all_members {
                body.push_str(&with_comment(&key.public_key, &user.username));
            } else {
                body.push_str(&key.public_key);
            }
            body.push('\n');
        }
    }
    let now = crate::store::now_ms();
    for (key, username) in store.ephemeral_keys(&device.uuid, &login, now).await? {
        let comment = format!("{username} (cloudlink terminal)");
        body.push_str(&with_comment(&key.public_key, &comment));
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body))
}

/// `type base64` of an OpenSSH key line, followed by `comment`.
fn with_comment(public_key: &str, comment: &str) -> String {
    let mut fields = public_key.split_whitespace();
    let (kind, data) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
    format!("{kind} {data} {comment}")
}

/// The device whose key is the request's bearer token, or 401. The key alone names the
/// device (balenaOS's stock script sends nothing else); keys are unique random secrets.
async fn device_from_key(state: &Shared, headers: &HeaderMap) -> Result<Device, ApiError> {
    let key = bearer(headers).ok_or(ApiError::Unauthorized)?;
    let hash = tokens::hash_secret(key);
    let device = state
        .store
        .device_by_key_hash(&hash)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    match crate::auth::device_key_matches(&device, &hash, crate::store::now_ms()) {
        Some(_) => Ok(device),
        None => Err(ApiError::Unauthorized),
    }
}

/// The longest grace period a rotation may give the old key: 30 days.
const MAX_ROTATION_GRACE_SECS: u64 = 30 * 86_400;

/// Gives a device a new key without downtime (owners and admins): the old key keeps
/// working until the agent has connected with the new one, or the grace period ends.
#[utoipa::path(post, path = "/v1/devices/{uuid}/rotate-key", tag = "devices",
    params(("uuid" = String, Path)), request_body = RotateKey,
    responses((status = 200, body = RotatedKey), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_key(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(uuid): Path<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<RotatedKey>, ApiError> {
    let body: RotateKey = optional_json(&body)?;
    let grace = body.grace_secs.unwrap_or(86_400);
    if grace > MAX_ROTATION_GRACE_SECS {
        return Err(ApiError::bad("grace_secs may be at most 30 days."));
    }
    let (device, standing) = visible_device(&state, &caller, &uuid).await?;
    if standing != Standing::Manager {
        return Err(ApiError::Forbidden(format!(
            "Only owners of fleet {} and admins may rotate its devices' keys.",
            device.fleet
        )));
    }
    let key = tokens::new_device_key();
    let until = crate::store::now_ms() + (grace as i64) * 1000;
    if !state
        .store
        .rotate_device_key(&device.uuid, &tokens::hash_secret(&key), until)
        .await?
    {
        return Err(ApiError::not_found(format!("Device {}", device.uuid)));
    }
    Ok(axum::Json(RotatedKey {
        uuid: device.uuid,
        key,
        old_key_valid_until: rfc3339(until),
    }))
}

/// The relays of the cluster, live and recently dead (admins only).
#[utoipa::path(get, path = "/v1/relays", tag = "relays",
    responses((status = 200, body = [RelayView]), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_relays(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<Vec<RelayView>>, ApiError> {
    caller.require_admin()?;
    let now = crate::store::now_ms();
    let relays = state.store.list_relays().await?;
    Ok(axum::Json(
        relays
            .into_iter()
            .map(|r| RelayView {
                alive: r.alive(now),
                id: r.id,
                peer_addr: r.peer_addr,
                started_at: rfc3339(r.started_at),
                heartbeat_at: rfc3339(r.heartbeat_at),
                draining: r.draining,
                devices: r.devices,
                tunnels: r.tunnels,
            })
            .collect(),
    ))
}

//! `/v1/devices` and `/v1/fleets/{name}/devices`: registering, listing, showing, deleting
//! devices and rotating their keys.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, Path};
use super::fields::{rfc3339, validate_name};
use super::fleets::{managed_fleet, visible_fleet, Standing};
use crate::auth::tokens;
use crate::proto::api::{DeviceView, NewDevice, RegisteredDevice, RotateKey, RotatedKey};
use crate::relay::state::Shared;
use crate::store::Device;

impl From<Device> for DeviceView {
    fn from(d: Device) -> Self {
        let online = d.online();
        let state = d.state().to_owned();
        DeviceView {
            uuid: d.uuid,
            name: d.name,
            fleet: d.fleet,
            online,
            state,
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

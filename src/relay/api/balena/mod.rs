//! The part of balena's API that the unmodified balena CLI calls for `login --token`,
//! `whoami`, `device list`, `device ssh` and `device tunnel` (PROTOCOL.md §6): answered in
//! balena's shapes from our store. A Cloudlink API key (or a relay JWT) is the balena
//! token. Fleets are applications (`app_name` and `slug` are the fleet's name); devices
//! are seen only by their fleets' members (every device by admins), so a device another
//! user cannot reach is exactly one that does not exist. What is not served answers 400
//! with a sentence, as balena's API does, never a guess.

pub mod odata;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Caller;
use super::fields::rfc3339;
use crate::relay::state::Shared;
use crate::store::{Device, DeviceFilter, Fleet};
use odata::{Options, QueryError, Shape};

/// An error as balena's API gives it: the status and a one-sentence text body (the CLI
/// shows the body as it is).
pub struct BalenaError(StatusCode, String);

impl IntoResponse for BalenaError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

impl From<ApiError> for BalenaError {
    fn from(e: ApiError) -> BalenaError {
        let status = e.status_code().0;
        let text = match e {
            ApiError::Unauthorized => "Unauthorized".to_owned(),
            other => other.to_string(),
        };
        BalenaError(status, text)
    }
}

impl From<QueryError> for BalenaError {
    fn from(e: QueryError) -> BalenaError {
        BalenaError(StatusCode::BAD_REQUEST, e.0)
    }
}

impl From<crate::store::StoreError> for BalenaError {
    fn from(e: crate::store::StoreError) -> BalenaError {
        ApiError::from(e).into()
    }
}

type Result<T> = std::result::Result<T, BalenaError>;

/// The caller, or balena's 401.
fn caller(caller: std::result::Result<Caller, ApiError>) -> Result<Caller> {
    caller.map_err(BalenaError::from)
}

/// `GET /actor/v1/whoami`: who the token belongs to.
pub async fn whoami(caller_: std::result::Result<Caller, ApiError>) -> Result<axum::Json<Value>> {
    let user = caller(caller_)?.0.user;
    Ok(axum::Json(json!({
        "id": user.id,
        "actorType": "user",
        "actorTypeId": user.id,
        "username": user.username,
        "email": Value::Null,
    })))
}

/// `GET /user/v1/refresh-token`: a fresh relay JWT for the API key behind the caller's
/// (balena's CLI asks for one when its JWT is a day old), as plain text.
pub async fn refresh_token(
    State(state): State<Arc<Shared>>,
    caller_: std::result::Result<Caller, ApiError>,
) -> Result<Response> {
    let caller = caller(caller_)?;
    let Some(key_id) = caller.0.credential.api_key() else {
        return Err(BalenaError(
            StatusCode::FORBIDDEN,
            "Tokens from an outside identity service are not refreshed here.".into(),
        ));
    };
    let (token, _) = super::tokens::mint_for_key(&state, caller.0.user.id, key_id).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], token).into_response())
}

static DEVICE: Shape = Shape {
    fields: &[
        "id",
        "uuid",
        "device_name",
        "status",
        "is_online",
        "is_connected_to_vpn",
        "api_heartbeat_state",
        "last_connectivity_event",
        "created_at",
        "supervisor_version",
        "os_version",
        "os_variant",
        "ip_address",
        "note",
    ],
    links: &[
        ("belongs_to__application", &APPLICATION),
        ("is_of__device_type", &DEVICE_TYPE),
        ("is_running__release", &RELEASE),
    ],
};

static APPLICATION: Shape = Shape {
    fields: &["id", "app_name", "slug", "uuid", "is_host", "created_at"],
    links: &[("owns__device", &DEVICE)],
};

static DEVICE_TYPE: Shape = Shape {
    fields: &["slug", "name"],
    links: &[],
};

static RELEASE: Shape = Shape {
    fields: &["commit"],
    links: &[],
};

/// A device's number, as balena's `id`: the uuid's first 7 hex digits (what the CLI
/// shows; the relay names devices by uuid).
fn device_id(uuid: &str) -> i64 {
    uuid.get(..7)
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

fn device_record(d: &Device) -> Value {
    let online = d.online();
    json!({
        "id": device_id(&d.uuid),
        "uuid": d.uuid,
        "device_name": d.name,
        "status": if online { "Idle" } else { "Offline" },
        "is_online": online,
        "is_connected_to_vpn": online,
        // balena's own states; `timeout` is its "heartbeat missed, not yet offline".
        "api_heartbeat_state": match d.state() {
            "online" => "online",
            "reconnecting" => "timeout",
            _ => "offline",
        },
        "last_connectivity_event": d.last_seen.map(rfc3339),
        "created_at": rfc3339(d.created_at),
        // The relay does not know what a device runs.
        "supervisor_version": Value::Null,
        "os_version": Value::Null,
        "os_variant": Value::Null,
        "ip_address": Value::Null,
        "note": Value::Null,
    })
}

fn application_record(f: &Fleet) -> Value {
    json!({
        "id": f.id,
        "app_name": f.name,
        "slug": f.name,
        "uuid": Value::Null,
        "is_host": false,
        "created_at": rfc3339(f.created_at),
    })
}

/// The devices and fleets the caller may see, as balena records, indexed for the links
/// between them.
struct Visible {
    devices: Vec<Value>,
    fleets: Vec<Value>,
    /// Device uuid to its fleet's id.
    fleet_of: HashMap<String, i64>,
    /// Fleet id to its record.
    fleet: HashMap<i64, Value>,
    /// Fleet id to its devices' records.
    devices_of: HashMap<i64, Vec<Value>>,
}

impl Visible {
    async fn load(state: &Shared, caller: &Caller, filter: &DeviceFilter) -> Result<Visible> {
        let member = (!caller.0.user.is_admin).then_some(caller.0.user.id);
        let devices: Vec<Device> = state.store.list_devices(member, filter).await?;
        let fleets: Vec<Fleet> = state.store.list_fleets(member).await?;
        let mut devices_of: HashMap<i64, Vec<Value>> = HashMap::new();
        let mut fleet_of = HashMap::new();
        let records: Vec<Value> = devices
            .iter()
            .map(|d| {
                let record = device_record(d);
                fleet_of.insert(d.uuid.clone(), d.fleet_id);
                devices_of
                    .entry(d.fleet_id)
                    .or_default()
                    .push(record.clone());
                record
            })
            .collect();
        let fleet_records: Vec<Value> = fleets.iter().map(application_record).collect();
        let fleet = fleets
            .iter()
            .zip(&fleet_records)
            .map(|(f, r)| (f.id, r.clone()))
            .collect();
        Ok(Visible {
            devices: records,
            fleets: fleet_records,
            fleet_of,
            fleet,
            devices_of,
        })
    }

    /// The records linked from `record` by `link`.
    fn links(&self, record: &Value, link: &str) -> Vec<Value> {
        match link {
            "belongs_to__application" => record
                .get("uuid")
                .and_then(Value::as_str)
                .and_then(|uuid| self.fleet_of.get(uuid))
                .and_then(|id| self.fleet.get(id))
                .cloned()
                .into_iter()
                .collect(),
            "owns__device" => record
                .get("id")
                .and_then(Value::as_i64)
                .and_then(|id| self.devices_of.get(&id))
                .cloned()
                .unwrap_or_default(),
            // The relay does not know devices' types or releases: linked to nothing.
            _ => Vec::new(),
        }
    }
}

/// One `/v7/<resource>` path: a collection, or one record by key (`device(uuid='…')`,
/// `device(7)`).
#[derive(Debug, PartialEq, Eq)]
enum Resource {
    Devices(Option<Key>),
    Applications(Option<Key>),
}

#[derive(Debug, PartialEq, Eq)]
enum Key {
    Id(i64),
    Field(&'static str, String),
}

fn resource(path: &str) -> Result<Resource> {
    if path.contains('/') {
        return Err(unserved(path));
    }
    let (name, key) = match path.find('(') {
        Some(open) if path.ends_with(')') => (&path[..open], Some(&path[open + 1..path.len() - 1])),
        Some(_) => return Err(unserved(path)),
        None => (path, None),
    };
    let key = match key {
        None => None,
        Some(k) => Some(match k.split_once('=') {
            None => Key::Id(k.trim().parse().map_err(|_| unserved(path))?),
            Some((field, value)) => {
                let value = value.trim();
                let value = value
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .ok_or_else(|| unserved(path))?
                    .replace("''", "'");
                let field = match field.trim() {
                    "uuid" => "uuid",
                    "slug" if name == "application" => "slug",
                    _ => return Err(unserved(path)),
                };
                Key::Field(field, value)
            }
        }),
    };
    match name {
        "device" => Ok(Resource::Devices(key)),
        "application" => Ok(Resource::Applications(key)),
        _ => Err(unserved(path)),
    }
}

fn unserved(path: &str) -> BalenaError {
    BalenaError(
        StatusCode::BAD_REQUEST,
        format!("/v7/{path} is not served by this relay (PROTOCOL.md §6 lists what is)."),
    )
}

/// `GET /v7/device…` and `GET /v7/application…`: `{"d":[…]}`.
pub async fn v7(
    State(state): State<Arc<Shared>>,
    caller_: std::result::Result<Caller, ApiError>,
    Path(path): Path<String>,
    query: std::result::Result<
        Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<axum::Json<Value>> {
    let caller = caller(caller_)?;
    let Query(query) = query.map_err(|e| BalenaError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let resource = resource(&path)?;
    let pairs = query.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let (shape, key) = match &resource {
        Resource::Devices(key) => (&DEVICE, key),
        Resource::Applications(key) => (&APPLICATION, key),
    };
    let options = Options::parse(pairs, shape)?;
    // The store narrows devices by a uuid the request pins.
    let uuid_prefix = match key {
        Some(Key::Field("uuid", uuid)) if matches!(resource, Resource::Devices(_)) => {
            Some(uuid.clone())
        }
        _ => options.filter.as_ref().and_then(|f| f.uuid_prefix()),
    }
    .map(|p| p.to_ascii_lowercase())
    .filter(|p| (1..=32).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit()));
    let filter = DeviceFilter {
        uuid_prefix,
        name: None,
    };
    let visible = Visible::load(&state, &caller, &filter).await?;
    let mut records: Vec<Value> = match resource {
        Resource::Devices(_) => visible.devices.clone(),
        Resource::Applications(_) => visible.fleets.clone(),
    };
    if let Some(key) = key {
        records.retain(|r| match key {
            Key::Id(id) => r.get("id").and_then(Value::as_i64) == Some(*id),
            Key::Field(field, value) => r.get(*field).and_then(Value::as_str) == Some(value),
        });
    }
    let links = |record: &Value, link: &str| visible.links(record, link);
    Ok(axum::Json(json!({ "d": options.apply(records, &links) })))
}

/// Any other path under balena's prefixes: 400, saying so.
pub async fn unserved_path(uri: axum::http::Uri) -> BalenaError {
    BalenaError(
        StatusCode::BAD_REQUEST,
        format!(
            "{} is not served by this relay (PROTOCOL.md §6 lists what is).",
            uri.path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths() {
        assert_eq!(resource("device").ok(), Some(Resource::Devices(None)));
        assert_eq!(
            resource("device(uuid='abc')").ok(),
            Some(Resource::Devices(Some(Key::Field("uuid", "abc".into()))))
        );
        assert_eq!(
            resource("device(7)").ok(),
            Some(Resource::Devices(Some(Key::Id(7))))
        );
        assert_eq!(
            resource("application(slug='a''b')").ok(),
            Some(Resource::Applications(Some(Key::Field(
                "slug",
                "a'b".into()
            ))))
        );
        for bad in [
            "user",
            "device/owns",
            "device(uuid=abc)",
            "device(name='x')",
            "device(x",
            "device(1.5)",
            "service_instance",
        ] {
            assert!(resource(bad).is_err(), "{bad}");
        }
    }
}

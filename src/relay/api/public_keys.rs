//! `/auth/v1/public-keys/{login}`: the device-facing authorized-keys lookup (PROTOCOL.md §4).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::error::{ApiError, ErrorBody};
use super::extract::{bearer, Path};
use crate::auth::{policy, tokens};
use crate::proto::SSH_PORT;
use crate::relay::state::Shared;
use crate::store::Device;

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

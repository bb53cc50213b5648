//! `/v1/api-keys`: a user's API keys.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::{Caller, Json, Path};
use super::fields::{rfc3339, validate_name};
use crate::auth::tokens;
use crate::proto::api::{ApiKeyView, CreatedApiKey, NewApiKey};
use crate::relay::state::Shared;
use crate::store::{ApiKey, Id};

/// The longest expiry a key may be given: ten years.
const MAX_KEY_LIFETIME_SECS: u64 = 10 * 366 * 86_400;

impl From<ApiKey> for ApiKeyView {
    fn from(k: ApiKey) -> Self {
        ApiKeyView {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            created_at: rfc3339(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339),
            revoked_at: k.revoked_at.map(rfc3339),
            expires_at: k.expires_at.map(rfc3339),
        }
    }
}

pub(super) async fn issue_api_key(
    state: &Shared,
    user_id: Id,
    name: &str,
    expires_at: Option<i64>,
) -> Result<(ApiKey, String), ApiError> {
    let key = tokens::new_api_key();
    let row = state
        .store
        .create_api_key(
            user_id,
            name,
            &tokens::hash_secret(&key),
            &tokens::display_prefix(&key),
            expires_at,
        )
        .await?;
    Ok((row, key))
}

/// Creates an API key for the caller.
#[utoipa::path(post, path = "/v1/api-keys", request_body = NewApiKey, tag = "keys",
    responses((status = 201, body = CreatedApiKey)), security(("bearer" = [])))]
pub async fn create_api_key(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Json(body): Json<NewApiKey>,
) -> Result<(StatusCode, axum::Json<CreatedApiKey>), ApiError> {
    validate_name("name", &body.name)?;
    let expires_at = match body.expires_in_secs {
        None => None,
        Some(0) => return Err(ApiError::bad("expires_in_secs must be positive.")),
        Some(s) if s > MAX_KEY_LIFETIME_SECS => {
            return Err(ApiError::bad("expires_in_secs may be at most ten years."))
        }
        Some(s) => Some(crate::store::now_ms() + (s as i64) * 1000),
    };
    let (row, key) = issue_api_key(&state, caller.0.user.id, &body.name, expires_at).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedApiKey {
            id: row.id,
            name: row.name,
            key,
            prefix: row.prefix,
            expires_at: row.expires_at.map(rfc3339),
        }),
    ))
}

/// Lists the caller's API keys, revoked ones included.
#[utoipa::path(get, path = "/v1/api-keys", tag = "keys",
    responses((status = 200, body = [ApiKeyView])), security(("bearer" = [])))]
pub async fn list_api_keys(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<Vec<ApiKeyView>>, ApiError> {
    let keys = state.store.list_api_keys(caller.0.user.id).await?;
    Ok(axum::Json(keys.into_iter().map(ApiKeyView::from).collect()))
}

/// Revokes one of the caller's API keys, effective for the next request.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "keys",
    params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_api_key(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<Id>,
) -> Result<StatusCode, ApiError> {
    if state.store.revoke_api_key(caller.0.user.id, id).await? {
        state.auth_cache.clear();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("API key {id}")))
    }
}

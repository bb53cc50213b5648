//! `/v1/auth/token`: a short-lived JWT for an API key.

use std::sync::Arc;

use axum::extract::State;

use super::error::ApiError;
use super::extract::Caller;
use super::fields::rfc3339;
use crate::proto::api::IssuedToken;
use crate::relay::state::Shared;

/// Trades the caller's API key (or a JWT minted from one) for a JWT valid for the
/// configured lifetime (1 h default), but never past the key's own expiry. The JWT is bound
/// to the user and to that key: deleting either ends it.
#[utoipa::path(post, path = "/v1/auth/token", tag = "keys",
    responses((status = 200, body = IssuedToken), (status = 403, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_token(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<IssuedToken>, ApiError> {
    let Some(key_id) = caller.0.credential.api_key() else {
        return Err(ApiError::Forbidden(
            "Tokens from an outside identity service cannot be traded for relay tokens; \
             ask that service for a new one."
                .into(),
        ));
    };
    let (token, exp) = mint_for_key(&state, caller.0.user.id, key_id).await?;
    Ok(axum::Json(IssuedToken {
        token,
        expires_at: rfc3339(exp as i64 * 1000),
    }))
}

/// A relay JWT for `user` through their API key `key_id`, living the configured time but
/// never past the key's own expiry; returns the token and its expiry (Unix seconds).
pub async fn mint_for_key(
    state: &Shared,
    user: crate::store::Id,
    key_id: crate::store::Id,
) -> Result<(String, u64), crate::store::StoreError> {
    let mut ttl = state.config.jwt_ttl_secs;
    if let Some(key) = state.store.api_key_by_id(key_id).await? {
        if let Some(expires_at) = key.expires_at {
            let left = (expires_at - crate::store::now_ms()).max(0) as u64 / 1000;
            ttl = ttl.min(left.max(1));
        }
    }
    Ok(state.jwt.mint(user, key_id, ttl))
}

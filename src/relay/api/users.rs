//! Users, API keys, JWTs and SSH keys.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::{Caller, Json, Path};
use super::fields::{rfc3339, validate_name};
use crate::auth::ssh_keys;
use crate::auth::tokens;
use crate::proto::api::{
    ApiKeyView, CreatedApiKey, CreatedUser, ImportSshKeys, ImportedSshKeys, InvalidKeyLine,
    IssuedToken, NewApiKey, NewSshKey, NewUser, SshKeyView, UserView,
};
use crate::relay::state::Shared;
use crate::store::{ApiKey, Id, SshKey, StoreError, User};

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            id: u.id,
            username: u.username,
            admin: u.is_admin,
        }
    }
}

/// Creates a user and a first API key named `default` (admins only).
#[utoipa::path(post, path = "/v1/users", request_body = NewUser, tag = "users",
    responses((status = 201, body = CreatedUser), (status = 409, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_user(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Json(body): Json<NewUser>,
) -> Result<(StatusCode, axum::Json<CreatedUser>), ApiError> {
    caller.require_admin()?;
    validate_name("username", &body.username)?;
    let user = state
        .store
        .create_user(&body.username, body.admin)
        .await
        .map_err(|e| match e {
            StoreError::Conflict => {
                ApiError::Conflict(format!("User {} already exists.", body.username))
            }
            e => e.into(),
        })?;
    let (_, key) = issue_api_key(&state, user.id, "default", None).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedUser {
            id: user.id,
            username: user.username,
            admin: user.is_admin,
            api_key: key,
        }),
    ))
}

/// Lists every user (admins only).
#[utoipa::path(get, path = "/v1/users", tag = "users",
    responses((status = 200, body = [UserView])), security(("bearer" = [])))]
pub async fn list_users(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<Vec<UserView>>, ApiError> {
    caller.require_admin()?;
    let users = state.store.list_users().await?;
    Ok(axum::Json(users.into_iter().map(UserView::from).collect()))
}

/// Deletes a user with their keys and memberships (admins only).
#[utoipa::path(delete, path = "/v1/users/{username}", tag = "users",
    params(("username" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_user(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(username): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let user = state
        .store
        .user_by_name(&username)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("User {username}")))?;
    if user.id == caller.0.user.id {
        return Err(ApiError::bad("You cannot delete yourself."));
    }
    state.store.delete_user(user.id).await?;
    state.auth_cache.clear();
    Ok(StatusCode::NO_CONTENT)
}

/// Who the caller is.
#[utoipa::path(get, path = "/v1/me", tag = "users",
    responses((status = 200, body = UserView)), security(("bearer" = [])))]
pub async fn me(caller: Caller) -> axum::Json<UserView> {
    axum::Json(caller.0.user.into())
}

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

async fn issue_api_key(
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
    let mut ttl = state.config.jwt_ttl_secs;
    if let Some(key) = state.store.api_key_by_id(key_id).await? {
        if let Some(expires_at) = key.expires_at {
            let left = (expires_at - crate::store::now_ms()).max(0) as u64 / 1000;
            ttl = ttl.min(left.max(1));
        }
    }
    let (token, exp) = state.jwt.mint(caller.0.user.id, key_id, ttl);
    Ok(axum::Json(IssuedToken {
        token,
        expires_at: rfc3339(exp as i64 * 1000),
    }))
}

impl From<SshKey> for SshKeyView {
    fn from(k: SshKey) -> Self {
        SshKeyView {
            id: k.id,
            title: k.title,
            fingerprint: k.fingerprint,
            public_key: k.public_key,
            created_at: rfc3339(k.created_at),
        }
    }
}

/// Adds a public SSH key to the caller's account.
#[utoipa::path(post, path = "/v1/ssh-keys", request_body = NewSshKey, tag = "keys",
    responses((status = 201, body = SshKeyView), (status = 409, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_ssh_key(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Json(body): Json<NewSshKey>,
) -> Result<(StatusCode, axum::Json<SshKeyView>), ApiError> {
    let title = body.title.trim();
    if title.is_empty() || title.chars().count() > 200 || title.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "The title must be 1 to 200 printable characters.",
        ));
    }
    let parsed = ssh_keys::parse(&body.public_key).map_err(|e| ApiError::bad(e.to_string()))?;
    let row = state
        .store
        .add_ssh_key(
            caller.0.user.id,
            title,
            &parsed.openssh,
            &parsed.fingerprint,
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict => {
                ApiError::Conflict(format!("You already have the key {}.", parsed.fingerprint))
            }
            e => e.into(),
        })?;
    Ok((StatusCode::CREATED, axum::Json(row.into())))
}

/// Adds the public keys of a GitHub account to the caller's account, skipping keys the
/// caller has already and reporting lines that are not acceptable keys.
#[utoipa::path(post, path = "/v1/ssh-keys/import", request_body = ImportSshKeys, tag = "keys",
    responses((status = 200, body = ImportedSshKeys),
        (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 502, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_ssh_keys(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Json(body): Json<ImportSshKeys>,
) -> Result<axum::Json<ImportedSshKeys>, ApiError> {
    use crate::relay::github::{self, GithubError};
    let text = github::fetch_keys(&state.config.github_keys_url, &body.github)
        .await
        .map_err(|e| match e {
            GithubError::BadLogin(_) => ApiError::bad(e.to_string()),
            GithubError::UnknownLogin(_) => ApiError::NotFound(e.to_string()),
            GithubError::Fetch { .. } => ApiError::BadGateway(e.to_string()),
        })?;
    let title = format!("GitHub {}", body.github);
    let mut out = ImportedSshKeys {
        added: Vec::new(),
        duplicates: Vec::new(),
        invalid: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = match ssh_keys::parse(line) {
            Ok(parsed) => parsed,
            Err(e) => {
                out.invalid.push(InvalidKeyLine {
                    line: i + 1,
                    error: e.to_string(),
                });
                continue;
            }
        };
        match state
            .store
            .add_ssh_key(
                caller.0.user.id,
                &title,
                &parsed.openssh,
                &parsed.fingerprint,
            )
            .await
        {
            Ok(row) => out.added.push(row.into()),
            Err(StoreError::Conflict) => out.duplicates.push(parsed.fingerprint),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(axum::Json(out))
}

/// Lists the caller's SSH keys.
#[utoipa::path(get, path = "/v1/ssh-keys", tag = "keys",
    responses((status = 200, body = [SshKeyView])), security(("bearer" = [])))]
pub async fn list_ssh_keys(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<Vec<SshKeyView>>, ApiError> {
    let keys = state.store.list_ssh_keys(caller.0.user.id).await?;
    Ok(axum::Json(keys.into_iter().map(SshKeyView::from).collect()))
}

/// Removes one of the caller's SSH keys.
#[utoipa::path(delete, path = "/v1/ssh-keys/{id}", tag = "keys",
    params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_ssh_key(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<Id>,
) -> Result<StatusCode, ApiError> {
    if state.store.delete_ssh_key(caller.0.user.id, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("SSH key {id}")))
    }
}

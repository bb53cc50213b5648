//! `/v1/ssh-keys`: a user's SSH public keys, added or imported from GitHub.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::{Caller, Json, Path};
use super::fields::rfc3339;
use crate::auth::ssh_keys;
use crate::proto::api::{ImportSshKeys, ImportedSshKeys, InvalidKeyLine, NewSshKey, SshKeyView};
use crate::relay::state::Shared;
use crate::store::{Id, SshKey, StoreError};

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

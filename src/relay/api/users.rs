//! `/v1/users` and `/v1/me`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::api_keys::issue_api_key;
use super::error::ApiError;
use super::extract::{Caller, Json, Path};
use super::fields::validate_name;
use crate::proto::api::{CreatedUser, NewUser, UserView};
use crate::relay::state::Shared;
use crate::store::{StoreError, User};

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

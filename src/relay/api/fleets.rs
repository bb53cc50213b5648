//! Fleets and their members.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, Json, Path};
use super::fields::validate_name;
use crate::proto::api::Role;
use crate::proto::api::{FleetPatch, FleetView, MemberView, NewFleet, NewMember};
use crate::relay::state::Shared;
use crate::store::{Fleet, StoreError};

/// What the caller may do with a fleet they can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Admin or owner: manage members and devices.
    Manager,
    /// Member: see the fleet and reach its devices.
    Member,
}

/// The fleet and the caller's standing in it; 404 when it does not exist or is not theirs
/// to see (the same answer, so fleet names cannot be probed).
pub async fn visible_fleet(
    state: &Shared,
    caller: &Caller,
    name: &str,
) -> Result<(Fleet, Standing), ApiError> {
    let not_found = || ApiError::not_found(format!("Fleet {name}"));
    let fleet = state
        .store
        .fleet_by_name(name)
        .await?
        .ok_or_else(not_found)?;
    if caller.0.user.is_admin {
        return Ok((fleet, Standing::Manager));
    }
    match state.store.member_role(fleet.id, caller.0.user.id).await? {
        Some(Role::Owner) => Ok((fleet, Standing::Manager)),
        Some(Role::Member) => Ok((fleet, Standing::Member)),
        None => Err(not_found()),
    }
}

/// Like [`visible_fleet`], but 403 for plain members.
pub async fn managed_fleet(state: &Shared, caller: &Caller, name: &str) -> Result<Fleet, ApiError> {
    match visible_fleet(state, caller, name).await? {
        (fleet, Standing::Manager) => Ok(fleet),
        (_, Standing::Member) => Err(ApiError::Forbidden(format!(
            "Only owners of fleet {name} and admins may do this."
        ))),
    }
}

impl From<Fleet> for FleetView {
    fn from(f: Fleet) -> Self {
        FleetView {
            id: f.id,
            name: f.name,
            allowed_ports: f.allowed_ports,
            created_at: super::fields::rfc3339(f.created_at),
        }
    }
}

fn check_ports(ports: &[u16]) -> Result<(), ApiError> {
    if ports.contains(&0) {
        return Err(ApiError::bad("Port 0 cannot be allowed."));
    }
    Ok(())
}

/// Creates a fleet; the caller becomes its owner.
#[utoipa::path(post, path = "/v1/fleets", request_body = NewFleet, tag = "fleets",
    responses((status = 201, body = FleetView), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_fleet(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Json(body): Json<NewFleet>,
) -> Result<(StatusCode, axum::Json<FleetView>), ApiError> {
    validate_name("name", &body.name)?;
    check_ports(&body.allowed_ports)?;
    let fleet = state
        .store
        .create_fleet(&body.name, &body.allowed_ports, Some(caller.0.user.id))
        .await
        .map_err(|e| match e {
            StoreError::Conflict => {
                ApiError::Conflict(format!("Fleet {} already exists.", body.name))
            }
            e => e.into(),
        })?;
    Ok((StatusCode::CREATED, axum::Json(fleet.into())))
}

/// Lists the fleets the caller may see (admins: all).
#[utoipa::path(get, path = "/v1/fleets", tag = "fleets",
    responses((status = 200, body = [FleetView])), security(("bearer" = [])))]
pub async fn list_fleets(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<Vec<FleetView>>, ApiError> {
    let member = (!caller.0.user.is_admin).then_some(caller.0.user.id);
    let fleets = state.store.list_fleets(member).await?;
    Ok(axum::Json(
        fleets.into_iter().map(FleetView::from).collect(),
    ))
}

/// Shows one fleet.
#[utoipa::path(get, path = "/v1/fleets/{name}", tag = "fleets", params(("name" = String, Path)),
    responses((status = 200, body = FleetView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_fleet(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<FleetView>, ApiError> {
    let (fleet, _) = visible_fleet(&state, &caller, &name).await?;
    Ok(axum::Json(fleet.into()))
}

/// Changes a fleet's port allowlist (owners and admins).
#[utoipa::path(patch, path = "/v1/fleets/{name}", tag = "fleets", params(("name" = String, Path)),
    request_body = FleetPatch,
    responses((status = 200, body = FleetView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn patch_fleet(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(body): Json<FleetPatch>,
) -> Result<axum::Json<FleetView>, ApiError> {
    check_ports(&body.allowed_ports)?;
    let mut fleet = managed_fleet(&state, &caller, &name).await?;
    state
        .store
        .set_fleet_ports(fleet.id, &body.allowed_ports)
        .await?;
    state.auth_cache.clear();
    fleet.allowed_ports = body.allowed_ports;
    Ok(axum::Json(fleet.into()))
}

/// Deletes a fleet with its devices (owners and admins).
#[utoipa::path(delete, path = "/v1/fleets/{name}", tag = "fleets", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_fleet(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let fleet = managed_fleet(&state, &caller, &name).await?;
    state.store.delete_fleet(fleet.id).await?;
    state.auth_cache.clear();
    Ok(StatusCode::NO_CONTENT)
}

/// Lists a fleet's members (anyone who can see the fleet).
#[utoipa::path(get, path = "/v1/fleets/{name}/members", tag = "fleets",
    params(("name" = String, Path)),
    responses((status = 200, body = [MemberView]), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_members(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Vec<MemberView>>, ApiError> {
    let (fleet, _) = visible_fleet(&state, &caller, &name).await?;
    let members = state.store.list_members(fleet.id).await?;
    Ok(axum::Json(
        members
            .into_iter()
            .map(|m| MemberView {
                username: m.username,
                role: m.role,
            })
            .collect(),
    ))
}

/// Adds a member or changes their role (owners and admins).
#[utoipa::path(post, path = "/v1/fleets/{name}/members", tag = "fleets",
    params(("name" = String, Path)), request_body = NewMember,
    responses((status = 201, body = MemberView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_member(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(body): Json<NewMember>,
) -> Result<(StatusCode, axum::Json<MemberView>), ApiError> {
    let fleet = managed_fleet(&state, &caller, &name).await?;
    let user = state
        .store
        .user_by_name(&body.username)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("User {}", body.username)))?;
    state.store.set_member(fleet.id, user.id, body.role).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(MemberView {
            username: user.username,
            role: body.role,
        }),
    ))
}

/// Removes a member (owners and admins); their open tunnels end within seconds.
#[utoipa::path(delete, path = "/v1/fleets/{name}/members/{username}", tag = "fleets",
    params(("name" = String, Path), ("username" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn remove_member(
    State(state): State<Arc<Shared>>,
    caller: Caller,
    Path((name, username)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let fleet = managed_fleet(&state, &caller, &name).await?;
    let not_member = || ApiError::not_found(format!("Member {username} of fleet {name}"));
    let user = state
        .store
        .user_by_name(&username)
        .await?
        .ok_or_else(not_member)?;
    if state.store.remove_member(fleet.id, user.id).await? {
        state.auth_cache.clear();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_member())
    }
}

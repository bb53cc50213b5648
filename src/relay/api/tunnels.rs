//! `/v1/tunnels`: the tunnel audit log.

use std::sync::Arc;

use axum::extract::{Query, State};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Caller;
use super::fields::rfc3339;
use crate::proto::api::TunnelView;
use crate::relay::state::Shared;
use crate::store::TunnelSession;

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
            resumes: t.resumes,
            replayed_bytes: t.replayed_bytes,
            waited_ms: t.waited_ms,
            resume_failure: t.resume_failure,
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

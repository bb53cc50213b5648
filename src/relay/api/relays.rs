//! `/v1/relays`: the relays sharing this store.

use std::sync::Arc;

use axum::extract::State;

use super::error::{ApiError, ErrorBody};
use super::extract::Caller;
use super::fields::rfc3339;
use crate::proto::api::RelayView;
use crate::relay::state::Shared;

/// The relays of the cluster, live and recently dead (admins only).
#[utoipa::path(get, path = "/v1/relays", tag = "relays",
    responses((status = 200, body = [RelayView]), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_relays(
    State(state): State<Arc<Shared>>,
    caller: Caller,
) -> Result<axum::Json<Vec<RelayView>>, ApiError> {
    caller.require_admin()?;
    let now = crate::store::now_ms();
    let relays = state.store.list_relays().await?;
    Ok(axum::Json(
        relays
            .into_iter()
            .map(|r| RelayView {
                alive: r.alive(now),
                id: r.id,
                peer_addr: r.peer_addr,
                started_at: rfc3339(r.started_at),
                heartbeat_at: rfc3339(r.heartbeat_at),
                draining: r.draining,
                devices: r.devices,
                tunnels: r.tunnels,
            })
            .collect(),
    ))
}

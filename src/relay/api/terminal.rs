//! `GET /v1/devices/{uuid}/terminal`: the upgrade to the browser terminal's WebSocket
//! (PROTOCOL.md §5), after what can be checked before it; the session itself is
//! [`crate::relay::web::terminal`]'s.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Path;
use crate::relay::state::Shared;
use crate::relay::web::terminal::{is_valid_service, session, MAX_MESSAGE};

/// `?service=NAME`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalQuery {
    /// A service to enter instead of the host OS.
    pub service: Option<String>,
}

/// The upgrade: everything that can be checked before it is (the query, the origin).
pub async fn terminal(
    State(state): State<Arc<Shared>>,
    Path(uuid): Path<String>,
    query: Result<Query<TerminalQuery>, axum::extract::rejection::QueryRejection>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let Some(uuid) = crate::proto::device_uuid(&uuid) else {
        return Err(ApiError::bad("A device uuid is 32 hex characters."));
    };
    if let Some(service) = &query.service {
        if !is_valid_service(service) {
            return Err(ApiError::bad(
                "A service name is 1 to 63 letters, digits, '_', '.' and '-'.",
            ));
        }
    }
    if !same_origin(&headers) {
        return Err(ApiError::Forbidden(
            "A terminal may be opened only from this relay's own pages.".into(),
        ));
    }
    let ws = ws.map_err(|_| ApiError::bad("This endpoint takes a WebSocket upgrade."))?;
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, state, uuid, query.service, peer))
        .into_response())
}

/// No `Origin` (a non-browser client), or one naming the host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_must_be_this_host() {
        let headers = |origin: Option<&str>, host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, host.parse().unwrap());
            if let Some(o) = origin {
                h.insert(header::ORIGIN, o.parse().unwrap());
            }
            h
        };
        assert!(same_origin(&headers(None, "relay:8443")));
        assert!(same_origin(&headers(
            Some("https://relay:8443"),
            "relay:8443"
        )));
        assert!(!same_origin(&headers(
            Some("https://evil.example"),
            "relay:8443"
        )));
        assert!(!same_origin(&headers(Some("null"), "relay:8443")));
    }
}

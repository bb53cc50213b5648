//! The REST API (axum): identities, fleets, devices, keys, audit; plus `/healthz`,
//! `/readyz`, `/metrics` and the generated OpenAPI document.

pub mod api_keys;
pub mod balena;
pub mod devices;
pub mod endpoints;
pub mod error;
pub mod extract;
mod fields;
pub mod fleets;
pub mod public_keys;
pub mod relays;
pub mod ssh_keys;
pub mod terminal;
pub mod tokens;
pub mod tunnels;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::listen::{Accepted, Conn, Listeners};
use super::state::Shared;
pub use error::ApiError;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key (clk_…) or a JWT"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A device key"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "Cloudlink relay API", description = "Fleets, devices, keys and tunnels."),
    modifiers(&BearerAuth),
    paths(
        users::create_user, users::list_users, users::delete_user, users::me,
        api_keys::create_api_key, api_keys::list_api_keys, api_keys::revoke_api_key, tokens::issue_token,
        ssh_keys::add_ssh_key, ssh_keys::list_ssh_keys, ssh_keys::delete_ssh_key, ssh_keys::import_ssh_keys,
        fleets::create_fleet, fleets::list_fleets, fleets::get_fleet, fleets::patch_fleet,
        fleets::delete_fleet, fleets::list_members, fleets::add_member, fleets::remove_member,
        devices::register_device, devices::list_devices, devices::get_device,
        devices::delete_device, devices::rotate_key, tunnels::list_tunnels, public_keys::public_keys, relays::list_relays,
        endpoints::endpoints,
        healthz, readyz,
    )
)]
pub struct ApiDoc;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = String)))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The store takes writes and the relay is not draining; 503 otherwise (store unreachable,
/// full, read-only, locked; or SIGTERM received). A load balancer then sends users to a
/// relay that can serve them and record what they do.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = String), (status = 503, body = error::ErrorBody)))]
pub async fn readyz(State(state): State<Arc<Shared>>) -> Result<&'static str, ApiError> {
    if state.draining.is_cancelled() {
        return Err(ApiError::Draining);
    }
    // The heartbeat is a real write of this relay's own row: the write path, not just a
    // read, must work for the relay to be ready.
    state
        .store
        .heartbeat(&state.relay_id, state.status())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "not ready: the store does not take writes");
            state.metrics.ready.set(0);
            ApiError::Unavailable
        })?;
    state.metrics.ready.set(1);
    Ok("ready\n")
}

async fn metrics(State(state): State<Arc<Shared>>) -> impl IntoResponse {
    state.metrics.tunnel_buffer_from(&state.budget);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state
            .metrics
            .render(state.registry.tunnels().iter().map(|t| {
                use std::sync::atomic::Ordering::Relaxed;
                (t.counters.up.load(Relaxed), t.counters.down.load(Relaxed))
            })),
    )
}

async fn openapi() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("No such endpoint.".into())
}

async fn count_responses(State(state): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    state
        .metrics
        .api_responses
        .with_label_values(&[response.status().as_str()])
        .inc();
    response
}

/// `/metrics` alone, for `--metrics-listen`.
pub fn metrics_router(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// The API's routes (`/metrics` among them unless it has a listener of its own).
pub fn router(state: Arc<Shared>) -> Router {
    let mut router = Router::new();
    for path in crate::relay::web::paths() {
        router = router.route(path, get(crate::relay::web::asset));
    }
    if state.config.metrics_listen.is_none() {
        router = router.route("/metrics", get(metrics));
    }
    router
        .route("/v1/users", post(users::create_user).get(users::list_users))
        .route("/v1/users/{username}", delete(users::delete_user))
        .route("/v1/me", get(users::me))
        .route(
            "/v1/api-keys",
            post(api_keys::create_api_key).get(api_keys::list_api_keys),
        )
        .route("/v1/api-keys/{id}", delete(api_keys::revoke_api_key))
        .route("/v1/auth/token", post(tokens::issue_token))
        .route(
            "/v1/ssh-keys",
            post(ssh_keys::add_ssh_key).get(ssh_keys::list_ssh_keys),
        )
        .route("/v1/ssh-keys/import", post(ssh_keys::import_ssh_keys))
        .route("/v1/ssh-keys/{id}", delete(ssh_keys::delete_ssh_key))
        .route(
            "/v1/fleets",
            post(fleets::create_fleet).get(fleets::list_fleets),
        )
        .route(
            "/v1/fleets/{name}",
            get(fleets::get_fleet)
                .patch(fleets::patch_fleet)
                .delete(fleets::delete_fleet),
        )
        .route(
            "/v1/fleets/{name}/members",
            get(fleets::list_members).post(fleets::add_member),
        )
        .route(
            "/v1/fleets/{name}/members/{username}",
            delete(fleets::remove_member),
        )
        .route("/v1/fleets/{name}/devices", post(devices::register_device))
        .route("/v1/devices", get(devices::list_devices))
        .route(
            "/v1/devices/{uuid}",
            get(devices::get_device).delete(devices::delete_device),
        )
        .route("/v1/devices/{uuid}/rotate-key", post(devices::rotate_key))
        .route("/v1/devices/{uuid}/terminal", get(terminal::terminal))
        .route("/v1/tunnels", get(tunnels::list_tunnels))
        .route("/v1/relays", get(relays::list_relays))
        .route("/v1/endpoints", get(endpoints::endpoints))
        // balena's API, the part its CLI calls (PROTOCOL.md §6).
        .route("/actor/v1/whoami", get(balena::whoami))
        .route("/user/v1/refresh-token", get(balena::refresh_token))
        .route("/v7/{*resource}", get(balena::v7))
        .route("/actor/{*rest}", axum::routing::any(balena::unserved_path))
        .route("/user/{*rest}", axum::routing::any(balena::unserved_path))
        .route(
            "/auth/v1/public-keys/{login}",
            get(public_keys::public_keys),
        )
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// Serves the API on its listeners (plain HTTP, and HTTPS when enabled) until the relay
/// shuts down, then lets open requests finish.
///
/// Connections are served by hyper directly rather than `axum::serve`, for what a public
/// listener needs and `axum::serve` does not offer: a header-read timeout (a silent
/// connection is dropped after `limits.api_header_timeout_ms`), a body timeout, a TLS
/// handshake bounded by the same timeout, and a cap on open connections shared by both
/// API listeners; past it, new connections wait in the kernel's backlog.
pub async fn run(listeners: Listeners, state: Arc<Shared>) -> std::io::Result<()> {
    let limits = &state.config.limits;
    let header_timeout = limits.api_header_timeout();
    let conns = Arc::new(Semaphore::new(limits.api_connections_max));
    let app = router(state.clone()).layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.api_body_timeout(),
    ));
    let tracker = TaskTracker::new();
    while let Some(accepted) = listeners.next(&conns, &state.shutdown).await {
        let Accepted { conn, peer, permit } = accepted;
        let app = app.clone();
        let shutdown = state.shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match conn {
                Conn::Plain(stream) => {
                    serve_connection(stream, peer, app, header_timeout, shutdown).await
                }
                Conn::Tls(pending) => {
                    match tokio::time::timeout(header_timeout, pending.finish()).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, app, header_timeout, shutdown).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(client = %peer, "API TLS handshake timed out"),
                    }
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Serves HTTP/1.1 requests on one connection until the client leaves, a header read times
/// out, or the relay shuts down (then the request in flight finishes first).
async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    app: Router,
    header_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let mut app = app.clone();
        async move { tower::Service::call(&mut app, req.map(axum::body::Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "API connection ended with an error");
    }
}

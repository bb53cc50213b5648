//! `/v1/endpoints`: where this relay's users connect (PROTOCOL.md §1d).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;

use crate::proto::api::{EndpointsView, SshEndpoint};
use crate::relay::state::Shared;

/// The CONNECT proxy (TLS and plain) and the SSH gateway with its host key, each at the
/// address set to be advertised, else at the host the caller reached this API by and the
/// listener's bound port. Public: it says nothing a port scan
/// would not, and `cloudlink login` asks it before it has checked a key.
#[utoipa::path(get, path = "/v1/endpoints", tag = "relays",
    responses((status = 200, body = EndpointsView)))]
pub async fn endpoints(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
) -> axum::Json<EndpointsView> {
    let config = &state.config;
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of)
        .filter(|h| !h.is_empty());
    let at = |advertised: &Option<String>, bound: std::net::SocketAddr| match (advertised, host) {
        (Some(advertised), _) => advertised.clone(),
        (None, Some(host)) => format!("{host}:{}", bound.port()),
        (None, None) => bound.to_string(),
    };
    let bound = state.endpoints.get().cloned().unwrap_or_default();
    let proxy_tls = bound
        .proxy_tls
        .map(|addr| at(&config.proxy_advertise, addr));
    let proxy = bound.proxy.map(|addr| at(&None, addr));
    let ssh_gateway = bound.ssh.map(|(addr, host_key, fingerprint)| SshEndpoint {
        address: at(&config.ssh_advertise, addr),
        host_key,
        fingerprint,
    });
    axum::Json(EndpointsView {
        proxy_tls,
        proxy,
        ssh_gateway,
        device_domains: config.device_domains.clone(),
    })
}

/// The host part of a `Host` header: `name`, `1.2.3.4`, `[::1]`, without the port.
fn host_of(header: &str) -> &str {
    let header = header.trim();
    if header.starts_with('[') {
        return header.find(']').map_or(header, |end| &header[..=end]);
    }
    match header.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => header,
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_without_its_port() {
        assert_eq!(host_of("relay.example.com:8443"), "relay.example.com");
        assert_eq!(host_of("relay.example.com"), "relay.example.com");
        assert_eq!(host_of("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8443"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
    }
}

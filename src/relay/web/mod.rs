//! What the relay serves to browsers: the dashboard's files, embedded in the binary, and the
//! terminal's WebSocket (its SSH client is `device_shell.rs`, shared with the gateway).

pub mod terminal;

use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// The dashboard's policy: scripts and styles from this relay only (no inline script at
/// all), network access to this relay only, no framing. Inline styles are allowed because
/// xterm.js sizes its rows and sets its theme through `<style>` elements it creates.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $type:literal) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!("static/", $file)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/app.js", "app.js", "text/javascript; charset=utf-8"),
    asset!("/app.css", "app.css", "text/css; charset=utf-8"),
    asset!(
        "/vendor/xterm.js",
        "vendor/xterm.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "/vendor/xterm.css",
        "vendor/xterm.css",
        "text/css; charset=utf-8"
    ),
    asset!(
        "/vendor/addon-fit.js",
        "vendor/addon-fit.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "/vendor/LICENSE-xterm.txt",
        "vendor/LICENSE-xterm.txt",
        "text/plain; charset=utf-8"
    ),
];

/// The paths the dashboard is served at.
pub fn paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|a| a.path)
}

/// Serves an embedded file with the dashboard's security headers.
pub async fn asset(uri: Uri) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let headers: [(HeaderName, HeaderValue); 6] = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // Small files, and a new relay version must not meet a stale script.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_no_inline_script() {
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        // Every <script> has a src from this relay, and no handler attributes exist.
        for tag in index.split("<script").skip(1) {
            let tag = &tag[..tag.find('>').unwrap()];
            assert!(tag.contains("src=\"/"), "inline or foreign script: {tag}");
        }
        assert!(!index.contains(" onclick=") && !index.contains(" onload="));
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe-eval"));
    }
}

//! A local stand-in for GitHub's `/<login>.keys` (the relay's `--github-keys-url`).

use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;

pub const ED25519_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O";
pub const ED25519_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFyLreSuR5YxOlt0757aSI/evzptYczk1HjS8BFScZ/A";
pub const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLJiakeNo6367eo9DmcxFARDDSkr1+lGrgvyGAM0LLXHKupGeiSrq9I8jTda3bzo4snOHhKOn7Jxt34vXqwbnAg=";

/// GitHub's `/<login>.keys` as the tests need it; returns its base URL.
pub async fn fake_github() -> String {
    let app = axum::Router::new()
        .route(
            "/octocat.keys",
            get(|| async { format!("{ED25519_A}\n{ED25519_B}\nssh-rsa not-a-key\n{ECDSA}\n") }),
        )
        .route(
            "/dupes.keys",
            get(|| async { format!("{ED25519_B}\n{ED25519_B}\n") }),
        )
        .route(
            "/moved.keys",
            get(|| async {
                (StatusCode::FOUND, [(header::LOCATION, "/octocat.keys")]).into_response()
            }),
        )
        .route(
            "/huge.keys",
            get(|| async { format!("{ED25519_A}\n").repeat(1000) }),
        )
        .route(
            "/slow.keys",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                ED25519_A.to_owned()
            }),
        )
        .route(
            "/flaky.keys",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR.into_response() }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/")
}

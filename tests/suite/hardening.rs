//! Trust defects found from outside (issue: hardening), each as a test that failed before
//! the fix: JWT revocation, fair limits, log injection, bounded edges, strict parsing, TLS.

use crate::common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cloudlink::auth::tokens::{unix_now, UserClaims, USER_AUDIENCE};
use cloudlink::proto::messages::{codes, Hello, RelayControl, VERSION};

async fn connect_status(proxy: std::net::SocketAddr, token: &str, uuid: &str, port: u16) -> u16 {
    let request =
        format!("CONNECT {uuid}:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n");
    status_of(&connect_raw(proxy, &request).await.1)
}

/// Reads until the relay ends the tunnel; true if it ended within `limit`.
async fn ends_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut rest))
        .await
        .is_ok()
}

async fn jwt_from(api: &Api) -> String {
    let (status, t) = api.call("POST", "/v1/auth/token", None).await;
    assert_eq!(status, 200, "{t}");
    t["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_jwt_dies_with_the_key_that_minted_it() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    let (status, k) = w
        .admin
        .call("POST", "/v1/api-keys", Some(json!({"name": "laptop"})))
        .await;
    assert_eq!(status, 201);
    let api_key = k["key"].as_str().unwrap().to_owned();
    let jwt = jwt_from(&w.admin.as_user(&api_key)).await;
    // Renewed with itself: still bound to the same key.
    let renewed = jwt_from(&w.admin.as_user(&jwt)).await;
    let mut open = tunnel(w.relay.proxy, &renewed, &uuid, echo).await;
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();

    let (status, _) = w
        .admin
        .call("DELETE", &format!("/v1/api-keys/{}", k["id"]), None)
        .await;
    assert_eq!(status, 204);
    assert!(
        ends_within(&mut open, Duration::from_secs(10)).await,
        "a tunnel opened with a JWT outlived the revoked key"
    );
    for token in [&jwt, &renewed] {
        assert_eq!(connect_status(w.relay.proxy, token, &uuid, echo).await, 407);
        let (status, _) = w.admin.as_user(token).call("GET", "/v1/me", None).await;
        assert_eq!(status, 401);
        let (status, _) = w
            .admin
            .as_user(token)
            .call("POST", "/v1/auth/token", None)
            .await;
        assert_eq!(status, 401, "a JWT of a revoked key renewed itself");
    }
}

#[tokio::test]
async fn a_jwt_does_not_outlive_its_user_or_pass_to_a_namesake() {
    let w = World::new(&limits(""));
    let dana_key = w.user("dana").await;
    let jwt = jwt_from(&w.admin.as_user(&dana_key)).await;
    let (status, me) = w.admin.as_user(&jwt).call("GET", "/v1/me", None).await;
    assert_eq!((status, me["username"].as_str()), (200, Some("dana")));
    let (status, _) = w.admin.call("DELETE", "/v1/users/dana", None).await;
    assert_eq!(status, 204);
    let (status, _) = w.admin.as_user(&jwt).call("GET", "/v1/me", None).await;
    assert_eq!(status, 401, "a deleted user's JWT works");
    // A new account with the same name is somebody else.
    let _new_dana = w.user("dana").await;
    let (status, me) = w.admin.as_user(&jwt).call("GET", "/v1/me", None).await;
    assert_eq!(status, 401, "an old JWT logs in a namesake: {me}");
}

/// The relay's JWT secret in the clock test, given on its command line.
const JWT_SECRET: &str = "jwt-clock-test-secret-jwt-clock-test";

/// A token signed with the relay's own secret, as the relay would shape it; only the
/// clocks are wrong.
fn forge(claims: &UserClaims) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_clocks_are_checked() {
    let w = World::with(&limits(""), &["--jwt-secret", JWT_SECRET], &[]);
    let (_, keys) = w.admin.call("GET", "/v1/api-keys", None).await;
    let kid = keys[0]["id"].as_i64().unwrap();
    let (_, me) = w.admin.call("GET", "/v1/me", None).await;
    let sub = me["id"].as_i64().unwrap().to_string();
    let now = unix_now();
    let good = UserClaims {
        sub,
        exp: now + 600,
        iat: now,
        nbf: None,
        aud: USER_AUDIENCE.into(),
        kid: Some(kid),
    };
    let (status, _) = w
        .admin
        .as_user(&forge(&good))
        .call("GET", "/v1/me", None)
        .await;
    assert_eq!(status, 200, "the well-formed token is accepted");
    for (what, claims) in [
        (
            "nbf in the future",
            UserClaims {
                nbf: Some(now + 300),
                ..good.clone()
            },
        ),
        (
            "iat in the future",
            UserClaims {
                iat: now + 300,
                ..good.clone()
            },
        ),
        (
            "expired",
            UserClaims {
                exp: now - 300,
                iat: now - 900,
                ..good.clone()
            },
        ),
    ] {
        let (status, _) = w
            .admin
            .as_user(&forge(&claims))
            .call("GET", "/v1/me", None)
            .await;
        assert_eq!(status, 401, "{what} accepted");
    }
}

#[tokio::test]
async fn api_keys_may_expire() {
    let w = World::new(&limits(""));
    let (status, k) = w
        .admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "short", "expires_in_secs": 2})),
        )
        .await;
    assert_eq!(status, 201, "{k}");
    assert!(k["expires_at"].is_string(), "{k}");
    let short = w.admin.as_user(k["key"].as_str().unwrap());
    let (status, _) = short.call("GET", "/v1/me", None).await;
    assert_eq!(status, 200);
    let jwt = jwt_from(&short).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            short.call("GET", "/v1/me", None).await.0 == 401
        })
        .await
        .is_some(),
        "the key still works after its expiry"
    );
    let (status, _) = w.admin.as_user(&jwt).call("GET", "/v1/me", None).await;
    assert_eq!(status, 401, "a JWT outlived its key's expiry");
    // The CLI's form.
    w.login(&w.relay.admin_key());
    let out = w.cli_ok(&["api-key", "create", "ci", "--expires", "30d"]);
    assert!(out.contains("expires"), "{out}");
    let (ok, _, err) = w.cli(&["api-key", "create", "bad", "--expires", "3w"]);
    assert!(!ok && err.contains("unit"), "{err}");
}

#[tokio::test]
async fn a_device_key_rotates_without_downtime() {
    let w = World::new(&limits(""));
    let (uuid, old_key) = w.device_in("pis").await;
    let mut agent = Agent::start(&w.relay, &uuid, &old_key, &[]);
    w.login(&w.relay.admin_key());
    let out = w.cli_ok(&["--json", "device", "rotate-key", &uuid, "--grace", "1h"]);
    let rotated: serde_json::Value = serde_json::from_str(&out).unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, old_key);
    let keys_api = |key: &str| {
        let key = key.to_owned();
        let api = w.relay.api;
        async move {
            http()
                .get(format!("http://{api}/auth/v1/public-keys/admin"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // During the grace period both keys work: the running agent reconnects with the old
    // one, and sshd's lookup with either.
    agent.kill();
    let mut agent = Agent::start(&w.relay, &uuid, &old_key, &[]);
    assert_eq!(keys_api(&old_key).await, 200);
    assert_eq!(keys_api(&new_key).await, 200);
    // Once the agent has connected with the new key, the old one is retired.
    agent.kill();
    let _agent = Agent::start(&w.relay, &uuid, &new_key, &[]);
    assert_eq!(keys_api(&old_key).await, 401);
    let (_conn, _s, _r, answer) =
        fake_device::hello(w.relay.device, &w.relay.cert(), &uuid, &old_key).await;
    assert!(matches!(answer, RelayControl::Reject { .. }), "{answer:?}");
    let (status, d) = w
        .admin
        .call("GET", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!((status, d["online"].as_bool()), (200, Some(true)));
}

#[tokio::test]
async fn failed_guesses_never_lock_out_a_valid_key_from_the_same_address() {
    let w = World::new("[limits]\nauth_failures_per_minute = 3\n");
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    let attacker = w.admin.as_user("clk_guess");
    for _ in 0..3 {
        assert_eq!(attacker.call("GET", "/v1/me", None).await.0, 401);
    }
    for _ in 0..3 {
        let (status, _) = attacker.call("GET", "/v1/me", None).await;
        assert_eq!(status, 429, "guessing goes on unthrottled");
        assert_eq!(
            connect_status(w.relay.proxy, "clk_guess", &uuid, echo).await,
            429
        );
    }
    // The admin behind the same address (an office NAT) works, on the API and the proxy.
    let (status, _) = w.admin.call("GET", "/v1/me", None).await;
    assert_eq!(
        status, 200,
        "a valid key was locked out by someone else's guesses"
    );
    let jwt = jwt_from(&w.admin).await;
    assert_eq!(
        connect_status(w.relay.proxy, &w.relay.admin_key(), &uuid, echo).await,
        200
    );
    assert_eq!(connect_status(w.relay.proxy, &jwt, &uuid, echo).await, 200);
}

#[tokio::test]
async fn one_user_cannot_hold_a_device() {
    let w = World::new(&limits(
        "tunnels_per_user_device = 2\ntunnels_per_device = 3\ntunnels_per_user = 10",
    ));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    let hog = w.relay.admin_key();
    let _a = tunnel(w.relay.proxy, &hog, &uuid, echo).await;
    let _b = tunnel(w.relay.proxy, &hog, &uuid, echo).await;
    let (_, head) = connect_raw(
        w.relay.proxy,
        &format!("CONNECT {uuid}:{echo} HTTP/1.1\r\nProxy-Authorization: Bearer {hog}\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&head), 429, "{head}");
    assert!(head.contains("Retry-After: "), "{head}");
    // Someone else still gets in.
    let colleague = w.user("colleague").await;
    w.admin.add_member("pis", "colleague").await;
    let _c = tunnel(w.relay.proxy, &colleague, &uuid, echo).await;
}

#[test]
fn default_limits_are_the_documented_ones() {
    let l = cloudlink::config::Limits::default();
    assert_eq!(
        (
            l.tunnels_per_user,
            l.tunnels_per_device,
            l.tunnels_per_user_device,
            l.proxy_unauthenticated_max,
            l.proxy_unauthenticated_per_source,
            l.keep_alive_ms,
            l.idle_timeout_ms,
            l.tcp_keep_alive_ms,
            l.tcp_idle_timeout_ms,
        ),
        (256, 64, 32, 10_000, 256, 0, 35_000, 0, 70_000)
    );
    // The agent keeps its link alive; the relay only listens (PROTOCOL.md §2, §2b).
    let a = cloudlink::agent::AgentConfig::default();
    assert_eq!(
        (
            a.keep_alive_ms,
            a.idle_timeout_ms,
            a.tcp_keep_alive_ms,
            a.tcp_idle_timeout_ms,
            a.quic_probe_secs,
        ),
        (25_000, 35_000, 60_000, 70_000, 45)
    );
    // The settings reference lists every setting of both roles with the default the code
    // declares, and nothing else.
    let reference = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let documented = settings_rows(&reference);
    let mut declared = Vec::new();
    declare(
        &mut declared,
        "relay",
        "",
        &json_of(&cloudlink::config::RelayConfig::default()),
    );
    declare(
        &mut declared,
        "agent",
        "",
        &json_of(&cloudlink::agent::AgentConfig::default()),
    );
    let missing: Vec<_> = declared
        .iter()
        .filter(|r| !documented.contains(r))
        .collect();
    let extra: Vec<_> = documented
        .iter()
        .filter(|r| !declared.contains(r))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/configuration.md is not the declaration: rows missing or wrong (role, key, \
         default) {missing:#?}; rows that are not settings {extra:#?}"
    );
}

fn json_of(config: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(config).unwrap()
}

/// Every setting as (role, key, its default as the reference shows it); tables nest as
/// `limits.key`.
fn declare(
    rows: &mut Vec<(String, String, String)>,
    role: &str,
    prefix: &str,
    v: &serde_json::Value,
) {
    for (key, value) in v.as_object().unwrap() {
        let key = format!("{prefix}{key}");
        match value {
            serde_json::Value::Object(_) => declare(rows, role, &format!("{key}."), value),
            value => rows.push((role.to_owned(), key, shown_default(value))),
        }
    }
}

/// A default as the reference writes it: `none` for no value (and for a secret, which
/// never shows), otherwise the TOML value in backticks, with `|` escaped for the table.
fn shown_default(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "none".to_owned(),
        serde_json::Value::String(s) if s.is_empty() || s == "***" => "none".to_owned(),
        serde_json::Value::Array(a) if a.is_empty() => "none".to_owned(),
        v => format!("`{}`", v.to_string().replace('|', "\\|")),
    }
}

/// The rows of the reference's settings tables: `| key | default | … |` under a heading
/// naming the role (`## relay`, `## agent`).
fn settings_rows(text: &str) -> Vec<(String, String, String)> {
    let mut role = String::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            role = heading
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_lowercase();
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((key, rest)) = row.split_once("` | ") else {
            continue;
        };
        let default = rest.split(" | ").next().unwrap_or("").to_owned();
        rows.push((role.clone(), key.to_owned(), default));
    }
    rows
}

#[tokio::test]
async fn peer_text_cannot_forge_log_lines() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let forged = "agent/1\nFORGED-LINE relay owned\u{1b}[2J\u{1b}]0;title\u{7}";
    let hello = Hello {
        version: VERSION,
        uuid: uuid.clone(),
        key: key.clone(),
        agent: forged.into(),
        ssh_login: None,
        features: Vec::new(),
        keep_alive_ms: None,
    };
    let (_conn, _s, _r, answer) =
        fake_device::hello_with(w.relay.device, &w.relay.cert(), &hello).await;
    assert!(matches!(answer, RelayControl::Welcome { .. }), "{answer:?}");
    w.relay.stderr.wait_for("device connected");
    let log = w.relay.stderr.text();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED-LINE")),
        "a hello forged a log line:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "an ESC reached the log");
    assert!(log.contains("agent/1\\nFORGED-LINE"), "{log}");

    // Overlong fields are refused before they are looked at.
    let long = Hello {
        agent: "a".repeat(10_000),
        ssh_login: None,
        features: Vec::new(),
        ..hello
    };
    let (conn, _s, _r) = {
        let conn = fake_device::dial(w.relay.device, &w.relay.cert()).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        cloudlink::proto::frame::write(&mut send, &long)
            .await
            .unwrap();
        (conn, send, recv)
    };
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(codes::PROTOCOL)
    );
}

/// Features (PROTOCOL.md §2): an agent may announce names the relay does not know (they
/// are ignored, the session works), the relay announces its own in the welcome, and a
/// malformed list is refused like any overlong field. An older agent's hello, with no
/// features at all, is what every other test sends.
#[tokio::test]
async fn hellos_carry_features_both_ways() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let echo = echo_server().await;
    let hello = Hello {
        version: VERSION,
        uuid: uuid.clone(),
        key: key.clone(),
        agent: "newer-agent/9".into(),
        ssh_login: None,
        features: vec!["resume".into(), "some-future-thing".into()],
        keep_alive_ms: None,
    };
    let (conn, _s, _r, answer) =
        fake_device::hello_with(w.relay.device, &w.relay.cert(), &hello).await;
    match &answer {
        RelayControl::Welcome { features, .. } => assert!(
            cloudlink::proto::messages::features::has(features, "udp-probe"),
            "the relay did not announce its UDP probes: {answer:?}"
        ),
        other => panic!("no welcome: {other:?}"),
    }
    let line = w.relay.stderr.wait_for("device connected");
    assert!(line.contains("resume,some-future-thing"), "{line}");
    // The session serves tunnels as any other.
    fake_device::serve_tunnels(conn.clone());
    let mut s = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, echo).await;
    s.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hi");
    drop(conn);

    for bad in [vec!["Not Valid".to_owned()], vec!["f".to_owned(); 33]] {
        let conn = fake_device::dial(w.relay.device, &w.relay.cert()).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let bad_hello = Hello {
            features: bad.clone(),
            ..hello.clone()
        };
        cloudlink::proto::frame::write(&mut send, &bad_hello)
            .await
            .unwrap();
        assert_eq!(
            fake_device::close_code(&conn).await,
            u64::from(codes::PROTOCOL),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_per_source() {
    let w = World::new(&limits("proxy_unauthenticated_per_source = 4"));
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(w.relay.proxy).await.unwrap());
    }
    let mut fifth = tokio::net::TcpStream::connect(w.relay.proxy).await.unwrap();
    let head = read_head(&mut fifth).await;
    assert_eq!(status_of(&head), 429, "{head}");
    // Places come back when connections end.
    drop(silent);
    let (uuid, _) = w.device_in("pis").await;
    assert!(eventually(Duration::from_secs(5), || async {
        connect_status(w.relay.proxy, &w.relay.admin_key(), &uuid, 22).await == 503
    })
    .await
    .is_some());
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_in_total() {
    let w = World::new(&limits("proxy_unauthenticated_max = 2"));
    let (uuid, _) = w.device_in("pis").await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(w.relay.proxy).await.unwrap());
    }
    // A third connection waits in the kernel's backlog: not served while two are pending.
    let mut third = tokio::net::TcpStream::connect(w.relay.proxy).await.unwrap();
    let request = format!(
        "CONNECT {uuid}:22 HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
        w.relay.admin_key()
    );
    third.write_all(request.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.peek(&mut byte)).await;
    assert!(early.is_err(), "served past the cap");
    // One pending connection leaves: the third is served.
    silent.pop();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut third))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "not served once a place was free:\n{}",
                w.relay.stderr.text()
            )
        });
    assert_eq!(status_of(&head), 503, "{head}");
}

#[tokio::test]
async fn the_api_drops_connections_that_send_no_headers() {
    let w = World::new(&limits(
        "api_header_timeout_ms = 300\napi_body_timeout_ms = 300",
    ));
    // A body that never comes is answered (not waited for) once the body timeout passes.
    let mut s = tokio::net::TcpStream::connect(w.relay.api).await.unwrap();
    let head = format!(
        "POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"na",
        w.relay.admin_key()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("a stalled body is held open");
    assert!(status_of(&answer) >= 400, "{answer}");
    for addr in [w.relay.api, w.relay.api_tls.unwrap()] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "{addr}: a slow header is held open");
    }
}

#[tokio::test]
async fn quic_admission_sends_retries_under_load() {
    // Every handshake counts as "under load": each new address must answer a Retry.
    let w = World::new(&limits("quic_retry_above_pending = 0"));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let text = metrics(&w.relay).await;
    assert!(
        text.contains("cloudlink_quic_admissions_total{action=\"retry\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cloudlink_quic_admissions_total{action=\"accept\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn handshakes_in_flight_are_capped() {
    let w = World::new(&limits("handshakes_max = 1\nhello_timeout_ms = 500"));
    let (uuid, key) = w.device_in("pis").await;
    // One connection sits between handshake and hello: the cap is full.
    let idle = fake_device::dial(w.relay.device, &w.relay.cert()).await;
    let refused = fake_device::try_dial(w.relay.device, &w.relay.cert()).await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    // Once it is gone (closed by the hello timeout), devices get in again.
    drop(idle);
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let text = metrics(&w.relay).await;
    assert!(
        text.contains("cloudlink_quic_admissions_total{action=\"refuse\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn connect_heads_are_parsed_strictly() {
    let w = World::new(&limits(""));
    let (uuid, _) = w.device_in("pis").await;
    let token = w.relay.admin_key();
    for (request, want) in [
        (
            format!(
                "CONNECT {uuid}.balena:+22 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "CONNECT {uuid}.balena:022 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "connect {uuid}.balena:22 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
            ),
            405,
        ),
        (
            format!(
                "CONNECT {uuid}.balena:22 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\
                 Proxy-Authorization: Bearer clk_other\r\n\r\n"
            ),
            400,
        ),
    ] {
        let (_, head) = connect_raw(w.relay.proxy, &request).await;
        assert_eq!(status_of(&head), want, "{request:?} answered {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_default_for_the_api_cli_and_proxy() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    // The HTTPS API answers with the relay's certificate.
    let api = Api::tls(&w.relay, &w.relay.admin_key());
    let (status, me) = api.call("GET", "/v1/me", None).await;
    assert_eq!((status, me["username"].as_str()), (200, Some("admin")));
    // `login` with a bare host:port means HTTPS, and the TLS proxy next to it.
    let tls_api = w.relay.api_tls.unwrap();
    let tls_proxy = w.relay.proxy_tls.unwrap();
    let (ok, _, err) = cli_in(
        &w.xdg(),
        &[
            "login",
            "--api",
            &format!("localhost:{}", tls_api.port()),
            "--proxy",
            &format!("localhost:{}", tls_proxy.port()),
            "--proxy-tls",
            "--ca",
            w.relay.cert().to_str().unwrap(),
            "--key",
            &w.relay.admin_key(),
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(!err.contains("warning"), "{err}");
    let out = w.cli_ok(&["whoami"]);
    assert!(
        out.contains(&format!("https://localhost:{}", tls_api.port())),
        "{out}"
    );
    let echo = echo_server().await;
    let (ok, out, err) = cli_in(
        &w.xdg(),
        &["proxy", &uuid, &echo.to_string()],
        Some(b"over tls"),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "over tls");
    // Without the CA, the relay's dev certificate is not trusted: no silent downgrade.
    let other = w.dir.path().join("xdg-untrusting");
    let (ok, _, err) = cli_in(
        &other,
        &[
            "login",
            "--api",
            &format!("https://localhost:{}", tls_api.port()),
            "--key",
            &w.relay.admin_key(),
        ],
        None,
    );
    assert!(!ok, "logged in without trusting the relay");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Plain HTTP still works (balena's CLI, load balancers) but says what it costs.
    let (ok, _, err) = cli_in(
        &other,
        &[
            "login",
            "--api",
            &format!("http://{}", w.relay.api),
            "--key",
            &w.relay.admin_key(),
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(err.contains("unencrypted"), "{err}");
}

//! The data plane end to end: real relay and agent processes, real local services.

use crate::common;

use std::time::Duration;

use base64::Engine;
use cloudlink::proto::frame;
use cloudlink::proto::messages::{codes, RejectCode, RelayControl};
use common::read_all as read_to_end;
use common::{
    connect_raw, dataplane, digest_server, echo_server, fake_device, limits, require_tool,
    sha256_hex, status_of, tunnel, Agent, Api, World,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous enough for debug builds on two cores; a wait this long means a real hang.
const IO_TIMEOUT: Duration = common::TRANSFER_TIMEOUT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    dataplane::checksummed_both_ways(w.relay.proxy, &w.relay.admin_key(), &uuid, 64 << 20).await;
}

#[tokio::test]
async fn half_close_lets_the_reply_arrive_and_pipelined_bytes_count() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let port = digest_server().await;

    // The request and the first tunnel bytes in one write: the bytes belong to the tunnel.
    let mut s = tokio::net::TcpStream::connect(w.relay.proxy).await.unwrap();
    let request = format!(
        "CONNECT {uuid}:{port} HTTP/1.0\r\nProxy-Authorization: Bearer {}\r\n\r\nhello ",
        w.relay.admin_key()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let head = common::read_head(&mut s).await;
    assert_eq!(head, "HTTP/1.0 200 Connection Established\r\n\r\n");
    s.write_all(b"world").await.unwrap();
    s.shutdown().await.unwrap();
    let reply = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert_eq!(
        reply,
        format!("got 11 bytes, sha256 {}", sha256_hex(b"hello world"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_tunnels() {
    let w = World::new(&limits(
        "tunnels_per_user = 200\ntunnels_per_device = 200\ntunnels_per_user_device = 200",
    ));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    dataplane::a_hundred_at_once(w.relay.proxy, &w.relay.admin_key(), &uuid).await;
}

fn basic(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
}

#[tokio::test]
async fn balena_request_api_keys_and_jwts_are_accepted() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let port = echo_server().await;

    // The balena CLI's request, byte for byte: HTTP/1.0, no Host, Basic with any username.
    let request = format!(
        "CONNECT {uuid}.balena:{port} HTTP/1.0\r\nProxy-Authorization: Basic {}\r\n\r\n",
        basic("whoever", &w.relay.admin_key())
    );
    let (mut s, head) = connect_raw(w.relay.proxy, &request).await;
    assert_eq!(head, "HTTP/1.0 200 Connection Established\r\n\r\n");
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"ping");

    // A JWT from /v1/auth/token, as Bearer and as Basic.
    let (_, t) = w.admin.call("POST", "/v1/auth/token", None).await;
    let jwt = t["token"].as_str().unwrap();
    let mut s = tunnel(w.relay.proxy, jwt, &uuid, port).await;
    s.write_all(b"jwt").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"jwt");
    let request = format!(
        "CONNECT {}.resin:{port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {}\r\n\r\n",
        uuid.to_uppercase(),
        basic("", jwt)
    );
    let (_, head) = connect_raw(w.relay.proxy, &request).await;
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
}

async fn status(w: &World, request: &str) -> u16 {
    status_of(&connect_raw(w.relay.proxy, request).await.1)
}

#[tokio::test]
async fn every_error_status_for_its_condition() {
    let w = World::new(&limits("head_timeout_ms = 300\nopen_timeout_ms = 1000"));
    let (uuid, key) = w.device_in("pis").await;
    let (offline_uuid, _) = w.device_in("pis").await;
    let (other_uuid, _) = w.device_in("other").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let admin = w.relay.admin_key();
    let olga = w.user("olga").await;
    w.admin.add_member("pis", "olga").await;
    let echo = echo_server().await;
    let req = |target: &str, token: &str| {
        format!("CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n")
    };

    // 400
    assert_eq!(status(&w, &req("example.com:443", &admin)).await, 400);
    assert_eq!(status(&w, &req(&format!("{uuid}:0"), &admin)).await, 400);
    assert_eq!(
        status(&w, &req(&format!("{uuid}:65536"), &admin)).await,
        400
    );
    assert_eq!(
        status(&w, &req(&format!("{}:22", &uuid[..7]), &admin)).await,
        400
    );
    assert_eq!(status(&w, "BLAH\r\n\r\n").await, 400);
    // 405
    let (_, head) = connect_raw(w.relay.proxy, "GET http://example.com/ HTTP/1.1\r\n\r\n").await;
    assert_eq!(status_of(&head), 405);
    assert!(head.contains("Allow: CONNECT"));
    // 407
    let (_, head) = connect_raw(
        w.relay.proxy,
        &format!("CONNECT {uuid}:{echo} HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&head), 407);
    assert!(head.contains("Proxy-Authenticate: Basic realm=\"cloudlink\""));
    assert_eq!(
        status(&w, &req(&format!("{uuid}:{echo}"), "clk_nope")).await,
        407
    );
    assert_eq!(
        status(&w, &req(&format!("{uuid}:{echo}"), "a.b.c")).await,
        407
    );
    // 403: not their fleet, no such device, port not allowed: one answer.
    assert_eq!(
        status(&w, &req(&format!("{other_uuid}:{echo}"), &olga)).await,
        403
    );
    assert_eq!(
        status(&w, &req(&format!("{}:{echo}", "0".repeat(32)), &olga)).await,
        403
    );
    let (s, _) = w
        .admin
        .call(
            "PATCH",
            "/v1/fleets/pis",
            Some(json!({"allowed_ports": [22222]})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        status(&w, &req(&format!("{uuid}:{echo}"), &olga)).await,
        403
    );
    let (s, _) = w
        .admin
        .call(
            "PATCH",
            "/v1/fleets/pis",
            Some(json!({"allowed_ports": []})),
        )
        .await;
    assert_eq!(s, 200);
    // 408: a client that never sends its head.
    let mut silent = tokio::net::TcpStream::connect(w.relay.proxy).await.unwrap();
    let head = common::read_head(&mut silent).await;
    assert_eq!(status_of(&head), 408);
    // 431
    let big = format!(
        "CONNECT {uuid}:{echo} HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    assert_eq!(status(&w, &big).await, 431);
    // 502: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (_, head) = connect_raw(w.relay.proxy, &req(&format!("{uuid}:{closed}"), &admin)).await;
    assert_eq!(status_of(&head), 502, "{head}");
    // 503: registered, not connected.
    assert_eq!(
        status(&w, &req(&format!("{offline_uuid}:{echo}"), &admin)).await,
        503
    );
    // 504: a device that takes the stream but never answers.
    let (timid_uuid, timid_key) = w.device_in("pis").await;
    let (_conn, _send, _recv, answer) =
        fake_device::hello(w.relay.device, &w.relay.cert(), &timid_uuid, &timid_key).await;
    assert!(matches!(answer, RelayControl::Welcome { .. }));
    assert_eq!(
        status(&w, &req(&format!("{timid_uuid}:{echo}"), &admin)).await,
        504
    );
    // And the working case still works after all that.
    assert_eq!(
        status(&w, &req(&format!("{uuid}:{echo}"), &olga)).await,
        200
    );
}

#[tokio::test]
async fn agent_allowlist_refuses_with_502() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let allowed = echo_server().await;
    let other = echo_server().await;
    let _agent = Agent::start(
        &w.relay,
        &uuid,
        &key,
        &["--allow-port", &allowed.to_string()],
    );
    let token = w.relay.admin_key();
    let req = |port: u16| {
        format!("CONNECT {uuid}:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n")
    };
    let (_, head) = connect_raw(w.relay.proxy, &req(other)).await;
    assert_eq!(status_of(&head), 502);
    assert_eq!(
        status_of(&connect_raw(w.relay.proxy, &req(allowed)).await.1),
        200
    );
}

#[tokio::test]
async fn limits_answer_429_with_retry_after() {
    let w = World::new("[limits]\nauth_failures_per_minute = 2\ntunnels_per_user = 1\n");
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    let token = w.relay.admin_key();
    let _open = tunnel(w.relay.proxy, &token, &uuid, echo).await;
    let (_, head) = connect_raw(
        w.relay.proxy,
        &format!("CONNECT {uuid}:{echo} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&head), 429);
    assert!(head.contains("Retry-After: "));

    let bad =
        format!("CONNECT {uuid}:{echo} HTTP/1.1\r\nProxy-Authorization: Bearer clk_x\r\n\r\n");
    assert_eq!(status(&w, &bad).await, 407);
    assert_eq!(status(&w, &bad).await, 407);
    let (_, head) = connect_raw(w.relay.proxy, &bad).await;
    assert_eq!(status_of(&head), 429, "guessing is throttled");
    assert!(head.contains("Retry-After: "));
}

#[tokio::test]
async fn revoking_a_key_ends_open_tunnels() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    dataplane::revoking_a_key_ends_open_tunnels(&w, &uuid).await;
}

#[tokio::test]
async fn agent_restart_and_relay_restart_recover_by_themselves() {
    let mut w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let echo = echo_server().await;
    let mut agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let token = w.relay.admin_key();
    let roundtrip = |proxy, msg: &'static [u8]| {
        let (token, uuid) = (token.clone(), uuid.clone());
        async move {
            let mut s = tunnel(proxy, &token, &uuid, echo).await;
            s.write_all(msg).await.unwrap();
            s.shutdown().await.unwrap();
            assert_eq!(read_to_end(&mut s).await, msg);
        }
    };
    roundtrip(w.relay.proxy, b"one").await;

    // Power loss on the device; it boots again and its new session replaces the stale one.
    agent.kill();
    let agent = Agent::start(&w.relay, &uuid, &key, &[]);
    roundtrip(w.relay.proxy, b"two").await;
    let (_, d) = w
        .admin
        .call("GET", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!(d["online"], true);

    // The relay restarts; the same agent comes back on its own.
    w.relay.restart();
    agent.stderr.wait_for("relay link down");
    agent.stderr.wait_for("connected to relay");
    roundtrip(w.relay.proxy, b"three").await;

    // The audit log has every tunnel, with bytes each way.
    let admin = Api::new(w.relay.api, &token);
    let (_, tunnels) = admin.call("GET", "/v1/tunnels", None).await;
    let tunnels = tunnels.as_array().unwrap();
    assert!(tunnels.len() >= 2, "{tunnels:?}");
    let first = tunnels
        .iter()
        .find(|t| t["bytes_up"] == 3 && t["close_reason"] == "closed");
    assert!(first.is_some(), "{tunnels:?}");
    assert_eq!(first.unwrap()["bytes_down"], 3);
    assert_eq!(first.unwrap()["user"], "admin");
    let (_, d) = admin
        .call("GET", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert!(d["last_seen"].is_string());
}

#[tokio::test]
async fn agent_survives_a_relay_that_is_down_at_boot() {
    let mut w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let cert = w.relay.cert();
    let device = w.relay.device;
    w.relay.stop();
    // The agent boots while the relay is down…
    assert_eq!(w.relay.device, device);
    let agent = common::Agent::spawn(&w.relay, &uuid, &key, &[]);
    agent.stderr.wait_for("relay link down");
    assert!(cert.exists());
    // …and connects once it is back.
    w.relay.restart();
    agent.stderr.wait_for("connected to relay");
}

#[tokio::test]
async fn device_misbehaviour_is_refused_with_codes() {
    let w = World::new(&limits("hello_timeout_ms = 300"));
    let (uuid, key) = w.device_in("pis").await;
    let dev = w.relay.device;
    let cert = w.relay.cert();

    // Wrong key: a reject frame, then a close.
    let (conn, _s, _r, answer) = fake_device::hello(dev, &cert, &uuid, "wrong").await;
    assert!(matches!(
        answer,
        RelayControl::Reject {
            code: RejectCode::Unauthorized,
            ..
        }
    ));
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(codes::REJECTED)
    );

    // A hello that never comes.
    let conn = fake_device::dial(dev, &cert).await;
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(codes::HELLO_TIMEOUT)
    );

    // An oversized frame.
    let conn = fake_device::dial(dev, &cert).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(codes::PROTOCOL)
    );

    // A malformed one.
    let conn = fake_device::dial(dev, &cert).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 5, b'n', b'o', b'p', b'e', b'!'])
        .await
        .unwrap();
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(codes::PROTOCOL)
    );

    // A device that opens a stream of its own is refused, and keeps its session.
    let (conn, _s, mut control, answer) = fake_device::hello(dev, &cert, &uuid, &key).await;
    assert!(matches!(answer, RelayControl::Welcome { .. }));
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"let me in").await.unwrap();
    let refused = recv.read_to_end(1024).await;
    assert!(
        matches!(refused, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) if code.into_inner() == u64::from(codes::STREAM_REFUSED)),
        "{refused:?}"
    );
    let (_, d) = w
        .admin
        .call("GET", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!(d["online"], true);

    // A newer session replaces it: the old one hears `replaced` and is closed.
    let (_conn2, _s2, _r2, answer) = fake_device::hello(dev, &cert, &uuid, &key).await;
    assert!(matches!(answer, RelayControl::Welcome { .. }));
    let msg: RelayControl = frame::read_required(&mut control, frame::MAX_FRAME)
        .await
        .unwrap();
    assert_eq!(msg, RelayControl::Replaced);
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(codes::REPLACED)
    );

    // Deleting the device ends its session at once.
    let (s, _) = w
        .admin
        .call("DELETE", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!(s, 204);
    assert_eq!(
        fake_device::close_code(&_conn2).await,
        u64::from(codes::DELETED)
    );

    // None of that hurt the relay.
    let (s, _) = w.admin.call("GET", "/v1/me", None).await;
    assert_eq!(s, 200);
    let metrics = common::metrics(&w.relay).await;
    assert!(
        metrics.contains("cloudlink_device_rejects_total{code=\"unauthorized\"} 1"),
        "{metrics}"
    );
}

// Multi-threaded: the test blocks on child processes while its echo service must keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tunnel_and_proxy_over_the_tls_listener() {
    let w = World::with(&limits(""), &["--proxy-tls-listen", "127.0.0.1:0"], &[]);
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    let tls = w.relay.proxy_tls.expect("TLS listener bound");
    w.cli_ok(&[
        "login",
        "--api",
        &format!("http://{}", w.relay.api),
        "--proxy",
        &format!("localhost:{}", tls.port()),
        "--proxy-tls",
        "--ca",
        w.relay.cert().to_str().unwrap(),
        "--key",
        &w.relay.admin_key(),
    ]);

    // `cloudlink proxy` bridges stdin/stdout with half-close.
    let out = std::process::Command::new(common::bin())
        .args(["proxy", &uuid, &echo.to_string()])
        .env("XDG_CONFIG_HOME", w.xdg())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"through TLS")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"through TLS");

    // `cloudlink device tunnel` listens locally, one CONNECT per connection.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let specs = [format!("{echo}:0"), format!("{closed}:127.0.0.1:0")];
    let (mut child, lines, local) =
        common::device_tunnel(&w.xdg(), &uuid, &specs, std::process::Stdio::piped());
    let errors = common::Lines::spawn(child.stderr.take().unwrap(), None);
    let (local, dead) = (local[0], local[1]);
    // A connection to a device port nothing listens on fails alone, with a reset (as a
    // refused local connection would), never as an empty but complete answer; the tunnel
    // keeps going.
    let mut s = tokio::net::TcpStream::connect(dead).await.unwrap();
    let mut buf = Vec::new();
    let read = s.read_to_end(&mut buf).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{buf:?}"
    );
    errors.wait_for("502");
    for round in 0..2 {
        let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
        s.write_all(format!("round {round}").as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            read_to_end(&mut s).await,
            format!("round {round}").as_bytes()
        );
        lines.wait_for(&format!("===> {uuid}:{echo}"));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Over a plain-TCP proxy `device tunnel` moves bytes with `splice`: a transfer arrives
/// whole and in order across a half-close, and a relay that crashes mid-stream resets the
/// local connection rather than ending it like a complete answer.
#[tokio::test]
async fn cli_tunnel_over_the_plain_proxy_is_whole_and_resets_on_a_relay_crash() {
    let mut w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    w.login(&w.relay.admin_key());
    let specs = [format!("{echo}:0")];
    let (mut child, _lines, local) =
        common::device_tunnel(&w.xdg(), &uuid, &specs, std::process::Stdio::null());
    let local = local[0];

    let data = common::random_bytes(8 << 20, 11);
    let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
    let back = common::send_and_read_back(&mut s, &data, "the echo did not come back").await;
    assert!(
        back == data,
        "{} of {} bytes came back, or out of order",
        back.len(),
        data.len()
    );

    let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    w.relay.kill();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("the crash reaches the local client");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{rest:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Path-MTU discovery stays at the internet-safe 1452 bytes by default and grows where
/// `quic_mtu_max` allows it and the path carries it (loopback's MTU is 64 KiB).
#[tokio::test]
async fn quic_packets_stay_internet_safe_by_default_and_grow_where_allowed() {
    let default = cloudlink::quic::MTU_MAX_DEFAULT;
    assert_eq!(settled_mtu(default).await, default);
    let big = settled_mtu(8952).await;
    assert!(
        big > default && big <= 8952,
        "loopback carries 8952-byte datagrams; discovery settled on {big}"
    );
}

/// Sends 4 MiB over one stream of a [`common::QuicPair`] and returns the packet size
/// path-MTU discovery settled on at the sender.
async fn settled_mtu(mtu_max: u16) -> u16 {
    let pair = common::quic_pair(mtu_max).await;
    let server = pair.server.clone();
    let receiver = tokio::spawn(async move {
        let (_send, mut recv) = server.accept_bi().await.unwrap();
        while recv.read_chunk(usize::MAX, true).await.unwrap().is_some() {}
    });
    let (mut send, _recv) = pair.client.open_bi().await.unwrap();
    let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    for _ in 0..64 {
        send.write_chunk(chunk.clone()).await.unwrap();
    }
    send.finish().unwrap();
    tokio::time::timeout(IO_TIMEOUT, receiver)
        .await
        .expect("the transfer ends")
        .unwrap();
    pair.client.stats().path.current_mtu
}

// Multi-threaded: the test waits on curl and socat while its services keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_socat_work_through_the_proxy() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let token = w.relay.admin_key();
    let proxy = w.relay.proxy;

    require_tool("curl");
    {
        // A one-shot HTTP server on the "device".
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = "hello from the device";
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "30", "-p", "-x"])
            .arg(format!("http://me:{token}@{proxy}"))
            .arg(format!("http://{uuid}.balena:{port}/"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello from the device");
    }

    require_tool("socat");
    {
        let echo = echo_server().await;
        let mut child = std::process::Command::new("socat")
            .arg("-")
            .arg(format!(
                "PROXY:{}:{uuid}.balena:{echo},proxyport={},proxyauth=me:{token}",
                proxy.ip(),
                proxy.port()
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"via socat").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"via socat");
    }
}

#[tokio::test]
async fn resets_propagate_both_ways() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let token = w.relay.admin_key();

    // The device's service resets its socket: the user sees a reset, not a clean close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (device_side_tx, device_side_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let _ = device_side_tx.send(s);
    });
    let mut s = tunnel(w.relay.proxy, &token, &uuid, port).await;
    let device_side = device_side_rx.await.unwrap();
    device_side.set_zero_linger().unwrap();
    drop(device_side);
    let mut buf = [0u8; 16];
    let got = tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a device-side reset arrives as a reset"
    );

    // The user resets: the device's service sees a reset.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (device_side_tx, device_side_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let _ = device_side_tx.send(s);
    });
    let s = tunnel(w.relay.proxy, &token, &uuid, port).await;
    let mut device_side = device_side_rx.await.unwrap();
    s.set_zero_linger().unwrap();
    drop(s);
    let got = tokio::time::timeout(IO_TIMEOUT, device_side.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn idle_timeout_when_configured_closes_quiet_tunnels() {
    let mut w = World::with(&limits(""), &["--tunnel-idle-timeout", "1"], &[]);
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    let mut s = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, echo).await;
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    // Nothing moves now; the relay cuts the tunnel after one to two idle periods.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "an idle tunnel outlived its idle timeout");
    w.relay.stop();
    w.relay.restart();
    let (_, tunnels) = Api::new(w.relay.api, &w.relay.admin_key())
        .call("GET", "/v1/tunnels", None)
        .await;
    assert_eq!(tunnels[0]["close_reason"], "idle", "{tunnels}");
}

// Multi-threaded: the device's service must keep writing while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_does_not_make_the_relay_buffer() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let pid = w.relay.pid().unwrap();
    let rss = || common::rss_kib(pid);
    // The device offers 512 MiB as fast as it can; the user reads nothing.
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let counter = written.clone();
    let source = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..(512 * 16) {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let before = rss();
    let _stalled = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, port).await;
    // Back-pressure must stop the source long before it is done: waiting for it to finish
    // has to time out.
    let finished = tokio::time::timeout(Duration::from_secs(3), source).await;
    assert!(finished.is_err(), "the whole 512 MiB went somewhere");
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    let growth_kib = rss().saturating_sub(before);
    assert!(sent < 64 * 1024 * 1024, "{sent} bytes left the device");
    assert!(growth_kib < 64 * 1024, "the relay grew by {growth_kib} KiB");
}

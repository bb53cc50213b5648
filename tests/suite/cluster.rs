//! A cluster of real relays on one throwaway Postgres: joining, shared secrets,
//! forwarding over the peer link, presence across relays, relay death and drain.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::pg::TempPg;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The cluster secret of these tests, so a test can mint peer tokens of its own.
const CLUSTER_SECRET: &str = "cluster-test-secret-cluster-test-secret";

/// A relay of the cluster in `dir`, on the shared store.
fn member(dir: &Path, name: &str, url: &str, config: &str) -> Relay {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, config).unwrap();
    Relay::start(
        &dir.join(name),
        &[
            "--config",
            file.to_str().unwrap(),
            "--database-url",
            url,
            "--peer-listen",
            "127.0.0.1:0",
            "--relay-id",
            name,
            "--cluster-secret",
            CLUSTER_SECRET,
        ],
        &[],
    )
}

/// The admin key, from whichever data directory the bootstrap wrote it to.
fn admin_key(relays: &[&Relay]) -> String {
    let keys: Vec<String> = relays
        .iter()
        .filter_map(|r| std::fs::read_to_string(r.data_dir.join("admin.key")).ok())
        .collect();
    assert_eq!(keys.len(), 1, "exactly one relay bootstraps the admin");
    keys[0].trim().to_owned()
}

async fn connect_status(proxy: SocketAddr, token: &str, uuid: &str, port: u16) -> (u16, String) {
    let request =
        format!("CONNECT {uuid}:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n");
    let head = connect_raw(proxy, &request).await.1;
    (status_of(&head), head)
}

async fn read_to_end(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    out
}

/// Which relay the API says holds the device.
async fn holder(api: &Api, uuid: &str) -> Option<String> {
    let (status, d) = api.call("GET", &format!("/v1/devices/{uuid}"), None).await;
    assert_eq!(status, 200, "{d}");
    d["relay"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_the_tcp_link_is_reached_through_either_relay() {
    let p = pair(&limits("")).await;
    let entry = format!("tcp://{}", p.a.device_tcp.expect("a TCP device listener"));
    let agent = Agent::spawn_with(&[entry], &p.a.cert(), &p.uuid, &p.device_key, &[], &[]);
    agent.stderr.wait_for("connected to relay");
    // Either relay shows where the device is and how it is connected.
    for relay in [&p.a, &p.b] {
        let (status, d) = Api::new(relay.api, &p.key)
            .call("GET", &format!("/v1/devices/{}", p.uuid), None)
            .await;
        assert_eq!(status, 200, "{d}");
        assert_eq!(
            (d["relay"].as_str(), d["transport"].as_str()),
            (Some("a"), Some("tcp"))
        );
    }
    // Checksummed transfers through b are forwarded to a, then over the TCP link.
    dataplane::checksummed_both_ways(p.b.proxy, &p.key, &p.uuid, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_start_together_and_share_one_identity() {
    let pg = TempPg::start();
    let dir = tempfile::tempdir().unwrap();
    // All three at the same moment, on an empty database.
    let starts: Vec<_> = ["r1", "r2", "r3"]
        .into_iter()
        .map(|name| {
            let dir = dir.path().to_owned();
            let url = pg.url.clone();
            std::thread::spawn(move || member(&dir, name, &url, &limits("")))
        })
        .collect();
    let relays: Vec<Relay> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let all: Vec<&Relay> = relays.iter().collect();
    let key = admin_key(&all);
    // One dev certificate for the cluster.
    let cert = std::fs::read(relays[0].cert()).unwrap();
    for r in &relays {
        assert_eq!(
            std::fs::read(r.cert()).unwrap(),
            cert,
            "relays serve different certificates"
        );
    }
    // A JWT from one relay works on every relay.
    let (status, t) = Api::new(relays[0].api, &key)
        .call("POST", "/v1/auth/token", None)
        .await;
    assert_eq!(status, 200, "{t}");
    let jwt = t["token"].as_str().unwrap();
    for r in &relays {
        let (status, me) = Api::new(r.api, jwt).call("GET", "/v1/me", None).await;
        assert_eq!((status, me["username"].as_str()), (200, Some("admin")));
    }
    let (status, list) = Api::new(relays[2].api, &key)
        .call("GET", "/v1/relays", None)
        .await;
    assert_eq!(status, 200, "{list}");
    let alive: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["alive"] == true)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(alive, ["r1", "r2", "r3"]);
    // A clean stop removes the relay's own row.
    let mut relays = relays;
    relays[2].stop();
    let (_, list) = Api::new(relays[0].api, &key)
        .call("GET", "/v1/relays", None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn cluster_mode_refuses_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["relay", "--data-dir"])
        .arg(dir.path())
        .args(["--peer-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres"), "{err}");
}

/// Two relays; a device on `a`; users come to `b`.
struct Pair {
    _dir: tempfile::TempDir,
    _pg: TempPg,
    a: Relay,
    b: Relay,
    key: String,
    uuid: String,
    device_key: String,
}

async fn pair(config: &str) -> Pair {
    let pg = TempPg::start();
    let dir = tempfile::tempdir().unwrap();
    let a = member(dir.path(), "a", &pg.url, config);
    let b = member(dir.path(), "b", &pg.url, config);
    let key = admin_key(&[&a, &b]);
    let (uuid, device_key) = Api::new(a.api, &key).register_device("pis").await;
    Pair {
        _dir: dir,
        _pg: pg,
        a,
        b,
        key,
        uuid,
        device_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_through_another_relay_is_forwarded_intact() {
    let p = pair(&limits("")).await;
    let _agent = Agent::start(&p.a, &p.uuid, &p.device_key, &[]);
    assert_eq!(
        holder(&Api::new(p.b.api, &p.key), &p.uuid).await.as_deref(),
        Some("a")
    );

    // 64 MiB up through b (a framed, resumable peer hop: PROTOCOL.md §2e), with half-close
    // for the answer.
    let digest = digest_server().await;
    let data = random_bytes(64 << 20, 11);
    let mut s = tunnel(p.b.proxy, &p.key, &p.uuid, digest).await;
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let answer = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert_eq!(
        answer,
        format!("got {} bytes, sha256 {}", data.len(), sha256_hex(&data))
    );
    // 64 MiB down.
    let source = source_server(64 << 20, 12).await;
    let mut s = tunnel(p.b.proxy, &p.key, &p.uuid, source).await;
    let got = read_to_end(&mut s).await;
    assert_eq!(sha256_hex(&got), sha256_hex(&random_bytes(64 << 20, 12)));

    // The owner's refusal passes back unchanged: nothing listens on that device port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (status, head) = connect_status(p.b.proxy, &p.key, &p.uuid, closed).await;
    assert_eq!(status, 502, "{head}");

    // The audit row is written once, by the entry relay, naming both.
    let (_, tunnels) = Api::new(p.a.api, &p.key)
        .call("GET", "/v1/tunnels", None)
        .await;
    let rows = tunnels.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{tunnels}");
    for row in rows {
        assert_eq!(
            (row["relay"].as_str(), row["device_relay"].as_str()),
            (Some("b"), Some("a"))
        );
    }
    let text = metrics(&p.b).await;
    assert!(
        text.contains("cloudlink_peer_tunnels_out_total 3"),
        "{text}"
    );
    let text = metrics(&p.a).await;
    assert!(text.contains("cloudlink_peer_tunnels_in_total 2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_tunnel_over_tls_and_revocation_across_relays() {
    let p = pair(&limits("")).await;
    let _agent = Agent::start(&p.a, &p.uuid, &p.device_key, &[]);
    let echo = echo_server().await;
    // A key made on a, used on b's TLS proxy (the copying path), revoked on a.
    let (status, k) = Api::new(p.a.api, &p.key)
        .call("POST", "/v1/api-keys", Some(json!({"name": "temp"})))
        .await;
    assert_eq!(status, 201);
    let temp = k["key"].as_str().unwrap().to_owned();
    let xdg = p._dir.path().join("xdg");
    let (ok, _, err) = cli_in(
        &xdg,
        &[
            "login",
            "--api",
            &format!("https://localhost:{}", p.b.api_tls.unwrap().port()),
            "--proxy",
            &format!("localhost:{}", p.b.proxy_tls.unwrap().port()),
            "--proxy-tls",
            "--ca",
            p.b.cert().to_str().unwrap(),
            "--key",
            &temp,
        ],
        None,
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli_in(
        &xdg,
        &["proxy", &p.uuid, &echo.to_string()],
        Some(b"tls hop"),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "tls hop");

    let mut open = tunnel(p.b.proxy, &temp, &p.uuid, echo).await;
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();
    let (status, _) = Api::new(p.a.api, &p.key)
        .call("DELETE", &format!("/v1/api-keys/{}", k["id"]), None)
        .await;
    assert_eq!(status, 204);
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "a forwarded tunnel outlived its revoked key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_takes_only_peer_tokens() {
    let p = pair(&limits("")).await;
    let _agent = Agent::start(&p.a, &p.uuid, &p.device_key, &[]);
    let echo = echo_server().await;
    let peer = p.a.peer.expect("peer listener");
    let mint = |secret: &str, hop: u32| {
        let now = cloudlink::auth::tokens::unix_now();
        let claims = cloudlink::auth::peer::PeerClaims {
            sub: 1,
            usr: "admin".into(),
            dev: p.uuid.clone(),
            port: echo,
            tid: "t".into(),
            hop,
            ver: cloudlink::auth::peer::PEER_VERSION,
            aud: cloudlink::auth::peer::PEER_AUDIENCE.into(),
            iat: now,
            exp: now + 30,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let (status, _) = connect_status(peer, &p.key, &p.uuid, echo).await;
    assert_eq!(status, 407, "a user's API key opened the peer link");
    let (_, t) = Api::new(p.a.api, &p.key)
        .call("POST", "/v1/auth/token", None)
        .await;
    let (status, _) = connect_status(peer, t["token"].as_str().unwrap(), &p.uuid, echo).await;
    assert_eq!(status, 407, "a user's JWT opened the peer link");
    let forged = mint("another-secret-another-secret-another", 1);
    assert_eq!(connect_status(peer, &forged, &p.uuid, echo).await.0, 407);
    let looping = mint(CLUSTER_SECRET, 2);
    assert_eq!(connect_status(peer, &looping, &p.uuid, echo).await.0, 403);
    let good = mint(CLUSTER_SECRET, 1);
    assert_eq!(connect_status(peer, &good, &p.uuid, echo).await.0, 200);
}

/// A fake device's session on `a` (its connection, control stream halves), and the API
/// through `b`, which shows `a` holding it.
async fn a_holds_a_fake_device(
    p: &Pair,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream, Api) {
    let (conn, send, control, answer) =
        fake_device::hello(p.a.device, &p.a.cert(), &p.uuid, &p.device_key).await;
    assert!(matches!(
        answer,
        cloudlink::proto::messages::RelayControl::Welcome { .. }
    ));
    let api = Api::new(p.b.api, &p.key);
    assert_eq!(holder(&api, &p.uuid).await.as_deref(), Some("a"));
    (conn, send, control, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moving_relays_supersedes_its_old_session() {
    let p = pair(&limits("")).await;
    let echo = echo_server().await;
    let (conn, _s, mut control, api) = a_holds_a_fake_device(&p).await;
    // The real agent connects to b: a hears it through Postgres and supersedes (once a
    // listens: its LISTEN connects in the background at start).
    p.a.stderr.wait_for("listening for presence changes");
    let _agent = Agent::start(&p.b, &p.uuid, &p.device_key, &[]);
    let started = Instant::now();
    let msg: cloudlink::proto::messages::RelayControl = tokio::time::timeout(
        Duration::from_secs(5),
        cloudlink::proto::frame::read_required(&mut control, cloudlink::proto::frame::MAX_FRAME),
    )
    .await
    .expect("no `replaced` within 5 s")
    .unwrap();
    assert_eq!(msg, cloudlink::proto::messages::RelayControl::Replaced);
    eprintln!(
        "the old relay heard of the move {:?} after the new hello",
        started.elapsed()
    );
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(cloudlink::proto::messages::codes::REPLACED)
    );
    assert_eq!(holder(&api, &p.uuid).await.as_deref(), Some("b"));
    // Tunnels through either relay reach it.
    for proxy in [p.a.proxy, p.b.proxy] {
        let mut s = tunnel(proxy, &p.key, &p.uuid, echo).await;
        s.write_all(b"hi").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut s).await, b"hi");
    }
    let text = metrics(&p.a).await;
    assert!(
        text.contains("cloudlink_presence_conflicts_total 1"),
        "{text}"
    );
}

/// A presence change lost while a relay's LISTEN connection was down (PROTOCOL.md §3,
/// "Reconciliation"): relay a holds a device's session, its listening connection is
/// killed and kept from coming back while the device connects to relay b, so a never
/// hears the NOTIFY. a's periodic reconciliation finds its row gone to b and supersedes
/// its own session (`replaced` to the old agent), within a round or two of 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_change_missed_while_listen_was_down_is_reconciled() {
    let p = pair(&limits("presence_reconcile_secs = 2")).await;
    common::require(
        p._pg.controllable(),
        "a Postgres cluster it controls (DATABASE_URL names one it cannot)",
    );
    let (conn, _s, mut control, api) = a_holds_a_fake_device(&p).await;
    p.a.stderr.wait_for("listening for presence changes");
    // No new connection to the store's database from here (the relays' pools keep the
    // ones they have); then every listening connection is killed, a's among them.
    p._pg.sql(
        "template1",
        "ALTER DATABASE postgres WITH ALLOW_CONNECTIONS false",
    );
    let killed = p._pg.sql(
        "template1",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = 'postgres' AND query ILIKE 'LISTEN%'",
    );
    assert!(killed.trim().parse::<u32>().unwrap() >= 1, "{killed}");
    p.a.stderr.wait_for("presence listener lost its connection");
    // The device connects to b meanwhile: b's NOTIFY reaches no one.
    let _agent = Agent::start(&p.b, &p.uuid, &p.device_key, &[]);
    let moved = poll(Duration::from_secs(15), || async {
        (holder(&api, &p.uuid).await.as_deref() == Some("b")).then_some(())
    })
    .await;
    assert!(moved.is_some(), "the device never showed on b");
    p._pg.sql(
        "template1",
        "ALTER DATABASE postgres WITH ALLOW_CONNECTIONS true",
    );
    let msg: cloudlink::proto::messages::RelayControl = tokio::time::timeout(
        Duration::from_secs(15),
        cloudlink::proto::frame::read_required(&mut control, cloudlink::proto::frame::MAX_FRAME),
    )
    .await
    .expect("no `replaced` within 15 s")
    .unwrap();
    assert_eq!(msg, cloudlink::proto::messages::RelayControl::Replaced);
    assert!(
        p.a.stderr
            .text()
            .contains("reconciliation: the device has a newer session"),
        "a superseded it, but not by reconciliation"
    );
    assert_eq!(
        fake_device::close_code(&conn).await,
        u64::from(cloudlink::proto::messages::codes::REPLACED)
    );
    let text = metrics(&p.a).await;
    assert!(
        text.contains("cloudlink_presence_repairs_total{action=\"superseded\"} 1"),
        "{text}"
    );
}

/// Short liveness so a dead relay is noticed in ~1.5 s.
const FAST: &str = "keep_alive_ms = 300\nidle_timeout_ms = 1500";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_s_devices_come_back_through_a_survivor() {
    let mut p = pair(&limits(FAST)).await;
    let config = p._dir.path().join("agent.toml");
    std::fs::write(&config, "keep_alive_ms = 300\nidle_timeout_ms = 1500\n").unwrap();
    let agent = Agent::start_to(
        &[&p.a, &p.b],
        &p.uuid,
        &p.device_key,
        &["--config", config.to_str().unwrap()],
    );
    let echo = echo_server().await;
    let api = Api::new(p.b.api, &p.key);
    assert_eq!(holder(&api, &p.uuid).await.as_deref(), Some("a"));
    p.a.kill();
    // Until the agent is back, CONNECTs through b answer 503 at once, never hang.
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(8),
        connect_status(p.b.proxy, &p.key, &p.uuid, echo),
    )
    .await
    .expect("a CONNECT hung while the device's relay was dead");
    assert!(status == 503 || status == 200, "{status}");
    let back = eventually(Duration::from_secs(45), || async {
        connect_status(p.b.proxy, &p.key, &p.uuid, echo).await.0 == 200
    })
    .await;
    assert!(
        back.is_some(),
        "the device did not come back through b:\n{}",
        agent.stderr.text()
    );
    eprintln!("device reachable through the survivor {back:?} after the kill");
    assert_eq!(holder(&api, &p.uuid).await.as_deref(), Some("b"));
}

/// The same with default liveness settings (keep-alive 10 s, idle 30 s): the device must
/// be reachable through the survivor within 45 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_settings_a_dead_relay_s_device_is_back_within_45_s() {
    let mut p = pair(&limits("")).await;
    let agent = Agent::start_to(&[&p.a, &p.b], &p.uuid, &p.device_key, &[]);
    let echo = echo_server().await;
    let killed = Instant::now();
    p.a.kill();
    let back = eventually(Duration::from_secs(45), || async {
        connect_status(p.b.proxy, &p.key, &p.uuid, echo).await.0 == 200
    })
    .await;
    assert!(
        back.is_some(),
        "not back through the survivor within 45 s:\n{}",
        agent.stderr.text()
    );
    eprintln!(
        "with default settings: back {:?} after the kill",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_lets_transfers_finish_while_devices_move() {
    let mut p = pair(&limits("shutdown_grace_secs = 30")).await;
    let _agent = Agent::start_to(&[&p.a, &p.b], &p.uuid, &p.device_key, &[]);
    let api = Api::new(p.b.api, &p.key);
    assert_eq!(holder(&api, &p.uuid).await.as_deref(), Some("a"));
    // Two downloads in flight into a: one local on a, one forwarded from b. The service
    // trickles (64 KiB every 20 ms), so both are still running when a gets SIGTERM.
    let slow = paced_source(8 << 20, 21, Some(Duration::from_millis(20))).await;
    let mut local = tunnel(p.a.proxy, &p.key, &p.uuid, slow).await;
    let mut forwarded = tunnel(p.b.proxy, &p.key, &p.uuid, slow).await;
    let reading = tokio::spawn(async move {
        let l = read_to_end(&mut local).await;
        let f = read_to_end(&mut forwarded).await;
        (l, f)
    });
    let pid = p.a.pid().unwrap();
    let sigterm = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    // New tunnels reach the device through b within 2 s: make-before-break.
    let echo = echo_server().await;
    let moved = eventually(Duration::from_secs(10), || async {
        connect_status(p.b.proxy, &p.key, &p.uuid, echo).await.0 == 200
            && holder(&api, &p.uuid).await.as_deref() == Some("b")
    })
    .await;
    assert!(moved.is_some(), "the device did not move to b");
    eprintln!(
        "new tunnels through b {:?} after SIGTERM",
        sigterm.elapsed()
    );
    // a says it is draining, not ready, and takes no new CONNECT; its API still answers.
    // The row's `draining` is written once the relay has taken the signal: wait for it.
    let a_row = || async {
        let (status, relays) = api.call("GET", "/v1/relays", None).await;
        assert_eq!(status, 200);
        let row = relays
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "a")
            .cloned()
            .unwrap_or_default();
        (row, relays)
    };
    let marked = eventually(Duration::from_secs(10), || async {
        a_row().await.0["draining"] == true
    })
    .await;
    let (row, relays) = a_row().await;
    assert!(marked.is_some(), "{relays}");
    assert_eq!(row["draining"], true, "{relays}");
    let ready = http()
        .get(format!("http://{}/readyz", p.a.api))
        .send()
        .await
        .expect("the API answers during the drain");
    assert_eq!(ready.status().as_u16(), 503);
    assert!(
        tokio::net::TcpStream::connect(p.a.proxy).await.is_err()
            || connect_status(p.a.proxy, &p.key, &p.uuid, echo).await.0 == 0,
        "a draining relay took a new CONNECT"
    );
    // The transfers that were running finish intact.
    let (l, f) = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("transfers did not finish")
        .unwrap();
    let want = sha256_hex(&random_bytes(8 << 20, 21));
    assert_eq!(sha256_hex(&l), want, "the local transfer was cut");
    assert_eq!(sha256_hex(&f), want, "the forwarded transfer was cut");
    p.a.stop();
}

/// One checksummed round trip through `proxy`: 256 KiB up to the digest service, its
/// answer back. `Ok(true)` intact; `Ok(false)` refused before any byte (the caller may
/// retry); `Err` a tunnel that carried bytes and then lost or corrupted some.
async fn checksummed(
    proxy: SocketAddr,
    key: &str,
    uuid: &str,
    digest: u16,
    seed: u64,
) -> Result<bool, String> {
    let request =
        format!("CONNECT {uuid}:{digest} HTTP/1.1\r\nProxy-Authorization: Bearer {key}\r\n\r\n");
    let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await else {
        return Ok(false);
    };
    if s.write_all(request.as_bytes()).await.is_err() {
        return Ok(false);
    }
    let head = read_head(&mut s).await;
    if status_of(&head) != 200 {
        return Ok(false);
    }
    let data = random_bytes(256 * 1024, seed);
    let want = format!("got {} bytes, sha256 {}", data.len(), sha256_hex(&data));
    if let Err(e) = s.write_all(&data).await {
        return Err(format!("write failed mid-tunnel: {e}"));
    }
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    match s.read_to_end(&mut got).await {
        Ok(_) if got == want.as_bytes() => Ok(true),
        Ok(_) => Err(format!(
            "answer {:?} instead of {want:?}",
            String::from_utf8_lossy(&got)
        )),
        Err(e) => Err(format!("read failed mid-tunnel: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_checksummed_traffic_loses_nothing() {
    let pg = TempPg::start();
    let dir = tempfile::tempdir().unwrap();
    let config = limits("keep_alive_ms = 300\nidle_timeout_ms = 1500\nshutdown_grace_secs = 20");
    let relays: Vec<Relay> = ["c1", "c2", "c3"]
        .into_iter()
        .map(|name| member(dir.path(), name, &pg.url, &config))
        .collect();
    let key = admin_key(&relays.iter().collect::<Vec<_>>());
    let (uuid, device_key) = Api::new(relays[0].api, &key).register_device("pis").await;
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        "keep_alive_ms = 300\nidle_timeout_ms = 1500\n",
    )
    .unwrap();
    let _agent = Agent::start_to(
        &relays.iter().collect::<Vec<_>>(),
        &uuid,
        &device_key,
        &["--config", agent_config.to_str().unwrap()],
    );
    let digest = digest_server().await;
    let proxies: Vec<SocketAddr> = relays.iter().map(|r| r.proxy).collect();

    // Traffic: a bounded, seeded stream of round trips through every relay in turn.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (key, uuid, stop) = (key.clone(), uuid.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut intact, mut refused) = (0u32, 0u32);
            let started = Instant::now();
            let mut seed = 0x5eed_u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(90)
                && intact + refused < 5_000
            {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let proxy = proxies[(seed >> 33) as usize % proxies.len()];
                match checksummed(proxy, &key, &uuid, digest, seed).await {
                    Ok(true) => intact += 1,
                    Ok(false) => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok((intact, refused))
        })
    };
    // Restart each relay in turn, as an operator's rolling restart does.
    let mut relays = relays;
    for i in 0..relays.len() {
        let relay = relays.remove(i);
        let relay = tokio::task::spawn_blocking(move || {
            let mut relay = relay;
            relay.restart();
            relay
        })
        .await
        .unwrap();
        relays.insert(i, relay);
        // Each relay back and ready before the next goes down.
        let api = relays[i].api;
        let ready = eventually(Duration::from_secs(30), || async move {
            http()
                .get(format!("http://{api}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        })
        .await;
        assert!(ready.is_some(), "relay {i} did not come back ready");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (intact, refused) = traffic
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("a tunnel lost bytes during the rolling restart: {e}"));
    eprintln!("rolling restart: {intact} round trips intact, {refused} refused before any byte");
    assert!(intact > 0);
}

/// The pair's device, with a real sshd (root logins for fleet members) behind its agent on
/// relay a.
async fn sshd_on_a(p: &Pair) -> (sshd::Sshd, Agent) {
    let sshd = sshd::Sshd::start_with(
        p.a.api,
        &p.uuid,
        &p.device_key,
        "root_login = \"fleet-members\"\n",
    )
    .await;
    let config = p._dir.path().join("agent-sshd.toml");
    std::fs::write(
        &config,
        format!("root_login = \"fleet-members\"\nssh_port = {}\n", sshd.port),
    )
    .unwrap();
    let agent = Agent::start(
        &p.a,
        &p.uuid,
        &p.device_key,
        &["--config", config.to_str().unwrap()],
    );
    (sshd, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_through_another_relay_logs_in_with_a_key_any_relay_answers() {
    sshd::require();
    let p = pair(&limits("")).await;
    // The device's sshd asks relay a for keys; the session's key is minted by relay b.
    let (sshd, _agent) = sshd_on_a(&p).await;
    let mut t = terminal::Term::open(p.b.api, &p.uuid, None, &p.key).await;
    assert_eq!(
        t.expect_control("started").await["login"],
        "root",
        "{}",
        sshd.log()
    );
    t.type_in("echo across-$((6*7)); exit\r").await;
    t.expect_output("across-42").await;
    assert_eq!(t.expect_control("exit").await["status"], 0);
    // One audit row, by the relay the browser came to, naming the device's relay.
    let api = Api::new(p.b.api, &p.key);
    let found = eventually(Duration::from_secs(10), || async {
        let (_, rows) = api.call("GET", "/v1/tunnels", None).await;
        rows.as_array().is_some_and(|rows| {
            rows.len() == 1
                && rows[0]["kind"] == "terminal"
                && rows[0]["relay"] == "b"
                && rows[0]["device_relay"] == "a"
                && rows[0]["closed_at"].is_string()
        })
    })
    .await;
    assert!(
        found.is_some(),
        "{:?}",
        api.call("GET", "/v1/tunnels", None).await
    );
}

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_session_at_one_relay_reaches_a_device_on_another_and_is_cut_there() {
    sshd::require();
    let p = pair(&limits("")).await;
    let (sshd, _agent) = sshd_on_a(&p).await;
    // The cloud user root, with a key, a member of the device's fleet.
    let admin = Api::new(p.a.api, &p.key);
    let (s, user) = admin
        .call("POST", "/v1/users", Some(json!({"username": "root"})))
        .await;
    assert_eq!(s, 201, "{user}");
    admin.add_member("pis", "root").await;
    let root = Api::new(p.a.api, user["api_key"].as_str().unwrap());
    let keys = p._dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = sshd::user_key(&keys);
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let (s, added) = root
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "laptop", "public_key": public.trim()})),
        )
        .await;
    assert_eq!(s, 201, "{added}");
    let ssh_config = crate::ssh::jump_config(&keys, &key);

    // At relay b, whose gateway presents the same host key as a's: `host` reaches the
    // device that relay a holds.
    let (gw_a, gw_b) = (p.a.ssh.unwrap(), p.b.ssh.unwrap());
    let (code, out, err) = crate::ssh::gateway_run(
        &ssh_config,
        gw_b,
        "root",
        &format!("host {} echo across-$((6*7))", p.uuid),
        "",
        false,
    );
    assert_eq!(
        (code, out.trim()),
        (0, "across-42"),
        "{err}\n{}",
        sshd.log()
    );
    let (_, endpoints_a) = admin.call("GET", "/v1/endpoints", None).await;
    let (_, endpoints_b) = Api::new(p.b.api, &p.key)
        .call("GET", "/v1/endpoints", None)
        .await;
    assert_eq!(
        endpoints_a["ssh_gateway"]["host_key"], endpoints_b["ssh_gateway"]["host_key"],
        "the relays of a cluster present different host keys"
    );
    assert_eq!(
        endpoints_b["ssh_gateway"]["address"],
        gw_b.to_string(),
        "{endpoints_b}"
    );
    let _ = gw_a;

    // An open session through b is cut when the key is deleted at a.
    let id = added["id"]
        .as_str()
        .map_or_else(|| added["id"].to_string(), str::to_owned);
    let err = crate::ssh::session_until_cut(&ssh_config, gw_b, &p.uuid, || async {
        let (s, _) = root
            .call("DELETE", &format!("/v1/ssh-keys/{id}"), None)
            .await;
        assert_eq!(s, 204);
    })
    .await;
    assert!(err.contains("access to this device has ended"), "{err}");
    // One audit row of kind ssh-gateway per session, written by b, naming a.
    let found = eventually(Duration::from_secs(10), || async {
        let (_, rows) = admin.call("GET", "/v1/tunnels", None).await;
        rows.as_array().is_some_and(|rows| {
            rows.iter().filter(|r| r["kind"] == "ssh-gateway").count() == 2
                && rows
                    .iter()
                    .filter(|r| r["kind"] == "ssh-gateway")
                    .all(|r| r["relay"] == "b" && r["device_relay"] == "a")
        })
    })
    .await;
    assert!(
        found.is_some(),
        "{:?}",
        admin.call("GET", "/v1/tunnels", None).await
    );
}

/// A transfer each way (16 MiB, paced to last about 20 s) and an interactive echo, entering
/// at `proxy`; returns the chat stream and the two transfers' tasks.
async fn transfers_through(
    proxy: SocketAddr,
    key: &str,
    uuid: &str,
    (digest, source, echo): (u16, u16, u16),
    seed: u64,
) -> (
    tokio::net::TcpStream,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
) {
    let size = 16 << 20;
    let mut chat = tunnel(proxy, key, uuid, echo).await;
    try_echo(&mut chat, b"before").await.unwrap();
    let up = {
        let (key, uuid) = (key.to_owned(), uuid.to_owned());
        tokio::spawn(async move {
            let data = random_bytes(size, seed);
            let mut s = tunnel(proxy, &key, &uuid, digest).await;
            let (mut r, mut w) = s.split();
            let mut answer = String::new();
            let ((), got) = tokio::join!(
                paced_write(&mut w, &data, Duration::from_millis(80)),
                r.read_to_string(&mut answer)
            );
            got.unwrap();
            assert_eq!(
                answer,
                format!("got {size} bytes, sha256 {}", sha256_hex(&data)),
                "the upload through {proxy}"
            );
        })
    };
    let down = {
        let (key, uuid) = (key.to_owned(), uuid.to_owned());
        tokio::spawn(async move {
            let mut s = tunnel(proxy, &key, &uuid, source).await;
            let got = read_to_end(&mut s).await;
            assert_eq!(got.len(), size, "the download through {proxy}");
            assert_eq!(
                sha256_hex(&got),
                sha256_hex(&random_bytes(size, 31)),
                "the download through {proxy}"
            );
        })
    };
    (chat, up, down)
}

/// Tunnels follow their device from relay to relay (PROTOCOL.md §2e, "Through another
/// relay"), over the device's `transport` link: one set enters at c1 (where the device
/// is), one at c3 (forwarded to c1). c1 stops for 4 s, so the device comes back through
/// c2: c1's tunnels resume over the peer hop to c2, c3's move their hop from c1 to c2.
/// Then c2 drains and the device moves to c3: c1's hop moves to c3, and c3's tunnels come
/// home to its own link. Every byte arrives once and in order each way, the echo answers
/// after each move, and each audit row counts two resumes.
async fn tunnels_follow_their_device(transport: &str) {
    let pg = TempPg::start();
    let dir = tempfile::tempdir().unwrap();
    let short = "keep_alive_ms = 300\nidle_timeout_ms = 1500\n\
                 tcp_keep_alive_ms = 300\ntcp_idle_timeout_ms = 1500\n";
    let config = limits(&format!("{short}shutdown_grace_secs = 60"));
    let mut relays: Vec<Relay> = ["c1", "c2", "c3"]
        .into_iter()
        .map(|name| member(dir.path(), name, &pg.url, &config))
        .collect();
    let key = admin_key(&relays.iter().collect::<Vec<_>>());
    let api = Api::new(relays[2].api, &key);
    let (uuid, device_key) = api.register_device("pis").await;
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(&agent_config, short).unwrap();
    let entries: Vec<String> = relays
        .iter()
        .map(|r| match transport {
            "tcp" => format!("tcp://{}", r.device_tcp.expect("a TCP device listener")),
            _ => format!("quic://{}", r.device),
        })
        .collect();
    let agent = Agent::spawn_with(
        &entries,
        &relays[0].cert(),
        &uuid,
        &device_key,
        &["--config", agent_config.to_str().unwrap()],
        &[],
    );
    agent.stderr.wait_for("connected to relay");
    let (_, d) = api.call("GET", &format!("/v1/devices/{uuid}"), None).await;
    assert_eq!(d["transport"], transport, "{d}");
    assert_eq!(holder(&api, &uuid).await.as_deref(), Some("c1"));
    let services = (
        digest_server().await,
        paced_source(16 << 20, 31, Some(Duration::from_millis(80))).await,
        echo_server().await,
    );
    let (mut chat1, up1, down1) =
        transfers_through(relays[0].proxy, &key, &uuid, services, 41).await;
    let (mut chat3, up3, down3) =
        transfers_through(relays[2].proxy, &key, &uuid, services, 43).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = |relays: &[Relay]| {
        let mut out = format!("agent:\n{}\n", agent.stderr.text());
        for (i, r) in relays.iter().enumerate() {
            out += &format!("c{}:\n{}\n", i + 1, r.stderr.text());
        }
        out
    };
    let moved_to = |to: &'static str| {
        let api = &api;
        let uuid = &uuid;
        async move {
            eventually(Duration::from_secs(30), || async {
                holder(api, uuid).await.as_deref() == Some(to)
            })
            .await
        }
    };

    // c1 stops: the agent gives its link up and comes back through c2.
    let c1 = relays[0].pid().unwrap().to_string();
    let signal = |sig: &str, pid: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let started = Instant::now();
    signal("-STOP", &c1);
    let moved = moved_to("c2").await;
    eprintln!(
        "c1 stopped: the device is on c2 after {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal("-CONT", &c1);
    assert!(moved.is_some(), "the device did not come back through c2");
    let resumed = Instant::now();
    for (chat, at) in [(&mut chat1, "c1"), (&mut chat3, "c3")] {
        if let Err(e) = try_echo(chat, b"after c1 stopped").await {
            panic!(
                "no echo through {at} after c1 stopped ({e}):\n{}",
                logs(&relays)
            );
        }
        eprintln!(
            "{transport}: echo through {at} {:?} after c1 continued",
            resumed.elapsed()
        );
    }

    // c2 drains: the device moves to c3, and the tunnels on c2's hop with it.
    let c2 = relays[1].pid().unwrap().to_string();
    let draining = Instant::now();
    signal("-TERM", &c2);
    assert!(
        moved_to("c3").await.is_some(),
        "the device did not move to c3"
    );
    eprintln!(
        "c2 drains: the device is on c3 after {:?}",
        draining.elapsed()
    );
    for (chat, at) in [(&mut chat1, "c1"), (&mut chat3, "c3")] {
        if let Err(e) = try_echo(chat, b"after c2 drained").await {
            panic!(
                "no echo through {at} after c2 drained ({e}):\n{}",
                logs(&relays)
            );
        }
        eprintln!(
            "{transport}: echo through {at} {:?} after the drain began",
            draining.elapsed()
        );
    }
    // c2's drain ends before its grace period: nothing of these tunnels is left on it.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while relays[1].pid().is_some_and(|pid| {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z")
        }) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    eprintln!("c2 exited {:?} after the drain began", draining.elapsed());
    for task in [up1, down1, up3, down3] {
        if let Err(e) = task.await {
            panic!("a transfer failed: {e}:\n{}", logs(&relays));
        }
    }
    eprintln!("transfers done {:?} after c1 stopped", started.elapsed());
    assert!(
        drained.is_ok(),
        "c2 still ran 30 s into its drain:\n{}",
        logs(&relays)
    );
    for chat in [&mut chat1, &mut chat3] {
        try_echo(chat, b"still").await.unwrap();
        chat.shutdown().await.unwrap();
        read_to_end(chat).await;
    }
    eprintln!("chats closed {:?} after c1 stopped", started.elapsed());
    // Each of the six tunnels resumed twice and none failed; the rows say where they
    // entered and where their device was at first.
    let complete = eventually(Duration::from_secs(10), || async {
        let (_, rows) = api.call("GET", "/v1/tunnels", None).await;
        let all = rows.as_array().cloned().unwrap_or_default();
        all.len() == 6 && all.iter().all(|r| !r["closed_at"].is_null())
    })
    .await;
    let (_, rows) = api.call("GET", "/v1/tunnels", None).await;
    assert!(complete.is_some(), "{rows}");
    for row in rows.as_array().unwrap() {
        assert_eq!(row["resumes"], 2, "{row}\n{}", logs(&relays));
        assert!(row["resume_failure"].is_null(), "{row}");
        assert_eq!(row["close_reason"], "closed", "{row}");
        let (entry, first) = (row["relay"].as_str(), row["device_relay"].as_str());
        assert!(
            matches!(
                (entry, first),
                (Some("c1"), None) | (Some("c3"), Some("c1"))
            ),
            "{row}"
        );
    }
    // The device goes first: a relay drains until its devices have moved, and there is
    // nowhere left for this one to move to.
    drop(agent);
    for (i, relay) in relays.iter_mut().enumerate() {
        // c2 has exited (drained); the others stop now.
        if i != 1 {
            relay.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_follow_their_device_through_a_stopped_relay_and_a_drain_over_quic() {
    tunnels_follow_their_device("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_follow_their_device_through_a_stopped_relay_and_a_drain_over_tcp() {
    tunnels_follow_their_device("tcp").await;
}

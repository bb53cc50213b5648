//! Helpers shared by the end-to-end tests, a file for each thing they start: a relay
//! (`relay.rs`) and its output (`lines.rs`), an agent (`agent.rs`), a relay with its admin
//! (`world.rs`), the API and CONNECT clients (`client.rs`), device-side services
//! (`services.rs`), Postgres, sshd, a browser, the impaired-path rig; what is left here is
//! small and shared by all of them (the binary, `require`, `poll`).
//!
//! Readiness is always an event: a process is ready when it prints its "listening" or
//! "connected" line, never after a sleep.
#![allow(dead_code)]

pub mod browser;
pub mod client_ns;
pub mod fake_device;
pub mod github;
pub mod pg;
pub mod rig;
pub mod sshd;
pub mod stalled;
pub mod terminal;

mod agent;
mod client;
mod lines;
mod relay;
mod services;
mod world;

pub use agent::*;
pub use client::*;
pub use lines::*;
pub use relay::*;
pub use services::*;
pub use world::*;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test: this build's, or `CLOUDLINK_BIN` when set (a benchmark of
/// another build, e.g. the one before a change, in the same harness).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CLOUDLINK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cloudlink").into())
    })
}

/// A command that runs [`bin`] under `wrapper` (a program and its arguments, such as
/// `ip netns exec NS`), or directly when `wrapper` is empty.
fn command_under<S: AsRef<std::ffi::OsStr>>(wrapper: &[S]) -> Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin());
            cmd
        }
        None => Command::new(bin()),
    }
}

/// Fails the test when a part of the machine it needs (Postgres, sshd, a browser, root, an
/// outside program) is missing: a test never skips itself. On a machine without the part,
/// install it (scripts/test does, as root), or leave the test out by name
/// (`cargo test -- --skip NAME`).
pub fn require(found: bool, part: &str) {
    assert!(
        found,
        "this test needs {part}, which is missing here: install it (scripts/test does, as \
         root) or leave the test out by name (cargo test -- --skip NAME)"
    );
}

/// Requires an outside program on the `PATH` (see [`require`]).
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    require(found, name);
}

/// How long any single wait for a process event may take before the test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the CLI with config dir `xdg` and optional stdin; returns (success, stdout, stderr).
pub fn cli_in(xdg: &Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    cli_env(xdg, args, &[], stdin)
}

/// [`cli_in`] with extra environment variables.
pub fn cli_env(
    xdg: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> (bool, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("XDG_CONFIG_HOME", xdg)
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cli runs");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().expect("cli runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A process's resident memory in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc status")
}

/// The one polling loop of the tests: retries `f` (with a short, growing pause between
/// tries) until it returns a value or `limit` passes. For conditions another process
/// brings about in its own time, never as a stand-in for readiness.
pub async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = f().await {
            return Some(value);
        }
        if started.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// [`poll`] for a condition: how long it took to hold, or `None` if it did not within
/// `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    poll(limit, || {
        let held = f();
        async move { held.await.then(|| started.elapsed()) }
    })
    .await
}

/// The relay's Prometheus text.
pub async fn metrics(relay: &Relay) -> String {
    metrics_at(relay.api).await
}

/// The scrape of the relay whose API listens at `api` (for a task that cannot borrow
/// the relay).
pub async fn metrics_at(api: std::net::SocketAddr) -> String {
    http()
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Writes a relay config with test-friendly limits, plus `extra` TOML lines for `[limits]`.
pub fn limits(extra: &str) -> String {
    format!("[limits]\nauth_failures_per_minute = 1000\n{extra}\n")
}

/// Generous enough for debug builds on two cores; a transfer this long means a real hang.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads `s` to its end within [`TRANSFER_TIMEOUT`].
pub async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(TRANSFER_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("read finished in time")
        .expect("read succeeded");
    out
}

/// `cloudlink device tunnel UUID -p SPEC…` with the login saved in `xdg` and its stderr
/// going to `stderr`: the process, its stdout lines, and each spec's local address in order
/// (from its `Listening on ADDR => UUID:PORT` line).
pub fn device_tunnel(
    xdg: &Path,
    uuid: &str,
    specs: &[String],
    stderr: Stdio,
) -> (Child, Lines, Vec<SocketAddr>) {
    let mut cmd = Command::new(bin());
    cmd.args(["device", "tunnel", uuid]);
    for spec in specs {
        cmd.args(["-p", spec]);
    }
    let mut child = cmd
        .env("XDG_CONFIG_HOME", xdg)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("cloudlink device tunnel starts");
    let lines = Lines::spawn(child.stdout.take().unwrap(), None);
    let local = specs
        .iter()
        .map(|_| {
            let line = lines.wait_for("Listening on");
            line.split_whitespace()
                .nth(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no listening address in {line:?}"))
        })
        .collect();
    (child, lines, local)
}

/// Two QUIC endpoints on loopback in this process, with the relay's TLS (a fresh
/// self-signed certificate) and [`cloudlink::quic::transport`] at the default limits and
/// packets up to `mtu_max`; the one connection between them, seen from each end.
pub struct QuicPair {
    /// The dialing end (the agent's stream cap).
    pub client: quinn::Connection,
    /// The accepting end (the relay's stream cap).
    pub server: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    _dir: tempfile::TempDir,
}

/// Connects a [`QuicPair`].
pub async fn quic_pair(mtu_max: u16) -> QuicPair {
    cloudlink::tls_client::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    let key_path = dir.path().join("key.pem");
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
    let material = cloudlink::relay::tls::Material::from_files(&cert_path, &key_path).unwrap();
    let limits = cloudlink::config::Limits::default();
    let transport = |streams| {
        cloudlink::quic::transport(&cloudlink::quic::Settings {
            keep_alive: Some(Duration::from_secs(25)),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            peer_bidi_streams: streams,
            mtu_max,
            congestion: limits.quic_congestion,
        })
    };

    let loopback = || cloudlink::quic::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let server_config = cloudlink::relay::tls::quic_server(&material, transport(4)).unwrap();
    let server_end = cloudlink::quic::endpoint(loopback(), Some(server_config)).unwrap();
    let tls = cloudlink::tls_client::config(
        cloudlink::tls_client::Trust::CaFile(&cert_path),
        &[cloudlink::proto::ALPN],
    )
    .unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    client_config.transport_config(Arc::new(transport(4096)));
    let client_end = cloudlink::quic::endpoint(loopback(), None).unwrap();
    let addr = server_end.local_addr().unwrap();
    let (server, client) = tokio::join!(
        async { server_end.accept().await.unwrap().await.unwrap() },
        async {
            client_end
                .connect_with(client_config, addr, "localhost")
                .unwrap()
                .await
                .unwrap()
        },
    );
    QuicPair {
        client,
        server,
        _endpoints: (client_end, server_end),
        _dir: dir,
    }
}

/// Writes `data` into `s` and half-closes it while reading all that comes back, and returns
/// that; panics saying `what` if it takes longer than [`TRANSFER_TIMEOUT`].
pub async fn send_and_read_back(s: &mut TcpStream, data: &[u8], what: &str) -> Vec<u8> {
    let (mut r, mut wr) = s.split();
    let send = async {
        wr.write_all(data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, read) = tokio::time::timeout(TRANSFER_TIMEOUT, async {
        tokio::join!(send, r.read_to_end(&mut back))
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
    read.unwrap();
    back
}

/// The data plane's checks, the same whichever device link carries the tunnels.
pub mod dataplane {
    use super::*;

    /// `size` bytes up to the device's digest service, answered after our half-close, then
    /// `size` bytes down from its source; both checked with SHA-256.
    pub async fn checksummed_both_ways(proxy: SocketAddr, token: &str, uuid: &str, size: usize) {
        let digest = digest_server().await;
        let source = source_server(size, 11).await;
        checksummed_through(proxy, token, uuid, size, digest, source).await;
    }

    /// [`checksummed_both_ways`] through services already running on the device: a
    /// [`digest_on`] service on port `digest` and a source of `size` bytes from seed 11
    /// on port `source`.
    pub async fn checksummed_through(
        proxy: SocketAddr,
        token: &str,
        uuid: &str,
        size: usize,
        digest: u16,
        source: u16,
    ) {
        let port = digest;
        let data = random_bytes(size, 7);
        let mut s = tunnel(proxy, token, uuid, port).await;
        let (mut r, mut wr) = s.split();
        let send = async {
            wr.write_all(&data).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut answer = String::new();
        let recv = r.read_to_string(&mut answer);
        let (_, got) = tokio::time::timeout(TRANSFER_TIMEOUT, async { tokio::join!(send, recv) })
            .await
            .expect("upload finished in time");
        got.unwrap();
        assert_eq!(
            answer,
            format!("got {size} bytes, sha256 {}", sha256_hex(&data))
        );

        let mut s = tunnel(proxy, token, uuid, source).await;
        let got = read_all(&mut s).await;
        assert_eq!(got.len(), size);
        assert_eq!(sha256_hex(&got), sha256_hex(&random_bytes(size, 11)));
    }

    /// 100 tunnels at once, 256 KiB each through an echo service, each checked.
    pub async fn a_hundred_at_once(proxy: SocketAddr, token: &str, uuid: &str) {
        let port = echo_server().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100u64 {
            let (token, uuid) = (token.to_owned(), uuid.to_owned());
            tasks.spawn(async move {
                let data = random_bytes(256 * 1024, i + 1);
                let mut s = tunnel(proxy, &token, &uuid, port).await;
                let back = send_and_read_back(&mut s, &data, "an echo took too long").await;
                assert_eq!(sha256_hex(&back), sha256_hex(&data), "tunnel {i}");
            });
        }
        let all = async {
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        };
        tokio::time::timeout(TRANSFER_TIMEOUT, all)
            .await
            .expect("all tunnels done in time");
    }

    /// A tunnel opened with a fresh API key ends within 10 s of revoking that key.
    pub async fn revoking_a_key_ends_open_tunnels(w: &World, uuid: &str) {
        let echo = echo_server().await;
        let (status, k) = w
            .admin
            .call("POST", "/v1/api-keys", Some(json!({"name": "temp"})))
            .await;
        assert_eq!(status, 201);
        let mut s = tunnel(w.relay.proxy, k["key"].as_str().unwrap(), uuid, echo).await;
        s.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        let (status, _) = w
            .admin
            .call("DELETE", &format!("/v1/api-keys/{}", k["id"]), None)
            .await;
        assert_eq!(status, 204);
        // The relay cuts the tunnel within its revalidation period: the read ends.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "tunnel still open 10 s after revocation");
    }
}

/// An open audit row: `id`, by `user_id`/`username` to port 22 of `device`, at `opened_at`.
pub fn tunnel_row(
    id: &str,
    user_id: i64,
    username: &str,
    device: &str,
    opened_at: i64,
) -> cloudlink::store::TunnelSession {
    cloudlink::store::TunnelSession {
        id: id.into(),
        user_id,
        username: username.into(),
        device_uuid: device.into(),
        port: 22,
        relay_id: "r1".into(),
        opened_at,
        closed_at: None,
        bytes_up: 0,
        bytes_down: 0,
        close_reason: None,
        device_relay: None,
        kind: "connect".into(),
        resumes: 0,
        replayed_bytes: 0,
        waited_ms: 0,
        resume_failure: None,
    }
}

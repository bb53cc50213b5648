//! Helpers shared by the end-to-end tests: real relays and agents (the built binary) on
//! port 0, real local services, a CONNECT client, and the API.
//!
//! Readiness is always an event: a process is ready when it prints its "listening" or
//! "connected" line, never after a sleep.
#![allow(dead_code)]

pub mod browser;
pub mod fake_device;
pub mod github;
pub mod pg;
pub mod rig;
pub mod sshd;
pub mod terminal;

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

/// A relay that did not come up.
#[derive(Debug)]
pub struct FailedStart {
    missing: Missing,
    status: Option<std::process::ExitStatus>,
    stderr: String,
}

impl FailedStart {
    /// It could not bind a port some other socket holds.
    fn port_taken(&self) -> bool {
        self.stderr.contains("Address already in use")
    }
}

impl std::fmt::Display for FailedStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.status.map_or("unknown".to_owned(), |s| s.to_string());
        write!(
            f,
            "the relay did not say \"relay listening\": {} (exit: {status}); stderr:\n{}",
            self.missing, self.stderr
        )
    }
}

/// Why an awaited line did not come.
#[derive(Debug)]
pub enum Missing {
    /// Not within the bound.
    TimedOut(Duration),
    /// The writer closed its end first (the process exited).
    Closed,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::TimedOut(limit) => write!(f, "none within {limit:?}"),
            Missing::Closed => f.write_str("the output closed first (the process exited)"),
        }
    }
}

/// Lines a child process writes, collected by a thread and readable as they come.
pub struct Lines {
    rx: Mutex<mpsc::Receiver<String>>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    pub fn spawn(reader: impl std::io::Read + Send + 'static, log: Option<PathBuf>) -> Lines {
        let (tx, rx) = mpsc::channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let keep = all.clone();
        std::thread::spawn(move || {
            let mut file = log.map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .expect("log file")
            });
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Lines {
            rx: Mutex::new(rx),
            all,
        }
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_within(needle, EVENT_TIMEOUT)
    }

    /// Waits up to `limit` for a line containing `needle` and returns it.
    pub fn wait_for_within(&self, needle: &str, limit: Duration) -> String {
        self.find_within(needle, limit).unwrap_or_else(|missing| {
            panic!(
                "no line containing {needle:?}: {missing}; saw:\n{}",
                self.text()
            )
        })
    }

    /// Like [`Lines::wait_for_within`], but says why the line is missing instead of
    /// failing the test.
    pub fn find_within(&self, needle: &str, limit: Duration) -> Result<String, Missing> {
        let rx = self.rx.lock().unwrap();
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(Missing::TimedOut(limit)),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Missing::Closed),
            }
        }
    }

    /// Waits (up to `limit`) until the writer has closed its end, so that [`Lines::text`]
    /// holds everything it wrote.
    pub fn wait_closed(&self, limit: Duration) {
        let rx = self.rx.lock().unwrap();
        let deadline = std::time::Instant::now() + limit;
        // Every line is kept in `all` by the reading thread; these are only its echoes.
        while rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
        {}
    }

    /// Everything seen so far.
    pub fn text(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }
}

/// The address named `key` in the relay's listening line: `key=ADDR` in text, or
/// `fields.key` in a JSON line (`--log-format json`).
fn field(line: &str, key: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let event: Value = serde_json::from_str(line).ok()?;
        return event["fields"][key].as_str()?.parse().ok();
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// Where a relay's listeners are (or are to be) bound.
#[derive(Clone)]
struct Listeners {
    api: String,
    api_tls: String,
    proxy: String,
    proxy_tls: String,
    device: String,
    /// `None`: not given, so the relay binds the TCP twin of its QUIC address.
    device_tcp: Option<String>,
}

impl Listeners {
    /// Port 0 everywhere, TLS listeners included (their defaults are fixed ports).
    fn any() -> Listeners {
        let any = "127.0.0.1:0".to_owned();
        Listeners {
            api: any.clone(),
            api_tls: any.clone(),
            proxy: any.clone(),
            proxy_tls: any.clone(),
            device: any.clone(),
            // Not the default TCP twin of the QUIC port: another test may hold that port
            // number on TCP.
            device_tcp: Some(any),
        }
    }
}

/// A relay process.
pub struct Relay {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub api_tls: Option<SocketAddr>,
    pub proxy: SocketAddr,
    pub proxy_tls: Option<SocketAddr>,
    /// Where agents dial: the QUIC listener (or, with QUIC off, the TCP one).
    pub device: SocketAddr,
    /// The TLS/TCP device listener.
    pub device_tcp: Option<SocketAddr>,
    /// The QUIC device listener.
    device_quic: Option<SocketAddr>,
    /// The peer link (cluster mode).
    pub peer: Option<SocketAddr>,
    /// The metrics listener, with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
    pub stdout: Lines,
    pub stderr: Lines,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// Every log line of every run, for the "no secret in the logs" checks.
    pub log_file: PathBuf,
}

impl Relay {
    /// Starts a relay on port 0 everywhere with `extra` arguments.
    pub fn start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Relay {
        Relay::start_wrapped(data_dir, extra, env, &[])
    }

    /// Starts a relay with `wrapper` in front of the binary (e.g. `prlimit --nofile=…`).
    pub fn start_wrapped(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let log_file = data_dir.with_extension("log");
        Relay::spawn(data_dir, Listeners::any(), extra, env, log_file, wrapper)
    }

    /// Starts a relay whose device listeners are QUIC on `device` and TLS/TCP on its twin
    /// (the same address and port number, the relay's default), as agents given a bare
    /// `HOST:PORT` expect. Use an address only this test binds (the rig's), so that the
    /// twin port is free.
    pub fn start_twin(
        data_dir: &Path,
        device: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let at = Listeners {
            device: device.to_owned(),
            device_tcp: None,
            ..Listeners::any()
        };
        Relay::spawn(
            data_dir,
            at,
            extra,
            env,
            data_dir.with_extension("log"),
            &[],
        )
    }

    fn spawn(
        data_dir: &Path,
        at: Listeners,
        extra: Vec<String>,
        env: Vec<(String, String)>,
        log_file: PathBuf,
        wrapper: &[&str],
    ) -> Relay {
        Relay::try_spawn(data_dir, at, extra, env, log_file, wrapper)
            .unwrap_or_else(|failed| panic!("{failed}"))
    }

    /// Starts the relay and waits for its "relay listening" line; a start that fails
    /// comes back with what the relay said on stderr.
    fn try_spawn(
        data_dir: &Path,
        at: Listeners,
        extra: Vec<String>,
        env: Vec<(String, String)>,
        log_file: PathBuf,
        wrapper: &[&str],
    ) -> Result<Relay, FailedStart> {
        let mut cmd = command_under(wrapper);
        // Listeners named in `extra` win (clap takes a flag once): a test may move one.
        let named = |flag: &str| extra.iter().any(|a| a == flag);
        cmd.arg("relay").arg("--data-dir").arg(data_dir);
        for (flag, addr) in [
            ("--api-listen", Some(&at.api)),
            ("--api-tls-listen", Some(&at.api_tls)),
            ("--proxy-listen", Some(&at.proxy)),
            ("--proxy-tls-listen", Some(&at.proxy_tls)),
            ("--device-listen", Some(&at.device)),
            ("--device-tcp-listen", at.device_tcp.as_ref()),
        ] {
            if let (false, Some(addr)) = (named(flag), addr) {
                cmd.args([flag, addr]);
            }
        }
        cmd.args(&extra)
            .env("RUST_LOG", "debug")
            .env_remove("CLOUDLINK_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("relay starts");
        let stdout = Lines::spawn(child.stdout.take().unwrap(), Some(log_file.clone()));
        let stderr = Lines::spawn(child.stderr.take().unwrap(), Some(log_file.clone()));
        // "relay listening: …" in text, {"fields":{"message":"relay listening",…}} in JSON.
        let line = match stdout.find_within("relay listening", EVENT_TIMEOUT) {
            Ok(line) => line,
            Err(missing) => {
                let _ = child.kill();
                let status = child.wait().ok();
                stderr.wait_closed(Duration::from_secs(5));
                return Err(FailedStart {
                    missing,
                    status,
                    stderr: stderr.text(),
                });
            }
        };
        Ok(Relay {
            child: Some(child),
            data_dir: data_dir.to_owned(),
            api: field(&line, "api").expect("api addr"),
            api_tls: field(&line, "api_tls"),
            proxy: field(&line, "proxy").expect("proxy addr"),
            proxy_tls: field(&line, "proxy_tls"),
            device: field(&line, "device")
                .or_else(|| field(&line, "device_tcp"))
                .expect("device addr"),
            device_tcp: field(&line, "device_tcp"),
            device_quic: field(&line, "device"),
            peer: field(&line, "peer"),
            metrics: field(&line, "metrics"),
            stdout,
            stderr,
            extra,
            env,
            log_file,
        })
    }

    /// The process id (for memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The bootstrap admin's key.
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_owned()
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let status = child.wait().expect("relay exits");
            assert!(status.success(), "relay exited with {status}");
        }
    }

    /// Stops and starts again on the same addresses and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Starts the (stopped or killed) relay again on the same addresses and data.
    pub fn start_again(&mut self) {
        let off = |a: Option<SocketAddr>| a.map_or("off".to_owned(), |a| a.to_string());
        let at = Listeners {
            api: self.api.to_string(),
            api_tls: off(self.api_tls),
            proxy: self.proxy.to_string(),
            proxy_tls: off(self.proxy_tls),
            device: off(self.device_quic),
            device_tcp: Some(off(self.device_tcp)),
        };
        // While the relay was down, any process here may have been given one of its
        // ports as the ephemeral port of an outgoing connection or UDP socket (loopback
        // ports from port 0 lie in the ephemeral range; a production relay's 443 does
        // not). That is this machine's doing, not the relay's: the start is tried again
        // for as long as such a socket usually lives, and only for that error.
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        let next = loop {
            match Relay::try_spawn(
                &self.data_dir,
                at.clone(),
                self.extra.clone(),
                self.env.clone(),
                self.log_file.clone(),
                &[],
            ) {
                Ok(relay) => break relay,
                Err(failed) if failed.port_taken() && std::time::Instant::now() < deadline => {
                    eprintln!("relay restart: a port was taken while it was down; again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(failed) => panic!("{failed}"),
            }
        };
        *self = next;
    }

    /// SIGKILL, like a crash or the OOM killer.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The relay's certificate (the generated dev one).
    pub fn cert(&self) -> PathBuf {
        self.data_dir.join("relay-cert.pem")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An agent process.
pub struct Agent {
    child: Option<Child>,
    pub stderr: Lines,
}

impl Agent {
    /// Starts an agent for `uuid`/`key` against `relay`; returns once it is connected.
    pub fn start(relay: &Relay, uuid: &str, key: &str, extra: &[&str]) -> Agent {
        let agent = Agent::spawn(relay, uuid, key, extra);
        agent.stderr.wait_for("connected to relay");
        agent
    }

    /// Starts an agent without waiting.
    pub fn spawn(relay: &Relay, uuid: &str, key: &str, extra: &[&str]) -> Agent {
        Agent::spawn_to(&[relay], uuid, key, extra)
    }

    /// Starts an agent that knows several relays (a cluster), tried in turn; returns once
    /// it is connected.
    pub fn start_to(relays: &[&Relay], uuid: &str, key: &str, extra: &[&str]) -> Agent {
        let agent = Agent::spawn_to(relays, uuid, key, extra);
        agent.stderr.wait_for("connected to relay");
        agent
    }

    /// Starts an agent for several relays without waiting.
    pub fn spawn_to(relays: &[&Relay], uuid: &str, key: &str, extra: &[&str]) -> Agent {
        let addrs: Vec<String> = relays.iter().map(|r| r.device.to_string()).collect();
        Agent::spawn_with(&addrs, &relays[0].cert(), uuid, key, extra, &[])
    }

    /// Starts an agent with `--relay` entries as given (`quic://`, `tcp://` or bare),
    /// trusting `cert`, with extra flags and environment, without waiting.
    pub fn spawn_with(
        relays: &[String],
        cert: &Path,
        uuid: &str,
        key: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Agent::spawn_wrapped(&[], relays, cert, uuid, key, extra, env)
    }

    /// [`Agent::spawn_with`] with `wrapper` in front of the binary (e.g. the rig's
    /// `ip netns exec DEVICE`).
    pub fn spawn_wrapped(
        wrapper: &[String],
        relays: &[String],
        cert: &Path,
        uuid: &str,
        key: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut cmd = command_under(wrapper);
        cmd.arg("agent");
        for relay in relays {
            cmd.arg("--relay").arg(relay);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("--ca")
            .arg(cert)
            .args(["--server-name", "localhost"])
            .args(extra)
            .env("CLOUDLINK_DEVICE_UUID", uuid)
            .env("CLOUDLINK_DEVICE_KEY", key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts");
        let stderr = Lines::spawn(child.stderr.take().unwrap(), None);
        Agent {
            child: Some(child),
            stderr,
        }
    }

    /// SIGKILL, like a device losing power.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay with a logged-in CLI config and an admin API client.
pub struct World {
    pub dir: tempfile::TempDir,
    pub relay: Relay,
    pub admin: Api,
}

impl World {
    /// A relay on SQLite in a temp dir, with test-friendly limits merged into `config`.
    pub fn new(config: &str) -> World {
        World::with(config, &[], &[])
    }

    /// Like [`World::new`] with extra relay flags and env.
    pub fn with(config: &str, extra: &[&str], env: &[(&str, &str)]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, config).unwrap();
        let mut args = vec!["--config", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let relay = Relay::start(&dir.path().join("data"), &args, env);
        let admin = Api::new(relay.api, &relay.admin_key());
        World { dir, relay, admin }
    }

    /// The CLI config dir of this world.
    pub fn xdg(&self) -> PathBuf {
        self.dir.path().join("xdg")
    }

    /// Runs the CLI with this world's config dir; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli_in(&self.xdg(), args, None)
    }

    /// Logs a CLI config dir in with `key`.
    pub fn login_in(&self, xdg: &Path, key: &str) {
        let (ok, _, err) = cli_in(
            xdg,
            &[
                "login",
                "--api",
                &format!("http://{}", self.relay.api),
                "--proxy",
                &self.relay.proxy.to_string(),
                "--key",
                key,
            ],
            None,
        );
        assert!(ok, "login failed: {err}");
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "cloudlink {args:?} failed: {err}");
        out
    }

    /// Logs the CLI in with `key`.
    pub fn login(&self, key: &str) {
        self.login_in(&self.xdg(), key);
    }

    /// Creates a fleet (owned by the admin) and a device in it; returns (uuid, key).
    pub async fn device_in(&self, fleet: &str) -> (String, String) {
        self.admin.register_device(fleet).await
    }

    /// Creates a user; returns their API key.
    pub async fn user(&self, name: &str) -> String {
        let (status, u) = self
            .admin
            .call("POST", "/v1/users", Some(json!({ "username": name })))
            .await;
        assert_eq!(status, 201, "{u}");
        u["api_key"].as_str().unwrap().to_owned()
    }
}

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

/// A plain HTTP client (installs the ring provider reqwest needs first).
pub fn http() -> reqwest::Client {
    cloudlink::tls_client::install_crypto();
    reqwest::Client::new()
}

/// A tiny API client.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr, token: &str) -> Api {
        Api {
            base: format!("http://{addr}"),
            token: token.to_owned(),
            http: http(),
        }
    }

    /// A client of the relay's HTTPS API, trusting the relay's dev certificate.
    pub fn tls(relay: &Relay, token: &str) -> Api {
        let addr = relay.api_tls.expect("HTTPS API bound");
        let http = cloudlink::tls_client::http_client(
            "https://",
            cloudlink::tls_client::Trust::CaFile(&relay.cert()),
            Duration::from_secs(30),
        )
        .unwrap();
        Api {
            base: format!("https://localhost:{}", addr.port()),
            token: token.to_owned(),
            http,
        }
    }

    pub fn as_user(&self, token: &str) -> Api {
        Api {
            token: token.to_owned(),
            ..self.clone()
        }
    }

    /// The device link `uuid` is on, as the API reports it (`"quic"`, `"tcp"`, or null
    /// when offline).
    pub async fn transport_of(&self, uuid: &str) -> serde_json::Value {
        let (status, d) = self.call("GET", &format!("/v1/devices/{uuid}"), None).await;
        assert_eq!(status, 200, "{d}");
        d["transport"].clone()
    }

    /// Creates `fleet` if needed and registers a device in it; returns (uuid, key).
    pub async fn register_device(&self, fleet: &str) -> (String, String) {
        // The fleet may exist already (409); the device registration below is what counts.
        let _ = self
            .call("POST", "/v1/fleets", Some(json!({ "name": fleet })))
            .await;
        let (status, d) = self
            .call(
                "POST",
                &format!("/v1/fleets/{fleet}/devices"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        (
            d["uuid"].as_str().unwrap().to_owned(),
            d["key"].as_str().unwrap().to_owned(),
        )
    }

    /// Makes `user` a member of `fleet`.
    pub async fn add_member(&self, fleet: &str, user: &str) {
        let (status, body) = self
            .call(
                "POST",
                &format!("/v1/fleets/{fleet}/members"),
                Some(json!({ "username": user, "role": "member" })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Sends a request; returns the status and the JSON body (or the text as a string).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }
}

/// Sends a CONNECT and returns the stream and the whole answer head (status line first).
pub async fn connect_raw(proxy: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// Reads an HTTP answer head byte by byte (so no tunnel byte is consumed).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The status code of an answer head.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Opens a tunnel with a Bearer token; panics unless the answer is 200.
pub async fn tunnel(proxy: SocketAddr, token: &str, uuid: &str, port: u16) -> TcpStream {
    let (s, head) = connect_raw(
        proxy,
        &format!(
            "CONNECT {uuid}.cloudlink:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status_of(&head), 200, "CONNECT answered: {head}");
    s
}

/// An echo service on 127.0.0.1:0; returns its port.
pub async fn echo_server() -> u16 {
    echo_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// [`echo_server`] on `listener` (e.g. one in the rig's device namespace).
pub fn echo_on(listener: tokio::net::TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// A service that reads until EOF and only then answers `got N bytes, sha256 H`.
pub async fn digest_server() -> u16 {
    digest_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// [`digest_server`] on `listener` (e.g. one in the rig's device namespace).
pub fn digest_on(listener: tokio::net::TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                use sha2::Digest;
                let mut hasher = sha2::Sha256::new();
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            hasher.update(&buf[..k]);
                            n += k as u64;
                        }
                    }
                }
                let answer = format!("got {n} bytes, sha256 {}", hex::encode(hasher.finalize()));
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// A service that sends `len` pseudo-random bytes from `seed`, then closes.
pub async fn source_server(len: usize, seed: u64) -> u16 {
    paced_source(len, seed, None).await
}

/// Like [`source_server`], but with `pause` after each 64 KiB when given, so a transfer
/// is still running when a test acts on it.
pub async fn paced_source(len: usize, seed: u64, pause: Option<Duration>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    paced_source_on(listener, len, seed, pause)
}

/// [`paced_source`] on `listener` (e.g. one in the rig's device namespace).
pub fn paced_source_on(
    listener: tokio::net::TcpListener,
    len: usize,
    seed: u64,
    pause: Option<Duration>,
) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let data = random_bytes(len, seed);
                let chunk = if pause.is_some() {
                    64 * 1024
                } else {
                    data.len().max(1)
                };
                for piece in data.chunks(chunk) {
                    if s.write_all(piece).await.is_err() {
                        return;
                    }
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for 64 MiB in a debug build.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
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
    http()
        .get(format!("http://{}/metrics", relay.api))
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
    }
}

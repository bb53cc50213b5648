//! A relay process for a test: started on port 0 (or on its old addresses again), its
//! output read as it comes, stopped or killed.

use super::*;

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
    ssh: String,
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
            device_tcp: Some(any.clone()),
            ssh: any,
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
    /// The SSH gateway, with `--ssh-listen`.
    pub ssh: Option<SocketAddr>,
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
        let (extra, env) = owned(extra, env);
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
        let (extra, env) = owned(extra, env);
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
            ("--ssh-listen", Some(&at.ssh)),
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
            ssh: field(&line, "ssh"),
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
            ssh: off(self.ssh),
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

/// Owned copies of a relay's extra arguments and environment, kept for a restart.
fn owned(extra: &[&str], env: &[(&str, &str)]) -> (Vec<String>, Vec<(String, String)>) {
    let extra = extra.iter().map(|s| s.to_string()).collect();
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (extra, env)
}

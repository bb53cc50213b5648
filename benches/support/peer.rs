//! Scenario h: Cloudlink against a peer tool, side by side in one run, as a user meets
//! them: one stream through `cloudlink device tunnel` (CLI → relay → QUIC → agent) and the
//! same stream through rathole 0.5 with its TLS transport (visitor → server → TLS →
//! client), both on loopback, rounds interleaved.
//!
//! Figures per tool: throughput each way (median of the rounds), CPU seconds per GB for
//! every process of the tool, and connect latency as issue 11 defines it: 1,000
//! sequential (TCP connect + 1 byte echoed back) through the warm tunnel, minus the same
//! straight to the service, in the same run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A child process stopped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Its pid, for CPU readings.
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

/// Where the rathole binary is: `--rathole PATH`, `$RATHOLE`, or `rathole` on PATH.
pub fn find_rathole(given: Option<PathBuf>) -> Option<PathBuf> {
    let candidate = given
        .or_else(|| std::env::var_os("RATHOLE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("rathole"));
    let ok = Command::new(&candidate)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(candidate)
}

/// A free loopback port (bound, read, released: rathole takes ports from its config).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// rathole server and client with the TLS transport, forwarding `services` (name, the
/// local service port); returns the processes and each service's visitor port.
pub async fn start_rathole(
    bin: &Path,
    dir: &Path,
    cert: &Path,
    key: &Path,
    services: &[(&str, u16)],
) -> (Proc, Proc, Vec<u16>) {
    // rathole's server takes a PKCS#12 identity: made from the relay's dev certificate.
    let identity = dir.join("identity.pfx");
    let made = Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
        .arg(&identity)
        .arg("-inkey")
        .arg(key)
        .arg("-in")
        .arg(cert)
        .status()
        .expect("openssl runs");
    assert!(made.success(), "openssl pkcs12 failed");
    let control = free_port();
    let visitors: Vec<u16> = services.iter().map(|_| free_port()).collect();
    let mut server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"tls\"\n\
         [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
        identity.display()
    );
    let mut client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"tls\"\n\
         [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
        cert.display()
    );
    for ((name, port), visitor) in services.iter().zip(&visitors) {
        server.push_str(&format!(
            "[server.services.{name}]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{visitor}\"\n"
        ));
        client.push_str(&format!(
            "[client.services.{name}]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{port}\"\n"
        ));
    }
    let (server_toml, client_toml) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(&server_toml, server).unwrap();
    std::fs::write(&client_toml, client).unwrap();
    let spawn = |role: &str, file: &Path| {
        Proc(
            Command::new(bin)
                .arg(role)
                .arg(file)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("rathole starts"),
        )
    };
    let server = spawn("--server", &server_toml);
    let client = spawn("--client", &client_toml);
    (server, client, visitors)
}

/// Waits until a 1-byte echo through `port` comes back (the tunnel is up end to end).
pub async fn wait_echo(port: u16, limit: Duration) {
    let up = crate::common::eventually(limit, || async { echo_once(port).await.is_ok() }).await;
    assert!(
        up.is_some(),
        "nothing echoes through 127.0.0.1:{port} within {limit:?}"
    );
}

/// One TCP connect and one byte echoed back.
pub async fn echo_once(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    Ok(())
}

/// p50 and p99 of `n` sequential connect + 1-byte echoes through `port`.
pub async fn connect_latency(port: u16, n: usize) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        echo_once(port).await.expect("echo through the tunnel");
        samples.push(t.elapsed());
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    (at(0.50), at(0.99))
}

/// The middle value.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

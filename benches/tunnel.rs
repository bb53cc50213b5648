//! `cargo bench --bench tunnel [-- OPTIONS]`: the hot path against this machine's limits.
//!
//! Scenarios (all on loopback, real sockets; the relay and the agent are separate processes
//! of the release binary, so the figures are what a deployment gets):
//!
//! - a: one plain TCP stream (the kernel's limit here)
//! - b: one quinn stream with the relay's TLS and transport settings (QUIC's limit here)
//! - c: client → CONNECT → relay → device link → agent → TCP sink, upload and download,
//!   over each device link (QUIC, and TLS over TCP with HTTP/2 streams), with the relay's
//!   CPU seconds per GB moved
//! - d: setup latency, CONNECT → 200 → first echoed byte, auth cache cold and warm, over
//!   each device link
//! - e: many concurrent tunnels, aggregate throughput and the slowest tunnel (fairness)
//! - f: idle devices holding a QUIC connection each: relay memory per device, and the time
//!   for all of them to reconnect after a relay restart; then the same number of idle
//!   devices on the TCP link: relay memory per device
//! - g: a cluster of two relays on a throwaway Postgres: the same transfer and the same
//!   setups through the device's own relay and through the other one (a peer hop), in one
//!   run
//!
//! - h: against a peer, side by side: one stream through `cloudlink device tunnel` (CLI →
//!   relay → QUIC → agent) and through rathole 0.5's TLS transport, rounds interleaved:
//!   throughput each way, CPU seconds per GB per process, connect latency added (1,000
//!   sequential TCP connect + 1 byte echoed, minus the same straight to the service), and
//!   the relay's RSS. Needs rathole (`cargo install rathole --root DIR`, then `--rathole
//!   DIR/bin/rathole` or `$RATHOLE`); fails without it unless `--no-peer` is given, which
//!   runs Cloudlink's rows alone.
//!
//! - i: the device links on impaired paths (the rig of `tests/suite/common/rig.rs`: the
//!   device in a network namespace, latency from a TUN delay line, loss from nftables, rate
//!   from tbf): each link's tunnel upload and download as a ratio to plain TCP (BBR, the
//!   kernel's default here, and cubic) over the same path, rounds interleaved, with the
//!   RTT, rate, loss and queue drops measured on the path; downloads with quinn's other
//!   congestion controllers; a tunnel download sharing the device's uplink with a TCP
//!   upload. `benches/support/field.rs` says how each row is measured.
//! - j: idle cost per link at the defaults, bytes counted by nftables on the rig's path,
//!   scaled to a month; and how long an agent that fell back to TCP takes to be back on
//!   QUIC once UDP works again.
//!
//! - k: stalled readers (`benches/support/stalled.rs`): 200 and 2,000 tunnels whose users
//!   stop reading, over each device link: relay RSS per tunnel and after they close, the
//!   relay's kernel socket memory, the agents' memory, and other tunnels' share meanwhile.
//!   Not in the default set: 2,000 readers start 40 agents.
//! - l: the events of issue 28 on the rig (address change, 20 and 90 s blackouts on each
//!   link, UDP blocked under `auto`) at the defaults, with a download running through each:
//!   how long after the path came back the interactive echo answered. About 5 minutes;
//!   needs what i needs; not in the default set.
//!
//! i, j and l need root, `ip`, `tc` and `nft` (they fail without them), are not in the
//! default set, and take long: i about 40 minutes at the defaults, j about 7. Their
//! before/after figures are in `docs/field.md`.
//!
//! Options: `--scenarios abcdefgh` (add `i`, `j` by name), `--rounds 3` (h), `--rathole PATH`, `--no-peer`,
//! `--quic-mtu-max N` (h: bigger QUIC packets, for paths that carry them; never the
//! headline), `--transport quic|tcp|both` (c, d, f; default both),
//! `--size-mib 1024` (a, b, c, g, h), `--setups 1000` (d, g, h),
//! `--tunnels 200 --tunnel-mib 16` (e), `--stalled 200,2000` (k), `--devices 2000` (f). To measure a deployed relay
//! instead of a local one (c, d, e): `--api URL --proxy HOST:PORT --device HOST:PORT
//! --key ADMIN_KEY [--ca PEM]`; the agent still runs here. For i: `--field-rounds 3`,
//! `--field-secs 5` (measured per transfer), `--field-warmup 2` (from its first byte),
//! `--field-rtts 50,150` (ms), `--field-losses 0,0.1,1` (%), `--field-rate 40` (Mbit/s
//! each way), `--field-ccs cubic,newreno,quinn-bbr` (empty: none), `--field-cli` (also
//! through `cloudlink device tunnel`), `--field-no-share`; for j: `--idle-secs 300`.
//! `CLOUDLINK_BIN=PATH` measures another build of the binary (an older commit's, for a
//! before/after) with this benchmark.

#[path = "../tests/suite/common/mod.rs"]
mod common;
#[path = "support/field.rs"]
mod field;
#[path = "support/peer.rs"]
mod peer;
#[path = "support/stalled.rs"]
mod stalled;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1024 * 1024;

struct Opts {
    scenarios: String,
    rounds: usize,
    rathole: Option<PathBuf>,
    no_peer: bool,
    /// h: QUIC packets up to this size instead of the internet-safe default.
    quic_mtu_max: Option<u16>,
    transports: Vec<&'static str>,
    size: u64,
    setups: usize,
    tunnels: usize,
    tunnel_size: u64,
    /// k: how many stalled readers, one run each.
    stalled: Vec<usize>,
    devices: usize,
    remote: Option<Remote>,
    field: field::FieldOpts,
}

/// A deployed relay to measure instead of a local one.
#[derive(Clone)]
struct Remote {
    api: String,
    proxy: SocketAddr,
    device: SocketAddr,
    key: String,
    ca: Option<PathBuf>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        scenarios: "abcdefgh".into(),
        rounds: 3,
        rathole: None,
        no_peer: false,
        quic_mtu_max: None,
        transports: vec!["quic", "tcp"],
        size: 1024 * MIB,
        setups: 1000,
        tunnels: 200,
        tunnel_size: 16 * MIB,
        stalled: vec![200, 2000],
        devices: 2000,
        remote: None,
        field: field::FieldOpts {
            rounds: 3,
            secs: 5.0,
            warmup: 2.0,
            rtts: vec![50, 150],
            losses: vec![0.0, 0.1, 1.0],
            rate: 40,
            idle_secs: 300,
            cli: false,
            ccs: vec!["cubic".into(), "newreno".into(), "quinn-bbr".into()],
            share: true,
        },
    };
    let (mut api, mut proxy, mut device, mut key, mut ca) = (None, None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--scenarios" => o.scenarios = value(),
            "--rounds" => o.rounds = value().parse().expect("number"),
            "--rathole" => o.rathole = Some(PathBuf::from(value())),
            "--no-peer" => o.no_peer = true,
            "--quic-mtu-max" => o.quic_mtu_max = Some(value().parse().expect("1200-65527")),
            "--transport" => {
                o.transports = match value().as_str() {
                    "quic" => vec!["quic"],
                    "tcp" => vec!["tcp"],
                    "both" => vec!["quic", "tcp"],
                    other => panic!("--transport quic|tcp|both, not {other}"),
                }
            }
            "--size-mib" => o.size = value().parse::<u64>().expect("number") * MIB,
            "--setups" => o.setups = value().parse().expect("number"),
            "--tunnels" => o.tunnels = value().parse().expect("number"),
            "--tunnel-mib" => o.tunnel_size = value().parse::<u64>().expect("number") * MIB,
            "--stalled" => {
                o.stalled = value()
                    .split(',')
                    .map(|v| v.parse().expect("number"))
                    .collect()
            }
            "--devices" => o.devices = value().parse().expect("number"),
            "--field-rounds" => o.field.rounds = value().parse().expect("number"),
            "--field-secs" => o.field.secs = value().parse().expect("seconds"),
            "--field-rtts" => {
                o.field.rtts = value().split(',').map(|v| v.parse().expect("ms")).collect()
            }
            "--field-losses" => {
                o.field.losses = value().split(',').map(|v| v.parse().expect("%")).collect()
            }
            "--field-rate" => o.field.rate = value().parse().expect("Mbit/s"),
            "--idle-secs" => o.field.idle_secs = value().parse().expect("seconds"),
            "--field-warmup" => o.field.warmup = value().parse().expect("seconds"),
            "--field-cli" => o.field.cli = true,
            "--field-no-share" => o.field.share = false,
            "--field-ccs" => {
                o.field.ccs = value()
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "--api" => api = Some(value()),
            "--proxy" => proxy = Some(value().parse().expect("HOST:PORT")),
            "--device" => device = Some(value().parse().expect("HOST:PORT")),
            "--key" => key = Some(value()),
            "--ca" => ca = Some(PathBuf::from(value())),
            other => panic!("unknown option {other}; see the header of benches/tunnel.rs"),
        }
    }
    if let Some(api) = api {
        o.remote = Some(Remote {
            api,
            proxy: proxy.expect("--proxy with --api"),
            device: device.expect("--device with --api"),
            key: key.expect("--key with --api"),
            ca,
        });
    }
    o
}

/// One row of the result table.
struct Row {
    scenario: &'static str,
    what: String,
    value: String,
    note: String,
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Where the tunnels go: a local relay (with its temp dir) or a deployed one.
struct Target {
    _world: Option<common::World>,
    /// The local relay's process, for CPU readings.
    relay_pid: Option<u32>,
    proxy: SocketAddr,
    device: SocketAddr,
    /// The local relay's TCP device listener (a deployed relay: `device`, both links).
    device_tcp: Option<SocketAddr>,
    ca: PathBuf,
    key: String,
    api: common::Api,
    /// Passed to agents as `--quic-mtu-max` (the relay's is in its config).
    quic_mtu_max: Option<u16>,
}

impl Target {
    fn local(config: &str) -> Target {
        let world = common::World::with(config, &[], &[("RUST_LOG", "info")]);
        let api = common::Api::new(world.relay.api, &world.relay.admin_key());
        Target {
            relay_pid: world.relay.pid(),
            proxy: world.relay.proxy,
            device: world.relay.device,
            device_tcp: world.relay.device_tcp,
            ca: world.relay.cert(),
            key: world.relay.admin_key(),
            api,
            _world: Some(world),
            quic_mtu_max: None,
        }
    }

    fn remote(r: &Remote) -> Target {
        let addr = r
            .api
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("--api http://HOST:PORT");
        Target {
            _world: None,
            relay_pid: None,
            proxy: r.proxy,
            device: r.device,
            device_tcp: None,
            ca: r.ca.clone().unwrap_or_default(),
            key: r.key.clone(),
            api: common::Api::new(addr, &r.key),
            quic_mtu_max: None,
        }
    }

    /// Registers a device and runs an agent process for it on `transport`.
    async fn device(&self, fleet: &str, transport: &str) -> (String, peer::Proc) {
        let (uuid, key) = self.api.register_device(fleet).await;
        let mut cmd = std::process::Command::new(common::bin());
        let relay = match (transport, self.device_tcp) {
            ("tcp", Some(tcp)) => format!("tcp://{tcp}"),
            _ => self.device.to_string(),
        };
        cmd.args(["agent", "--relay", &relay])
            .args(["--transport", transport])
            .env("CLOUDLINK_DEVICE_UUID", &uuid)
            .env("CLOUDLINK_DEVICE_KEY", key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if self.ca.as_os_str().is_empty() {
            cmd.arg("--insecure-skip-verify");
        } else {
            cmd.arg("--ca")
                .arg(&self.ca)
                .args(["--server-name", "localhost"]);
        }
        if let Some(mtu) = self.quic_mtu_max {
            cmd.args(["--quic-mtu-max", &mtu.to_string()]);
        }
        let mut child = cmd.spawn().expect("agent starts");
        let lines = common::Lines::spawn(child.stderr.take().unwrap(), None);
        lines.wait_for("connected to relay");
        // Dropping `lines` leaves its thread draining stderr, so the agent never blocks.
        (uuid, peer::Proc(child))
    }

    async fn tunnel(&self, uuid: &str, port: u16) -> TcpStream {
        common::tunnel(self.proxy, &self.key, uuid, port).await
    }
}

/// A local service that reads to EOF, then answers with the byte count (8 bytes, BE).
async fn sink_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; MIB as usize];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    port
}

/// A local service that sends `len` bytes, then closes.
async fn source_server(len: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let buf = vec![0x5au8; MIB as usize];
                let mut left = len;
                while left > 0 {
                    let k = left.min(MIB) as usize;
                    if s.write_all(&buf[..k]).await.is_err() {
                        return;
                    }
                    left -= k as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

async fn upload(mut s: TcpStream, len: u64) -> Duration {
    let start = Instant::now();
    let buf = vec![0xa5u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let k = left.min(MIB) as usize;
        s.write_all(&buf[..k]).await.unwrap();
        left -= k as u64;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), len, "the sink got every byte");
    start.elapsed()
}

async fn download(mut s: TcpStream, len: u64) -> Duration {
    let start = Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    loop {
        let k = s.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    assert_eq!(n, len, "every byte arrived");
    start.elapsed()
}

/// a: one plain TCP stream.
async fn tcp_limit(size: u64) -> f64 {
    let port = sink_server().await;
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    gbps(size, upload(s, size).await)
}

/// b: one quinn stream, the relay's TLS and transport settings, both ends in this process.
async fn quic_limit(size: u64) -> f64 {
    let pair = common::quic_pair(cloudlink::config::Limits::default().quic_mtu_max).await;
    let server = pair.server.clone();
    let receiver = tokio::spawn(async move {
        let (_send, mut recv) = server.accept_bi().await.unwrap();
        let mut n = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
            n += chunk.bytes.len() as u64;
        }
        (n, Instant::now())
    });
    let (mut send, _recv) = pair.client.open_bi().await.unwrap();
    let chunk = Bytes::from(vec![0x42u8; MIB as usize]);
    let start = Instant::now();
    let mut left = size;
    while left > 0 {
        let k = left.min(MIB) as usize;
        send.write_chunk(chunk.slice(..k)).await.unwrap();
        left -= k as u64;
    }
    send.finish().unwrap();
    let (n, done) = receiver.await.unwrap();
    assert_eq!(n, size);
    gbps(size, done - start)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// d: sequential CONNECT → 200 → first echoed byte.
async fn setup_latency(target: &Target, uuid: &str, echo: u16, n: usize) -> (Duration, Duration) {
    let request = format!(
        "CONNECT {uuid}:{echo} HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
        target.key
    );
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut s = TcpStream::connect(target.proxy).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let head = common::read_head(&mut s).await;
        assert_eq!(common::status_of(&head), 200, "{head}");
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

/// e: `n` concurrent downloads of `size` each; (aggregate GB/s, slowest tunnel GB/s, the
/// local relay's RSS in KiB when the first download ends and the rest still run).
async fn many_tunnels(target: &Target, uuid: &str, n: usize, size: u64) -> (f64, f64, Option<u64>) {
    let port = source_server(size).await;
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(target.tunnel(uuid, port).await);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in streams {
        tasks.spawn(download(s, size));
    }
    let mut slowest = Duration::ZERO;
    let mut rss = None;
    while let Some(d) = tasks.join_next().await {
        if rss.is_none() {
            rss = target.relay_pid.map(common::rss_kib);
        }
        slowest = slowest.max(d.unwrap());
    }
    let wall = start.elapsed();
    (gbps(size * n as u64, wall), gbps(size, slowest), rss)
}

/// One simulated device: dial, hello, stay; on drain or loss, reconnect as the agent does
/// (a random pause within the drain window; after a failed dial, exponential backoff with
/// full jitter, capped at 60 s, or 8 s soon after a drain: `agent::backoff`,
/// `agent::backoff_cap`).
async fn sim_device(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    relay: SocketAddr,
    uuid: String,
    key: String,
    connected: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) {
    use cloudlink::proto::frame;
    use cloudlink::proto::messages::{Hello, RelayControl, VERSION};
    use rand::Rng;
    let mut pause = Duration::ZERO;
    let mut failures = 0u32;
    let mut drained_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
        failures = failures.saturating_add(1);
        let cap =
            cloudlink::agent::backoff_cap(drained_at.map(|t| t.elapsed()), Duration::from_secs(60));
        pause = cloudlink::agent::backoff(failures, cap);
        let dial = async {
            let conn = endpoint
                .connect_with(client.clone(), relay, "localhost")
                .ok()?
                .await
                .ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let hello = Hello {
                version: VERSION,
                uuid: uuid.clone(),
                key: key.clone(),
                agent: "bench".into(),
                ssh_login: None,
                features: Vec::new(),
                keep_alive_ms: None,
            };
            frame::write(&mut send, &hello).await.ok()?;
            match frame::read_required(&mut recv, frame::MAX_FRAME)
                .await
                .ok()?
            {
                RelayControl::Welcome { .. } => Some((conn, send, recv)),
                _ => None,
            }
        };
        let Ok(Some((conn, _send, mut recv))) =
            tokio::time::timeout(Duration::from_secs(5), dial).await
        else {
            continue;
        };
        failures = 0;
        connected.fetch_add(1, Ordering::SeqCst);
        let msg = tokio::select! {
            m = frame::read::<_, RelayControl>(&mut recv, frame::MAX_FRAME) => m.ok().flatten(),
            _ = stop.cancelled() => None,
        };
        connected.fetch_sub(1, Ordering::SeqCst);
        conn.close(0u32.into(), b"bye");
        if let Some(RelayControl::Drain { reconnect_ms }) = msg {
            drained_at = Some(Instant::now());
            pause = Duration::from_millis(rand::rng().random_range(0..=reconnect_ms));
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

async fn wait_until(count: &AtomicUsize, n: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while count.load(Ordering::SeqCst) < n {
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(start.elapsed())
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat` (USER_HZ is 100
/// on Linux).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// f's figures.
struct Idle {
    per_device_kib: f64,
    back: Option<Duration>,
    /// CPU seconds the relay and this benchmark (the simulated devices) spent while the
    /// devices came back: which one was the bottleneck.
    relay_cpu: f64,
    sim_cpu: f64,
}

/// Registers `n` devices in a fleet `idle`; their (uuid, key) pairs.
async fn idle_fleet(relay: &common::Relay, n: usize) -> Vec<(String, String)> {
    let api = common::Api::new(relay.api, &relay.admin_key());
    let (s, _) = api
        .call("POST", "/v1/fleets", Some(json!({"name": "idle"})))
        .await;
    assert_eq!(s, 201);
    let mut creds = Vec::with_capacity(n);
    for _ in 0..n {
        let (s, d) = api
            .call("POST", "/v1/fleets/idle/devices", Some(json!({})))
            .await;
        assert_eq!(s, 201);
        creds.push((
            d["uuid"].as_str().unwrap().to_owned(),
            d["key"].as_str().unwrap().to_owned(),
        ));
    }
    creds
}

/// f: N idle devices; relay RSS per device, and reconnect time after a restart.
async fn idle_devices(n: usize) -> Idle {
    let mut world = common::World::with(
        "[limits]\nauth_failures_per_minute = 100000\n",
        &[],
        &[("RUST_LOG", "warn")],
    );
    let creds = idle_fleet(&world.relay, n).await;
    cloudlink::tls_client::install_crypto();
    let tls = cloudlink::tls_client::config(
        cloudlink::tls_client::Trust::CaFile(&world.relay.cert()),
        &[cloudlink::proto::ALPN],
    )
    .unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(cloudlink::quic::transport(
        &cloudlink::quic::Settings {
            keep_alive: Some(Duration::from_secs(15)),
            idle_timeout: Duration::from_secs(60),
            peer_bidi_streams: 16,
            mtu_max: cloudlink::quic::MTU_MAX_DEFAULT,
            congestion: Default::default(),
        },
    )));
    let socket = cloudlink::quic::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = cloudlink::quic::endpoint(socket, None).unwrap();

    // Let the relay settle, then read its memory before any device.
    let pid = world.relay.pid().unwrap();
    let before = common::rss_kib(pid);
    let connected = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    for (uuid, key) in creds {
        tokio::spawn(sim_device(
            endpoint.clone(),
            client.clone(),
            world.relay.device,
            uuid,
            key,
            connected.clone(),
            stop.clone(),
        ));
    }
    wait_until(&connected, n, Duration::from_secs(120))
        .await
        .expect("every device connected");
    let after = common::rss_kib(pid);
    let per_device = (after.saturating_sub(before)) as f64 / n as f64;

    let restart = Instant::now();
    world.relay.restart();
    let pid = world.relay.pid().unwrap().to_string();
    let (relay_before, sim_before) = (cpu_secs(&pid), cpu_secs("self"));
    let back = wait_until(&connected, n, Duration::from_secs(120))
        .await
        .map(|_| restart.elapsed());
    let (relay_cpu, sim_cpu) = (cpu_secs(&pid) - relay_before, cpu_secs("self") - sim_before);
    stop.cancel();
    Idle {
        per_device_kib: per_device,
        back,
        relay_cpu,
        sim_cpu,
    }
}

/// g's figures: direct and through a peer hop.
struct Hop {
    up: (f64, f64),
    down: (f64, f64),
    setup_p50: (Duration, Duration),
}

/// g: two relays of a cluster; a device on `a`; the same work through `a` and through `b`.
async fn peer_hop(size: u64, setups: usize) -> Hop {
    let pg = common::pg::TempPg::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[limits]\nauth_failures_per_minute = 100000\ntunnels_per_user_device = 256\n",
    )
    .unwrap();
    let start = |name: &str| {
        common::Relay::start(
            &dir.path().join(name),
            &[
                "--config",
                config.to_str().unwrap(),
                "--database-url",
                &pg.url,
                "--peer-listen",
                "127.0.0.1:0",
                "--relay-id",
                name,
            ],
            &[("RUST_LOG", "warn")],
        )
    };
    let a = start("a");
    let b = start("b");
    let key = std::fs::read_to_string(a.data_dir.join("admin.key"))
        .or_else(|_| std::fs::read_to_string(b.data_dir.join("admin.key")))
        .expect("one relay bootstrapped the admin")
        .trim()
        .to_owned();
    let target = |r: &common::Relay| Target {
        _world: None,
        relay_pid: r.pid(),
        proxy: r.proxy,
        device: r.device,
        device_tcp: r.device_tcp,
        ca: r.cert(),
        key: key.clone(),
        api: common::Api::new(r.api, &key),
        quic_mtu_max: None,
    };
    let (direct, hop) = (target(&a), target(&b));
    let (uuid, agent) = direct.device("hop", "quic").await;
    let sink = sink_server().await;
    let source = source_server(size).await;
    let mut up = (0.0, 0.0);
    let mut down = (0.0, 0.0);
    // Interleaved, so drift on the machine hits both the same.
    for (i, t) in [&direct, &hop].into_iter().enumerate() {
        let u = gbps(size, upload(t.tunnel(&uuid, sink).await, size).await);
        let d = gbps(size, download(t.tunnel(&uuid, source).await, size).await);
        if i == 0 {
            (up.0, down.0) = (u, d);
        } else {
            (up.1, down.1) = (u, d);
        }
    }
    let echo = common::echo_server().await;
    let (direct_p50, _) = setup_latency(&direct, &uuid, echo, setups).await;
    let (hop_p50, _) = setup_latency(&hop, &uuid, echo, setups).await;
    drop(agent);
    Hop {
        up,
        down,
        setup_p50: (direct_p50, hop_p50),
    }
}

/// f over TCP: N idle devices on the TLS/TCP link (the agent's own dialer, in this
/// process); relay RSS per device.
async fn idle_tcp_devices(n: usize) -> f64 {
    // Each device is a socket here: raise this process's open-files limit for them.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    let world = common::World::with(
        "[limits]\nauth_failures_per_minute = 100000\n",
        &[
            "--device-listen",
            "off",
            "--device-tcp-listen",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "warn")],
    );
    let creds = idle_fleet(&world.relay, n).await;
    cloudlink::tls_client::install_crypto();
    let cert = world.relay.cert();
    let tls = cloudlink::tls_client::config(
        cloudlink::tls_client::Trust::CaFile(&cert),
        &[cloudlink::link::TCP_ALPN],
    )
    .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let addr = world.relay.device_tcp.expect("TCP device listener");
    let pid = world.relay.pid().unwrap();
    let before = common::rss_kib(pid);
    let mut links = Vec::with_capacity(n);
    // A few at a time, as a fleet trickles in; the relay's handshake cap is not the subject.
    for chunk in creds.chunks(64) {
        let mut dials = tokio::task::JoinSet::new();
        for (uuid, key) in chunk.iter().cloned() {
            let tls = tls.clone();
            dials.spawn(async move {
                let config = cloudlink::agent::AgentConfig {
                    uuid,
                    key: cloudlink::config::Secret(key),
                    ..Default::default()
                };
                let tcp = TcpStream::connect(addr).await.expect("TCP connect");
                // Links only: no tunnels to resume.
                let held = cloudlink::agent::link::Resuming::default();
                cloudlink::agent::link::dial_tcp(tcp, &tls, &config, &held, "localhost")
                    .await
                    .map_err(|e| format!("{e:?}"))
            });
        }
        while let Some(link) = dials.join_next().await {
            links.push(link.unwrap().expect("an idle TCP device connects"));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = common::rss_kib(pid);
    drop(links);
    after.saturating_sub(before) as f64 / n as f64
}

/// One tool's figures in scenario h.
#[derive(Default)]
struct Side {
    up: Vec<f64>,
    down: Vec<f64>,
    /// CPU seconds per process name, summed over the rounds.
    cpu: Vec<(&'static str, f64)>,
    latency: Option<(Duration, Duration)>,
}

impl Side {
    fn add_cpu(&mut self, name: &'static str, secs: f64) {
        match self.cpu.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += secs,
            None => self.cpu.push((name, secs)),
        }
    }
}

/// Uploads and downloads `size` through local ports `up` (to a sink) and `down` (from a
/// source), counting the CPU of `procs`; returns the two rates.
async fn one_round(
    side: &mut Side,
    procs: &[(&'static str, String)],
    up: u16,
    down: u16,
    size: u64,
) {
    let before: Vec<f64> = procs.iter().map(|(_, pid)| cpu_secs(pid)).collect();
    let connect = |port: u16| async move {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    };
    side.up
        .push(gbps(size, upload(connect(up).await, size).await));
    side.down
        .push(gbps(size, download(connect(down).await, size).await));
    for ((name, pid), b) in procs.iter().zip(before) {
        side.add_cpu(name, cpu_secs(pid) - b);
    }
}

/// h: Cloudlink's tunnel (CLI, relay, agent over QUIC) against rathole's TLS transport.
async fn head_to_head(opts: &Opts, rows: &mut Vec<Row>) {
    let rathole = match (peer::find_rathole(opts.rathole.clone()), opts.no_peer) {
        (Some(bin), false) => Some(bin),
        (None, false) => panic!(
            "scenario h needs rathole: `cargo install rathole --root /tmp/peers` and \
             --rathole /tmp/peers/bin/rathole (or $RATHOLE), or --no-peer for our rows alone"
        ),
        (_, true) => None,
    };
    let size = opts.size;
    let sink = sink_server().await;
    let source = source_server(size).await;
    let echo = common::echo_server().await;

    let mut config = String::from("[limits]\nauth_failures_per_minute = 100000\n");
    if let Some(mtu) = opts.quic_mtu_max {
        config.push_str(&format!("quic_mtu_max = {mtu}\n"));
    }
    let mut target = Target::local(&config);
    target.quic_mtu_max = opts.quic_mtu_max;
    let world = target._world.as_ref().expect("a local relay");
    let (uuid, agent) = target.device("h", "quic").await;
    world.login(&target.key);
    let specs = [sink, source, echo].map(|port| format!("{port}:0"));
    let (cli, _lines, local) =
        common::device_tunnel(&world.xdg(), &uuid, &specs, std::process::Stdio::null());
    let cli = peer::Proc(cli);
    let (cl_up, cl_down, cl_echo) = (local[0].port(), local[1].port(), local[2].port());
    peer::wait_echo(cl_echo, Duration::from_secs(30)).await;
    let relay_pid = target.relay_pid.expect("local relay").to_string();
    let ours_procs = vec![
        ("relay", relay_pid.clone()),
        ("agent", agent.pid()),
        ("cli", cli.pid()),
    ];

    let dir = tempfile::tempdir().unwrap();
    let peer_side = match &rathole {
        Some(bin) => {
            let data = &world.relay.data_dir;
            let (server, client, visitors) = peer::start_rathole(
                bin,
                dir.path(),
                &data.join("relay-cert.pem"),
                &data.join("relay-key.pem"),
                &[("up", sink), ("down", source), ("echo", echo)],
            )
            .await;
            peer::wait_echo(visitors[2], Duration::from_secs(30)).await;
            Some((server, client, visitors))
        }
        None => None,
    };

    let (mut ours, mut theirs) = (Side::default(), Side::default());
    for _ in 0..opts.rounds.max(1) {
        one_round(&mut ours, &ours_procs, cl_up, cl_down, size).await;
        if let Some((server, client, visitors)) = &peer_side {
            let procs = [("server", server.pid()), ("client", client.pid())];
            one_round(&mut theirs, &procs, visitors[0], visitors[1], size).await;
        }
    }
    let direct = peer::connect_latency(echo, opts.setups).await;
    ours.latency = Some(peer::connect_latency(cl_echo, opts.setups).await);
    if let Some((_, _, visitors)) = &peer_side {
        theirs.latency = Some(peer::connect_latency(visitors[2], opts.setups).await);
    }
    let rss = common::rss_kib(relay_pid.parse().unwrap());

    let gb = 2.0 * size as f64 * opts.rounds.max(1) as f64 / 1e9;
    let sides: Vec<(&str, &Side)> = std::iter::once(("cloudlink", &ours))
        .chain(peer_side.as_ref().map(|_| ("rathole-tls", &theirs)))
        .collect();
    let size_mib = size / MIB;
    for (tool, side) in &sides {
        for (dir, rates) in [("upload", &side.up), ("download", &side.down)] {
            let v = peer::median(rates.clone());
            let note = if *tool == "cloudlink" && peer_side.is_some() {
                let theirs_rates = if dir == "upload" {
                    &theirs.up
                } else {
                    &theirs.down
                };
                let theirs_v = peer::median(theirs_rates.clone());
                // Each round's own ratio (the tools alternate within a round): their spread
                // is the noise a change has to beat.
                let per_round: Vec<f64> =
                    rates.iter().zip(theirs_rates).map(|(o, t)| o / t).collect();
                let lo = per_round.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = per_round.iter().cloned().fold(0.0, f64::max);
                format!(
                    "{:.2} × rathole-tls (rounds {lo:.2}–{hi:.2}; target ≥ 1.20)",
                    v / theirs_v
                )
            } else {
                format!("median of {} rounds", side.up.len())
            };
            rows.push(Row {
                scenario: "h",
                what: match (opts.quic_mtu_max, *tool) {
                    (Some(mtu), "cloudlink") => {
                        format!("{tool} {dir}, one stream, {size_mib} MiB, QUIC MTU ≤ {mtu}")
                    }
                    _ => format!("{tool} {dir}, one stream, {size_mib} MiB"),
                },
                value: format!("{v:.2} GB/s"),
                note,
            });
        }
        let total: f64 = side.cpu.iter().map(|(_, s)| s).sum();
        let parts: Vec<String> = side
            .cpu
            .iter()
            .map(|(n, s)| format!("{n} {:.2}", s / gb))
            .collect();
        rows.push(Row {
            scenario: "h",
            what: format!("{tool} CPU, all processes"),
            value: format!("{:.2} CPU-s/GB", total / gb),
            note: parts.join(", "),
        });
        if let Some((p50, p99)) = side.latency {
            rows.push(Row {
                scenario: "h",
                what: format!("{tool} connect latency added, {} sequential", opts.setups),
                value: format!(
                    "p50 +{:.2} ms, p99 +{:.2} ms",
                    ms(p50.saturating_sub(direct.0)),
                    ms(p99.saturating_sub(direct.1))
                ),
                note: format!(
                    "direct p50 {:.2} ms, p99 {:.2} ms (target +0.3 / +1 ms)",
                    ms(direct.0),
                    ms(direct.1)
                ),
            });
        }
    }
    rows.push(Row {
        scenario: "h",
        what: "relay RSS after the run".into(),
        value: format!("{:.1} MiB", rss as f64 / 1024.0),
        note: String::new(),
    });
    drop((cli, agent, peer_side));
}

fn main() {
    let opts = parse_opts();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(opts));
}

async fn run(opts: Opts) {
    let has = |c: char| opts.scenarios.contains(c);
    let mut rows: Vec<Row> = Vec::new();
    let size_mib = opts.size / MIB;
    let (mut tcp, mut quic) = (None, None);
    eprintln!(
        "cloudlink tunnel benchmark on {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    if has('a') {
        let v = tcp_limit(opts.size).await;
        tcp = Some(v);
        rows.push(Row {
            scenario: "a",
            what: format!("TCP, one stream, {size_mib} MiB"),
            value: format!("{v:.2} GB/s"),
            note: "kernel loopback limit".into(),
        });
    }
    if has('b') {
        let v = quic_limit(opts.size).await;
        quic = Some(v);
        rows.push(Row {
            scenario: "b",
            what: format!("QUIC, one quinn stream, {size_mib} MiB"),
            value: format!("{v:.2} GB/s"),
            note: tcp
                .map(|t| format!("{:.2} × TCP", v / t))
                .unwrap_or_default(),
        });
    }

    let needs_target = has('c') || has('d') || has('e');
    let target = needs_target.then(|| match &opts.remote {
        Some(r) => Target::remote(r),
        None => Target::local(&format!(
            "[limits]\nauth_failures_per_minute = 100000\ntunnels_per_user = {n}\n\
             tunnels_per_device = {n}\ntunnels_per_user_device = {n}\n",
            n = opts.tunnels.max(64) + 8
        )),
    });
    // One agent per device link, each its own device on the same relay.
    let mut agents = Vec::new();
    if let Some(t) = &target {
        for transport in &opts.transports {
            let (uuid, child) = t.device(&format!("bench-{transport}"), transport).await;
            agents.push((*transport, uuid, child));
        }
    }

    if let Some(t) = &target {
        // c, per link: throughput both ways and the relay's CPU per GB moved.
        let mut link_rates: Vec<(&str, f64, f64)> = Vec::new();
        for (transport, uuid, _) in agents.iter().filter(|_| has('c')) {
            let cpu = || t.relay_pid.map(|p| cpu_secs(&p.to_string()));
            let before = cpu();
            let sink = sink_server().await;
            let up = gbps(
                opts.size,
                upload(t.tunnel(uuid, sink).await, opts.size).await,
            );
            let source = source_server(opts.size).await;
            let down = gbps(
                opts.size,
                download(t.tunnel(uuid, source).await, opts.size).await,
            );
            let relay_cpu = cpu().zip(before).map(|(a, b)| a - b);
            let quic_link = link_rates.iter().find(|(t, _, _)| *t == "quic").copied();
            for (dir, v) in [("upload", up), ("download", down)] {
                let mut note = Vec::new();
                if let Some(q) = quic {
                    note.push(format!("{:.2} × QUIC (target ≥ 0.80)", v / q));
                }
                if let Some(t) = tcp {
                    note.push(format!("{:.2} × TCP", v / t));
                }
                if let (Some((_, qu, qd)), true) = (quic_link, *transport == "tcp") {
                    let q = if dir == "upload" { qu } else { qd };
                    note.push(format!("{:.2} × the QUIC link (target ≥ 1.00)", v / q));
                }
                rows.push(Row {
                    scenario: "c",
                    what: format!("tunnel {dir} over {transport}, {size_mib} MiB"),
                    value: format!("{v:.2} GB/s"),
                    note: note.join(", "),
                });
            }
            if let Some(cpu) = relay_cpu {
                let gb = 2.0 * opts.size as f64 / 1e9;
                rows.push(Row {
                    scenario: "c",
                    what: format!("relay CPU over {transport}, both transfers"),
                    value: format!("{:.2} CPU-s/GB", cpu / gb),
                    note: "relay process only (user + system)".into(),
                });
            }
            link_rates.push((transport, up, down));
        }
        for (transport, uuid, _) in agents.iter().filter(|_| has('d')) {
            let echo = common::echo_server().await;
            let (p50, p99) = setup_latency(t, uuid, echo, opts.setups).await;
            rows.push(Row {
                scenario: "d",
                what: format!(
                    "setup over {transport}, warm auth cache, {} sequential",
                    opts.setups
                ),
                value: format!("p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99)),
                note: "target p50 ≤ 1 ms, p99 ≤ 5 ms".into(),
            });
        }
        if has('d') && opts.remote.is_none() {
            // The same relay set-up with the cache off: every CONNECT asks the store.
            let echo = common::echo_server().await;
            let cold =
                Target::local("[limits]\nauth_failures_per_minute = 100000\nauth_cache_ms = 0\n");
            let (cold_uuid, cold_agent) = cold.device("cold", opts.transports[0]).await;
            let (p50, p99) = setup_latency(&cold, &cold_uuid, echo, opts.setups).await;
            drop(cold_agent);
            rows.push(Row {
                scenario: "d",
                what: format!("setup, cold auth cache, {} sequential", opts.setups),
                value: format!("p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99)),
                note: "every CONNECT reads the store (SQLite)".into(),
            });
        }
        if let (true, Some((transport, uuid, _))) = (has('e'), agents.first()) {
            let (aggregate, slowest, rss) =
                many_tunnels(t, uuid, opts.tunnels, opts.tunnel_size).await;
            let fair = aggregate / opts.tunnels as f64;
            rows.push(Row {
                scenario: "e",
                what: format!(
                    "{} concurrent tunnels × {} MiB over {transport}, aggregate",
                    opts.tunnels,
                    opts.tunnel_size / MIB
                ),
                value: format!("{aggregate:.2} GB/s"),
                note: quic
                    .map(|q| format!("{:.2} × QUIC", aggregate / q))
                    .unwrap_or_default(),
            });
            rows.push(Row {
                scenario: "e",
                what: "slowest tunnel".into(),
                value: format!("{:.1} MB/s", slowest * 1000.0),
                note: format!("{:.2} × fair share (target ≥ 0.50)", slowest / fair),
            });
            if let Some(kib) = rss {
                rows.push(Row {
                    scenario: "e",
                    what: format!("relay RSS with {} tunnels open", opts.tunnels),
                    value: format!("{:.1} MiB", kib as f64 / 1024.0),
                    note: "when the first download ends".into(),
                });
            }
        }
    }
    drop(agents);
    drop(target);

    if has('f') && opts.transports.contains(&"tcp") {
        let per_device = idle_tcp_devices(opts.devices).await;
        rows.push(Row {
            scenario: "f",
            what: format!("{} idle devices over tcp, relay memory", opts.devices),
            value: format!("{per_device:.1} KiB/device"),
            note: "target ≤ 48 KiB".into(),
        });
    }
    if has('f') && opts.transports.contains(&"quic") {
        let idle = idle_devices(opts.devices).await;
        rows.push(Row {
            scenario: "f",
            what: format!("{} idle devices over quic, relay memory", opts.devices),
            value: format!("{:.1} KiB/device", idle.per_device_kib),
            note: "target ≤ 48 KiB".into(),
        });
        rows.push(Row {
            scenario: "f",
            what: format!("{} devices reconnect after restart", opts.devices),
            value: idle
                .back
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not all within 120 s".into()),
            note: format!(
                "target ≤ 60 s at 10,000; CPU meanwhile: relay {:.1} s, devices (sim) {:.1} s",
                idle.relay_cpu, idle.sim_cpu
            ),
        });
    }

    if has('g') {
        let h = peer_hop(opts.size, opts.setups).await;
        for (dir, (direct, hop)) in [("upload", h.up), ("download", h.down)] {
            rows.push(Row {
                scenario: "g",
                what: format!("peer hop {dir}, {size_mib} MiB"),
                value: format!("{hop:.2} GB/s (direct {direct:.2})"),
                note: format!("{:.2} × direct (target ≥ 0.90)", hop / direct),
            });
        }
        let (direct, hop) = h.setup_p50;
        rows.push(Row {
            scenario: "g",
            what: format!("peer hop setup, {} sequential", opts.setups),
            value: format!("p50 {:.2} ms (direct {:.2})", ms(hop), ms(direct)),
            note: format!(
                "+{:.2} ms (target ≤ 0.30 ms)",
                ms(hop.saturating_sub(direct))
            ),
        });
    }

    if has('h') {
        head_to_head(&opts, &mut rows).await;
    }
    if has('i') {
        for (what, value, note) in field::throughput(&opts.field).await {
            rows.push(Row {
                scenario: "i",
                what,
                value,
                note,
            });
        }
    }
    if has('k') {
        for transport in &opts.transports {
            for &n in &opts.stalled {
                for (what, value, note) in stalled::stalled_readers(transport, n).await {
                    rows.push(Row {
                        scenario: "k",
                        what,
                        value,
                        note,
                    });
                }
            }
        }
    }
    if has('j') {
        for (what, value, note) in field::idle_cost(opts.field.idle_secs).await {
            rows.push(Row {
                scenario: "j",
                what,
                value,
                note,
            });
        }
    }

    if has('l') {
        for (what, value, note) in field::events().await {
            rows.push(Row {
                scenario: "l",
                what,
                value,
                note,
            });
        }
    }

    let w = |f: &dyn Fn(&Row) -> usize| rows.iter().map(f).max().unwrap_or(0);
    let (ww, wv) = (
        w(&|r| r.what.chars().count()),
        w(&|r| r.value.chars().count()),
    );
    println!("\n| | scenario | result | vs. |\n|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:ww$} | {:wv$} | {} |",
            r.scenario, r.what, r.value, r.note
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

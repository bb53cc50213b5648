//! Scenarios i and j: the device link on an impaired path, the rig of
//! `tests/suite/common/rig.rs` (the device in a network namespace behind a middle one that
//! adds latency, loss and a rate limit).
//!
//! - i, throughput: for each path (RTT × loss, 40 Mbit/s each way), rounds interleaved,
//!   each link's tunnel upload and download against plain TCP over the same path with the
//!   kernel's default here (BBR) and with cubic. A transfer is measured at its receiver
//!   for `--field-secs`, after `--field-warmup` from its first byte (a fresh TCP
//!   connection's slow start is not held against plain TCP; the device link is already
//!   up). Downloads also run through agents using each of quinn's congestion controllers
//!   (`--field-ccs`), which is how the default was chosen; and the device's uplink is
//!   shared between a tunnel download and a cubic TCP upload from the device, to show what
//!   the link's controller does to a device's other traffic. Every row says what the rig
//!   measured: RTT (UDP echoes), rate (a UDP burst each way) and loss (nft counters over
//!   the row's transfers).
//! - j, idle cost: one idle device per link at the defaults (QUIC; TLS/TCP; `auto` with UDP
//!   blocked, which is TLS/TCP plus the UDP probes), every byte on the path counted by nft
//!   for `--idle-secs` and scaled to a 30-day month.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::common::rig::{Counts, Rig, Shape};
use super::common::{self, Agent, World};

/// One result row: what, value, note.
pub type FieldRow = (String, String, String);

/// What scenarios i and j run.
pub struct FieldOpts {
    /// Rounds per path, interleaved.
    pub rounds: usize,
    /// Seconds each transfer is measured for.
    pub secs: f64,
    /// Seconds from a transfer's first byte before it is measured.
    pub warmup: f64,
    /// RTTs, ms.
    pub rtts: Vec<u64>,
    /// Loss per direction, %.
    pub losses: Vec<f64>,
    /// Rate each way, Mbit/s.
    pub rate: u32,
    /// Seconds each idle device is watched (j).
    pub idle_secs: u64,
    /// Also through `cloudlink device tunnel` (the CLI), as users run it.
    pub cli: bool,
    /// Other QUIC congestion controllers to run downloads with (agents' `--quic-congestion`).
    pub ccs: Vec<String>,
    /// The shared-uplink rows.
    pub share: bool,
}

/// Bytes a receiver has seen, and when the first came.
#[derive(Default)]
struct Meter {
    first: OnceLock<Instant>,
    bytes: AtomicU64,
}

impl Meter {
    fn add(&self, n: usize) {
        self.first.get_or_init(Instant::now);
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Reads `s` into a meter until it ends or the task is aborted.
fn drain(mut s: TcpStream, meter: Arc<Meter>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            meter.add(n);
        }
    })
}

/// Writes into `s` without end (until the task is aborted or the far side goes).
fn flood(mut s: TcpStream) -> JoinHandle<()> {
    tokio::spawn(async move {
        let buf = vec![0xa5u8; 256 * 1024];
        while s.write_all(&buf).await.is_ok() {}
    })
}

/// A sink: every accepted connection is read into a [`Meter`], handed out on the channel.
fn sink(listener: TcpListener) -> (u16, mpsc::UnboundedReceiver<Arc<Meter>>) {
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let meter = Arc::new(Meter::default());
            if tx.send(meter.clone()).is_err() {
                return;
            }
            drain(s, meter);
        }
    });
    (port, rx)
}

/// A source that writes without end to every accepted connection, sending with congestion
/// controller `cc` (the kernel's default when `None`).
fn source(listener: TcpListener, cc: Option<&'static str>) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            if let Some(cc) = cc {
                socket2::SockRef::from(&s)
                    .set_tcp_congestion(cc.as_bytes())
                    .expect("TCP_CONGESTION");
            }
            flood(s);
        }
    });
    port
}

/// Waits for every meter's first byte, then `warmup`, then measures `secs`: Mbit/s each.
async fn measure(meters: &[Arc<Meter>], warmup: f64, secs: f64) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while meters.iter().any(|m| m.first.get().is_none()) {
        assert!(
            Instant::now() < deadline,
            "a transfer moved nothing within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = meters
        .iter()
        .filter_map(|m| m.first.get())
        .max()
        .copied()
        .unwrap();
    tokio::time::sleep_until((first + Duration::from_secs_f64(warmup)).into()).await;
    let before: Vec<u64> = meters
        .iter()
        .map(|m| m.bytes.load(Ordering::Relaxed))
        .collect();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let took = start.elapsed().as_secs_f64();
    meters
        .iter()
        .zip(before)
        .map(|(m, b)| (m.bytes.load(Ordering::Relaxed) - b) as f64 * 8.0 / took / 1e6)
        .collect()
}

/// A plain TCP connection from here to `addr`, sending with `cc` when given.
async fn plain_connect(addr: std::net::SocketAddr, cc: Option<&str>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(cc) = cc {
        socket2::SockRef::from(&socket)
            .set_tcp_congestion(cc.as_bytes())
            .expect("TCP_CONGESTION");
    }
    let s = socket.connect(addr).await.expect("plain TCP to the device");
    s.set_nodelay(true).unwrap();
    s
}

/// What a transfer goes through.
#[derive(Clone, PartialEq, Eq, Debug)]
enum Via {
    /// Plain TCP with this congestion controller.
    Plain(&'static str),
    /// A tunnel through the device whose agent has this label (`quic`, `tcp`, `quic cubic`…).
    Link(String),
    /// The same through `cloudlink device tunnel`.
    Cli(String),
}

impl Via {
    fn label(&self) -> String {
        match self {
            Via::Plain(cc) => format!("plain TCP ({cc})"),
            Via::Link(t) => format!("{t} link"),
            Via::Cli(t) => format!("{t} link, device tunnel"),
        }
    }
}

/// A running transfer: what measures it, and the tasks and processes to stop after.
struct Running {
    meter: Arc<Meter>,
    tasks: Vec<JoinHandle<()>>,
    cli: Option<std::process::Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(mut c) = self.cli.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The world scenario i runs in: a rig, a relay here, agents in the device namespace, and
/// the services on both sides.
struct Field {
    rig: Rig,
    world: World,
    key: String,
    /// (label, uuid) per agent.
    devices: Vec<(String, String)>,
    _agents: Vec<Agent>,
    sink_port: u16,
    meters: mpsc::UnboundedReceiver<Arc<Meter>>,
    source_default: u16,
    source_cubic: u16,
    /// A sink on this side, for the device's own uploads.
    here_sink: std::net::SocketAddr,
    here_meters: mpsc::UnboundedReceiver<Arc<Meter>>,
}

impl Field {
    async fn new(opts: &FieldOpts) -> Field {
        let rig = Rig::new();
        let at = format!("{}:0", rig.relay_ip);
        let world = World::with(
            "[limits]\nauth_failures_per_minute = 100000\n",
            &["--device-listen", &at, "--device-tcp-listen", &at],
            &[(
                "RUST_LOG",
                &std::env::var("BENCH_RELAY_LOG").unwrap_or("info".into()),
            )],
        );
        let key = world.relay.admin_key();
        if opts.cli {
            let api_tls = world.relay.api_tls.expect("HTTPS API");
            let proxy_tls = world.relay.proxy_tls.expect("TLS proxy");
            let cert = world.relay.cert();
            world.cli_ok(&[
                "login",
                "--api",
                &format!("https://localhost:{}", api_tls.port()),
                "--ca",
                cert.to_str().unwrap(),
                "--proxy",
                &format!("localhost:{}", proxy_tls.port()),
                "--proxy-tls",
                "--key",
                &key,
            ]);
        }
        let quic = format!("quic://{}", world.relay.device);
        let tcp = format!(
            "tcp://{}",
            world.relay.device_tcp.expect("TCP device listener")
        );
        let mut wanted: Vec<(String, String, Vec<String>)> = vec![
            (
                "quic".into(),
                quic.clone(),
                vec!["--transport".into(), "quic".into()],
            ),
            ("tcp".into(), tcp, vec!["--transport".into(), "tcp".into()]),
        ];
        for cc in &opts.ccs {
            wanted.push((
                format!("quic {cc}"),
                quic.clone(),
                vec![
                    "--transport".into(),
                    "quic".into(),
                    "--quic-congestion".into(),
                    cc.clone(),
                ],
            ));
        }
        let mut devices = Vec::new();
        let mut agents = Vec::new();
        for (i, (label, addr, extra)) in wanted.into_iter().enumerate() {
            let (uuid, device_key) = world.admin.register_device(&format!("field-{i}")).await;
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let agent = Agent::spawn_wrapped(
                &rig.device_wrapper(),
                &[addr],
                &world.relay.cert(),
                &uuid,
                &device_key,
                &extra,
                &[],
            );
            agent.stderr.wait_for("connected to relay");
            devices.push((label, uuid));
            agents.push(agent);
        }
        let any = "0.0.0.0:0".parse().unwrap();
        let (sink_port, meters) = sink(rig.device_listener(any));
        let source_default = source(rig.device_listener(any), None);
        let source_cubic = source(rig.device_listener(any), Some("cubic"));
        let here = TcpListener::bind((rig.relay_ip, 0)).await.unwrap();
        let here_sink = here.local_addr().unwrap();
        let (_, here_meters) = sink(here);
        Field {
            rig,
            world,
            key,
            devices,
            _agents: agents,
            sink_port,
            meters,
            source_default,
            source_cubic,
            here_sink,
            here_meters,
        }
    }

    fn uuid(&self, label: &str) -> &str {
        &self.devices.iter().find(|(l, _)| l == label).unwrap().1
    }

    async fn sink_meter(&mut self) -> Arc<Meter> {
        tokio::time::timeout(Duration::from_secs(20), self.meters.recv())
            .await
            .expect("the sink accepted within 20 s")
            .expect("the sink runs")
    }

    /// Starts one transfer.
    async fn start(&mut self, via: &Via, up: bool) -> Running {
        let device = self.rig.device_ip;
        let (stream, cli) = match via {
            Via::Plain(cc) if up => (
                plain_connect((device, self.sink_port).into(), Some(cc)).await,
                None,
            ),
            Via::Plain(cc) => {
                let port = if *cc == "cubic" {
                    self.source_cubic
                } else {
                    self.source_default
                };
                (plain_connect((device, port).into(), None).await, None)
            }
            Via::Link(label) => {
                let port = if up {
                    self.sink_port
                } else {
                    self.source_default
                };
                let uuid = self.uuid(label).to_owned();
                (
                    common::tunnel(self.world.relay.proxy, &self.key, &uuid, port).await,
                    None,
                )
            }
            Via::Cli(label) => {
                let port = if up {
                    self.sink_port
                } else {
                    self.source_default
                };
                let (child, _lines, local) = common::device_tunnel(
                    &self.world.xdg(),
                    self.uuid(label),
                    &[format!("{port}:0")],
                    std::process::Stdio::null(),
                );
                (TcpStream::connect(local[0]).await.unwrap(), Some(child))
            }
        };
        if up {
            let task = flood(stream);
            let meter = self.sink_meter().await;
            Running {
                meter,
                tasks: vec![task],
                cli,
            }
        } else {
            let meter = Arc::new(Meter::default());
            let task = drain(stream, meter.clone());
            Running {
                meter,
                tasks: vec![task],
                cli,
            }
        }
    }

    /// A cubic TCP upload from the device to this side (the device's other traffic).
    async fn device_upload(&mut self) -> Running {
        let socket = self.rig.device_socket();
        socket2::SockRef::from(&socket)
            .set_tcp_congestion(b"cubic")
            .expect("TCP_CONGESTION");
        let s = socket
            .connect(self.here_sink)
            .await
            .expect("device to here");
        let task = flood(s);
        let meter = tokio::time::timeout(Duration::from_secs(20), self.here_meters.recv())
            .await
            .expect("accepted")
            .expect("sink runs");
        Running {
            meter,
            tasks: vec![task],
            cli: None,
        }
    }

    /// Lets the path's queues drain before the next transfer.
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(1) + self.rig.current().rtt * 4).await;
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return 0.0;
    }
    s[s.len() / 2]
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

fn add(total: &mut Counts, d: &Counts) {
    total.up_packets += d.up_packets;
    total.up_bytes += d.up_bytes;
    total.down_packets += d.down_packets;
    total.down_bytes += d.down_bytes;
    total.up_lost += d.up_lost;
    total.down_lost += d.down_lost;
    total.blocked += d.blocked;
    total.up_udp += d.up_udp;
    total.up_udp_large += d.up_udp_large;
    total.up_queue_drops += d.up_queue_drops;
    total.down_queue_drops += d.down_queue_drops;
}

/// One measured row's data: its transfer, the rate of each round, the counters over them.
struct Series {
    via: Via,
    up: bool,
    rates: Vec<f64>,
    counts: Counts,
}

/// Scenario i.
pub async fn throughput(opts: &FieldOpts) -> Vec<FieldRow> {
    let mut f = Field::new(opts).await;
    let mut plan: Vec<(Via, bool)> = Vec::new();
    let mut vias = vec![
        Via::Plain("bbr"),
        Via::Plain("cubic"),
        Via::Link("quic".into()),
        Via::Link("tcp".into()),
    ];
    if opts.cli {
        vias.push(Via::Cli("quic".into()));
        vias.push(Via::Cli("tcp".into()));
    }
    for via in vias {
        plan.push((via.clone(), true));
        plan.push((via, false));
    }
    for cc in &opts.ccs {
        plan.push((Via::Link(format!("quic {cc}")), false));
    }
    let mut rows = Vec::new();
    for &rtt in &opts.rtts {
        for &loss in &opts.losses {
            let shape = Shape {
                rtt: Duration::from_millis(rtt),
                loss: loss / 100.0,
                rate_mbit: opts.rate,
            };
            f.rig.shape(shape);
            let measured_rtt = f.rig.measure_rtt();
            let (rate_up, rate_down) = f.rig.measure_rate();
            let path = format!("{rtt} ms, {loss} % loss");
            let rtt_text = measured_rtt
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "lost".into());
            eprintln!("field: {path}: RTT {rtt_text}, rate {rate_up:.1}/{rate_down:.1} Mbit/s");
            let mut series: Vec<Series> = plan
                .iter()
                .map(|(via, up)| Series {
                    via: via.clone(),
                    up: *up,
                    rates: Vec::new(),
                    counts: Counts::default(),
                })
                .collect();
            let mut shares: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            if opts.share {
                for label in [
                    "plain TCP (cubic)",
                    "plain TCP (bbr)",
                    "quic link",
                    "tcp link",
                ] {
                    shares.push((label.into(), Vec::new()));
                }
            }
            for round in 0..opts.rounds {
                for s in series.iter_mut() {
                    let before = f.rig.counts();
                    let running = f.start(&s.via, s.up).await;
                    let r = measure(std::slice::from_ref(&running.meter), opts.warmup, opts.secs)
                        .await[0];
                    drop(running);
                    add(&mut s.counts, &f.rig.counts().since(&before));
                    let d = f.rig.counts().since(&before);
                    eprintln!(
                        "field: {path}, round {round}: {} {}: {r:.2} Mbit/s (queue drops {}/{})",
                        s.via.label(),
                        if s.up { "up" } else { "down" },
                        d.up_queue_drops,
                        d.down_queue_drops
                    );
                    s.rates.push(r);
                    f.settle().await;
                }
                for (label, results) in shares.iter_mut() {
                    let via = match label.as_str() {
                        "plain TCP (cubic)" => Via::Plain("cubic"),
                        "plain TCP (bbr)" => Via::Plain("bbr"),
                        "quic link" => Via::Link("quic".into()),
                        _ => Via::Link("tcp".into()),
                    };
                    let ours = f.start(&via, false).await;
                    let other = f.device_upload().await;
                    let r = measure(
                        &[ours.meter.clone(), other.meter.clone()],
                        opts.warmup,
                        opts.secs,
                    )
                    .await;
                    drop((ours, other));
                    eprintln!("field: {path}, round {round}: shared uplink, {label} download {:.2} + device cubic upload {:.2}", r[0], r[1]);
                    results.push((r[0], r[1]));
                    f.settle().await;
                }
            }
            for s in &series {
                let (lu, ld) = s.counts.loss();
                let measured = format!(
                    "measured RTT {rtt_text}, rate {rate_up:.1}/{rate_down:.1} Mbit/s, loss {:.2}/{:.2} % (up/down), queue drops {}/{}",
                    lu * 100.0,
                    ld * 100.0,
                    s.counts.up_queue_drops,
                    s.counts.down_queue_drops,
                );
                let dir = if s.up { "upload" } else { "download" };
                let mut note = Vec::new();
                if !matches!(s.via, Via::Plain(_)) {
                    for base in ["bbr", "cubic"] {
                        let b = &series
                            .iter()
                            .find(|o| o.via == Via::Plain(base) && o.up == s.up)
                            .unwrap()
                            .rates;
                        let ratios: Vec<f64> = s.rates.iter().zip(b).map(|(x, y)| x / y).collect();
                        note.push(format!(
                            "{:.2} × TCP {base} (rounds {})",
                            median(&s.rates) / median(b),
                            range(&ratios)
                        ));
                    }
                }
                note.push(measured);
                rows.push((
                    format!("{} {dir}, {path}", s.via.label()),
                    format!("{:.1} Mbit/s", median(&s.rates)),
                    note.join("; "),
                ));
            }
            for (label, results) in &shares {
                let ours: Vec<f64> = results.iter().map(|r| r.0).collect();
                let other: Vec<f64> = results.iter().map(|r| r.1).collect();
                let (a, b) = (median(&ours), median(&other));
                rows.push((
                    format!("shared uplink, {path}: {label} download + the device's cubic upload"),
                    format!("{a:.1} + {b:.1} Mbit/s"),
                    format!(
                        "the download's share {:.0} %; measured RTT {rtt_text}",
                        100.0 * a / (a + b)
                    ),
                ));
            }
        }
    }
    rows
}

/// Scenario j: bytes per idle device per month, each link, at the defaults.
pub async fn idle_cost(secs: u64) -> Vec<FieldRow> {
    let cases: [(&str, &str, bool); 3] = [
        ("quic", "quic link", false),
        ("tcp", "tcp link", false),
        ("auto", "auto, UDP blocked (tcp link + probes)", true),
    ];
    let mut runs = Vec::new();
    for (transport, label, block) in cases {
        runs.push(tokio::spawn(async move {
            let Idle {
                rig,
                _dir,
                relay,
                uuid,
                device_key,
                ..
            } = Idle::new(block, "idle").await;
            // QUIC and TLS/TCP on one port number, as a bare HOST:PORT expects.
            let entry = format!("{transport}://{}", relay.device);
            let entry = if transport == "auto" {
                relay.device.to_string()
            } else {
                entry
            };
            let agent = Agent::spawn_wrapped(
                &rig.device_wrapper(),
                &[entry],
                &relay.cert(),
                &uuid,
                &device_key,
                &["--transport", transport],
                &[],
            );
            agent.stderr.wait_for("connected to relay");
            // Past the handshake and the first keep-alives.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let before = rig.counts();
            let started = Instant::now();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let d = rig.counts().since(&before);
            let took = started.elapsed().as_secs_f64();
            let bytes = (d.up_bytes + d.down_bytes) as f64;
            let month = bytes / took * 30.0 * 86_400.0;
            drop(agent);
            drop(relay);
            (
                format!("idle device, {label}, {secs} s watched"),
                format!("{:.1} MB/month", month / 1e6),
                format!(
                    "{} packets up, {} down, {} bytes ({:.2} B/s); target ≤ 15 MB",
                    d.up_packets,
                    d.down_packets,
                    bytes as u64,
                    bytes / took
                ),
            )
        }));
    }
    runs.push(tokio::spawn(back_to_quic()));
    let mut rows = Vec::new();
    for r in runs {
        rows.push(r.await.unwrap());
    }
    rows
}

/// One relay with QUIC and TLS/TCP on the same port number (as deployed) on a rig's
/// 50 ms path, and a device registered with it.
struct Idle {
    rig: Rig,
    _dir: tempfile::TempDir,
    relay: common::Relay,
    api: common::Api,
    uuid: String,
    device_key: String,
}

impl Idle {
    async fn new(block_udp: bool, name: &str) -> Idle {
        let rig = Rig::new();
        rig.shape(Shape::field(50, 0.0));
        if block_udp {
            rig.block_udp(true);
        }
        let dir = tempfile::tempdir().unwrap();
        let relay = common::Relay::start_twin(
            &dir.path().join("data"),
            &format!("{}:0", rig.relay_ip),
            &[],
            &[("RUST_LOG", "info")],
        );
        let api = common::Api::new(relay.api, &relay.admin_key());
        let (uuid, device_key) = api.register_device(name).await;
        Idle {
            rig,
            _dir: dir,
            relay,
            api,
            uuid,
            device_key,
        }
    }
}

/// How long after UDP works again an agent (defaults, `auto`) that fell back to TCP is on
/// QUIC again: UDP blocked until the agent has been on TCP for 90 s (its probes at their
/// longest pause by then), then let through.
async fn back_to_quic() -> FieldRow {
    const BLOCKED: Duration = Duration::from_secs(90);
    const LIMIT: Duration = Duration::from_secs(900);
    let Idle {
        rig,
        _dir,
        relay,
        api,
        uuid,
        device_key,
    } = Idle::new(true, "back").await;
    let agent = Agent::spawn_wrapped(
        &rig.device_wrapper(),
        &[relay.device.to_string()],
        &relay.cert(),
        &uuid,
        &device_key,
        &[],
        &[],
    );
    agent.stderr.wait_for("connected to relay");
    let transport = || async {
        let (_, d) = api.call("GET", &format!("/v1/devices/{uuid}"), None).await;
        d["transport"].as_str().unwrap_or("").to_owned()
    };
    assert_eq!(
        transport().await,
        "tcp",
        "UDP is blocked: the agent must be on TCP"
    );
    tokio::time::sleep(BLOCKED).await;
    let before = rig.counts();
    rig.block_udp(false);
    let unblocked = Instant::now();
    let back = common::eventually(LIMIT, || async { transport().await == "quic" }).await;
    let d = rig.counts().since(&before);
    drop(agent);
    (
        format!("back on QUIC after UDP works again (blocked for the first {} s on TCP)", BLOCKED.as_secs()),
        match back {
            Some(t) => format!("{:.1} s", t.as_secs_f64()),
            None => format!("not within {} s", LIMIT.as_secs()),
        },
        format!(
            "target ≤ 60 s; measured from letting UDP through ({:.0} s ago); {} UDP packets up meanwhile",
            unblocked.elapsed().as_secs_f64(),
            d.up_udp
        ),
    )
}

/// What happens to the device's network in one row of scenario l.
#[derive(Clone, Copy)]
enum Event {
    /// The device moves to a new address; the old one is deleted.
    AddressChange,
    /// Every packet dropped both ways for this long.
    Blackout(Duration),
    /// A firewall starts dropping UDP (`auto`: the agent moves QUIC → TCP).
    UdpBlocked,
}

impl Event {
    fn label(self) -> String {
        match self {
            Event::AddressChange => "address change".into(),
            Event::Blackout(d) => format!("{} s blackout", d.as_secs()),
            Event::UdpBlocked => "UDP blocked (auto: QUIC → TLS/TCP)".into(),
        }
    }
}

/// Scenario l: for each event of issue 28 on each link, at the defaults (release build,
/// resume on, the rig's 50 ms path), with a 16 MiB download running through the event and
/// an interactive echo: how long after the path came back (or, for UDP blocked, after the
/// block) the echo answered. The download is checked byte for byte.
pub async fn events() -> Vec<FieldRow> {
    let cases: Vec<(&'static str, Event)> = vec![
        ("quic", Event::AddressChange),
        ("tcp", Event::AddressChange),
        ("quic", Event::Blackout(Duration::from_secs(20))),
        ("tcp", Event::Blackout(Duration::from_secs(20))),
        ("quic", Event::Blackout(Duration::from_secs(90))),
        ("tcp", Event::Blackout(Duration::from_secs(90))),
        ("auto", Event::UdpBlocked),
    ];
    let mut rows = Vec::new();
    // Two rigs at a time: the long blackouts overlap, the CPU is not shared by more.
    for pair in cases.chunks(2) {
        let runs: Vec<_> = pair
            .iter()
            .map(|&(transport, event)| tokio::spawn(event_row(transport, event)))
            .collect();
        for r in runs {
            rows.push(r.await.unwrap());
        }
    }
    rows
}

async fn event_row(transport: &'static str, event: Event) -> FieldRow {
    let Idle {
        rig,
        _dir,
        relay,
        uuid,
        device_key,
        ..
    } = Idle::new(false, "event").await;
    let entry = match transport {
        "auto" => relay.device.to_string(),
        t => format!("{t}://{}", relay.device),
    };
    let agent = Agent::spawn_wrapped(
        &rig.device_wrapper(),
        &[entry],
        &relay.cert(),
        &uuid,
        &device_key,
        &[],
        &[],
    );
    agent.stderr.wait_for("connected to relay");
    let loopback = "127.0.0.1:0".parse().unwrap();
    let size = 16 << 20;
    let echo = common::echo_on(rig.device_listener(loopback));
    let source = common::paced_source_on(
        rig.device_listener(loopback),
        size,
        5,
        Some(Duration::from_millis(100)),
    );
    let key = relay.admin_key();
    let mut chat = common::tunnel(relay.proxy, &key, &uuid, echo).await;
    let download = {
        let mut s = common::tunnel(relay.proxy, &key, &uuid, source).await;
        tokio::spawn(async move {
            let mut got = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(600), s.read_to_end(&mut got)).await;
            matches!(read, Ok(Ok(_)))
                && common::sha256_hex(&got) == common::sha256_hex(&common::random_bytes(size, 5))
        })
    };
    echo_answers(&mut chat)
        .await
        .expect("the echo answers before the event");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = match event {
        Event::AddressChange => {
            rig.move_device();
            Instant::now()
        }
        Event::Blackout(length) => {
            rig.blackout(true);
            tokio::time::sleep(length).await;
            rig.blackout(false);
            Instant::now()
        }
        Event::UdpBlocked => {
            rig.block_udp(true);
            Instant::now()
        }
    };
    let answered = echo_answers(&mut chat).await.map(|()| back.elapsed());
    let intact = download.await.unwrap_or(false);
    // What the agent did about its link, for the run's log.
    let moves: Vec<String> = agent
        .stderr
        .text()
        .lines()
        .filter(|l| {
            [
                "beside",
                "moving the link",
                "connected to relay",
                "lost",
                "resumed",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .map(str::to_owned)
        .collect();
    eprintln!(
        "l: {} on {transport}: the agent's link:\n{}",
        event.label(),
        moves.join("\n")
    );
    drop(agent);
    (
        format!("{}, {transport} link: echo again after", event.label()),
        match answered {
            Some(t) => format!("{:.2} s", t.as_secs_f64()),
            None => "never (300 s)".into(),
        },
        format!(
            "from the path's return{}; 16 MiB download through it {}; target: a second or two",
            if matches!(event, Event::UdpBlocked) {
                " (the block's start: the path never returns for UDP)"
            } else {
                ""
            },
            if intact { "intact (SHA-256)" } else { "FAILED" }
        ),
    )
}

/// One byte through an echo service and back, within 300 s.
async fn echo_answers(chat: &mut TcpStream) -> Option<()> {
    chat.write_all(b"x").await.ok()?;
    let mut one = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(300), chat.read_exact(&mut one))
        .await
        .ok()?
        .ok()?;
    Some(())
}

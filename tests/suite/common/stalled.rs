//! Stalled readers, the load of the memory issue: tunnels to device-side sources that write
//! without end, whose users read the `200` and then nothing (half of them first read 4 MiB
//! at full rate), spread over devices and users so that no per-device, per-user or
//! per-user-on-one-device limit is reached. Shared by the test that asserts the bounds
//! (`tests/suite/memory.rs`) and the benchmark that reports the figures
//! (`benches/support/stalled.rs`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{rss_kib, tunnel, Agent, World};

/// Tunnels one user opens to one device (the default per-user-on-one-device limit is 32).
const PER_PAIR: usize = 25;
/// Users per device (so 50 stalled tunnels per device, of its default limit of 64).
const USERS_PER_DEVICE: usize = 2;
/// Devices one user reaches (10 × 25 = 250 tunnels, of the default per-user limit of 256).
const DEVICES_PER_USER: usize = 5;
/// What half the stalled readers read at full rate before they stop.
pub const FAST_FIRST: u64 = 4 << 20;
/// The receive buffer of a stalled reader's socket and the send buffer of a source's, set
/// rather than left to the kernel's autotuning. In the field these sockets are on the
/// users' machines and on the devices; here they share the relay's kernel, and autotuned
/// (up to 6 and 4 MiB each) 2,000 of each would hold gigabytes of the machine's TCP memory
/// and push the relay's own sockets into the kernel's memory pressure, which no relay
/// with remote users meets for that reason. What the relay is asked to hold is the same
/// either way: what a stalled reader's socket does not take waits in the relay's send
/// queue, which is what is measured.
pub const REMOTE_SOCKET_BUFFER: usize = 32 * 1024;

/// A relay with its devices (an agent each, on one transport), the readers' users, and one
/// more user for the tunnels that keep moving beside the stalled ones.
pub struct Stalled {
    /// The relay and its admin.
    pub world: World,
    /// The relay's pid.
    pub pid: u32,
    /// One agent per device.
    pub agents: Vec<Agent>,
    /// The devices.
    pub uuids: Vec<String>,
    /// The readers' API keys.
    pub keys: Vec<String>,
    /// The active user's API key.
    pub active_key: String,
    /// The device-side source that never ends (the same on every device: it is local),
    /// with its send buffers left to the kernel: the active tunnels' source.
    pub port: u16,
    /// The same source with [`REMOTE_SOCKET_BUFFER`] send buffers: the stalled readers'.
    pub stalled_port: u16,
}

/// Devices and users enough for `n` stalled readers over `transport` (`quic` or `tcp`),
/// on a relay with `config` (TOML; `[limits]` with room for the set-up's logins).
pub async fn stalled_world(transport: &str, n: usize, config: &str) -> Stalled {
    let world = World::with(config, &[], &[("RUST_LOG", "warn")]);
    let pid = world.relay.pid().expect("a local relay");
    let pairs = n.div_ceil(PER_PAIR);
    let devices = pairs.div_ceil(USERS_PER_DEVICE);
    let users = devices.div_ceil(DEVICES_PER_USER) * USERS_PER_DEVICE;
    let mut agents = Vec::new();
    let mut uuids = Vec::new();
    for _ in 0..devices {
        let (uuid, key) = world.device_in("stalled").await;
        let relay = match transport {
            "tcp" => format!(
                "tcp://{}",
                world.relay.device_tcp.expect("a device TCP listener")
            ),
            _ => world.relay.device.to_string(),
        };
        let agent = Agent::spawn_with(
            &[relay],
            &world.relay.cert(),
            &uuid,
            &key,
            &["--transport", transport],
            &[],
        );
        agent.stderr.wait_for("connected to relay");
        agents.push(agent);
        uuids.push(uuid);
    }
    let mut keys = Vec::new();
    for u in 0..users {
        let name = format!("reader{u}");
        keys.push(world.user(&name).await);
        world.admin.add_member("stalled", &name).await;
    }
    let active_key = world.user("active").await;
    world.admin.add_member("stalled", "active").await;
    let port = endless_source(None).await;
    let stalled_port = endless_source(Some(REMOTE_SOCKET_BUFFER)).await;
    Stalled {
        world,
        pid,
        agents,
        uuids,
        keys,
        active_key,
        port,
        stalled_port,
    }
}

impl Stalled {
    /// Opens `n` stalled readers (the first ones on the first devices); with `fast_first`
    /// the even ones read [`FAST_FIRST`] at full rate first, all at once, and check what
    /// they read.
    pub async fn open(&self, n: usize, fast_first: bool) -> Vec<TcpStream> {
        let mut stalled = Vec::with_capacity(n);
        for i in 0..n {
            let pair = i / PER_PAIR;
            let device = pair / USERS_PER_DEVICE;
            let user = (device / DEVICES_PER_USER) * USERS_PER_DEVICE + pair % USERS_PER_DEVICE;
            let s = tunnel(
                self.world.relay.proxy,
                &self.keys[user],
                &self.uuids[device],
                self.stalled_port,
            )
            .await;
            socket2::SockRef::from(&s)
                .set_recv_buffer_size(REMOTE_SOCKET_BUFFER)
                .unwrap();
            stalled.push(s);
        }
        let mut fast = tokio::task::JoinSet::new();
        for (i, mut s) in stalled.drain(..).enumerate() {
            fast.spawn(async move {
                if fast_first && i % 2 == 0 {
                    read_checked(&mut s, 0, FAST_FIRST).await;
                }
                (i, s)
            });
        }
        let mut back: Vec<_> = fast.join_all().await;
        back.sort_by_key(|(i, _)| *i);
        back.into_iter().map(|(_, s)| s).collect()
    }

    /// One tunnel per device for the active user, each reading `len` bytes at once; the
    /// slowest one's MB/s.
    pub async fn active(&self, len: u64) -> f64 {
        let mut streams = Vec::new();
        for uuid in &self.uuids {
            streams.push(tunnel(self.world.relay.proxy, &self.active_key, uuid, self.port).await);
        }
        slowest_download(streams, len).await
    }

    /// The agents' RSS together, KiB.
    pub fn agents_rss(&self) -> u64 {
        self.agent_pids().map(rss_kib).sum()
    }

    /// The kernel memory of the agents' sockets together, bytes ([`kernel_socket_bytes`]).
    pub fn agents_socket_bytes(&self) -> u64 {
        self.agent_pids().map(kernel_socket_bytes).sum()
    }

    fn agent_pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.agents.iter().filter_map(|a| a.pid())
    }
}

/// The byte at `offset` of what [`endless_source`] sends.
pub fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A device-side service that writes without end (until the connection fails) a pattern
/// a reader can check for lost, repeated or reordered bytes: byte `i` is `i % 251`.
///
/// With `send_buffer`, each connection's send buffer is set to it instead of autotuned.
pub async fn endless_source(send_buffer: Option<usize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // 251 × 4,096 bytes: a whole number of periods, so every write continues the pattern.
    let block: Vec<u8> = (0..251 * 4096).map(pattern).collect();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let block = block.clone();
            if let Some(size) = send_buffer {
                let _ = socket2::SockRef::from(&s).set_send_buffer_size(size);
            }
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                while s.write_all(&block).await.is_ok() {}
            });
        }
    });
    port
}

/// Reads `len` bytes from `s` as fast as they come, checking that they are the pattern's
/// from `offset` on (a slice compare against the pattern, so the check costs little next
/// to the transfer it checks).
pub async fn read_checked(s: &mut TcpStream, offset: u64, len: u64) {
    // The pattern from any phase, for as long as one read: 251 bytes more than the buffer.
    const BUF: usize = 256 * 1024;
    let expected: Vec<u8> = (0..(BUF + 251) as u64).map(pattern).collect();
    let mut buf = vec![0u8; BUF];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let want = (end - at).min(BUF as u64) as usize;
        let n = s.read(&mut buf[..want]).await.unwrap();
        assert!(n > 0, "the source ended early");
        let phase = (at % 251) as usize;
        if buf[..n] != expected[phase..phase + n] {
            let k = (0..n).find(|&k| buf[k] != expected[phase + k]).unwrap_or(0);
            panic!("byte {} lost or out of order", at + k as u64);
        }
        at += n as u64;
    }
}

/// Reads `len` bytes on each of `streams` at once; the slowest one's MB/s.
pub async fn slowest_download(streams: Vec<TcpStream>, len: u64) -> f64 {
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        tasks.spawn(async move {
            let start = Instant::now();
            read_checked(&mut s, 0, len).await;
            start.elapsed()
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(d) = tasks.join_next().await {
        slowest = slowest.max(d.unwrap());
    }
    len as f64 / slowest.as_secs_f64() / 1e6
}

/// The kernel memory of process `pid`'s sockets (bytes): the sum of `ss -m`'s `r`
/// (receive queue) and `w` (send queue, queued) over its TCP and UDP sockets.
pub fn kernel_socket_bytes(pid: u32) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tumnpH"])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mine = format!("pid={pid},");
    let mut total = 0u64;
    let mut owned = false;
    for line in text.lines() {
        if line.contains("users:(") {
            owned = line.contains(&mine);
        }
        let Some(start) = line.find("skmem:(") else {
            continue;
        };
        if !owned {
            continue;
        }
        let fields = &line[start + 7..];
        let fields = &fields[..fields.find(')').unwrap_or(fields.len())];
        for f in fields.split(',') {
            if let Some(v) = f.strip_prefix('r').or_else(|| f.strip_prefix('w')) {
                if let Ok(v) = v.parse::<u64>() {
                    total += v;
                }
            }
        }
    }
    total
}

/// The machine's TCP memory and the kernel's pressure mark for it (`net.ipv4.tcp_mem`'s
/// second figure), bytes, from `/proc/net/sockstat`.
pub fn machine_tcp_memory() -> (u64, u64) {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = sockstat.lines().find(|l| l.starts_with("TCP:")).unwrap();
    let mut words = line.split_whitespace();
    let pages: u64 = words
        .find(|w| *w == "mem")
        .and_then(|_| words.next())
        .and_then(|v| v.parse().ok())
        .expect("sockstat's TCP line has mem");
    let marks = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").unwrap();
    let pressure: u64 = marks.split_whitespace().nth(1).unwrap().parse().unwrap();
    (pages * 4096, pressure * 4096)
}

/// Waits until `pid`'s RSS stops growing (under 1 % in 2 s), at most 60 s; the RSS, KiB.
pub async fn settled_rss(pid: u32) -> u64 {
    let start = Instant::now();
    let mut last = rss_kib(pid);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = rss_kib(pid);
        if now <= last + last / 100 || start.elapsed() > Duration::from_secs(60) {
            return now;
        }
        last = now;
    }
}

/// One metric's value from a scrape (the first series of that name).
pub fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = rest.strip_prefix(' ').or_else(|| {
                rest.starts_with('{')
                    .then(|| rest.rsplit_once(' ').map(|(_, v)| v))
                    .flatten()
            })?;
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

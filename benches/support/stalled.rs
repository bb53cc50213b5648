//! k: stalled readers. `n` tunnels to device-side sources that write without end, whose
//! users read the `200` and then nothing (half of them first read 4 MiB at full rate), spread
//! over devices and users so that no per-device, per-user or per-user-on-one-device limit
//! is reached. Reported, all from one run: the relay's RSS idle, with the stalled tunnels
//! settled, and 10 s after they are closed; the kernel's socket memory of the relay
//! process (`ss -m`); the agents' RSS; and the throughput of other tunnels of the same
//! devices, with and without the stalled ones, as a ratio.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::{common, source_server, MIB};
/// Tunnels one user opens to one device (the default per-user-on-one-device limit is 32).
const PER_PAIR: usize = 25;
/// Users per device (so 50 stalled tunnels per device, of its default limit of 64).
const USERS_PER_DEVICE: usize = 2;
/// Devices one user reaches (10 × 25 = 250 tunnels, of the default per-user limit of 256).
const DEVICES_PER_USER: usize = 5;

/// Reads `len` bytes from `s` as fast as they come.
async fn read_exactly(s: &mut TcpStream, len: u64) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = s
            .read(&mut buf[..left.min(256 * 1024) as usize])
            .await
            .unwrap();
        assert!(n > 0, "the source ended early");
        left -= n as u64;
    }
}

/// The relay's sockets' kernel memory (bytes): the sum of `ss -m`'s `r` (receive queue)
/// and `w` (send queue, queued) over every TCP and UDP socket of process `pid`.
fn kernel_socket_bytes(pid: u32) -> u64 {
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

/// Waits until the relay's RSS stops growing (under 1 % in 2 s), at most 60 s; the RSS.
async fn settled_rss(pid: u32) -> u64 {
    let start = Instant::now();
    let mut last = common::rss_kib(pid);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = common::rss_kib(pid);
        if now <= last + last / 100 || start.elapsed() > Duration::from_secs(60) {
            return now;
        }
        last = now;
    }
}

/// Downloads `len` bytes on each of `streams` at once; the slowest one's MB/s.
async fn slowest_download(streams: Vec<TcpStream>, len: u64) -> f64 {
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        tasks.spawn(async move {
            let start = Instant::now();
            read_exactly(&mut s, len).await;
            start.elapsed()
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(d) = tasks.join_next().await {
        slowest = slowest.max(d.unwrap());
    }
    len as f64 / slowest.as_secs_f64() / 1e6
}

/// Scenario k over `transport` with `n` stalled readers: (what, value, note) rows.
pub async fn stalled_readers(transport: &str, n: usize) -> Vec<(String, String, String)> {
    let world = common::World::with(
        "[limits]\nauth_failures_per_minute = 100000\n",
        &[],
        &[("RUST_LOG", "warn")],
    );
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
        let agent = common::Agent::spawn_with(
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
    // A source that never ends: it writes until the connection fails.
    let port = source_server(u64::MAX).await;
    let agents_rss = |agents: &[common::Agent]| -> u64 {
        agents
            .iter()
            .filter_map(|a| a.pid())
            .map(common::rss_kib)
            .sum()
    };

    // Other tunnels of the same devices, alone: one per device, 64 MiB each at once.
    let active = |world: &common::World| {
        let uuids = uuids.clone();
        let key = active_key.clone();
        let proxy = world.relay.proxy;
        async move {
            let mut streams = Vec::new();
            for uuid in &uuids {
                streams.push(common::tunnel(proxy, &key, uuid, port).await);
            }
            slowest_download(streams, 64 * MIB).await
        }
    };
    let alone = active(&world).await;
    let idle = settled_rss(pid).await;
    let agents_idle = agents_rss(&agents);

    let mut stalled = Vec::with_capacity(n);
    for i in 0..n {
        let pair = i / PER_PAIR;
        let device = pair / USERS_PER_DEVICE;
        let user = (device / DEVICES_PER_USER) * USERS_PER_DEVICE + pair % USERS_PER_DEVICE;
        stalled.push(common::tunnel(world.relay.proxy, &keys[user], &uuids[device], port).await);
    }
    // Half read at full rate first, all at once, then stop like the rest.
    let mut fast = tokio::task::JoinSet::new();
    for (i, mut s) in stalled.drain(..).enumerate() {
        fast.spawn(async move {
            if i % 2 == 0 {
                read_exactly(&mut s, 4 * MIB).await;
            }
            s
        });
    }
    while let Some(s) = fast.join_next().await {
        stalled.push(s.unwrap());
    }
    let full = settled_rss(pid).await;
    let kernel = kernel_socket_bytes(pid);
    let agents_full = agents_rss(&agents);
    let beside = active(&world).await;

    drop(stalled);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = common::rss_kib(pid);

    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let per = |kib: u64| format!("{:.0} KiB per tunnel", kib as f64 / n as f64);
    let over = full.saturating_sub(idle);
    vec![
        (
            format!("{n} stalled readers over {transport} ({devices} devices, {users} users): relay RSS"),
            format!("{} → {}", mib(idle), mib(full)),
            format!("+{} (target ≤ 256 KiB per tunnel)", per(over)),
        ),
        (
            "relay sockets' kernel memory (ss -m, r + w)".into(),
            format!("{:.1} MiB", kernel as f64 / MIB as f64),
            per(kernel / 1024),
        ),
        (
            "relay RSS 10 s after closing them".into(),
            mib(after),
            format!("+{} over idle (target ≤ 32 MiB)", mib(after.saturating_sub(idle))),
        ),
        (
            format!("the agents' RSS ({devices} processes)"),
            format!("{} → {}", mib(agents_idle), mib(agents_full)),
            per(agents_full.saturating_sub(agents_idle)),
        ),
        (
            "other tunnels of the same devices, slowest, beside them".into(),
            format!("{beside:.0} MB/s (alone {alone:.0})"),
            format!("{:.2} × alone (target ≥ 0.50)", beside / alone),
        ),
    ]
}

//! k: stalled readers (`tests/suite/common/stalled.rs` makes the load): `n` tunnels to
//! device-side sources that write without end, whose users read the `200` and then
//! nothing, half of them after reading 4 MiB at full rate (the readers' and sources'
//! socket buffers are fixed as if they were on other machines: see
//! `REMOTE_SOCKET_BUFFER`). Reported, all from one run:
//! the relay's RSS idle, with the stalled tunnels settled, and 10 s after they are closed;
//! what the relay's metrics say it holds for them (granted and not yet taken, and of that
//! what waits in its own memory); the kernel's socket memory of the relay process
//! (`ss -m`) and of the machine; the agents' RSS and socket memory; and the throughput of
//! other tunnels of the same devices, with and without the stalled ones (the median of
//! three rounds each), as a ratio.

use std::time::Duration;

use crate::common;
use crate::common::stalled::{
    kernel_socket_bytes, machine_tcp_memory, metric, settled_rss, stalled_world,
};
use crate::MIB;

/// Scenario k over `transport` with `n` stalled readers: (what, value, note) rows.
pub async fn stalled_readers(transport: &str, n: usize) -> Vec<(String, String, String)> {
    let s = stalled_world(
        transport,
        n,
        "[limits]\nauth_failures_per_minute = 100000\n",
    )
    .await;
    let devices = s.uuids.len();
    let users = s.keys.len();
    // Other tunnels of the same devices, alone: one per device, 64 MiB each at once; the
    // median of three, since one such figure moves by several times between runs on a
    // machine this small.
    let alone = median_of_three(&s).await;
    let idle = settled_rss(s.pid).await;
    let agents_idle = s.agents_rss();

    let stalled = s.open(n, true).await;
    let full = settled_rss(s.pid).await;
    let kernel = kernel_socket_bytes(s.pid);
    let (machine_tcp, pressure_mark) = machine_tcp_memory();
    let agents_full = s.agents_rss();
    let agents_kernel = s.agents_socket_bytes();
    let scrape = common::metrics(&s.world.relay).await;
    let granted = metric(&scrape, "cloudlink_tunnel_buffer_bytes");
    let held = metric(&scrape, "cloudlink_tunnel_held_bytes");
    let beside = median_of_three(&s).await;

    drop(stalled);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = common::rss_kib(s.pid);

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
            "granted and not yet taken by users (metric), of it in relay memory".into(),
            format!("{:.1} MiB, {:.1} MiB", granted / MIB as f64, held / MIB as f64),
            format!("{}, {}", per(granted as u64 / 1024), per(held as u64 / 1024)),
        ),
        (
            "relay sockets' kernel memory (ss -m, r + w)".into(),
            format!("{:.1} MiB", kernel as f64 / MIB as f64),
            per(kernel / 1024),
        ),
        (
            "the machine's TCP memory (sockstat), all processes".into(),
            format!("{:.1} MiB", machine_tcp as f64 / MIB as f64),
            format!(
                "the kernel's pressure mark: {:.0} MiB",
                pressure_mark as f64 / MIB as f64
            ),
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
            "the agents' sockets' kernel memory (ss -m, r + w)".into(),
            format!("{:.1} MiB", agents_kernel as f64 / MIB as f64),
            per(agents_kernel / 1024),
        ),
        (
            "other tunnels of the same devices, slowest, beside them".into(),
            format!("{beside:.0} MB/s (alone {alone:.0})"),
            format!("{:.2} × alone (target ≥ 0.50)", beside / alone),
        ),
    ]
}

/// The median of three [`Stalled::active`] rounds of 64 MiB per device, MB/s.
async fn median_of_three(s: &crate::common::stalled::Stalled) -> f64 {
    let mut rounds = Vec::with_capacity(3);
    for _ in 0..3 {
        rounds.push(s.active(64 * MIB).await);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[1]
}

//! The device link on an impaired path (the rig, `common/rig.rs`): the device in a network
//! namespace of its own behind a middle namespace that adds latency, loss, a rate limit
//! and firewalls. The figures are in `cargo bench --bench tunnel -- --scenarios ij`; these
//! tests hold the behaviour: every byte arrives on a lossy mobile path on both links, and
//! an agent that fell back to TCP returns to QUIC by itself once UDP gets through, without
//! a QUIC handshake while UDP is still blocked.

use std::time::{Duration, Instant};

use crate::common::rig::{Rig, Shape};
use crate::common::*;

/// A relay here with its device listeners on the rig, an agent for one device in the
/// device's namespace, and the API.
struct FieldWorld {
    rig: Rig,
    dir: tempfile::TempDir,
    relay: Relay,
    admin: Api,
    uuid: String,
    key: String,
}

impl FieldWorld {
    async fn new(shape: Shape) -> FieldWorld {
        FieldWorld::with_limits(shape, "").await
    }

    /// The world with `extra` lines in the relay's `[limits]`.
    async fn with_limits(shape: Shape, extra: &str) -> FieldWorld {
        let rig = Rig::new();
        rig.shape(shape);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, limits(extra)).unwrap();
        let relay = Relay::start_twin(
            &dir.path().join("data"),
            &format!("{}:0", rig.relay_ip),
            &["--config", config.to_str().unwrap()],
            &[],
        );
        let admin = Api::new(relay.api, &relay.admin_key());
        let (uuid, key) = admin.register_device("field").await;
        FieldWorld {
            rig,
            dir,
            relay,
            admin,
            uuid,
            key,
        }
    }

    /// Starts the agent in the device's namespace with `relay` entries and `extra` flags,
    /// without waiting.
    fn agent(&self, relay: String, extra: &[&str]) -> Agent {
        Agent::spawn_wrapped(
            &self.rig.device_wrapper(),
            &[relay],
            &self.relay.cert(),
            &self.uuid,
            &self.key,
            extra,
            &[],
        )
    }

    async fn transport(&self) -> serde_json::Value {
        self.admin.transport_of(&self.uuid).await
    }
}

/// 8 MiB up and 8 MiB down through services on the device, each checked with SHA-256, at
/// 40 Mbit/s, 50 ms and 1 % loss each way.
async fn lossy_transfer(transport: &str) {
    let w = FieldWorld::new(Shape::field(50, 1.0)).await;
    let entry = match transport {
        "tcp" => format!("tcp://{}", w.relay.device_tcp.unwrap()),
        _ => format!("quic://{}", w.relay.device),
    };
    let agent = w.agent(entry, &[]);
    agent.stderr.wait_for("connected to relay");
    assert_eq!(w.transport().await, transport);
    let loopback = "127.0.0.1:0".parse().unwrap();
    let size = 8 << 20;
    let digest = digest_on(w.rig.device_listener(loopback));
    let source = paced_source_on(w.rig.device_listener(loopback), size, 11, None);
    let before = w.rig.counts();
    dataplane::checksummed_through(
        w.relay.proxy,
        &w.relay.admin_key(),
        &w.uuid,
        size,
        digest,
        source,
    )
    .await;
    // The path did lose packets (so recovery was exercised) and no more than it should.
    let d = w.rig.counts().since(&before);
    let (up, down) = d.loss();
    for (dir, loss) in [("up", up), ("down", down)] {
        assert!(
            (0.003..0.03).contains(&loss),
            "{transport}: {dir} loss {:.2} % on a 1 % path: {d:?}",
            loss * 100.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_crosses_a_lossy_mobile_path_over_quic() {
    lossy_transfer("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_crosses_a_lossy_mobile_path_over_tcp() {
    lossy_transfer("tcp").await;
}

/// With UDP blocked the agent (defaults, `auto`) comes up on TCP and probes the QUIC
/// port with small UDP probes only, never a QUIC handshake; once UDP is let through it is
/// back on QUIC within 60 s, and a tunnel open across the move keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_brings_the_agent_back_to_quic() {
    let w = FieldWorld::new(Shape::field(50, 0.0)).await;
    w.rig.block_udp(true);
    let agent = w.agent(w.relay.device.to_string(), &[]);
    // At boot `auto` tries one QUIC handshake before falling back; probes follow from here.
    agent.stderr.wait_for("device link on TLS over TCP");
    let before = w.rig.counts();
    assert_eq!(w.transport().await, "tcp");
    let echo = echo_on(w.rig.device_listener("127.0.0.1:0".parse().unwrap()));
    let mut open = tunnel(w.relay.proxy, &w.relay.admin_key(), &w.uuid, echo).await;
    echo_once(&mut open, b"before").await;

    // Blocked: the probes go out (about 5, 17 and 39 s after the fallback: each pause give
    // or take a tenth, plus the 2 s each probe waits for its answer) and nothing bigger
    // than a probe. Polled rather than slept, so a slow tunnel setup above cannot push the
    // first probes out of a fixed window.
    let counted = poll(Duration::from_secs(40), || async {
        let blocked = w.rig.counts().since(&before);
        (blocked.up_udp >= 2).then_some(blocked)
    })
    .await;
    let blocked = counted.unwrap_or_else(|| w.rig.counts().since(&before));
    assert!(
        blocked.up_udp >= 2,
        "fewer than two UDP probes in 40 s while UDP was blocked: {blocked:?}"
    );
    assert_eq!(
        blocked.up_udp_large, 0,
        "a QUIC handshake was tried while no probe got through: {blocked:?}"
    );
    assert_eq!(w.transport().await, "tcp");

    w.rig.block_udp(false);
    let unblocked = Instant::now();
    agent
        .stderr
        .wait_for_within("device link back on QUIC", Duration::from_secs(60));
    let took = unblocked.elapsed();
    eprintln!("back on QUIC {took:?} after UDP was let through");
    assert!(took <= Duration::from_secs(60), "{took:?}");
    assert_eq!(w.transport().await, "quic");
    // The tunnel opened on TCP still works (it moved to QUIC by resume: PROTOCOL.md §2e),
    // and a new one goes over QUIC.
    if let Err(e) = try_echo(&mut open, b"after").await {
        let log = std::fs::read_to_string(w.dir.path().join("data.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("tunnel")).collect();
        panic!(
            "the tunnel opened on TCP broke ({e}); relay log:\n{}\nagent log:\n{}",
            lines.join("\n"),
            agent.stderr.text()
        );
    }
    let mut fresh = tunnel(w.relay.proxy, &w.relay.admin_key(), &w.uuid, echo).await;
    echo_once(&mut fresh, b"fresh").await;
    drop(w.dir);
}

/// Writes `msg` and reads it back from an echo service.
async fn echo_once(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("the echo came back in time")
        .unwrap();
    assert_eq!(back, msg);
}

/// Link timeouts short enough that a blackout of a few seconds ends the link on both
/// sides (the relay's `[limits]`; [`short_agent`] for the agent).
const SHORT_LINK: &str = "idle_timeout_ms = 3000\ntcp_idle_timeout_ms = 3000";

/// An agent configuration file with the same short link timeouts.
fn short_agent(dir: &std::path::Path) -> String {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        "keep_alive_ms = 1000\nidle_timeout_ms = 3000\ntcp_keep_alive_ms = 1000\ntcp_idle_timeout_ms = 3000\n",
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

/// What happens to the device's network while tunnels are open (the events of issue 28).
#[derive(Clone, Copy, Debug)]
enum Event {
    /// Every packet dropped both ways for this long.
    Blackout(Duration),
    /// The device moves to a new address; the old one is deleted.
    AddressChange,
    /// A firewall starts dropping UDP (the agent moves QUIC → TCP), and later stops (the
    /// probe brings it back TCP → QUIC).
    UdpBlocked,
}

/// The link timeouts of a world: the defaults, or [`SHORT_LINK`] (and [`short_agent`]),
/// which end a link after 3 s of silence.
#[derive(Clone, Copy, PartialEq)]
enum Timeouts {
    Default,
    Short,
}

/// A tunnel up, a tunnel down (16 MiB each, paced to last about ten seconds, or longer
/// where the event takes longer) and an interactive echo, open while `event` happens to
/// the device's network: every byte arrives once and in order (SHA-256), the echo answers
/// again once the path is back, nothing is counted as failed, and the audit rows count
/// the resumes the metrics count. Returns how long after the path came back the echo
/// answered, and the device states the API showed meanwhile (polled every 250 ms).
async fn a_tunnel_outlives(
    transport: &str,
    event: Event,
    timeouts: Timeouts,
) -> (Duration, Vec<String>) {
    use tokio::io::AsyncReadExt;
    let limits = if timeouts == Timeouts::Short {
        SHORT_LINK
    } else {
        ""
    };
    let w = FieldWorld::with_limits(Shape::field(50, 0.0), limits).await;
    let entry = match transport {
        "tcp" => format!("tcp://{}", w.relay.device_tcp.unwrap()),
        // `auto` (the QUIC address alone) where the agent must fall back to TCP.
        _ if matches!(event, Event::UdpBlocked) => w.relay.device.to_string(),
        _ => format!("quic://{}", w.relay.device),
    };
    let config = short_agent(w.dir.path());
    let mut flags = vec![];
    if timeouts == Timeouts::Short {
        flags.extend(["--config", config.as_str()]);
    }
    let agent = w.agent(entry, &flags);
    agent.stderr.wait_for("connected to relay");
    assert_eq!(w.transport().await, transport);
    let loopback = "127.0.0.1:0".parse().unwrap();
    let size = 16 << 20;
    // The transfers must still be running when the event starts, and for the move back
    // to QUIC (which waits for a probe) still when that happens.
    let pause = match event {
        Event::UdpBlocked => Duration::from_millis(300),
        _ => Duration::from_millis(40),
    };
    let digest = digest_on(w.rig.device_listener(loopback));
    let source = paced_source_on(w.rig.device_listener(loopback), size, 11, Some(pause));
    let echo = echo_on(w.rig.device_listener(loopback));
    let key = w.relay.admin_key();
    let mut chat = tunnel(w.relay.proxy, &key, &w.uuid, echo).await;
    echo_once(&mut chat, b"before").await;

    let (proxy, uuid) = (w.relay.proxy, w.uuid.clone());
    let up = {
        let (key, uuid) = (key.clone(), uuid.clone());
        tokio::spawn(async move {
            let data = random_bytes(size, 7);
            let mut s = tunnel(proxy, &key, &uuid, digest).await;
            let (mut r, mut wr) = s.split();
            let mut answer = String::new();
            let ((), got) = tokio::join!(
                paced_write(&mut wr, &data, pause),
                r.read_to_string(&mut answer)
            );
            got.unwrap();
            assert_eq!(
                answer,
                format!("got {size} bytes, sha256 {}", sha256_hex(&data))
            );
        })
    };
    let down = tokio::spawn(async move {
        let mut s = tunnel(proxy, &key, &uuid, source).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(300), s.read_to_end(&mut got))
            .await
            .expect("the download finished")
            .unwrap();
        assert_eq!(got.len(), size);
        assert_eq!(sha256_hex(&got), sha256_hex(&random_bytes(size, 11)));
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    // The states the API shows, from the event on.
    let states = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let polling = {
        let states = states.clone();
        let api = Api::new(w.relay.api, &w.relay.admin_key());
        let uuid = w.uuid.clone();
        tokio::spawn(async move {
            loop {
                let (_, d) = api.call("GET", &format!("/v1/devices/{uuid}"), None).await;
                let state = d["state"].as_str().unwrap_or("?").to_owned();
                {
                    let mut seen = states.lock().unwrap();
                    if seen.last() != Some(&state) {
                        seen.push(state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let back = match event {
        Event::Blackout(length) => {
            w.rig.blackout(true);
            tokio::time::sleep(length).await;
            w.rig.blackout(false);
            Instant::now()
        }
        Event::AddressChange => {
            w.rig.move_device();
            Instant::now()
        }
        Event::UdpBlocked => {
            w.rig.block_udp(true);
            let blocked = Instant::now();
            agent
                .stderr
                .wait_for_within("device link on TLS over TCP", Duration::from_secs(120));
            blocked
        }
    };
    // What both ends logged, for a failure.
    let logs = || {
        let log = std::fs::read_to_string(w.dir.path().join("data.log")).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("tunnel") || l.contains("device"))
            .collect();
        format!(
            "agent log:\n{}\nrelay log:\n{}",
            agent.stderr.text(),
            lines.join("\n")
        )
    };
    if let Err(e) = try_echo(&mut chat, b"after").await {
        panic!(
            "{transport} {event:?}: no echo after the event ({e}); {}",
            logs()
        );
    }
    let answered = back.elapsed();
    eprintln!("{transport} {event:?}: the echo answered {answered:?} after the path came back");
    if let Event::UdpBlocked = event {
        // And back to QUIC once UDP gets through again (a probe finds it), the transfers
        // still running.
        w.rig.block_udp(false);
        agent
            .stderr
            .wait_for_within("device link back on QUIC", Duration::from_secs(90));
        assert_eq!(w.transport().await, "quic");
        if let Err(e) = try_echo(&mut chat, b"on quic again").await {
            panic!("no echo after the move back to QUIC ({e}); {}", logs());
        }
    }
    if let Err(e) = up.await {
        panic!("{transport} {event:?}: the upload failed: {e}; {}", logs());
    }
    if let Err(e) = down.await {
        panic!(
            "{transport} {event:?}: the download failed: {e}; {}",
            logs()
        );
    }
    echo_once(&mut chat, b"still").await;
    polling.abort();
    // The echo ends too, so that every tunnel's audit row is complete.
    {
        use tokio::io::AsyncWriteExt;
        chat.shutdown().await.unwrap();
        let mut rest = Vec::new();
        chat.read_to_end(&mut rest).await.unwrap();
    }
    // Counted: none failed, none waits now; the audit rows hold the resumes the metric
    // counts.
    let rows = poll(Duration::from_secs(10), || async {
        let (status, rows) = w.admin.call("GET", "/v1/tunnels", None).await;
        assert_eq!(status, 200, "{rows}");
        let all = rows.as_array().unwrap();
        (all.len() == 3 && all.iter().all(|r| !r["closed_at"].is_null())).then_some(rows)
    })
    .await
    .expect("the three tunnels' audit rows completed");
    let scrape = metrics(&w.relay).await;
    let sample = |series: &str| -> f64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the scrape"))
    };
    assert_eq!(sample("cloudlink_tunnels_waiting"), 0.0);
    for reason in cloudlink::relay::metrics::RESUME_FAILURES {
        let series = format!("cloudlink_tunnel_resume_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&series), 0.0, "{series}");
    }
    let resumed = sample("cloudlink_tunnel_resumes_total");
    let rows = rows.as_array().unwrap();
    let in_rows: i64 = rows.iter().map(|r| r["resumes"].as_i64().unwrap()).sum();
    assert_eq!(
        in_rows as f64, resumed,
        "the audit rows count {in_rows} resumes, the metric {resumed}: {rows:?}"
    );
    for r in rows {
        assert!(r["resume_failure"].is_null(), "{r}");
    }
    let states = states.lock().unwrap().clone();
    drop(w.dir);
    (answered, states)
}

/// A blackout longer than the link's idle timeout (both ends give the link up): the
/// tunnels resume on a new link, and meanwhile the device shows `reconnecting`.
async fn a_tunnel_outlives_a_blackout(transport: &str) {
    let event = Event::Blackout(Duration::from_secs(6));
    let (answered, states) = a_tunnel_outlives(transport, event, Timeouts::Short).await;
    assert!(answered < Duration::from_secs(10), "{answered:?}");
    assert!(
        states.iter().any(|s| s == "reconnecting") && states.last().unwrap() == "online",
        "{transport}: the device's states during the blackout: {states:?}"
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_tunnel_outlives_a_blackout_longer_than_the_link() {
    a_tunnel_outlives_a_blackout("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_outlives_a_blackout_longer_than_the_link() {
    a_tunnel_outlives_a_blackout("tcp").await;
}

/// Blackouts of 20 s and 90 s at the default link timeouts, on two rigs at once: the
/// 20 s one is shorter than either link's idle timeout (the link itself may survive), the
/// 90 s one longer (it does not; the tunnels wait and resume). The device shows
/// `reconnecting` in the long one.
async fn tunnels_outlive_long_blackouts(transport: &str) {
    let short = a_tunnel_outlives(
        transport,
        Event::Blackout(Duration::from_secs(20)),
        Timeouts::Default,
    );
    let long = a_tunnel_outlives(
        transport,
        Event::Blackout(Duration::from_secs(90)),
        Timeouts::Default,
    );
    let ((short, _), (long, states)) = tokio::join!(short, long);
    for answered in [short, long] {
        assert!(
            answered < Duration::from_secs(15),
            "{transport}: {answered:?}"
        );
    }
    assert!(
        states.iter().any(|s| s == "reconnecting") && states.last().unwrap() == "online",
        "{transport}: the device's states during the 90 s blackout: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_tunnels_outlive_blackouts_of_20_and_90_s() {
    tunnels_outlive_long_blackouts("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tunnels_outlive_blackouts_of_20_and_90_s() {
    tunnels_outlive_long_blackouts("tcp").await;
}

/// The device's address changes (the old one deleted) at the default link timeouts: on
/// TLS/TCP the agent sees its address go (netlink), dials again at once and the tunnels
/// resume; QUIC moves to the new address by itself. The device never shows `offline`.
async fn a_tunnel_outlives_an_address_change(transport: &str) {
    let (answered, states) =
        a_tunnel_outlives(transport, Event::AddressChange, Timeouts::Default).await;
    assert!(
        answered < Duration::from_secs(10),
        "{transport}: {answered:?}"
    );
    assert!(
        !states.iter().any(|s| s == "offline") && states.last().unwrap() == "online",
        "{transport}: the device's states across the address change: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_tunnel_outlives_an_address_change() {
    a_tunnel_outlives_an_address_change("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_outlives_an_address_change() {
    a_tunnel_outlives_an_address_change("tcp").await;
}

/// A firewall starts dropping UDP under open tunnels: the agent falls back to TLS/TCP and
/// they resume there; once UDP gets through again the probe takes the agent back to QUIC
/// and they move with it (short link timeouts, so the QUIC link is given up in 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_move_from_quic_to_tcp_and_back_as_udp_is_blocked_and_let_through() {
    let (answered, _) = a_tunnel_outlives("quic", Event::UdpBlocked, Timeouts::Short).await;
    assert!(answered < Duration::from_secs(30), "{answered:?}");
}

/// The relay's own view: an agent with a 4 s keep-alive goes silent (a blackout) under
/// the relay's default idle timeouts, which keep the link for 35 s (QUIC) or 70 s
/// (TLS/TCP). The API shows the device `reconnecting` within the keep-alive plus a few
/// seconds, and `online` again once the path is back, on the same session.
async fn a_silent_link_shows_reconnecting(transport: &str) {
    let w = FieldWorld::new(Shape::field(50, 0.0)).await;
    let entry = match transport {
        "tcp" => format!("tcp://{}", w.relay.device_tcp.unwrap()),
        _ => format!("quic://{}", w.relay.device),
    };
    let config = w.dir.path().join("agent.toml");
    std::fs::write(&config, "keep_alive_ms = 4000\ntcp_keep_alive_ms = 4000\n").unwrap();
    let agent = w.agent(entry, &["--config", config.to_str().unwrap()]);
    agent.stderr.wait_for("connected to relay");
    // The session is all there (the relay has the agent's answer to its control stream
    // too) once a tunnel works.
    let echo = echo_on(w.rig.device_listener("127.0.0.1:0".parse().unwrap()));
    let mut chat = tunnel(w.relay.proxy, &w.relay.admin_key(), &w.uuid, echo).await;
    echo_once(&mut chat, b"up").await;
    drop(chat);
    let state = || async {
        let (_, d) = w
            .admin
            .call("GET", &format!("/v1/devices/{}", w.uuid), None)
            .await;
        d["state"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(state().await, "online");
    w.rig.blackout(true);
    let dark = Instant::now();
    let seen = poll(Duration::from_secs(30), || async {
        (state().await == "reconnecting").then_some(())
    })
    .await;
    let took = dark.elapsed();
    w.rig.blackout(false);
    if seen.is_none() {
        let log = std::fs::read_to_string(w.dir.path().join("data.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("device")).collect();
        panic!(
            "{transport}: still {} after 30 s; relay log:\n{}\nagent log:\n{}",
            state().await,
            lines.join("\n"),
            agent.stderr.text()
        );
    }
    eprintln!("{transport}: reconnecting {took:?} into the blackout");
    // Keep-alive 4 s, plus 5 s, plus a check every second and the API's poll.
    assert!(took < Duration::from_secs(12), "{transport}: {took:?}");
    let back = poll(Duration::from_secs(20), || async {
        (state().await == "online").then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "{transport}: not online again: {}",
        state().await
    );
    assert_eq!(
        agent.stderr.text().matches("connected to relay").count(),
        1,
        "{transport}: the link itself lived through it"
    );
    let scrape = metrics(&w.relay).await;
    assert!(
        scrape.contains("cloudlink_devices_reconnecting 0"),
        "{scrape}"
    );
    drop(w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_shows_reconnecting_within_its_keep_alive() {
    tokio::join!(
        a_silent_link_shows_reconnecting("quic"),
        a_silent_link_shows_reconnecting("tcp")
    );
}

/// A blackout that outlasts the resume window on both sides: the tunnel ends with a reset
/// at both ends (the user's client and the device's service), never a clean end, since a
/// stream that stopped in the middle must not read as complete.
async fn a_tunnel_past_its_resume_window_is_reset(transport: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let extra = format!("{SHORT_LINK}\ntunnel_resume_secs = 2");
    let w = FieldWorld::with_limits(Shape::field(50, 0.0), &extra).await;
    let entry = match transport {
        "tcp" => format!("tcp://{}", w.relay.device_tcp.unwrap()),
        _ => format!("quic://{}", w.relay.device),
    };
    let config = short_agent(w.dir.path());
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap() + "tunnel_resume_secs = 2\n",
    )
    .unwrap();
    let agent = w.agent(entry, &["--config", &config]);
    agent.stderr.wait_for("connected to relay");
    // The device's service: it holds its connection and says how it ended.
    let service = w.rig.device_listener("127.0.0.1:0".parse().unwrap());
    let port = service.local_addr().unwrap().port();
    let service_end = tokio::spawn(async move {
        let (mut s, _) = service.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "eof".to_owned(),
                Ok(_) => {}
                Err(e) => return format!("{:?}", e.kind()),
            }
        }
    });
    let mut user = tunnel(w.relay.proxy, &w.relay.admin_key(), &w.uuid, port).await;
    user.write_all(b"hello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.rig.blackout(true);
    let mut buf = [0u8; 16];
    let user_end = tokio::time::timeout(Duration::from_secs(30), user.read(&mut buf))
        .await
        .expect("the user's end ended within the resume window and the link timeout");
    let user_end = match user_end {
        Ok(0) => "eof".to_owned(),
        Ok(n) => format!("{n} bytes"),
        Err(e) => format!("{:?}", e.kind()),
    };
    let service_end = tokio::time::timeout(Duration::from_secs(30), service_end)
        .await
        .expect("the service's end ended in time")
        .unwrap();
    w.rig.blackout(false);
    assert_eq!(user_end, "ConnectionReset", "{transport}: the user's end");
    assert_eq!(
        service_end, "ConnectionReset",
        "{transport}: the service's end"
    );
    drop(w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_tunnel_past_its_resume_window_is_reset() {
    a_tunnel_past_its_resume_window_is_reset("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_past_its_resume_window_is_reset() {
    a_tunnel_past_its_resume_window_is_reset("tcp").await;
}

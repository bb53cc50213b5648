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

/// Writes `msg` and reads it back from an echo service, or says why it could not.
async fn try_echo(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    if back != msg {
        return Err(format!("echoed {back:?}"));
    }
    Ok(())
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

/// Writes `data` in 64 KiB pieces `pause` apart, then half-closes.
async fn paced_write(w: &mut (impl tokio::io::AsyncWrite + Unpin), data: &[u8], pause: Duration) {
    use tokio::io::AsyncWriteExt;
    for piece in data.chunks(64 * 1024) {
        w.write_all(piece).await.unwrap();
        tokio::time::sleep(pause).await;
    }
    w.shutdown().await.unwrap();
}

/// A tunnel up, a tunnel down (16 MiB each, paced to last about ten seconds) and an
/// interactive echo, open while the device's network goes away for longer than the link's
/// idle timeout (both ends give the link up) and comes back: every byte arrives once and
/// in order (SHA-256), and the echo answers again soon after the path is back.
async fn a_tunnel_outlives_a_blackout(transport: &str) {
    use tokio::io::AsyncReadExt;
    let w = FieldWorld::with_limits(Shape::field(50, 0.0), SHORT_LINK).await;
    let entry = match transport {
        "tcp" => format!("tcp://{}", w.relay.device_tcp.unwrap()),
        _ => format!("quic://{}", w.relay.device),
    };
    let config = short_agent(w.dir.path());
    let agent = w.agent(entry, &["--config", &config]);
    agent.stderr.wait_for("connected to relay");
    assert_eq!(w.transport().await, transport);
    let loopback = "127.0.0.1:0".parse().unwrap();
    let size = 16 << 20;
    let pause = Duration::from_millis(40);
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
        tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut got))
            .await
            .expect("the download finished")
            .unwrap();
        assert_eq!(got.len(), size);
        assert_eq!(sha256_hex(&got), sha256_hex(&random_bytes(size, 11)));
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    w.rig.blackout(true);
    agent
        .stderr
        .wait_for_within("waits for a resume", Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.rig.blackout(false);
    let back = Instant::now();
    echo_once(&mut chat, b"after").await;
    eprintln!(
        "{transport}: the echo answered {:?} after the path came back",
        back.elapsed()
    );
    agent
        .stderr
        .wait_for_within("tunnel resumed", Duration::from_secs(30));
    if let Err(e) = up.await {
        let log = std::fs::read_to_string(w.dir.path().join("data.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("tunnel")).collect();
        panic!("upload failed: {e}\nrelay log:\n{}", lines.join("\n"));
    }
    down.await.unwrap();
    echo_once(&mut chat, b"still").await;
    // Counted: the three tunnels resumed, none failed, none waits now.
    let scrape = metrics(&w.relay).await;
    let sample = |series: &str| -> f64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the scrape"))
    };
    assert!(sample("cloudlink_tunnel_resumes_total") >= 3.0, "{scrape}");
    assert_eq!(sample("cloudlink_tunnels_waiting"), 0.0);
    assert!(sample("cloudlink_tunnel_wait_seconds_total") > 0.0);
    for reason in cloudlink::relay::metrics::RESUME_FAILURES {
        let series = format!("cloudlink_tunnel_resume_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&series), 0.0, "{series}");
    }
    drop(w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_tunnel_outlives_a_blackout_longer_than_the_link() {
    a_tunnel_outlives_a_blackout("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_outlives_a_blackout_longer_than_the_link() {
    a_tunnel_outlives_a_blackout("tcp").await;
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

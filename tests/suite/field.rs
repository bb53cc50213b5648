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
        let rig = Rig::new();
        rig.shape(shape);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, limits("")).unwrap();
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
    // The tunnel opened on TCP still works (make before break), and a new one goes over QUIC.
    echo_once(&mut open, b"after").await;
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

//! An abrupt death mid-transfer reaches both ends as a reset, never as a clean end: the
//! relay or the agent is killed with SIGKILL while bytes flow, each way, and the user's
//! client and the device's service must both see a connection reset.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// How one end of a tunnel saw it end.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// A clean end of stream: what a crash must never look like.
    Eof,
    /// A connection reset (or a write into a reset connection).
    Reset,
    /// Anything else, or the test's own bound.
    Other(String),
}

fn ending(e: std::io::Error) -> Ending {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe | ConnectionAborted => Ending::Reset,
        _ => Ending::Other(e.to_string()),
    }
}

/// The most any flood writes, and for how long: loops here are bounded.
const FLOOD_MAX_BYTES: u64 = 8 << 30;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(60);

/// Reads until the end, counting; how it ended.
async fn drain(mut r: impl AsyncRead + Unpin, count: Arc<AtomicU64>) -> Ending {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return Ending::Eof,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return ending(e),
        }
    }
}

/// Writes until an error (or the bounds), counting; how it ended.
async fn flood(mut w: impl AsyncWrite + Unpin, count: Arc<AtomicU64>) -> Ending {
    let block = random_bytes(64 * 1024, 7);
    let started = Instant::now();
    while count.load(Ordering::Relaxed) < FLOOD_MAX_BYTES && started.elapsed() < FLOOD_MAX_TIME {
        match w.write_all(&block).await {
            Ok(()) => {
                count.fetch_add(block.len() as u64, Ordering::Relaxed);
            }
            Err(e) => return ending(e),
        }
    }
    Ending::Other("the flood hit its bound without an error".into())
}

/// Which way the bytes flow.
#[derive(Clone, Copy)]
enum Flow {
    /// Device to user.
    Download,
    /// User to device.
    Upload,
}

/// A device service that floods (download) or drains (upload) its first connection and
/// reports how that ended; returns its port, the report, and its byte count.
async fn service(flow: Flow) -> (u16, oneshot::Receiver<Ending>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel();
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let end = match flow {
            Flow::Download => flood(s, counted).await,
            Flow::Upload => drain(s, counted).await,
        };
        let _ = tx.send(end);
    });
    (port, rx, count)
}

/// Short liveness on both sides so a dead peer is noticed in ~1.5 s instead of 30 s, and a
/// short resume window: a tunnel whose link is lost waits that long for it to come back
/// (PROTOCOL.md §2e), then ends with a reset, as here where the dead process never does.
const RELAY_LIMITS: &str = "keep_alive_ms = 300\nidle_timeout_ms = 1500\ntunnel_resume_secs = 3";

fn agent_config(w: &World) -> std::path::PathBuf {
    let path = w.dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "keep_alive_ms = 300\nidle_timeout_ms = 1500\ntunnel_resume_secs = 3\n",
    )
    .unwrap();
    path
}

/// A relay with short liveness, a device in it, and its agent connected.
async fn device_with_agent() -> (World, String, Agent) {
    let w = World::new(&limits(RELAY_LIMITS));
    let (uuid, key) = w.device_in("pis").await;
    let config = agent_config(&w);
    let agent = Agent::start(
        &w.relay,
        &uuid,
        &key,
        &["--config", config.to_str().unwrap()],
    );
    (w, uuid, agent)
}

/// Waits until `count` passes `bytes`: data is flowing through the tunnel.
async fn flowing(count: &AtomicU64, bytes: u64) {
    let flowed = eventually(Duration::from_secs(30), || async {
        count.load(Ordering::Relaxed) >= bytes
    })
    .await;
    assert!(flowed.is_some(), "no data flowed through the tunnel");
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

/// Which process dies.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Relay,
    Agent,
}

async fn kill_mid_transfer(victim: Victim, flow: Flow) {
    let (mut w, uuid, mut agent) = device_with_agent().await;
    let (port, service_end, service_count) = service(flow).await;
    let stream = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, port).await;
    let (r, wr) = stream.into_split();
    let user_count = Arc::new(AtomicU64::new(0));
    let user = match flow {
        Flow::Download => tokio::spawn(drain(r, user_count.clone())),
        Flow::Upload => tokio::spawn(async move {
            let end = flood(wr, user_count.clone()).await;
            drop(r);
            end
        }),
    };
    flowing(&service_count, 4 << 20).await;
    match victim {
        Victim::Relay => w.relay.kill(),
        Victim::Agent => agent.kill(),
    }
    let user_end = within("the user's end", user).await.unwrap();
    let service_end = within("the service's end", service_end).await.unwrap();
    assert_eq!(
        user_end,
        Ending::Reset,
        "{victim:?} killed: the user's client saw {user_end:?}"
    );
    assert_eq!(
        service_end,
        Ending::Reset,
        "{victim:?} killed: the device's service saw {service_end:?}"
    );
    if let Victim::Agent = victim {
        // The relay noticed within the idle timeout: the device shows offline, and a
        // CONNECT answers 503 at once instead of waiting for a 504.
        let path = format!("/v1/devices/{uuid}");
        let offline = eventually(Duration::from_secs(10), || async {
            w.admin.call("GET", &path, None).await.1["online"] == false
        })
        .await;
        assert!(offline.is_some(), "still online 10 s after the agent died");
        let request = format!(
            "CONNECT {uuid}:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
            w.relay.admin_key()
        );
        assert_eq!(
            status_of(&connect_raw(w.relay.proxy, &request).await.1),
            503
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_a_download_resets_both_ends() {
    kill_mid_transfer(Victim::Relay, Flow::Download).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_an_upload_resets_both_ends() {
    kill_mid_transfer(Victim::Relay, Flow::Upload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_a_download_resets_both_ends() {
    kill_mid_transfer(Victim::Agent, Flow::Download).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_an_upload_resets_both_ends() {
    kill_mid_transfer(Victim::Agent, Flow::Upload).await;
}

/// A device service that reports the moment it accepts a connection, then reads that
/// connection until it ends and reports how.
async fn silent_service() -> (u16, oneshot::Receiver<()>, oneshot::Receiver<Ending>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, accepted) = oneshot::channel();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let _ = accepted_tx.send(());
        let _ = tx.send(drain(s, Arc::new(AtomicU64::new(0))).await);
    });
    (port, accepted, rx)
}

/// The relay dies the moment the user reads its `200`, before any byte has moved: the
/// user must still see a reset, not an empty transfer that ended cleanly. (The socket is
/// armed to reset before the `200` is written, not after.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_as_the_200_arrives_resets_both_ends() {
    let (mut w, uuid, _agent) = device_with_agent().await;
    let (port, _accepted, service_end) = silent_service().await;
    let stream = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, port).await;
    w.relay.kill();
    let user_end = within("the user's end", drain(stream, Arc::new(AtomicU64::new(0)))).await;
    assert_eq!(
        user_end,
        Ending::Reset,
        "the user's client saw {user_end:?}"
    );
    let service_end = within("the service's end", service_end).await.unwrap();
    assert_eq!(
        service_end,
        Ending::Reset,
        "the device's service saw {service_end:?}"
    );
}

/// The agent dies the moment the device's service accepts the tunnel's connection,
/// before it has told the relay the tunnel is open: the service must see a reset, not a
/// client that connected and cleanly hung up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_as_the_service_accepts_resets_the_service() {
    let (w, uuid, mut agent) = device_with_agent().await;
    let (port, accepted, service_end) = silent_service().await;
    let request = format!(
        "CONNECT {uuid}:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
        w.relay.admin_key()
    );
    let user = tokio::spawn(async move { connect_raw(w.relay.proxy, &request).await });
    within("the service's accept", accepted).await.unwrap();
    agent.kill();
    let service_end = within("the service's end", service_end).await.unwrap();
    assert_eq!(
        service_end,
        Ending::Reset,
        "the device's service saw {service_end:?}"
    );
    // The user got an answer, never a hang: the device's refusal or loss (5xx), or a
    // 200 if the agent said `opened` before it died.
    let (_stream, head) = within("the user's answer", user).await.unwrap();
    assert!(
        matches!(status_of(&head), 200 | 502 | 503 | 504),
        "answer: {head:?}"
    );
}

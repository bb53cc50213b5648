//! The TLS/TCP device link (PROTOCOL.md §2b): devices behind networks that block UDP come
//! online over TCP, by themselves, and get everything a QUIC device gets.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlink::proto::frame;
use cloudlink::proto::messages::RelayControl;
use common::{
    dataplane, echo_server, eventually, fake_device, limits, metrics, random_bytes, read_all,
    send_and_read_back, sha256_hex, tunnel, Agent, Api, Relay, World,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const IO_TIMEOUT: Duration = common::TRANSFER_TIMEOUT;

/// The relay's TCP device address as a `tcp://` relay entry.
fn tcp_entry(relay: &Relay) -> String {
    format!("tcp://{}", relay.device_tcp.expect("a TCP device listener"))
}

/// An agent on the TCP link only, connected.
fn tcp_agent(relay: &Relay, uuid: &str, key: &str) -> Agent {
    let agent = Agent::spawn_with(&[tcp_entry(relay)], &relay.cert(), uuid, key, &[], &[]);
    agent.stderr.wait_for("connected to relay");
    agent
}

async fn echo_roundtrip(proxy: SocketAddr, token: &str, uuid: &str, echo: u16, msg: &[u8]) {
    let mut s = tunnel(proxy, token, uuid, echo).await;
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_all(&mut s).await, msg);
}

/// A firewall in front of one port number: TCP passes to the relay's TCP device
/// listener; UDP is either dropped silently (every datagram swallowed) or passed to the
/// relay's QUIC listener, switchable while running.
struct Gate {
    port: u16,
    udp_open: Arc<AtomicBool>,
}

impl Gate {
    async fn new(tcp_to: SocketAddr, udp_to: SocketAddr) -> Gate {
        // One port number for both protocols, as a bare `host:port` relay entry means.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let port = tcp.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut relay) = TcpStream::connect(tcp_to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut relay).await;
                    }
                });
            }
        });
        let udp_open = Arc::new(AtomicBool::new(false));
        let open = udp_open.clone();
        tokio::spawn(async move {
            let udp = Arc::new(udp);
            let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            back.connect(udp_to).await.unwrap();
            let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
            {
                let (udp, back, client) = (udp.clone(), back.clone(), client.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = back.recv(&mut buf).await {
                        let to = *client.lock().unwrap();
                        if let Some(to) = to {
                            let _ = udp.send_to(&buf[..n], to).await;
                        }
                    }
                });
            }
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if open.load(Ordering::Relaxed) {
                    *client.lock().unwrap() = Some(from);
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
        Gate { port, udp_open }
    }

    fn entry(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// An HTTP CONNECT proxy such as a corporate network has; counts the CONNECTs it served
/// and remembers their targets.
async fn corporate_proxy() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let head = common::read_head(&mut client).await;
                let target = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                log.lock().unwrap().push(target.clone());
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_refused_device_comes_online_over_tcp() {
    // Nothing listens on UDP at the relay's port: QUIC fails, TCP works.
    let w = World::with(
        &limits(""),
        &[
            "--device-listen",
            "off",
            "--device-tcp-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let (uuid, key) = w.device_in("pis").await;
    let tcp = w.relay.device_tcp.expect("TCP device listener");
    let started = Instant::now();
    let agent = Agent::spawn_with(&[tcp.to_string()], &w.relay.cert(), &uuid, &key, &[], &[]);
    agent.stderr.wait_for("connected to relay");
    let took = started.elapsed();
    eprintln!("online over TCP {took:?} after start (UDP refused)");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    agent.stderr.wait_for("device link on TLS over TCP");
    assert_eq!(w.admin.transport_of(&uuid).await, "tcp");
    echo_roundtrip(
        w.relay.proxy,
        &w.relay.admin_key(),
        &uuid,
        echo_server().await,
        b"hi",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_swallowed_device_comes_online_over_tcp_and_moves_back_to_quic() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let gate = Gate::new(w.relay.device_tcp.unwrap(), w.relay.device).await;
    let config = w.dir.path().join("agent.toml");
    std::fs::write(&config, "quic_probe_secs = 2\n").unwrap();
    let started = Instant::now();
    let agent = Agent::spawn_with(
        &[gate.entry()],
        &w.relay.cert(),
        &uuid,
        &key,
        &["--config", config.to_str().unwrap()],
        &[],
    );
    agent.stderr.wait_for("connected to relay");
    let took = started.elapsed();
    eprintln!("online over TCP {took:?} after start (UDP silently dropped)");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(w.admin.transport_of(&uuid).await, "tcp");
    let token = w.relay.admin_key();
    let echo = echo_server().await;
    // A tunnel open on the TCP link while the device moves to QUIC keeps working.
    let mut long = tunnel(w.relay.proxy, &token, &uuid, echo).await;
    long.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf).await.unwrap();

    gate.udp_open.store(true, Ordering::Relaxed);
    let moved = eventually(Duration::from_secs(20), || async {
        w.admin.transport_of(&uuid).await == "quic"
    })
    .await;
    assert!(
        moved.is_some(),
        "the device stayed on TCP after UDP came back"
    );
    agent.stderr.wait_for("device link back on QUIC");
    let echoed = match long.write_all(b"after!").await {
        Ok(()) => long.read_exact(&mut buf).await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = echoed {
        let log = std::fs::read_to_string(w.dir.path().join("data.log")).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("tunnel") || l.contains("device") || l.contains("session"))
            .collect();
        panic!(
            "the TCP-link tunnel broke during the move ({e}); relay log:\n{}\nagent log:\n{}",
            lines.join("\n"),
            agent.stderr.text()
        );
    }
    assert_eq!(&buf, b"after!", "the TCP-link tunnel broke during the move");
    long.shutdown().await.unwrap();
    assert_eq!(read_all(&mut long).await, b"");
    echo_roundtrip(w.relay.proxy, &token, &uuid, echo, b"new over quic").await;
    // The old TCP session closes once its tunnel is done: one device, on QUIC.
    let one = eventually(Duration::from_secs(10), || async {
        let m = metrics(&w.relay).await;
        m.contains("cloudlink_devices_connected{transport=\"tcp\"} 0")
            && m.contains("cloudlink_devices_connected{transport=\"quic\"} 1")
    })
    .await;
    assert!(one.is_some(), "{}", metrics(&w.relay).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_https_proxy_as_corporate_networks_require() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let (proxy, seen) = corporate_proxy().await;
    let proxy_url = format!("http://{proxy}");
    let agent = Agent::spawn_with(
        &[tcp_entry(&w.relay)],
        &w.relay.cert(),
        &uuid,
        &key,
        &[],
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "example.com")],
    );
    agent.stderr.wait_for("connected to relay");
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![w.relay.device_tcp.unwrap().to_string()],
        "the agent did not go through the proxy"
    );
    assert_eq!(w.admin.transport_of(&uuid).await, "tcp");
    echo_roundtrip(
        w.relay.proxy,
        &w.relay.admin_key(),
        &uuid,
        echo_server().await,
        b"via proxy",
    )
    .await;

    // NO_PROXY naming the relay's host: straight there.
    drop(agent);
    let (uuid2, key2) = w.device_in("pis").await;
    let direct = Agent::spawn_with(
        &[tcp_entry(&w.relay)],
        &w.relay.cert(),
        &uuid2,
        &key2,
        &[],
        &[
            ("HTTPS_PROXY", &proxy_url),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    );
    direct.stderr.wait_for("connected to relay");
    assert_eq!(seen.lock().unwrap().len(), 1, "NO_PROXY was not honoured");
}

#[tokio::test]
async fn sixty_four_mib_each_way_and_half_close_over_tcp() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = tcp_agent(&w.relay, &uuid, &key);
    dataplane::checksummed_both_ways(w.relay.proxy, &w.relay.admin_key(), &uuid, 64 << 20).await;
}

#[tokio::test]
async fn resets_propagate_both_ways_over_tcp() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = tcp_agent(&w.relay, &uuid, &key);
    let token = w.relay.admin_key();
    let mut buf = [0u8; 16];
    for device_resets in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let _ = tx.send(s);
        });
        let mut user = tunnel(w.relay.proxy, &token, &uuid, port).await;
        let mut device = rx.await.unwrap();
        let (resetter, mut other) = if device_resets {
            (device, user)
        } else {
            user.write_all(b"x").await.unwrap();
            device.read_exact(&mut buf[..1]).await.unwrap();
            (user, device)
        };
        resetter.set_zero_linger().unwrap();
        drop(resetter);
        let got = tokio::time::timeout(IO_TIMEOUT, other.read(&mut buf))
            .await
            .unwrap();
        assert_eq!(
            got.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "a reset on the {} side did not arrive as a reset",
            if device_resets { "device" } else { "user" }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_tunnels_over_tcp() {
    let w = World::new(&limits(
        "tunnels_per_user = 200\ntunnels_per_device = 200\ntunnels_per_user_device = 200",
    ));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = tcp_agent(&w.relay, &uuid, &key);
    dataplane::a_hundred_at_once(w.relay.proxy, &w.relay.admin_key(), &uuid).await;
}

#[tokio::test]
async fn stalled_readers_do_not_stall_another_tunnel() {
    stalled_readers_case(true).await;
}

/// The same on the QUIC link, whose connection window must stay unbounded for the same
/// reason (a 16 MiB one, tried for the relay's memory, answered 504s).
#[tokio::test]
async fn stalled_readers_do_not_stall_another_tunnel_over_quic() {
    stalled_readers_case(false).await;
}

async fn stalled_readers_case(tcp: bool) {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = if tcp {
        tcp_agent(&w.relay, &uuid, &key)
    } else {
        Agent::start(&w.relay, &uuid, &key, &[])
    };
    let token = w.relay.admin_key();
    // Tunnels whose users never read, each filling its own stream window: 16 of them once
    // used up the whole 16 MiB connection window, so that no other tunnel on the device
    // could move a byte (PROTOCOL.md §2b). 24 leave no doubt, within the per-device limits.
    let stalled_count = 24;
    let (source, written) = endless_source().await;
    let mut stalled = Vec::new();
    for _ in 0..stalled_count {
        stalled.push(tunnel(w.relay.proxy, &token, &uuid, source).await);
    }
    // Ready once the device's service, writing as fast as it can, has written nothing for
    // a whole second: every buffer on the way (sockets, both ends' windows) is full.
    let mut last = u64::MAX;
    let mut moved = Instant::now();
    let full = eventually(Duration::from_secs(60), || {
        let now = written.load(Ordering::Relaxed);
        if now != last {
            last = now;
            moved = Instant::now();
        }
        std::future::ready(moved.elapsed() >= Duration::from_secs(1))
    })
    .await;
    assert!(full.is_some(), "the stalled downloads kept moving");
    // Each got at least its first window of credit (PROTOCOL.md §2d) before it stalled;
    // since credit, a stalled tunnel holds a window, no longer the transport's 4 MiB.
    assert!(
        last >= (stalled_count as u64) * cloudlink::credit::MIN_WINDOW,
        "only {last} bytes written into {stalled_count} stalled tunnels"
    );
    // Another tunnel on the same link moves 32 MiB through and back meanwhile.
    let echo = echo_server().await;
    let data = random_bytes(32 << 20, 5);
    let mut s = tunnel(w.relay.proxy, &token, &uuid, echo).await;
    let what = "the second tunnel was held up by the stalled ones";
    let back = send_and_read_back(&mut s, &data, what).await;
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
    drop(stalled);
}

/// A service that writes to every connection until it blocks, counting what it wrote.
async fn endless_source() -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = written.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let total = total.clone();
            tokio::spawn(async move {
                let chunk = vec![0x5a; 64 << 10];
                while s.write_all(&chunk).await.is_ok() {
                    total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (port, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_and_drain_reach_a_tcp_device_as_written() {
    let mut w = World::new(&limits("shutdown_grace_secs = 30"));
    let (uuid, key) = w.device_in("pis").await;
    let tcp = w.relay.device_tcp.unwrap();
    let cert = w.relay.cert();

    // A device written from §2b alone: welcome, then a CONNECT per tunnel.
    let mut first = fake_device::tcp::hello(tcp, &cert, &uuid, &key).await;
    assert!(
        matches!(first.answer, RelayControl::Welcome { .. }),
        "{:?}",
        first.answer
    );
    assert_eq!(w.admin.transport_of(&uuid).await, "tcp");
    let token = w.relay.admin_key();
    let proxy = w.relay.proxy;
    let user = tokio::spawn({
        let (token, uuid) = (token.clone(), uuid.clone());
        async move { tunnel(proxy, &token, &uuid, 4321).await }
    });
    let (req, mut respond) = tokio::time::timeout(IO_TIMEOUT, first.tunnels.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.method(), http::Method::CONNECT);
    assert_eq!(req.uri().authority().unwrap().as_str(), "127.0.0.1:4321");
    assert!(req.headers().contains_key("cloudlink-tunnel"));
    assert_eq!(req.headers()["cloudlink-user"], "admin");
    let mut down = respond
        .send_response(http::Response::new(()), false)
        .unwrap();
    let mut user = user.await.unwrap();
    down.send_data(bytes::Bytes::from_static(b"from device"), false)
        .unwrap();
    let mut buf = [0u8; 11];
    user.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"from device");

    // A refusal the device answers with 502 reaches the user as 502.
    let user2 = tokio::spawn({
        let (token, uuid) = (token.clone(), uuid.clone());
        async move {
            common::connect_raw(
                proxy,
                &format!(
                    "CONNECT {uuid}:1 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
                ),
            )
            .await
        }
    });
    let (_, mut respond) = first.tunnels.recv().await.unwrap();
    let refusal = http::Response::builder()
        .status(502)
        .header("cloudlink-refused", "connect")
        .body(())
        .unwrap();
    let mut body = respond.send_response(refusal, false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"Connection refused"), true)
        .unwrap();
    let (_, head) = user2.await.unwrap();
    assert_eq!(common::status_of(&head), 502, "{head}");

    // A second session of the same device replaces the first: `replaced` on its control
    // stream; the open tunnel keeps working until it ends.
    let second = fake_device::tcp::hello(tcp, &cert, &uuid, &key).await;
    assert!(matches!(second.answer, RelayControl::Welcome { .. }));
    let msg = tokio::time::timeout(Duration::from_secs(5), first.control.recv())
        .await
        .expect("no `replaced` within 5 s")
        .unwrap();
    assert_eq!(msg, RelayControl::Replaced);
    down.send_data(bytes::Bytes::from_static(b"still here!"), true)
        .unwrap();
    user.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here!");
    drop(user);

    // Draining (SIGTERM): the live session hears `drain`.
    let mut second = second;
    let pid = w.relay.pid().unwrap();
    // Keep a tunnel open so the relay stays in its drain.
    let holder = tokio::spawn({
        let (token, uuid) = (token.clone(), uuid.clone());
        async move { tunnel(proxy, &token, &uuid, 4321).await }
    });
    let (_, mut respond) = second.tunnels.recv().await.unwrap();
    let mut held = respond
        .send_response(http::Response::new(()), false)
        .unwrap();
    let holder = holder.await.unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let msg = tokio::time::timeout(Duration::from_secs(5), second.control.recv())
        .await
        .expect("no `drain` within 5 s")
        .unwrap();
    assert!(matches!(msg, RelayControl::Drain { .. }), "{msg:?}");
    held.send_data(bytes::Bytes::new(), true).unwrap();
    drop(holder);
    w.relay.stop();
}

#[tokio::test]
async fn a_session_whose_control_stream_ends_is_closed_and_offline() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let tcp = w.relay.device_tcp.unwrap();
    let mut session = fake_device::tcp::hello(tcp, &w.relay.cert(), &uuid, &key).await;
    assert_eq!(w.admin.transport_of(&uuid).await, "tcp");
    // §2b: the device ending its side of the control stream ends the session; the relay
    // then closes the connection instead of leaving it open and unregistered.
    let _ = session.end_control.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(5), &mut session.closed)
        .await
        .expect("the relay kept the connection open")
        .unwrap();
    let offline = eventually(Duration::from_secs(5), || async {
        w.admin.transport_of(&uuid).await.is_null()
    })
    .await;
    assert!(offline.is_some(), "the device still shows online");
}

#[tokio::test]
async fn revocation_metrics_and_device_list_on_tcp() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = tcp_agent(&w.relay, &uuid, &key);
    dataplane::revoking_a_key_ends_open_tunnels(&w, &uuid).await;

    let m = metrics(&w.relay).await;
    assert!(
        m.contains("cloudlink_devices_connected{transport=\"tcp\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cloudlink_device_hellos_total{transport=\"tcp\"} 1"),
        "{m}"
    );
    w.login(&w.relay.admin_key());
    let list = w.cli_ok(&["device", "list"]);
    let row = list.lines().find(|l| l.contains(&uuid)).unwrap_or_default();
    assert!(row.contains("online") && row.contains("tcp"), "{list}");
}

#[tokio::test]
async fn garbage_on_the_tcp_link_is_closed_without_harm() {
    let w = World::new(&limits("hello_timeout_ms = 500"));
    let tcp = w.relay.device_tcp.unwrap();
    let cert = w.relay.cert();
    let closed = |mut s: tokio_rustls::client::TlsStream<TcpStream>| async move {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        matches!(r, Ok(Ok(0)) | Ok(Err(_)))
    };
    // Not a frame: an HTTP request where the hello should be.
    let mut s = fake_device::tcp::tls(tcp, &cert).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(s).await, "garbage was not closed");
    // A frame announcing 1 GiB.
    let mut s = fake_device::tcp::tls(tcp, &cert).await;
    s.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    s.write_all(&[b'{'; 1024]).await.unwrap();
    assert!(closed(s).await, "an oversized frame was not closed");
    // A frame that is JSON but not a hello.
    let mut s = fake_device::tcp::tls(tcp, &cert).await;
    frame::write(&mut s, &json!({"type": "open", "port": 22}))
        .await
        .unwrap();
    assert!(closed(s).await, "a non-hello was not closed");
    // Never says hello: closed after the hello timeout.
    let s = fake_device::tcp::tls(tcp, &cert).await;
    assert!(closed(s).await, "a silent client was not closed");
    // Not even TLS.
    let mut raw = TcpStream::connect(tcp).await.unwrap();
    raw.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(_)) | Ok(Err(_))),
        "plain garbage was not closed"
    );
    // A wrong key is rejected with a `reject` frame.
    let bad = fake_device::tcp::hello(tcp, &cert, &"ab".repeat(16), "nope").await;
    assert!(
        matches!(bad.answer, RelayControl::Reject { .. }),
        "{:?}",
        bad.answer
    );
    // The relay is fine: a real device still comes online.
    let (uuid, key) = w.device_in("pis").await;
    let _agent = tcp_agent(&w.relay, &uuid, &key);
    assert!(!w.relay.stderr.text().contains("panicked"));
    let m = metrics(&w.relay).await;
    assert!(
        m.contains("cloudlink_device_rejects_total{code=\"protocol\"} 3"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_for_api_proxy_and_devices_by_alpn() {
    // Everything on one port, as an operator behind a 443-only firewall runs it.
    let port = loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            break port;
        }
    };
    let shared = format!("127.0.0.1:{port}");
    let w = World::with(
        &limits(""),
        &[
            "--device-tcp-listen",
            &shared,
            "--api-tls-listen",
            &shared,
            "--proxy-tls-listen",
            &shared,
        ],
        &[],
    );
    assert_eq!(w.relay.device_tcp.unwrap().port(), port);
    assert_eq!(w.relay.api_tls.unwrap().port(), port);
    assert_eq!(w.relay.proxy_tls.unwrap().port(), port);
    let (uuid, key) = w.device_in("pis").await;
    let _agent = tcp_agent(&w.relay, &uuid, &key);
    // The API over TLS on the same port.
    let api = Api::tls(&w.relay, &w.relay.admin_key());
    assert_eq!(api.transport_of(&uuid).await, "tcp");
    // And the TLS CONNECT proxy, for a client that offers no ALPN.
    let echo = echo_server().await;
    let config =
        cloudlink::tls_client::config(cloudlink::tls_client::Trust::CaFile(&w.relay.cert()), &[])
            .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(w.relay.proxy_tls.unwrap())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    let request = format!(
        "CONNECT {uuid}:{echo} HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
        w.relay.admin_key()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"one port").await.unwrap();
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"one port");
}

#[tokio::test]
async fn an_abandoned_tcp_dial_closes_its_connection() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    // A relay that says welcome and then never opens the control stream: the agent's dial
    // waits for it until its caller gives up.
    let w = World::new(&limits(""));
    let data = &w.relay.data_dir;
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(data.join("relay-cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(data.join("relay-key.pem")).unwrap();
    cloudlink::tls_client::install_crypto();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    server.alpn_protocols = vec![b"cloudlink-tcp/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let _hello: cloudlink::proto::messages::Hello =
            frame::read_required(&mut tls, frame::MAX_FRAME)
                .await
                .unwrap();
        let welcome = RelayControl::Welcome {
            relay: "fake".into(),
            session: "s".into(),
            features: Vec::new(),
        };
        frame::write(&mut tls, &welcome).await.unwrap();
        let (_requests, connection) = h2::client::handshake(tls).await.unwrap();
        // Holding `_requests` keeps our side open: only the agent can end it now.
        let _ = connection.await;
        let _ = closed_tx.send(());
    });

    let config = tls_client_config(&w.relay.cert());
    let agent = cloudlink::agent::AgentConfig {
        uuid: "ab".repeat(16),
        key: cloudlink::config::Secret("k".into()),
        ..Default::default()
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let held = cloudlink::agent::link::Resuming::default();
    let dial = cloudlink::agent::link::dial_tcp(tcp, &config, &agent, &held, "localhost");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), dial)
            .await
            .is_err(),
        "the dial finished without a control stream"
    );
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the abandoned link stayed open")
        .unwrap();
}

fn tls_client_config(cert: &std::path::Path) -> tokio_rustls::TlsConnector {
    let config = cloudlink::tls_client::config(
        cloudlink::tls_client::Trust::CaFile(cert),
        &[b"cloudlink-tcp/1"],
    )
    .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

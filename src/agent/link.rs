//! The agent's end of a device link, on either transport: dial, hello, and the tunnel
//! requests the relay sends (PROTOCOL.md §2 and §2b).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::AgentConfig;
use crate::credit::Board;
use crate::link::h2::{self as link_h2, BodyReader, Heard, LastHeard};
use crate::link::{LinkSend, Transport};
use crate::proto::frame::{self, MAX_FRAME};
use crate::proto::messages::{
    codes, features, AgentControl, Hello, OpenReply, RefuseCode, RejectCode, RelayControl, VERSION,
};
use crate::resume::{AckBoard, Acks};

/// What the agent calls itself in its hello.
pub const AGENT_NAME: &str = concat!("cloudlink-agent/", env!("CARGO_PKG_VERSION"));

/// Why a dial or a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Could not reach or talk to the relay.
    Unreachable(String),
    /// The relay refused the hello.
    Rejected(RejectCode, String),
    /// The session ran, then the connection was lost.
    Lost(String),
    /// The relay asked us to reconnect elsewhere within this many ms.
    Drain(u64),
    /// Another session of this device replaced ours.
    Replaced,
    /// We are shutting down.
    Shutdown,
}

/// One tunnel the relay asked for, with the link it came on.
pub struct TunnelRequest {
    /// The stream and what it asks.
    pub stream: TunnelStream,
    /// What the link's tunnels share.
    pub link: Arc<LinkShare>,
}

/// What the links need of the agent's resumable tunnels (PROTOCOL.md §2e): whether they
/// are on, and where acks from the relay go, whichever link brings them.
#[derive(Clone, Default)]
pub struct Resuming {
    /// Whether the agent announces `resume`.
    pub enabled: bool,
    /// The held tunnels' acks, by tunnel id.
    pub acks: Arc<AckBoard>,
}

/// What a link's tunnels share: where its `credit` frames raise their limits, where
/// their acks go, and whether the link is still there.
pub struct LinkShare {
    /// Where the link's `credit` frames raise this tunnel's limit (PROTOCOL.md §2d).
    pub credit: Arc<Board>,
    /// The agent's acks waiting to go on the link's control stream (PROTOCOL.md §2e).
    pub acks: Arc<Acks>,
    /// Fires when the link has ended.
    pub lost: CancellationToken,
    /// Whether both ends announced `resume`: the relay may open resumable tunnels and
    /// resume them here.
    pub resume: bool,
}

/// Where the answer to a tunnel request goes.
pub enum Answer {
    /// A QUIC stream's sending half: the answer is a frame.
    Quic(quinn::SendStream),
    /// An HTTP/2 request's response.
    H2(h2::server::SendResponse<Bytes>),
}

impl Answer {
    /// Says `opened`; the stream's sending half follows.
    pub async fn opened(self) -> Option<LinkSend> {
        match self {
            Answer::Quic(mut send) => frame::write(&mut send, &OpenReply::Opened)
                .await
                .ok()
                .map(|()| LinkSend::Quic(send)),
            Answer::H2(mut respond) => respond
                .send_response(http::Response::new(()), false)
                .ok()
                .map(LinkSend::H2),
        }
    }

    /// Says `resumed` with the agent's offsets (PROTOCOL.md §2e); the stream's sending
    /// half follows.
    pub async fn resumed(self, (written, fin): (u64, bool)) -> Option<LinkSend> {
        match self {
            Answer::Quic(mut send) => frame::write(&mut send, &OpenReply::Resumed { written, fin })
                .await
                .ok()
                .map(|()| LinkSend::Quic(send)),
            Answer::H2(mut respond) => {
                let response = http::Response::builder()
                    .header(
                        link_h2::WRITTEN_HEADER,
                        link_h2::offsets_header(written, fin),
                    )
                    .body(())
                    .expect("a valid response");
                respond
                    .send_response(response, false)
                    .ok()
                    .map(LinkSend::H2)
            }
        }
    }

    /// Says `refused` (a 502, 403 or 410 with the message as body on HTTP/2).
    pub async fn refuse(self, code: RefuseCode, message: &str) {
        match self {
            Answer::Quic(mut send) => {
                let reply = OpenReply::Refused {
                    code,
                    message: message.to_owned(),
                };
                if frame::write(&mut send, &reply).await.is_ok() {
                    let _ = send.finish();
                }
            }
            Answer::H2(mut respond) => {
                let (status, name) = match code {
                    RefuseCode::Connect => (http::StatusCode::BAD_GATEWAY, "connect"),
                    RefuseCode::Forbidden => (http::StatusCode::FORBIDDEN, "forbidden"),
                    RefuseCode::Gone => (http::StatusCode::GONE, "gone"),
                };
                let response = http::Response::builder()
                    .status(status)
                    .header(link_h2::REFUSED_HEADER, name)
                    .header(http::header::CONTENT_TYPE, "text/plain")
                    .body(())
                    .expect("a valid response");
                if let Ok(mut body) = respond.send_response(response, false) {
                    let _ = body.send_data(Bytes::copy_from_slice(message.as_bytes()), true);
                }
            }
        }
    }
}

/// A tunnel request as its transport carries it.
pub enum TunnelStream {
    /// A QUIC stream; its first frame is `open`.
    Quic(quinn::SendStream, quinn::RecvStream),
    /// An HTTP/2 CONNECT request and where to answer it.
    H2(
        http::Request<h2::RecvStream>,
        h2::server::SendResponse<Bytes>,
    ),
}

/// What carries a link's tunnel requests, and what its tunnels share.
pub struct Requests(Carrier, Arc<LinkShare>);

enum Carrier {
    Quic {
        conn: quinn::Connection,
    },
    Tcp {
        incoming: mpsc::UnboundedReceiver<TunnelStream>,
        closer: CancellationToken,
        /// Dropping the link closes the connection, as dropping a QUIC connection does.
        _close_on_drop: tokio_util::sync::DropGuard,
        reason: Arc<OnceLock<String>>,
    },
}

/// A link that said hello and heard `welcome`.
pub struct AgentLink {
    /// Which transport.
    pub transport: Transport,
    /// The relay's id, from `welcome`.
    pub relay_id: String,
    /// What the relay announced it can do, from `welcome` (PROTOCOL.md §2, "Features").
    pub relay_features: Vec<String>,
    /// Tunnel requests from the relay.
    pub requests: Requests,
    /// Control messages from the relay (`drain`, `replaced`).
    pub control: mpsc::Receiver<RelayControl>,
}

/// What a QUIC link has received and sent, for telling a silent path from an idle one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent.
    pub sent: u64,
}

impl AgentLink {
    /// The link's datagram counts and smoothed RTT (QUIC only: the TLS/TCP link has the
    /// kernel's capped retransmission and the route watch instead).
    pub fn traffic(&self) -> Option<(Traffic, Duration)> {
        match &self.requests.0 {
            Carrier::Quic { conn } => {
                let stats = conn.stats();
                let traffic = Traffic {
                    received: stats.udp_rx.datagrams,
                    sent: stats.udp_tx.datagrams,
                };
                Some((traffic, conn.rtt()))
            }
            Carrier::Tcp { .. } => None,
        }
    }
}

impl AgentLink {
    /// Sends a one-byte QUIC DATAGRAM, which the relay acknowledges and ignores: whether
    /// the path still carries anything (PROTOCOL.md §2, "A silent link"). Nothing on TCP,
    /// or to a relay that takes no datagrams.
    pub fn poke(&self) {
        if let Carrier::Quic { conn } = &self.requests.0 {
            let _ = conn.send_datagram(Bytes::from_static(&[0]));
        }
    }
}

impl Requests {
    /// The next tunnel request; `Err` with why once the link has ended.
    pub async fn accept(&mut self) -> Result<TunnelRequest, String> {
        let stream = match &mut self.0 {
            Carrier::Quic { conn, .. } => conn
                .accept_bi()
                .await
                .map(|(s, r)| TunnelStream::Quic(s, r))
                .map_err(|e| e.to_string()),
            Carrier::Tcp {
                incoming, reason, ..
            } => match incoming.recv().await {
                Some(request) => Ok(request),
                None => Err(reason
                    .get()
                    .cloned()
                    .unwrap_or_else(|| "connection closed".into())),
            },
        }?;
        Ok(TunnelRequest {
            stream,
            link: self.1.clone(),
        })
    }

    /// Closes the link (the agent is stopping).
    pub fn close(&self) {
        match &self.0 {
            Carrier::Quic { conn, .. } => {
                conn.close(VarInt::from_u32(codes::OK), b"agent stopping")
            }
            Carrier::Tcp { closer, .. } => closer.cancel(),
        }
    }
}

/// Reads control frames (frame reads are not cancel-safe, so they run in their own task):
/// `credit` raises a tunnel's gate on `board` and `ack` a held tunnel's acks at once,
/// whatever the session's loop is doing; the rest go to the session through `tx`.
async fn read_control<R: AsyncRead + Unpin>(
    mut recv: R,
    tx: mpsc::Sender<RelayControl>,
    board: Arc<Board>,
    acks: Arc<AckBoard>,
) {
    while let Ok(Some(msg)) = frame::read::<_, RelayControl>(&mut recv, MAX_FRAME).await {
        match &msg {
            RelayControl::Credit { tunnel, limit } => board.raise(tunnel, *limit),
            RelayControl::Ack {
                tunnel,
                written,
                fin,
            } => acks.raise(tunnel, *written, *fin),
            _ => {
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes the agent's acks on its half of the control stream (PROTOCOL.md §2e) until the
/// link ends; the half stays open meanwhile (a close would read as a goodbye).
async fn write_acks<W: AsyncWrite + Unpin>(
    mut control: W,
    acks: Arc<Acks>,
    lost: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            () = acks.next(&mut batch) => {}
            () = lost.cancelled() => return,
        }
        for (tunnel, (written, fin)) in batch.drain(..) {
            let ack = AgentControl::Ack {
                tunnel: tunnel.to_string(),
                written,
                fin,
            };
            if frame::write(&mut control, &ack).await.is_err() {
                return;
            }
        }
        if control.flush().await.is_err() {
            return;
        }
    }
}

/// The hello for a link whose keep-alive is `keep_alive_ms`.
fn hello(config: &AgentConfig, held: &Resuming, keep_alive_ms: u64) -> Hello {
    let mut features = vec![features::CREDIT.to_owned()];
    if held.enabled {
        features.push(features::RESUME.to_owned());
    }
    Hello {
        version: VERSION,
        uuid: config.uuid.clone(),
        key: config.key.0.clone(),
        agent: AGENT_NAME.into(),
        ssh_login: config.advertised_login(),
        features,
        keep_alive_ms: Some(keep_alive_ms),
    }
}

/// What the tunnels of a link that said `welcome` with `relay_features` share.
fn share(held: &Resuming, relay_features: &[String]) -> Arc<LinkShare> {
    Arc::new(LinkShare {
        credit: Arc::default(),
        acks: Arc::default(),
        lost: CancellationToken::new(),
        resume: held.enabled && features::has(relay_features, features::RESUME),
    })
}

/// Reads the answer to a hello: `welcome` gives the relay's id and features.
async fn read_welcome<R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<(String, Vec<String>), Outcome> {
    match frame::read_required::<_, RelayControl>(recv, MAX_FRAME).await {
        // A malformed features list is ignored rather than trusted: the base protocol
        // still works.
        Ok(RelayControl::Welcome {
            relay, features, ..
        }) => Ok((
            relay,
            if crate::proto::messages::features::valid(&features) {
                features
            } else {
                Vec::new()
            },
        )),
        Ok(RelayControl::Reject { code, message }) => Err(Outcome::Rejected(code, message)),
        Ok(other) => Err(Outcome::Unreachable(format!(
            "unexpected {other:?} before welcome"
        ))),
        Err(e) => Err(Outcome::Unreachable(e.to_string())),
    }
}

fn unreachable(e: &dyn std::fmt::Display) -> Outcome {
    Outcome::Unreachable(e.to_string())
}

/// QUIC: the handshake must finish within `handshake` (the fallback timer in `auto`),
/// then hello and welcome on the first stream.
pub async fn dial_quic(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    config: &AgentConfig,
    held: &Resuming,
    addr: SocketAddr,
    server_name: &str,
    handshake: Duration,
) -> Result<AgentLink, Outcome> {
    let connecting = endpoint
        .connect_with(client.clone(), addr, server_name)
        .map_err(|e| unreachable(&e))?;
    let conn = match tokio::time::timeout(handshake, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(unreachable(&e)),
        Err(_) => {
            return Err(Outcome::Unreachable(format!(
                "no QUIC handshake with {addr} within {handshake:?}"
            )))
        }
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
    frame::write(&mut send, &hello(config, held, config.keep_alive_ms))
        .await
        .map_err(|e| unreachable(&e))?;
    let (relay_id, relay_features) = read_welcome(&mut recv).await.map_err(|e| match e {
        // A close reason says more than "connection lost" does.
        Outcome::Unreachable(e) => Outcome::Unreachable(match conn.close_reason() {
            Some(reason) => reason.to_string(),
            None => e,
        }),
        other => other,
    })?;
    let (tx, control) = mpsc::channel(4);
    let link = share(held, &relay_features);
    tokio::spawn(read_control(
        recv,
        tx,
        link.credit.clone(),
        held.acks.clone(),
    ));
    tokio::spawn(write_acks(send, link.acks.clone(), link.lost.clone()));
    {
        let (conn, lost) = (conn.clone(), link.lost.clone());
        tokio::spawn(async move {
            conn.closed().await;
            lost.cancel();
        });
    }
    tokio::spawn(watch_quic(
        conn.clone(),
        Duration::from_millis(config.idle_timeout_ms),
    ));
    Ok(AgentLink {
        transport: Transport::Quic,
        relay_id,
        relay_features,
        requests: Requests(Carrier::Quic { conn }, link),
        control,
    })
}

/// Connects to a relay's device TCP listener with the link's retransmission ceiling set
/// before the SYN (PROTOCOL.md §2b, "Blackouts"): a dial begun while the path was gone
/// sends its next SYN within a second of the path coming back, not seconds later on the
/// kernel's 1-3-7-15 s back-off.
pub async fn connect_tcp(addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    crate::sockinfo::cap_retransmit_timeout(&socket, crate::link::TCP_RTO_MAX);
    socket.connect(addr).await
}

/// TLS over TCP: the TCP connection (direct or through an HTTP proxy), TLS with ALPN
/// `cloudlink-tcp/1`, hello and welcome as frames, then HTTP/2 with the agent as server.
pub async fn dial_tcp(
    tcp: TcpStream,
    tls: &tokio_rustls::TlsConnector,
    config: &AgentConfig,
    held: &Resuming,
    server_name: &str,
) -> Result<AgentLink, Outcome> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| Outcome::Unreachable(format!("{server_name}: {e}")))?;
    let path = tcp.local_addr().ok().zip(tcp.peer_addr().ok());
    crate::link::tune_tcp(&tcp, Duration::from_millis(config.tcp_idle_timeout_ms));
    let mut stream = tls.connect(name, tcp).await.map_err(|e| unreachable(&e))?;
    frame::write(&mut stream, &hello(config, held, config.tcp_keep_alive_ms))
        .await
        .map_err(|e| unreachable(&e))?;
    stream.flush().await.map_err(|e| unreachable(&e))?;
    let (relay_id, relay_features) = read_welcome(&mut stream).await?;
    let heard = LastHeard::default();
    let mut connection = link_h2::server()
        .handshake::<_, Bytes>(Heard::new(stream, heard.clone()))
        .await
        .map_err(|e| unreachable(&e))?;
    let ping = connection.ping_pong();
    // Unbounded here, bounded by HTTP/2: at most MAX_STREAMS requests are open at once, so
    // a burst of tunnels waits in this queue instead of being refused.
    let (tunnels, incoming) = mpsc::unbounded_channel();
    let (control_tx, control) = mpsc::channel(4);
    let (control_open, control_opened) = tokio::sync::oneshot::channel();
    let closer = CancellationToken::new();
    let reason: Arc<OnceLock<String>> = Arc::default();
    let link = share(held, &relay_features);
    let keep_alive = Duration::from_millis(config.tcp_keep_alive_ms);
    let idle = Duration::from_millis(config.tcp_idle_timeout_ms);
    {
        let (closer, reason) = (closer.clone(), reason.clone());
        let (link, acks) = (link.clone(), held.acks.clone());
        tokio::spawn(async move {
            let alive = link_h2::keep_alive(ping, heard, Some(keep_alive), idle);
            let accepting = accept_loop(
                &mut connection,
                tunnels,
                control_tx,
                control_open,
                &link,
                acks,
            );
            // The device's address or route went away: this connection can reach nothing
            // any more, so it is given up now rather than at its idle timeout.
            let path_gone = async {
                match path {
                    Some((local, remote)) => super::path::gone(local, remote).await,
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                why = accepting => why,
                why = alive => why,
                why = path_gone => {
                    tracing::info!(why = %why, "the path of the TLS/TCP link is gone; dialing again");
                    why
                }
                _ = closer.cancelled() => {
                    // GOAWAY, flushed while the connection winds down (briefly).
                    connection.graceful_shutdown();
                    let wind_down = async { while connection.accept().await.is_some() {} };
                    let _ = tokio::time::timeout(Duration::from_secs(1), wind_down).await;
                    "closed by the agent".into()
                }
            };
            let _ = reason.set(why);
            link.lost.cancel();
        });
    }
    // A dial given up from here on (its timeout) closes the connection.
    let close_on_drop = closer.clone().drop_guard();
    // The relay opens the control stream once this session is registered: only then is
    // the device reachable, and only then does the agent count itself connected.
    if control_opened.await.is_err() {
        return Err(Outcome::Unreachable(reason.get().cloned().unwrap_or_else(
            || "the relay never opened the control stream".into(),
        )));
    }
    Ok(AgentLink {
        transport: Transport::Tcp,
        relay_id,
        relay_features,
        requests: Requests(
            Carrier::Tcp {
                incoming,
                closer,
                _close_on_drop: close_on_drop,
                reason,
            },
            link,
        ),
        control,
    })
}

/// Closes `conn` once nothing has arrived on it for `idle`.
///
/// QUIC's own idle timer restarts when the agent sends its keep-alive, so on its own it
/// notices a vanished relay only a keep-alive interval plus the idle timeout after the last
/// packet (25 s + 35 s at the defaults). Counting received datagrams makes it the idle
/// timeout since the last packet (35 s), as the relay sees a vanished agent. One check a
/// second is nothing on a device.
async fn watch_quic(conn: quinn::Connection, idle: Duration) {
    let every = (idle / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut last = conn.stats().udp_rx.datagrams;
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = conn.stats().udp_rx.datagrams;
        if now != last {
            last = now;
            heard = tokio::time::Instant::now();
        } else if heard.elapsed() >= idle {
            let why = format!("nothing heard from the relay for {} s", idle.as_secs());
            tracing::debug!("{why}; closing the QUIC link");
            conn.close(VarInt::from_u32(codes::IDLE), why.as_bytes());
            return;
        }
    }
}

type H2Server = h2::server::Connection<Heard<tokio_rustls::client::TlsStream<TcpStream>>, Bytes>;

/// Drives the HTTP/2 connection: the control stream's frames go to `control`, CONNECT
/// streams to `tunnels`; anything else is answered 404. Returns why the connection ended.
async fn accept_loop(
    conn: &mut H2Server,
    tunnels: mpsc::UnboundedSender<TunnelStream>,
    control: mpsc::Sender<RelayControl>,
    opened: tokio::sync::oneshot::Sender<()>,
    link: &LinkShare,
    acks: Arc<AckBoard>,
) -> String {
    let mut control = Some((control, opened));
    loop {
        let (request, mut respond) = match conn.accept().await {
            Some(Ok(pair)) => pair,
            Some(Err(e)) => return e.to_string(),
            None => return "the relay closed the connection".into(),
        };
        if request.method() == http::Method::CONNECT {
            // A closed queue: the agent is not taking tunnels (it is stopping).
            if let Err(mpsc::error::SendError(TunnelStream::H2(_, mut respond))) =
                tunnels.send(TunnelStream::H2(request, respond))
            {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        } else if request.method() == http::Method::POST
            && request.uri().path() == link_h2::CONTROL_PATH
        {
            let Some((tx, opened)) = control.take() else {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            };
            match respond.send_response(http::Response::new(()), false) {
                Ok(ours) => {
                    let _ = opened.send(());
                    let body = BodyReader::new(request.into_body());
                    // Our side stays open for the session's life, carrying only acks.
                    let ours = link_h2::BodyWriter::new(ours);
                    tokio::spawn(write_acks(ours, link.acks.clone(), link.lost.clone()));
                    tokio::spawn(read_control(body, tx, link.credit.clone(), acks.clone()));
                }
                Err(e) => return e.to_string(),
            }
        } else {
            let mut not_found = http::Response::new(());
            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
            let _ = respond.send_response(not_found, true);
        }
    }
}

//! A device that speaks raw QUIC to the relay, to test what a real agent never does.

use std::path::Path;
use std::sync::Arc;

use cloudlink::proto::frame;
use cloudlink::proto::messages::{Hello, RelayControl, VERSION};
use cloudlink::tls_client::{self, Trust};

/// Dials the relay's device listener; returns the connection (handshake done, no hello).
pub async fn dial(device: std::net::SocketAddr, cert: &Path) -> quinn::Connection {
    try_dial(device, cert)
        .await
        .expect("QUIC handshake with the relay")
}

/// Dials, returning how the handshake ended.
pub async fn try_dial(
    device: std::net::SocketAddr,
    cert: &Path,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    cloudlink::tls_client::install_crypto();
    let tls = tls_client::config(Trust::CaFile(cert), &[cloudlink::proto::ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint.connect(device, "localhost").unwrap().await
}

/// Dials and says hello; returns the connection, the control stream and the relay's answer.
pub async fn hello(
    device: std::net::SocketAddr,
    cert: &Path,
    uuid: &str,
    key: &str,
) -> (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    RelayControl,
) {
    let hello = Hello {
        version: VERSION,
        uuid: uuid.into(),
        key: key.into(),
        agent: "fake".into(),
        ssh_login: None,
        features: Vec::new(),
        keep_alive_ms: None,
    };
    hello_with(device, cert, &hello).await
}

/// Dials and sends `hello` as it is; returns like [`hello`].
pub async fn hello_with(
    device: std::net::SocketAddr,
    cert: &Path,
    hello: &Hello,
) -> (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    RelayControl,
) {
    let conn = dial(device, cert).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write(&mut send, hello).await.unwrap();
    let answer = frame::read_required(&mut recv, frame::MAX_FRAME)
        .await
        .expect("an answer to hello");
    (conn, send, recv, answer)
}

/// Serves the relay's tunnel streams on `conn` as an agent would (PROTOCOL.md §2): reads
/// `open`, connects to the local port, answers `opened`, copies both ways.
pub fn serve_tunnels(conn: quinn::Connection) {
    use cloudlink::proto::messages::{OpenReply, TunnelOpen};
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let open: TunnelOpen = frame::read_required(&mut recv, frame::MAX_FRAME)
                    .await
                    .unwrap();
                let local = tokio::net::TcpStream::connect(("127.0.0.1", open.port))
                    .await
                    .unwrap();
                frame::write(&mut send, &OpenReply::Opened).await.unwrap();
                let (mut r, mut w) = local.into_split();
                let up = async {
                    let _ = tokio::io::copy(&mut recv, &mut w).await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut r, &mut send).await;
                    let _ = send.finish();
                };
                tokio::join!(up, down);
            });
        }
    });
}

/// The application close code of a connection the relay closed.
pub async fn close_code(conn: &quinn::Connection) -> u64 {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other}"),
    }
}

/// A device on the TLS/TCP link, written from PROTOCOL.md §2b with the `h2` crate directly
/// (not the agent's code), so that the tests hold the relay to the written wire format.
pub mod tcp {
    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;
    use cloudlink::proto::frame;
    use cloudlink::proto::messages::{Hello, RelayControl, VERSION};
    use cloudlink::tls_client::{self, Trust};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;
    use tokio_rustls::client::TlsStream;

    /// TLS to the device TCP listener with ALPN `cloudlink-tcp/1`, nothing sent yet.
    pub async fn tls(addr: std::net::SocketAddr, cert: &Path) -> TlsStream<TcpStream> {
        cloudlink::tls_client::install_crypto();
        let config = tls_client::config(Trust::CaFile(cert), &[b"cloudlink-tcp/1"]).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.expect("TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"cloudlink-tcp/1"[..])
        );
        tls
    }

    /// A request the relay sent on the HTTP/2 connection.
    pub type Request = (
        http::Request<h2::RecvStream>,
        h2::server::SendResponse<Bytes>,
    );

    /// A fake device's session: control frames and tunnel requests as they arrive.
    pub struct Session {
        /// `welcome` or `reject`.
        pub answer: RelayControl,
        /// §2 frames from the control stream.
        pub control: mpsc::UnboundedReceiver<RelayControl>,
        /// CONNECT requests.
        pub tunnels: mpsc::UnboundedReceiver<Request>,
        /// Sending on it ends our side of the control stream (END_STREAM).
        pub end_control: Option<tokio::sync::oneshot::Sender<()>>,
        /// Fires when the relay has closed the connection.
        pub closed: tokio::sync::oneshot::Receiver<()>,
    }

    /// Says hello; after `welcome`, serves HTTP/2 as §2b says (in the background).
    pub async fn hello(addr: std::net::SocketAddr, cert: &Path, uuid: &str, key: &str) -> Session {
        let mut tls = tls(addr, cert).await;
        let hello = Hello {
            version: VERSION,
            uuid: uuid.into(),
            key: key.into(),
            agent: "fake-tcp".into(),
            ssh_login: None,
            features: Vec::new(),
            keep_alive_ms: None,
        };
        frame::write(&mut tls, &hello).await.unwrap();
        tls.flush().await.unwrap();
        let answer: RelayControl = frame::read_required(&mut tls, frame::MAX_FRAME)
            .await
            .expect("an answer to hello");
        let (control_tx, control) = mpsc::unbounded_channel();
        let (tunnel_tx, tunnels) = mpsc::unbounded_channel();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        let welcomed = matches!(answer, RelayControl::Welcome { .. });
        if welcomed {
            tokio::spawn(async move {
                let mut opened_tx = Some(opened_tx);
                let mut end_rx = Some(end_rx);
                let mut conn = h2::server::handshake(tls).await.expect("HTTP/2 preface");
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if req.method() == http::Method::POST
                        && req.uri().path() == "/cloudlink/control"
                    {
                        let send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        if let Some(opened) = opened_tx.take() {
                            let _ = opened.send(());
                        }
                        let tx = control_tx.clone();
                        let mut end = end_rx.take();
                        tokio::spawn(async move {
                            let mut send = send;
                            let mut body = req.into_body();
                            let mut buf = Vec::new();
                            loop {
                                let ending = async {
                                    match end.as_mut() {
                                        Some(end) => end.await.is_ok(),
                                        None => std::future::pending().await,
                                    }
                                };
                                let data = tokio::select! {
                                    data = body.data() => data,
                                    ended = ending => {
                                        end = None;
                                        if ended {
                                            let _ = send.send_data(bytes::Bytes::new(), true);
                                        }
                                        continue;
                                    }
                                };
                                let Some(Ok(data)) = data else { break };
                                let _ = body.flow_control().release_capacity(data.len());
                                buf.extend_from_slice(&data);
                                while buf.len() >= 4 {
                                    let len =
                                        u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                                    if buf.len() < 4 + len {
                                        break;
                                    }
                                    let msg = serde_json::from_slice(&buf[4..4 + len]).unwrap();
                                    buf.drain(..4 + len);
                                    let _ = tx.send(msg);
                                }
                            }
                        });
                    } else {
                        let _ = tunnel_tx.send((req, respond));
                    }
                }
                let _ = closed_tx.send(());
            });
        }
        if welcomed {
            // The device is reachable once the relay has opened the control stream.
            opened.await.expect("the relay opened the control stream");
        }
        Session {
            answer,
            control,
            tunnels,
            end_control: Some(end_tx),
            closed,
        }
    }
}

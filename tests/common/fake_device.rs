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

/// The application close code of a connection the relay closed.
pub async fn close_code(conn: &quinn::Connection) -> u64 {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other}"),
    }
}

//! A client of the browser terminal's WebSocket (PROTOCOL.md §5), as a browser uses it.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Long enough for a debug-build relay, sshd and a shell on two busy cores.
pub const WAIT: Duration = Duration::from_secs(30);

/// An open terminal WebSocket.
pub struct Term {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Terminal output so far, as text.
    pub output: String,
    /// Control messages so far.
    pub control: Vec<Value>,
    /// Whether the relay has closed.
    pub closed: bool,
}

/// The terminal URL of `uuid` on the plain API at `api`.
pub fn url(api: SocketAddr, uuid: &str, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("ws://{api}/v1/devices/{uuid}/terminal?service={s}"),
        None => format!("ws://{api}/v1/devices/{uuid}/terminal"),
    }
}

impl Term {
    /// Connects and sends the auth message (80 × 24).
    pub async fn open(api: SocketAddr, uuid: &str, service: Option<&str>, token: &str) -> Term {
        let mut term = Term::connect(&url(api, uuid, service)).await;
        term.send_json(json!({"type": "auth", "token": token, "cols": 80, "rows": 24}))
            .await;
        term
    }

    /// Connects without sending anything.
    pub async fn connect(url: &str) -> Term {
        let (ws, _) = tokio_tungstenite::connect_async(url.into_client_request().unwrap())
            .await
            .expect("WebSocket upgrade");
        Term {
            ws,
            output: String::new(),
            control: Vec::new(),
            closed: false,
        }
    }

    /// Sends a text (control) message.
    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// Sends terminal input.
    pub async fn type_in(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(text.as_bytes().to_vec().into()))
            .await
            .unwrap();
    }

    /// Reads until `done` holds (or the relay closes, or [`WAIT`] passes); returns whether
    /// it held.
    pub async fn until(&mut self, done: impl Fn(&Term) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            if self.closed {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => self.closed = true,
                Ok(Some(Ok(msg))) => match msg {
                    Message::Binary(b) => self.output.push_str(&String::from_utf8_lossy(&b)),
                    Message::Text(t) => self.control.push(serde_json::from_str(&t).unwrap()),
                    Message::Close(_) => self.closed = true,
                    _ => {}
                },
            }
        }
        true
    }

    /// Reads until the output contains `text`.
    pub async fn expect_output(&mut self, text: &str) {
        let found = self.until(|t| t.output.contains(text)).await;
        assert!(
            found,
            "no {text:?} in the terminal; output {:?}, control {:?}",
            self.output, self.control
        );
    }

    /// Reads until a control message of `kind` arrives; returns it.
    pub async fn expect_control(&mut self, kind: &str) -> Value {
        let found = self
            .until(|t| t.control.iter().any(|c| c["type"] == kind))
            .await;
        assert!(
            found,
            "no {kind:?} message; control {:?}, output {:?}",
            self.control, self.output
        );
        self.control
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
            .unwrap()
    }

    /// Reads until the relay closes the socket.
    pub async fn expect_closed(&mut self) {
        let closed = self.until(|t| t.closed).await;
        assert!(closed, "the relay did not close the terminal");
    }
}

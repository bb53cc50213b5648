//! Talking to a relay from a test: its HTTP API, and CONNECT by hand.

use super::*;

/// A plain HTTP client (installs the ring provider reqwest needs first).
pub fn http() -> reqwest::Client {
    cloudlink::tls_client::install_crypto();
    reqwest::Client::new()
}

/// A tiny API client.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr, token: &str) -> Api {
        Api {
            base: format!("http://{addr}"),
            token: token.to_owned(),
            http: http(),
        }
    }

    /// A client of the relay's HTTPS API, trusting the relay's dev certificate.
    pub fn tls(relay: &Relay, token: &str) -> Api {
        let addr = relay.api_tls.expect("HTTPS API bound");
        let http = cloudlink::tls_client::http_client(
            "https://",
            cloudlink::tls_client::Trust::CaFile(&relay.cert()),
            Duration::from_secs(30),
        )
        .unwrap();
        Api {
            base: format!("https://localhost:{}", addr.port()),
            token: token.to_owned(),
            http,
        }
    }

    pub fn as_user(&self, token: &str) -> Api {
        Api {
            token: token.to_owned(),
            ..self.clone()
        }
    }

    /// The device link `uuid` is on, as the API reports it (`"quic"`, `"tcp"`, or null
    /// when offline).
    pub async fn transport_of(&self, uuid: &str) -> serde_json::Value {
        let (status, d) = self.call("GET", &format!("/v1/devices/{uuid}"), None).await;
        assert_eq!(status, 200, "{d}");
        d["transport"].clone()
    }

    /// Creates `fleet` if needed and registers a device in it; returns (uuid, key).
    pub async fn register_device(&self, fleet: &str) -> (String, String) {
        // The fleet may exist already (409); the device registration below is what counts.
        let _ = self
            .call("POST", "/v1/fleets", Some(json!({ "name": fleet })))
            .await;
        let (status, d) = self
            .call(
                "POST",
                &format!("/v1/fleets/{fleet}/devices"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        (
            d["uuid"].as_str().unwrap().to_owned(),
            d["key"].as_str().unwrap().to_owned(),
        )
    }

    /// Makes `user` a member of `fleet`.
    pub async fn add_member(&self, fleet: &str, user: &str) {
        let (status, body) = self
            .call(
                "POST",
                &format!("/v1/fleets/{fleet}/members"),
                Some(json!({ "username": user, "role": "member" })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Sends a request; returns the status and the JSON body (or the text as a string).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }
}

/// Sends a CONNECT and returns the stream and the whole answer head (status line first).
pub async fn connect_raw(proxy: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// Reads an HTTP answer head byte by byte (so no tunnel byte is consumed).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The status code of an answer head.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Opens a tunnel with a Bearer token; panics unless the answer is 200.
pub async fn tunnel(proxy: SocketAddr, token: &str, uuid: &str, port: u16) -> TcpStream {
    let (s, head) = connect_raw(
        proxy,
        &format!(
            "CONNECT {uuid}.cloudlink:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status_of(&head), 200, "CONNECT answered: {head}");
    s
}

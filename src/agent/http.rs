//! One HTTP/1.1 GET to the relay's API, for `agent authorized-keys`: hyper's client
//! connection over TCP (through `HTTPS_PROXY` when the environment names one, as the TCP
//! device link does) and TLS with the agent's trust settings. The agent build needs no more
//! HTTP than this, and a full HTTP client stack would be most of its size.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::https_proxy::{self as proxy, ProxyEnv};
use crate::tls_client::{self, Trust};

/// The largest answer body read.
const MAX_BODY: usize = 1024 * 1024;

/// An answer: its status and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// Where an `http://` or `https://` URL points.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    tls: bool,
    /// The host, without IPv6 brackets.
    host: &'a str,
    /// `host:port` as the Host header and a CONNECT proxy want it.
    authority: String,
    /// Path and query, at least `/`.
    path: &'a str,
}

fn parse(url: &str) -> Result<Target<'_>, String> {
    let parts = crate::addr::url(url).ok_or_else(|| format!("{url:?} is not a URL"))?;
    let tls = match parts.scheme {
        "https" => true,
        "http" => false,
        _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
    };
    let port = match parts.port {
        Some(port) => port
            .parse::<u16>()
            .map_err(|_| format!("{url:?} has no valid port"))?,
        None if tls => 443,
        None => 80,
    };
    if parts.host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    Ok(Target {
        tls,
        host: parts.host,
        authority: crate::addr::join(parts.host, port),
        path: parts.path,
    })
}

/// `GET url` with `Authorization: Bearer token`, all of it within `timeout`.
pub async fn get(
    url: &str,
    token: &str,
    trust: Trust<'_>,
    timeout: Duration,
) -> Result<Answer, String> {
    tokio::time::timeout(timeout, exchange(url, token, trust, timeout))
        .await
        .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
}

async fn exchange(
    url: &str,
    token: &str,
    trust: Trust<'_>,
    timeout: Duration,
) -> Result<Answer, String> {
    let target = parse(url)?;
    let tcp = match ProxyEnv::from_env().for_host(target.host)? {
        Some(via) => proxy::connect(&via, &target.authority, timeout).await?,
        None => TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("cannot reach {}: {e}", target.authority))?,
    };
    let _ = tcp.set_nodelay(true);
    if target.tls {
        tls_client::install_crypto();
        let config = tls_client::config(trust, &[b"http/1.1"]).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(target.host.to_owned())
            .map_err(|_| format!("{} is not a valid TLS server name", target.host))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                format!(
                    "TLS with {} failed: {}",
                    target.authority,
                    tls_client::explain(&e)
                )
            })?;
        request(TokioIo::new(tls), &target, token).await
    } else {
        request(TokioIo::new(tcp), &target, token).await
    }
}

async fn request<T>(io: TokioIo<T>, target: &Target<'_>, token: &str) -> Result<Answer, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let broke = |e: hyper::Error| format!("the relay API at {} broke off: {e}", target.authority);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(broke)?;
    // The connection task ends with the exchange: this request is its only one.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(target.path)
        .header(http::header::HOST, &target.authority)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(
            http::header::USER_AGENT,
            concat!("cloudlink-agent/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender.send_request(request).await.map_err(broke)?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("the relay API at {} broke off: {e}", target.authority))?
        .to_bytes();
    let body = String::from_utf8(body.to_vec()).map_err(|_| {
        format!(
            "the relay API at {} answered with non-UTF-8",
            target.authority
        )
    })?;
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse("https://relay.example.com:8443/auth/v1/public-keys/root?all_members=true")
            .unwrap();
        assert_eq!(
            t,
            Target {
                tls: true,
                host: "relay.example.com",
                authority: "relay.example.com:8443".into(),
                path: "/auth/v1/public-keys/root?all_members=true",
            }
        );
        let t = parse("http://[::1]/x").unwrap();
        assert_eq!(
            (t.host, t.authority.as_str(), t.tls),
            ("::1", "[::1]:80", false)
        );
        assert_eq!(parse("https://h").unwrap().authority, "h:443");
        assert!(parse("ftp://h/").is_err());
        assert!(parse("relay:8443").is_err());
        assert!(parse("https://h:99999/").is_err());
        assert!(parse("https:///x").is_err());
    }
}

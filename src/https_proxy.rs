//! Outbound HTTP CONNECT proxies, for the agent's TLS/TCP device link and the CLI's
//! connections to a relay: `HTTPS_PROXY` / `https_proxy` and `NO_PROXY` / `no_proxy`, as
//! corporate networks require (curl's reading of them). QUIC never goes through a proxy.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most a proxy's answer head may be.
const HEAD_MAX: usize = 8 * 1024;

/// A proxy to reach a host through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `HOST:PORT` of the proxy.
    pub addr: String,
    /// `user:password` for Basic authentication, if the URL carried it.
    pub credentials: Option<String>,
}

/// Reads the proxy settings from the environment.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    https_proxy: Option<String>,
    no_proxy: Option<String>,
}

fn env_either(upper: &str, lower: &str) -> Option<String> {
    std::env::var(lower)
        .ok()
        .or_else(|| std::env::var(upper).ok())
        .filter(|v| !v.trim().is_empty())
}

impl ProxyEnv {
    /// `https_proxy` wins over `HTTPS_PROXY`, `no_proxy` over `NO_PROXY`, as in curl.
    pub fn from_env() -> ProxyEnv {
        ProxyEnv {
            https_proxy: env_either("HTTPS_PROXY", "https_proxy"),
            no_proxy: env_either("NO_PROXY", "no_proxy"),
        }
    }

    /// Settings given directly (tests).
    pub fn new(https_proxy: Option<&str>, no_proxy: Option<&str>) -> ProxyEnv {
        ProxyEnv {
            https_proxy: https_proxy.map(str::to_owned),
            no_proxy: no_proxy.map(str::to_owned),
        }
    }

    /// The proxy for `host`, or `None` to connect directly; an unusable proxy URL is an
    /// error rather than a silent direct connection.
    pub fn for_host(&self, host: &str) -> Result<Option<Proxy>, String> {
        let Some(url) = &self.https_proxy else {
            return Ok(None);
        };
        if self
            .no_proxy
            .as_deref()
            .is_some_and(|list| bypass(list, host))
        {
            return Ok(None);
        }
        parse_proxy(url).map(Some)
    }
}

/// Whether `NO_PROXY` (`*`, or comma-separated hosts, domains and IPs; `.example.com` and
/// `example.com` both cover subdomains) says to reach `host` directly.
fn bypass(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches("*.").trim_start_matches('.');
        let entry = entry
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if entry == "*" {
            return true;
        }
        // An entry with a port: match the host part only.
        let entry = match entry.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && !h.contains(':') => h.to_owned(),
            _ => entry,
        };
        !entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}")))
    })
}

/// `http://[user:pass@]host[:port][/]` (or without a scheme) → the proxy.
fn parse_proxy(url: &str) -> Result<Proxy, String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "HTTPS_PROXY {url:?}: only http:// proxies are supported, not {scheme}://"
            ))
        }
        None => url,
    };
    let rest = rest.split('/').next().unwrap_or("");
    let (credentials, hostport) = match rest.rsplit_once('@') {
        Some((user, hp)) => (Some(user.to_owned()), hp),
        None => (None, rest),
    };
    let addr = match hostport.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host.ends_with(':') && port.parse::<u16>().is_ok() =>
        {
            hostport.to_owned()
        }
        _ if !hostport.is_empty() => format!("{hostport}:1080"),
        _ => return Err(format!("HTTPS_PROXY {url:?} names no host")),
    };
    Ok(Proxy { addr, credentials })
}

/// Opens a TCP connection to `target` (`HOST:PORT`) through `proxy` with HTTP CONNECT.
pub async fn connect(proxy: &Proxy, target: &str, timeout: Duration) -> Result<TcpStream, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(&proxy.addr)
            .await
            .map_err(|e| format!("cannot reach the proxy {}: {e}", proxy.addr))?;
        let _ = stream.set_nodelay(true);
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(credentials) = &proxy.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            head.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("proxy {}: {e}", proxy.addr))?;
        // Read byte by byte up to the blank line: nothing after it belongs to the proxy
        // (the relay says nothing before our TLS ClientHello).
        let mut answer = Vec::with_capacity(256);
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= HEAD_MAX {
                return Err(format!("proxy {}: answer head too long", proxy.addr));
            }
            let byte = stream
                .read_u8()
                .await
                .map_err(|e| format!("proxy {} closed: {e}", proxy.addr))?;
            answer.push(byte);
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(_)) if response.code == Some(200) => Ok(stream),
            Ok(httparse::Status::Complete(_)) => Err(format!(
                "proxy {} refused CONNECT {target}: {} {}",
                proxy.addr,
                response.code.unwrap_or(0),
                crate::logsafe::Peer(response.reason.unwrap_or(""))
            )),
            _ => Err(format!("proxy {}: not an HTTP answer", proxy.addr)),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("proxy {}: no answer within {timeout:?}", proxy.addr))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = parse_proxy("http://alice:s3cret@proxy.corp:3128/").unwrap();
        assert_eq!(p.addr, "proxy.corp:3128");
        assert_eq!(p.credentials.as_deref(), Some("alice:s3cret"));
        assert_eq!(
            parse_proxy("proxy.corp:8080").unwrap().addr,
            "proxy.corp:8080"
        );
        assert_eq!(
            parse_proxy("http://proxy.corp").unwrap().addr,
            "proxy.corp:1080"
        );
        assert_eq!(parse_proxy("http://[::1]:3128").unwrap().addr, "[::1]:3128");
        assert!(parse_proxy("socks5://proxy:1080").is_err());
        assert!(parse_proxy("http://").is_err());
    }

    #[test]
    fn no_proxy_matches_hosts_domains_and_wildcards() {
        let env = ProxyEnv::new(
            Some("http://proxy:3128"),
            Some("localhost, .internal.example, example.org:443,10.1.2.3,[::1]"),
        );
        let direct = |h: &str| env.for_host(h).unwrap().is_none();
        assert!(direct("localhost"));
        assert!(direct("relay.internal.example"));
        assert!(direct("internal.example"));
        assert!(direct("relay.example.org"));
        assert!(direct("10.1.2.3"));
        assert!(direct("::1"));
        assert!(!direct("relay.example.com"));
        assert!(!direct("notinternal.example"));
        assert!(!direct("10.1.2.30"));
        assert!(ProxyEnv::new(Some("http://p:1"), Some("*"))
            .for_host("x")
            .unwrap()
            .is_none());
        assert!(ProxyEnv::new(None, None).for_host("x").unwrap().is_none());
    }
}

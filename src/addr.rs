//! The addresses people and config files write: `HOST:PORT`, `[V6]:PORT` and
//! `scheme://HOST[:PORT][/path]` URLs. One reading of them for the agent, the CLI and the
//! healthcheck (the relay's own listeners take socket addresses instead).

/// `HOST[:PORT]` or `[V6][:PORT]`, split: the host without brackets, and the port's text
/// if there is one. A bare IPv6 address (colons, no brackets) is all host.
pub fn split(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => (rest, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// The host of `HOST:PORT`, without IPv6 brackets.
pub fn host(authority: &str) -> &str {
    split(authority).0
}

/// `HOST:PORT`, with brackets around an IPv6 host.
pub fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A URL's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Url<'a> {
    /// Before `://`.
    pub scheme: &'a str,
    /// The host, without IPv6 brackets.
    pub host: &'a str,
    /// The port's text, if the URL gives one.
    pub port: Option<&'a str>,
    /// Path and query, at least `/`.
    pub path: &'a str,
}

/// Splits `scheme://authority/path`; `None` without `://`.
pub fn url(text: &str) -> Option<Url<'_>> {
    let (scheme, rest) = text.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = split(authority);
    Some(Url {
        scheme,
        host,
        port,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            split("relay.example.com:3128"),
            ("relay.example.com", Some("3128"))
        );
        assert_eq!(split("relay.example.com"), ("relay.example.com", None));
        assert_eq!(split("[::1]:3129"), ("::1", Some("3129")));
        assert_eq!(split("[::1]"), ("::1", None));
        assert_eq!(split("::1"), ("::1", None));
        assert_eq!(split("[::1"), ("::1", None));
        assert_eq!(host("127.0.0.1:4433"), "127.0.0.1");
        assert_eq!(join("::1", 3128), "[::1]:3128");
        assert_eq!(join("relay", 3128), "relay:3128");
    }

    #[test]
    fn urls() {
        assert_eq!(
            url("https://[::1]:8443/readyz?x=1"),
            Some(Url {
                scheme: "https",
                host: "::1",
                port: Some("8443"),
                path: "/readyz?x=1",
            })
        );
        assert_eq!(
            url("http://relay.example.com"),
            Some(Url {
                scheme: "http",
                host: "relay.example.com",
                port: None,
                path: "/",
            })
        );
        assert_eq!(url("relay.example.com:8443"), None);
    }
}

//! The user side: HTTP/1.x CONNECT heads (PROTOCOL.md §1), parsed and answered.

use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A parsed CONNECT request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHead {
    /// `HTTP/1.0` or `HTTP/1.1`, echoed in the answer.
    pub version: &'static str,
    /// The method (only `CONNECT` is served).
    pub method: String,
    /// The request target, e.g. `7a3c….balena:22222`.
    pub target: String,
    /// The token from `Proxy-Authorization` (Basic password or Bearer), if any.
    pub token: Option<String>,
    /// A `Cloudlink-Resume` header's value (a peer CONNECT, PROTOCOL.md §2e), if any;
    /// users' requests' are ignored.
    pub resume: Option<String>,
}

/// Why a head could not be read or parsed; each maps to one status (or to silence).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    /// Not a parseable HTTP/1.x request.
    #[error("{0}")]
    BadRequest(&'static str),
    /// A well-formed request whose method is not exactly `CONNECT`; carries the version
    /// to answer in.
    #[error("only CONNECT is served")]
    MethodNotAllowed(&'static str),
    /// The head grew past the size limit.
    #[error("request head too large")]
    TooLarge,
    /// The head did not arrive within the timeout.
    #[error("request head timed out")]
    Timeout,
    /// The client closed (or failed) before sending a whole head; nothing to answer.
    #[error("client went away before sending a request")]
    Closed,
}

/// The end of the head (index just past the blank line), if the buffer holds one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// Reads a head of at most `max` bytes within `timeout`; returns it and whatever the client
/// sent after it (pipelined tunnel bytes, which belong to the tunnel).
pub async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    timeout: Duration,
) -> Result<(ConnectHeadBytes, BytesMut), HeadError> {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if let Some(end) = head_end(&buf) {
                let head = buf.split_to(end);
                return Ok((ConnectHeadBytes(head), buf));
            }
            if buf.len() > max {
                return Err(HeadError::TooLarge);
            }
            // Reads of at most 1 KiB past the limit: the limit bounds our memory.
            buf.reserve(1024);
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => {
            let (head, rest) = result?;
            if head.0.len() > max {
                return Err(HeadError::TooLarge);
            }
            Ok((head, rest))
        }
        Err(_) => Err(HeadError::Timeout),
    }
}

/// The raw bytes of a request head, up to and including the blank line.
#[derive(Debug)]
pub struct ConnectHeadBytes(pub BytesMut);

/// How many header lines a CONNECT head may carry; real clients send two or three.
const MAX_HEADERS: usize = 64;

/// Parses a request head strictly (PROTOCOL.md §1): an HTTP/1.0 or 1.1 request line whose
/// method is exactly `CONNECT` (anything else is [`HeadError::MethodNotAllowed`], 405), at
/// most one `Proxy-Authorization` header (two are ambiguous: 400), and well-formed header
/// lines. `Host` and every other header are ignored.
pub fn parse_head(raw: &[u8]) -> Result<ConnectHead, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::BadRequest("incomplete request")),
        Err(httparse::Error::Version) => {
            return Err(HeadError::BadRequest("unsupported HTTP version"))
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::BadRequest("malformed request")),
    }
    let version = match request.version {
        Some(0) => "HTTP/1.0",
        Some(1) => "HTTP/1.1",
        _ => return Err(HeadError::BadRequest("unsupported HTTP version")),
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(HeadError::BadRequest("malformed request line"));
    };
    // Exactly `CONNECT`: methods are case-sensitive (RFC 9110 §9.1).
    if method != "CONNECT" {
        return Err(HeadError::MethodNotAllowed(version));
    }
    let mut auth = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authorization"));
    let token = match (auth.next(), auth.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(HeadError::BadRequest(
                "more than one Proxy-Authorization header",
            ))
        }
        (Some(h), None) => {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| HeadError::BadRequest("Proxy-Authorization is not text"))?;
            credentials(value.trim())
        }
    };
    let resume = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(RESUME_HEADER))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|v| v.trim().to_owned());
    Ok(ConnectHead {
        version,
        method: method.to_owned(),
        target: target.to_owned(),
        token,
        resume,
    })
}

/// The peer CONNECT header that asks for a resumable tunnel (PROTOCOL.md §2e, "Through
/// another relay"), and the owner's answer header that says it is one.
pub const RESUME_HEADER: &str = "Cloudlink-Resume";

/// The owner's answer header with the agent's offsets after a resume.
pub const WRITTEN_HEADER: &str = "Cloudlink-Written";

/// What a peer CONNECT's `Cloudlink-Resume` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerResume {
    /// A first open, with the entry's credit limit for the device's direction.
    New {
        /// The credit limit (PROTOCOL.md §2d).
        credit: u64,
    },
    /// A resume of tunnel `tunnel`: the entry has written `written` bytes of the device's
    /// direction to the user (and passed its FIN on, with `fin`).
    Resume {
        /// The tunnel id.
        tunnel: String,
        /// The entry's offset of the device's direction.
        written: u64,
        /// Whether the entry passed the device's FIN on.
        fin: bool,
        /// The credit limit.
        credit: u64,
    },
}

impl PeerResume {
    /// The header's value.
    pub fn to_value(&self) -> String {
        match self {
            PeerResume::New { credit } => format!("new; credit={credit}"),
            PeerResume::Resume {
                tunnel,
                written,
                fin,
                credit,
            } => {
                let fin = if *fin { "; fin" } else { "" };
                format!("{tunnel}; written={written}; credit={credit}{fin}")
            }
        }
    }

    /// Parses the header's value; `None` for anything malformed.
    pub fn parse(value: &str) -> Option<PeerResume> {
        let mut parts = value.split(';').map(str::trim);
        let what = parts.next()?;
        let (mut written, mut credit, mut fin) = (None, None, false);
        for part in parts {
            match part.split_once('=') {
                Some(("written", n)) => written = Some(n.parse().ok()?),
                Some(("credit", n)) => credit = Some(n.parse().ok()?),
                None if part == "fin" => fin = true,
                _ => return None,
            }
        }
        let credit = credit?;
        match what {
            "new" if written.is_none() && !fin => Some(PeerResume::New { credit }),
            id if !id.is_empty() && id.len() <= 64 && id != "new" => Some(PeerResume::Resume {
                tunnel: id.to_owned(),
                written: written?,
                fin,
                credit,
            }),
            _ => None,
        }
    }
}

/// A `Cloudlink-Written` value: the agent's offset and whether it passed the user's FIN on.
pub fn written_value((written, fin): (u64, bool)) -> String {
    if fin {
        format!("{written}; fin")
    } else {
        written.to_string()
    }
}

/// Parses a `Cloudlink-Written` value.
pub fn parse_written(value: &str) -> Option<(u64, bool)> {
    let mut parts = value.split(';').map(str::trim);
    let written = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next()) {
        (None, _) => Some((written, false)),
        (Some("fin"), None) => Some((written, true)),
        _ => None,
    }
}

/// The token in a `Proxy-Authorization` value: Basic's password (the username is ignored)
/// or Bearer's token.
fn credentials(value: &str) -> Option<String> {
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_, password) = decoded.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// Why a CONNECT target is not a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// Not `<uuid>[.<domain>][:<port>]` with a known domain.
    #[error("the target must be <device uuid>[.<domain>]:<port>")]
    NotADevice,
    /// Port 0, above 65535, or not a number.
    #[error("the port must be between 1 and 65535")]
    BadPort,
}

/// Splits a target into a lowercase device uuid and a port (80 when absent).
pub fn parse_target(target: &str, domains: &[String]) -> Result<(String, u16), TargetError> {
    let (host, port) = match target.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(port)?),
        None => (target, 80),
    };
    let uuid = match host.split_once('.') {
        None => host,
        Some((uuid, domain)) => {
            if !domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
                return Err(TargetError::NotADevice);
            }
            uuid
        }
    };
    let uuid = super::device_uuid(uuid).ok_or(TargetError::NotADevice)?;
    Ok((uuid, port))
}

/// A port in plain decimal, 1 to 65535: digits only, no sign, no leading zero, no spaces
/// (`str::parse` would take `+22`).
pub fn parse_port(s: &str) -> Result<u16, TargetError> {
    let plain = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && !s.starts_with('0');
    if !plain {
        return Err(TargetError::BadPort);
    }
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(TargetError::BadPort),
    }
}

/// `HTTP/1.x 200 Connection Established` and the blank line, alone.
pub fn established(version: &str) -> Vec<u8> {
    format!("{version} 200 Connection Established\r\n\r\n").into_bytes()
}

/// An error answer: status line, a one-sentence `text/plain` body, then the connection closes.
pub fn error_response(
    version: &str,
    status: u16,
    reason: &str,
    message: &str,
    extra_headers: &[(&str, String)],
) -> Vec<u8> {
    let body = format!("{message}\n");
    let mut out = format!(
        "{version} {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        ["balena", "cloudlink", "resin", "vpn"]
            .map(String::from)
            .to_vec()
    }

    const UUID: &str = "7a3c9e0f2b5d41c8a6e4f1b2c3d4e5f6";

    #[test]
    fn the_peer_resume_headers_round_trip_and_refuse_the_malformed() {
        let asks = [
            PeerResume::New { credit: 65536 },
            PeerResume::Resume {
                tunnel: UUID.into(),
                written: 12,
                fin: true,
                credit: 99,
            },
            PeerResume::Resume {
                tunnel: UUID.into(),
                written: 0,
                fin: false,
                credit: 1,
            },
        ];
        for ask in asks {
            assert_eq!(PeerResume::parse(&ask.to_value()), Some(ask));
        }
        for bad in [
            "",
            "new",
            "new; written=1; credit=2",
            "new; credit=x",
            "abc; credit=1",
            "abc; written=1",
            "abc; written=1; credit=2; fin=1",
            "abc; written=-1; credit=2",
            "; written=1; credit=2",
        ] {
            assert_eq!(PeerResume::parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse_written(&written_value((7, true))), Some((7, true)));
        assert_eq!(parse_written(&written_value((7, false))), Some((7, false)));
        for bad in ["", "x", "1; fin; fin", "1; end"] {
            assert_eq!(parse_written(bad), None, "{bad:?}");
        }
        let head = parse_head(b"CONNECT a:1 HTTP/1.1\r\ncloudlink-resume:  new; credit=5 \r\n\r\n")
            .unwrap();
        assert_eq!(head.resume.as_deref(), Some("new; credit=5"));
    }

    #[test]
    fn parses_the_balena_cli_request_byte_for_byte() {
        let token = base64::engine::general_purpose::STANDARD.encode("someone:clk_secret");
        let raw = format!(
            "CONNECT {UUID}.balena:22222 HTTP/1.0\r\nProxy-Authorization: Basic {token}\r\n\r\n"
        );
        let head = parse_head(raw.as_bytes()).unwrap();
        assert_eq!(head.version, "HTTP/1.0");
        assert_eq!(head.method, "CONNECT");
        assert_eq!(head.token.as_deref(), Some("clk_secret"));
        assert_eq!(
            parse_target(&head.target, &domains()).unwrap(),
            (UUID.to_owned(), 22222)
        );
    }

    #[test]
    fn bearer_host_and_other_headers() {
        let raw = format!(
            "CONNECT {UUID}:80 HTTP/1.1\r\nHost: {UUID}:80\r\nUser-Agent: curl\r\n\
             proxy-authorization: Bearer eyJ.x.y\r\n\r\n"
        );
        let head = parse_head(raw.as_bytes()).unwrap();
        assert_eq!(head.version, "HTTP/1.1");
        assert_eq!(head.token.as_deref(), Some("eyJ.x.y"));
        let raw = format!("CONNECT {UUID}:80 HTTP/1.1\r\n\r\n");
        assert_eq!(parse_head(raw.as_bytes()).unwrap().token, None);
    }

    #[test]
    fn targets() {
        let d = domains();
        let upper = UUID.to_uppercase();
        assert_eq!(parse_target(&upper, &d).unwrap(), (UUID.to_owned(), 80));
        assert_eq!(
            parse_target(&format!("{UUID}.resin:1"), &d).unwrap(),
            (UUID.to_owned(), 1)
        );
        assert_eq!(
            parse_target(&format!("{UUID}:0"), &d),
            Err(TargetError::BadPort)
        );
        assert_eq!(
            parse_target(&format!("{UUID}:65536"), &d),
            Err(TargetError::BadPort)
        );
        assert_eq!(
            parse_target(&format!("{UUID}:x"), &d),
            Err(TargetError::BadPort)
        );
        assert_eq!(
            parse_target(&format!("{}:22", &UUID[..7]), &d),
            Err(TargetError::NotADevice),
            "short prefixes are not accepted"
        );
        assert_eq!(
            parse_target(&format!("{UUID}.example.com:22"), &d),
            Err(TargetError::NotADevice)
        );
        assert_eq!(
            parse_target("example.com:443", &d),
            Err(TargetError::NotADevice)
        );
    }

    #[test]
    fn malformed_heads() {
        for raw in [
            "\r\n\r\n",
            "CONNECT\r\n\r\n",
            "CONNECT a b c d\r\n\r\n",
            "CONNECT x:1 HTTP/2\r\n\r\n",
            "CONNECT x:1 HTTP/1.1\r\nno colon here\r\n\r\n",
            "CONNECT x:1 HTTP/1.1\r\nBad Name: v\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(raw.as_bytes()), Err(HeadError::BadRequest(_))),
                "{raw:?}"
            );
        }
        assert!(parse_head(b"\xff\xfe\r\n\r\n").is_err());
    }

    #[test]
    fn only_exactly_connect_is_served() {
        for method in ["connect", "Connect", "GET", "POST", "CONNECTX"] {
            let raw = format!("{method} {UUID}:22 HTTP/1.0\r\n\r\n");
            assert_eq!(
                parse_head(raw.as_bytes()),
                Err(HeadError::MethodNotAllowed("HTTP/1.0")),
                "{method}"
            );
        }
    }

    #[test]
    fn two_proxy_authorization_headers_are_refused() {
        let raw = format!(
            "CONNECT {UUID}:22 HTTP/1.1\r\nProxy-Authorization: Bearer a\r\n\
             proxy-authorization: Bearer b\r\n\r\n"
        );
        assert!(matches!(
            parse_head(raw.as_bytes()),
            Err(HeadError::BadRequest(_))
        ));
    }

    #[test]
    fn ports_are_plain_decimal() {
        let d = domains();
        for bad in [
            "+22", "-22", "022", " 22", "22 ", "0x16", "", "99999", "2_2", "١٢",
        ] {
            assert_eq!(
                parse_target(&format!("{UUID}.balena:{bad}"), &d),
                Err(TargetError::BadPort),
                "{bad:?}"
            );
        }
        assert_eq!(parse_port("65535"), Ok(65535));
        assert_eq!(parse_port("1"), Ok(1));
    }

    /// A seeded mutational fuzz of the head parser and target parser: random edits of real
    /// heads, and random bytes, must never panic, and whatever parses must be well-formed.
    /// `CLOUDLINK_FUZZ_ITERS` raises the count for a longer run.
    #[test]
    fn fuzz_connect_heads() {
        let token = base64::engine::general_purpose::STANDARD.encode("u:clk_x");
        let seeds = [
            format!("CONNECT {UUID}.balena:22222 HTTP/1.0\r\nProxy-Authorization: Basic {token}\r\n\r\n"),
            format!("CONNECT {UUID}:80 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer t\r\n\r\n"),
            "GET / HTTP/1.1\r\n\r\n".to_owned(),
        ];
        let mut rng = crate::proto::fuzz::Rng::new(0x5eed_c0de);
        for i in 0..crate::proto::fuzz::iterations() {
            let input = if i % 10 == 0 {
                {
                    let len = rng.below(300);
                    rng.bytes(len)
                }
            } else {
                rng.mutate(seeds[i % seeds.len()].as_bytes())
            };
            if let Ok(head) = parse_head(&input) {
                assert_eq!(head.method, "CONNECT");
                assert!(head.version == "HTTP/1.0" || head.version == "HTTP/1.1");
                if let Ok((uuid, port)) = parse_target(&head.target, &domains()) {
                    assert!(port >= 1);
                    assert_eq!(crate::proto::device_uuid(&uuid).as_deref(), Some(&*uuid));
                }
            }
            let _ = head_end(&input);
        }
    }

    #[tokio::test]
    async fn reads_head_and_keeps_pipelined_bytes() {
        let raw = format!("CONNECT {UUID}:22 HTTP/1.1\r\n\r\nSSH-2.0-client\r\n");
        let (head, rest) = read_head(&mut raw.as_bytes(), 8192, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(head.0.ends_with(b"\r\n\r\n"));
        assert_eq!(&rest[..], b"SSH-2.0-client\r\n");
    }

    #[tokio::test]
    async fn head_limits() {
        let big = format!(
            "CONNECT {UUID}:22 HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(9000)
        );
        let err = read_head(&mut big.as_bytes(), 8192, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err, HeadError::TooLarge);
        let err = read_head(&mut &b"CONNECT"[..], 8192, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err, HeadError::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn head_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reading = read_head(&mut server, 8192, Duration::from_secs(10));
        let keep = tokio::io::AsyncWriteExt::write_all(&mut client, b"CONN");
        let (result, _) = tokio::join!(reading, keep);
        assert_eq!(result.unwrap_err(), HeadError::Timeout);
    }

    #[test]
    fn responses() {
        assert_eq!(
            established("HTTP/1.0"),
            b"HTTP/1.0 200 Connection Established\r\n\r\n"
        );
        let r = String::from_utf8(error_response(
            "HTTP/1.1",
            407,
            "Proxy Authentication Required",
            "Credentials are required.",
            &[("Proxy-Authenticate", "Basic realm=\"cloudlink\"".into())],
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"));
        assert!(r.contains("Proxy-Authenticate: Basic realm=\"cloudlink\"\r\n"));
        assert!(r.ends_with("\r\n\r\nCredentials are required.\n"));
    }
}

//! Why a CONNECT was refused, which side caused it, and the answer it gets.

use crate::proto::connect;

/// The side whose doing a refusal is: it picks the status class and labels the metric, so
/// an operator can tell "users are sending junk" from "devices are down" from "we are
/// broken" at a glance (as pingora does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The person or program that sent the CONNECT.
    User,
    /// The device (its agent, or the service on it).
    Device,
    /// This relay or its store.
    Relay,
    /// The relay of the cluster that holds the device, which refused for its own reasons.
    Peer,
}

impl Side {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::User => "user",
            Side::Device => "device",
            Side::Relay => "relay",
            Side::Peer => "peer",
        }
    }
}

/// Why a CONNECT was refused; each variant names the side that caused it, which picks the
/// status and labels the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// User: unparseable request, bad target or port.
    BadRequest(String),
    /// User: a method other than exactly CONNECT.
    MethodNotAllowed,
    /// User: no credentials, or ones that prove nobody.
    AuthRequired,
    /// User: authenticated, but no such device, not theirs, or a closed port.
    Forbidden,
    /// User: the head did not arrive in time.
    HeadTimeout,
    /// User: too many tunnels, connections or failed attempts; retry after this many
    /// seconds.
    TooMany(u64, &'static str),
    /// User: head over the size limit.
    HeadTooLarge,
    /// Device: refused the port (nothing listening, or its allowlist).
    DeviceRefused(String),
    /// Device: not connected to this relay.
    DeviceOffline,
    /// Device: did not answer the stream in time.
    DeviceTimeout,
    /// Device: a resume over the peer hop for a tunnel the agent no longer holds
    /// (PROTOCOL.md §2e).
    Gone,
    /// Relay: the store cannot answer.
    StoreUnavailable,
    /// Relay: its tunnel buffer limit cannot cover a tunnel to an agent without credit
    /// (PROTOCOL.md §2d).
    RelayBusy,
    /// Peer: the relay that holds the device refused; its whole answer (head and one-line
    /// body) reaches the user unchanged but for the HTTP version.
    Owner {
        /// Its status.
        status: u16,
        /// Its answer as it came.
        answer: Vec<u8>,
    },
}

impl Refusal {
    /// Status, reason phrase, and the side that caused it.
    pub fn status(&self) -> (u16, &'static str, Side) {
        match self {
            Refusal::BadRequest(_) => (400, "Bad Request", Side::User),
            Refusal::MethodNotAllowed => (405, "Method Not Allowed", Side::User),
            Refusal::AuthRequired => (407, "Proxy Authentication Required", Side::User),
            Refusal::Forbidden => (403, "Forbidden", Side::User),
            Refusal::HeadTimeout => (408, "Request Timeout", Side::User),
            Refusal::TooMany(..) => (429, "Too Many Requests", Side::User),
            Refusal::HeadTooLarge => (431, "Request Header Fields Too Large", Side::User),
            Refusal::DeviceRefused(_) => (502, "Bad Gateway", Side::Device),
            Refusal::DeviceOffline => (503, "Service Unavailable", Side::Device),
            Refusal::DeviceTimeout => (504, "Gateway Timeout", Side::Device),
            Refusal::Gone => (410, "Gone", Side::Device),
            Refusal::StoreUnavailable => (503, "Service Unavailable", Side::Relay),
            Refusal::RelayBusy => (503, "Service Unavailable", Side::Relay),
            Refusal::Owner { status, .. } => (*status, "", Side::Peer),
        }
    }

    /// The one sentence of the answer's body.
    pub fn message(&self) -> String {
        match self {
            Refusal::BadRequest(why) => format!("Bad request: {why}."),
            Refusal::MethodNotAllowed => "Only CONNECT is served here.".into(),
            Refusal::AuthRequired => {
                "A valid API key or token is required in Proxy-Authorization.".into()
            }
            Refusal::Forbidden => "You may not reach that device on that port.".into(),
            Refusal::HeadTimeout => "The request did not arrive in time.".into(),
            Refusal::TooMany(_, what) => format!("Too many {what}; try again later."),
            Refusal::HeadTooLarge => "The request head is too large.".into(),
            Refusal::DeviceRefused(why) => format!("The device refused the connection: {why}."),
            Refusal::DeviceOffline => "The device is not connected.".into(),
            Refusal::DeviceTimeout => "The device did not answer in time.".into(),
            Refusal::Gone => "The device no longer holds that tunnel.".into(),
            Refusal::StoreUnavailable => {
                "The relay cannot check credentials right now; try again shortly.".into()
            }
            Refusal::RelayBusy => {
                "The relay is at its limit of buffered tunnel bytes; try again shortly.".into()
            }
            Refusal::Owner { answer, .. } => {
                let body = answer
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(&answer[..0], |at| &answer[at + 4..]);
                String::from_utf8_lossy(body).trim().to_owned()
            }
        }
    }

    /// The whole answer.
    pub fn response(&self, version: &str) -> Vec<u8> {
        if let Refusal::Owner { answer, .. } = self {
            return with_version(answer, version);
        }
        let (status, reason, _) = self.status();
        let mut headers = Vec::new();
        match self {
            Refusal::AuthRequired => {
                headers.push(("Proxy-Authenticate", "Basic realm=\"cloudlink\"".to_owned()))
            }
            Refusal::TooMany(secs, _) => headers.push(("Retry-After", secs.to_string())),
            Refusal::MethodNotAllowed => headers.push(("Allow", "CONNECT".to_owned())),
            _ => {}
        }
        connect::error_response(version, status, reason, &self.message(), &headers)
    }
}

/// An answer with its status line in the user's HTTP version.
fn with_version(answer: &[u8], version: &str) -> Vec<u8> {
    match answer.iter().position(|b| *b == b' ') {
        Some(space) if answer.starts_with(b"HTTP/1.") => {
            let mut out = version.as_bytes().to_vec();
            out.extend_from_slice(&answer[space..]);
            out
        }
        _ => answer.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_their_status_in_the_users_version() {
        let owner = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nno\n";
        assert_eq!(
            with_version(owner, "HTTP/1.0"),
            b"HTTP/1.0 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nno\n"
        );
        assert_eq!(with_version(b"junk", "HTTP/1.0"), b"junk");
    }

    #[test]
    fn an_owner_s_answer_keeps_its_status_in_the_user_s_version() {
        let answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nNope.".to_vec();
        let refusal = Refusal::Owner {
            status: 403,
            answer,
        };
        assert_eq!(
            refusal.response("HTTP/1.0"),
            b"HTTP/1.0 403 Forbidden\r\nContent-Length: 5\r\n\r\nNope.".to_vec()
        );
        assert_eq!(refusal.message(), "Nope.");
        assert_eq!(refusal.status().0, 403);
        assert_eq!(refusal.status().2.as_str(), "peer");
        let odd = Refusal::Owner {
            status: 502,
            answer: b"garbage".to_vec(),
        };
        assert_eq!(odd.response("HTTP/1.0"), b"garbage".to_vec());
        assert_eq!(odd.message(), "");
    }
}

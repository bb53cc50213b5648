//! The JSON messages of the device link (PROTOCOL.md §2), named by direction.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Agent → relay, first frame on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "hello")]
pub struct Hello {
    /// Protocol version.
    pub version: u32,
    /// Device uuid.
    pub uuid: String,
    /// Device key.
    pub key: String,
    /// Agent name and version, for logs.
    #[serde(default)]
    pub agent: String,
    /// The account the device's sshd logs users in as (`root` with root logins on);
    /// absent: each user's own cloud username (PROTOCOL.md §4, §5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_login: Option<String>,
    /// What this agent can do beyond the base protocol ([`features`]); absent from an
    /// older agent, which a relay then treats exactly as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The longest the agent stays silent on this link, milliseconds (its keep-alive on
    /// the transport in use): the relay reports a device it has not heard from for this
    /// long plus a few seconds as `reconnecting` (PROTOCOL.md §2e, "Presence"). Absent
    /// from an older agent: the relay's idle timeout alone decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<u64>,
}

/// The abilities either side may announce (PROTOCOL.md §2, "Features"). A side acts on a
/// feature only when the other side announced it; unknown names are ignored, so that a
/// newer peer may announce more.
pub mod features {
    /// Relay: it answers UDP probes on its QUIC port (PROTOCOL.md §2c).
    pub const UDP_PROBE: &str = "udp-probe";
    /// Agent: it obeys the relay's tunnel credit (PROTOCOL.md §2d).
    pub const CREDIT: &str = "credit";
    /// Agent and relay: tunnels outlive the loss of their link (PROTOCOL.md §2e).
    pub const RESUME: &str = "resume";
    /// At most this many features in one message.
    pub const MAX_COUNT: usize = 32;
    /// At most this long, each.
    pub const MAX_LEN: usize = 32;

    /// Whether `list` is a valid features list: at most [`MAX_COUNT`] names of 1 to
    /// [`MAX_LEN`] characters from `a-z`, `0-9` and `-`.
    pub fn valid(list: &[String]) -> bool {
        list.len() <= MAX_COUNT
            && list.iter().all(|f| {
                (1..=MAX_LEN).contains(&f.len())
                    && f.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    }

    /// Whether `list` names `feature`.
    pub fn has(list: &[String], feature: &str) -> bool {
        list.iter().any(|f| f == feature)
    }
}

/// The longest device key a hello may carry (balenaOS keys are 32 hex characters, ours 64).
pub const MAX_KEY_LEN: usize = 256;
/// The longest `agent` name a hello may carry.
pub const MAX_AGENT_LEN: usize = 128;
/// The longest `uuid` a hello may carry before it is even looked at.
pub const MAX_UUID_LEN: usize = 64;

impl Hello {
    /// Checks the lengths of the peer-chosen fields (PROTOCOL.md §2), before any of them
    /// is looked up or logged.
    pub fn check_fields(&self) -> Result<(), &'static str> {
        if self.uuid.len() > MAX_UUID_LEN {
            return Err("hello uuid too long");
        }
        if self.key.len() > MAX_KEY_LEN {
            return Err("hello key too long");
        }
        if self.agent.chars().count() > MAX_AGENT_LEN {
            return Err("hello agent name too long");
        }
        if self
            .ssh_login
            .as_deref()
            .is_some_and(|l| !is_valid_login(l))
        {
            return Err("hello ssh_login is not an account name");
        }
        if !features::valid(&self.features) {
            return Err("hello features malformed");
        }
        Ok(())
    }
}

/// Whether `login` is a portable Unix account name (`^[a-z_][a-z0-9_-]{0,31}$`): what a
/// hello's `ssh_login` and the agent's setting may name.
pub fn is_valid_login(login: &str) -> bool {
    let b = login.as_bytes();
    (1..=32).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Why a relay refused a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectCode {
    /// Unknown device or wrong key.
    Unauthorized,
    /// A protocol version this relay does not speak.
    Version,
    /// Refused as a duplicate session.
    Duplicate,
    /// The relay is draining (shutting down): connect to another relay at once.
    Draining,
}

impl RejectCode {
    /// The wire form, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Unauthorized => "unauthorized",
            RejectCode::Version => "version",
            RejectCode::Duplicate => "duplicate",
            RejectCode::Draining => "draining",
        }
    }
}

/// Relay → agent on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RelayControl {
    /// The hello was accepted.
    Welcome {
        /// The relay's id.
        relay: String,
        /// This session's id.
        session: String,
        /// What this relay can do beyond the base protocol ([`features`]); absent from
        /// an older relay.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// The hello was refused; the relay closes the connection.
    Reject {
        /// Why.
        code: RejectCode,
        /// For people.
        message: String,
    },
    /// Reconnect elsewhere within `reconnect_ms`; open tunnels keep running.
    Drain {
        /// The window to reconnect in.
        reconnect_ms: u64,
    },
    /// A newer session of the same device exists; this one ends.
    Replaced,
    /// Raises a tunnel's credit (PROTOCOL.md §2d): the agent may send `limit` bytes on it
    /// in all. Sent only to an agent that announced [`features::CREDIT`].
    Credit {
        /// The tunnel id, as its `open` named it.
        tunnel: String,
        /// Bytes the agent may send on the tunnel in all; never lowered.
        limit: u64,
    },
    /// The relay has written `written` bytes of the device's direction to the user (and
    /// passed its FIN on, with `fin`): PROTOCOL.md §2e.
    Ack {
        /// The tunnel id.
        tunnel: String,
        /// Bytes written.
        written: u64,
        /// Whether the FIN was passed on too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fin: bool,
    },
}

/// Relay → agent, first frame on a tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "open")]
pub struct TunnelOpen {
    /// The local port to connect to.
    pub port: u16,
    /// Tunnel id, for logs on both ends.
    pub tunnel: String,
    /// Who asked, for logs on the device.
    pub user: String,
    /// The initial credit (PROTOCOL.md §2d): bytes the agent may send on the tunnel before
    /// a `credit` frame raises it. Absent: no credit (an older relay, or an agent that did
    /// not announce it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit: Option<u64>,
    /// The tunnel is resumable (PROTOCOL.md §2e): sent only when both sides announced
    /// [`features::RESUME`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// Relay → agent, first frame on a tunnel stream instead of [`TunnelOpen`]: carry on a
/// resumable tunnel whose link was lost (PROTOCOL.md §2e).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "resume")]
pub struct TunnelResume {
    /// The tunnel id, as its `open` named it.
    pub tunnel: String,
    /// Bytes of the device's direction the relay has written to the user.
    pub written: u64,
    /// Whether the relay has passed the device's FIN on.
    #[serde(default)]
    pub fin: bool,
    /// The credit limit in force (PROTOCOL.md §2d), replacing the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit: Option<u64>,
}

/// The first frame of a tunnel stream from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamHead {
    /// A new tunnel.
    Open(TunnelOpen),
    /// A tunnel carried over from a lost link.
    Resume(TunnelResume),
}

impl StreamHead {
    /// Reads the head from a frame's JSON by its `type`.
    pub fn from_value(value: serde_json::Value) -> Result<StreamHead, serde_json::Error> {
        if value.get("type").and_then(|t| t.as_str()) == Some("resume") {
            serde_json::from_value(value).map(StreamHead::Resume)
        } else {
            serde_json::from_value(value).map(StreamHead::Open)
        }
    }
}

/// Agent → relay on the control stream, after `welcome` (PROTOCOL.md §2e): only to a
/// relay that announced [`features::RESUME`], from an agent that did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AgentControl {
    /// The agent has written `written` bytes of the user's direction to the service
    /// (and passed its FIN on, with `fin`).
    Ack {
        /// The tunnel id.
        tunnel: String,
        /// Bytes written.
        written: u64,
        /// Whether the FIN was passed on too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fin: bool,
    },
}

/// Why a device refused a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefuseCode {
    /// Nothing listens on the port (or it could not be reached).
    Connect,
    /// The agent's allowlist does not include the port.
    Forbidden,
    /// A `resume` for a tunnel the agent no longer holds (PROTOCOL.md §2e).
    Gone,
}

/// Agent → relay, the answer to [`TunnelOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OpenReply {
    /// Connected to the local port; raw bytes follow.
    Opened,
    /// The answer to a `resume`: the agent's offsets; the tunnel's bytes follow from the
    /// relay's.
    Resumed {
        /// Bytes of the user's direction the agent has written to the service.
        written: u64,
        /// Whether it has passed the user's FIN on.
        #[serde(default)]
        fin: bool,
    },
    /// Not connected.
    Refused {
        /// Why.
        code: RefuseCode,
        /// For people.
        message: String,
    },
}

/// QUIC application close and stream error codes.
pub mod codes {
    /// Normal close.
    pub const OK: u32 = 0;
    /// The peer broke the protocol (bad frame, unexpected stream).
    pub const PROTOCOL: u32 = 1;
    /// The hello did not arrive in time.
    pub const HELLO_TIMEOUT: u32 = 2;
    /// The hello was rejected.
    pub const REJECTED: u32 = 3;
    /// A newer session of the device replaced this one.
    pub const REPLACED: u32 = 4;
    /// The relay is shutting down.
    pub const SHUTDOWN: u32 = 5;
    /// The device was deleted.
    pub const DELETED: u32 = 6;
    /// The relay cannot check the hello right now (store down); retry later.
    pub const UNAVAILABLE: u32 = 7;
    /// Nothing arrived from the peer for the idle timeout (the agent closes; the relay
    /// it gave up on rarely hears it).
    pub const IDLE: u32 = 8;
    /// A tunnel stream was reset because its other side reset.
    pub const STREAM_RESET: u32 = 16;
    /// A tunnel stream was cut by the relay (revoked, idle, shutdown).
    pub const STREAM_CANCELLED: u32 = 17;
    /// The device opened a stream it may not open.
    pub const STREAM_REFUSED: u32 = 18;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_ssh_login_is_an_account_name() {
        let hello = |login: Option<&str>| Hello {
            version: VERSION,
            uuid: "0".repeat(32),
            key: "k".into(),
            agent: String::new(),
            ssh_login: login.map(str::to_owned),
            features: Vec::new(),
            keep_alive_ms: None,
        };
        for ok in [
            None,
            Some("root"),
            Some("pi"),
            Some("_svc-1"),
            Some(&*"a".repeat(32)),
        ] {
            assert_eq!(hello(ok).check_fields(), Ok(()), "{ok:?}");
        }
        for bad in ["", "Root", "1pi", "a b", "root;id", "../x", &"a".repeat(33)] {
            assert!(hello(Some(bad)).check_fields().is_err(), "{bad:?}");
        }
        // Absent on the wire when unset, so older relays see the hello they know.
        let wire = serde_json::to_string(&hello(None)).unwrap();
        assert!(!wire.contains("ssh_login"), "{wire}");
    }

    #[test]
    fn wire_forms_match_the_protocol() {
        let hello: Hello = serde_json::from_str(
            r#"{"type":"hello","version":1,"uuid":"u","key":"k","agent":"cloudlink-agent/0.1.0"}"#,
        )
        .unwrap();
        assert_eq!(hello.uuid, "u");
        assert_eq!(
            serde_json::to_string(&RelayControl::Welcome {
                relay: "r".into(),
                session: "s".into(),
                features: Vec::new(),
            })
            .unwrap(),
            r#"{"type":"welcome","relay":"r","session":"s"}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayControl::Welcome {
                relay: "r".into(),
                session: "s".into(),
                features: vec!["udp-probe".into()],
            })
            .unwrap(),
            r#"{"type":"welcome","relay":"r","session":"s","features":["udp-probe"]}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayControl::Reject {
                code: RejectCode::Unauthorized,
                message: "m".into()
            })
            .unwrap(),
            r#"{"type":"reject","code":"unauthorized","message":"m"}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayControl::Drain { reconnect_ms: 5 }).unwrap(),
            r#"{"type":"drain","reconnect_ms":5}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayControl::Replaced).unwrap(),
            r#"{"type":"replaced"}"#
        );
        assert_eq!(
            serde_json::to_string(&TunnelOpen {
                port: 22222,
                tunnel: "t".into(),
                user: "u".into(),
                credit: None,
                resume: false,
            })
            .unwrap(),
            r#"{"type":"open","port":22222,"tunnel":"t","user":"u"}"#
        );
        assert_eq!(
            serde_json::to_string(&TunnelOpen {
                port: 22222,
                tunnel: "t".into(),
                user: "u".into(),
                credit: Some(65536),
                resume: false,
            })
            .unwrap(),
            r#"{"type":"open","port":22222,"tunnel":"t","user":"u","credit":65536}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayControl::Credit {
                tunnel: "t".into(),
                limit: 131072
            })
            .unwrap(),
            r#"{"type":"credit","tunnel":"t","limit":131072}"#
        );
        assert_eq!(
            serde_json::to_string(&OpenReply::Opened).unwrap(),
            r#"{"type":"opened"}"#
        );
        assert_eq!(
            serde_json::to_string(&OpenReply::Refused {
                code: RefuseCode::Connect,
                message: "m".into()
            })
            .unwrap(),
            r#"{"type":"refused","code":"connect","message":"m"}"#
        );
        assert!(serde_json::from_str::<Hello>(r#"{"type":"open","port":1}"#).is_err());
    }

    #[test]
    fn features_are_optional_bounded_and_open_ended() {
        // An older agent's hello has none; an older relay's welcome neither.
        let old: Hello =
            serde_json::from_str(r#"{"type":"hello","version":1,"uuid":"u","key":"k"}"#).unwrap();
        assert!(old.features.is_empty());
        assert_eq!(old.check_fields(), Ok(()));
        let welcome: RelayControl =
            serde_json::from_str(r#"{"type":"welcome","relay":"r","session":"s"}"#).unwrap();
        assert_eq!(
            welcome,
            RelayControl::Welcome {
                relay: "r".into(),
                session: "s".into(),
                features: Vec::new()
            }
        );
        // Names this side does not know are kept (and ignored by whoever reads them).
        let newer: Hello = serde_json::from_str(
            r#"{"type":"hello","version":1,"uuid":"u","key":"k","features":["resume","some-future-thing"]}"#,
        )
        .unwrap();
        assert_eq!(newer.check_fields(), Ok(()));
        assert!(features::has(&newer.features, "resume"));
        assert!(!features::has(&newer.features, features::UDP_PROBE));
        let with = |list: Vec<String>| Hello {
            features: list,
            ..old.clone()
        };
        for bad in [
            vec![String::new()],
            vec!["UPPER".into()],
            vec!["a b".into()],
            vec!["x".repeat(features::MAX_LEN + 1)],
            vec!["f".to_owned(); features::MAX_COUNT + 1],
        ] {
            assert!(with(bad.clone()).check_fields().is_err(), "{bad:?}");
        }
        assert_eq!(
            with(vec!["f".to_owned(); features::MAX_COUNT]).check_fields(),
            Ok(())
        );
    }

    /// The §2e messages as PROTOCOL.md spells them, and a stream's head told apart by its
    /// `type`.
    #[test]
    fn resume_messages_are_as_specified() {
        let head = |json: &str| StreamHead::from_value(serde_json::from_str(json).unwrap());
        assert_eq!(
            head(r#"{"type":"resume","tunnel":"t","written":7,"fin":true,"credit":9}"#).unwrap(),
            StreamHead::Resume(TunnelResume {
                tunnel: "t".into(),
                written: 7,
                fin: true,
                credit: Some(9),
            })
        );
        assert!(matches!(
            head(r#"{"type":"open","port":1,"tunnel":"t","user":"u","resume":true}"#).unwrap(),
            StreamHead::Open(TunnelOpen { resume: true, .. })
        ));
        assert!(
            head(r#"{"type":"resume","tunnel":"t"}"#).is_err(),
            "no offset"
        );
        assert_eq!(
            serde_json::to_string(&OpenReply::Resumed {
                written: 5,
                fin: false
            })
            .unwrap(),
            r#"{"type":"resumed","written":5,"fin":false}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayControl::Ack {
                tunnel: "t".into(),
                written: 3,
                fin: true
            })
            .unwrap(),
            r#"{"type":"ack","tunnel":"t","written":3,"fin":true}"#
        );
        assert_eq!(
            serde_json::to_string(&AgentControl::Ack {
                tunnel: "t".into(),
                written: 3,
                fin: false
            })
            .unwrap(),
            r#"{"type":"ack","tunnel":"t","written":3}"#
        );
        assert_eq!(
            serde_json::to_string(&RefuseCode::Gone).unwrap(),
            r#""gone""#
        );
    }
}

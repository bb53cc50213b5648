//! Bytes on the wire (PROTOCOL.md), with no I/O policy: CONNECT heads, length-prefixed JSON
//! frames, and the messages those frames carry.

pub mod connect;
pub mod frame;
pub mod messages;

/// The QUIC ALPN of the device link.
pub const ALPN: &[u8] = b"cloudlink/1";

/// A device uuid in its one canonical form: 32 hex characters, any case in, lowercase out.
pub fn device_uuid(raw: &str) -> Option<String> {
    (raw.len() == 32 && raw.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| raw.to_ascii_lowercase())
}

/// Errors reading or writing the device link's frames and messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame announced more bytes than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is not valid JSON for the expected message.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The peer closed the stream before a whole frame arrived.
    #[error("stream ended before a complete frame")]
    Truncated,
    /// A message arrived that does not belong here.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// The frame did not arrive in time.
    #[error("timed out waiting for a frame")]
    Timeout,
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

//! Bytes on the wire (PROTOCOL.md), with no I/O policy: CONNECT heads, length-prefixed JSON
//! frames, the messages those frames carry, and the UDP probe.

#[cfg(feature = "relay")]
pub mod api;
pub mod connect;
pub mod frame;
pub mod messages;
pub mod probe;

/// The QUIC ALPN of the device link.
pub const ALPN: &[u8] = b"cloudlink/1";

/// The device port of its SSH server (balenaOS: 22222): what `device ssh`, the browser
/// terminal and the authorized-keys lookup (PROTOCOL.md §4) mean by a device's sshd.
pub const SSH_PORT: u16 = 22222;

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

/// A tiny seeded generator and mutator for the bounded fuzz tests of the parsers, so a
/// failure reproduces from its seed on any machine.
/// Whether `name` is a valid user, fleet, device or key name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

#[cfg(test)]
pub(crate) mod fuzz {
    /// xorshift64: fast, deterministic, good enough to explore a parser's input space.
    pub struct Rng(u64);

    /// Iterations per fuzz test: `CLOUDLINK_FUZZ_ITERS`, default 20,000 (well under a
    /// second each in a debug build).
    pub fn iterations() -> usize {
        std::env::var("CLOUDLINK_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000)
    }

    impl Rng {
        /// A generator from `seed`.
        pub fn new(seed: u64) -> Rng {
            Rng(seed | 1)
        }
        /// The next number.
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// A number below `n` (0 when `n` is 0).
        pub fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
        /// `len` random bytes, biased towards the bytes parsers care about.
        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.byte()).collect()
        }
        fn byte(&mut self) -> u8 {
            const SPECIAL: &[u8] = b"\r\n :/.+-0123456789aAfF\x00\x1b\xff";
            if self.next().is_multiple_of(3) {
                SPECIAL[self.below(SPECIAL.len())]
            } else {
                self.next() as u8
            }
        }
        /// `seed` with a few random edits: flips, inserts, deletions, truncation.
        pub fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
            let mut out = seed.to_vec();
            for _ in 0..1 + self.below(4) {
                let at = self.below(out.len() + 1);
                match self.below(5) {
                    0 if at < out.len() => out[at] = self.byte(),
                    1 => {
                        let b = self.byte();
                        out.insert(at, b)
                    }
                    2 if at < out.len() => {
                        out.remove(at);
                    }
                    3 => out.truncate(at),
                    _ => {
                        let len = self.below(8);
                        let extra = self.bytes(len);
                        out.splice(at..at, extra);
                    }
                }
            }
            out
        }
    }
}

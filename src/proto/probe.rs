//! The UDP probe (PROTOCOL.md §2c): 16 bytes an agent on the TLS/TCP link sends to a
//! relay's QUIC port to learn whether UDP gets through again, before it spends a QUIC
//! handshake (over a kilobyte each way, resent for seconds) on a network that drops it.
//!
//! It is shaped as a QUIC long-header packet of a version no QUIC implementation speaks,
//! and shorter than any Initial, so a QUIC stack that is not ours drops it (RFC 9000
//! §5.2.2: a server drops short packets of unsupported versions; quinn does), and middle
//! boxes see what looks like QUIC. The answer is the same size as the probe, so a relay
//! cannot be used to amplify traffic towards a forged source.

/// The version field that marks a probe ("CLKP").
pub const VERSION: u32 = 0x434c_4b50;

/// The length of a probe and of its answer.
pub const LEN: usize = 16;

/// The kind byte of a probe.
const PROBE: u8 = 0x01;
/// The kind byte of an answer.
const ANSWER: u8 = 0x02;

/// Long header form and fixed bit, as QUIC sets them.
const FIRST: u8 = 0xc0;

/// A probe or an answer, for `nonce` (chosen by the agent, echoed by the relay).
fn packet(kind: u8, nonce: [u8; 8]) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[0] = FIRST;
    p[1..5].copy_from_slice(&VERSION.to_be_bytes());
    p[5] = 8; // "destination connection id" length: the nonce
    p[6..14].copy_from_slice(&nonce);
    p[14] = 0; // "source connection id" length
    p[15] = kind;
    p
}

/// The nonce of `datagram` if it is a packet of `kind`.
fn parse(datagram: &[u8], kind: u8) -> Option<[u8; 8]> {
    if datagram.len() != LEN
        || datagram[0] != FIRST
        || datagram[1..5] != VERSION.to_be_bytes()
        || datagram[5] != 8
        || datagram[14] != 0
        || datagram[15] != kind
    {
        return None;
    }
    datagram[6..14].try_into().ok()
}

/// The probe an agent sends.
pub fn probe(nonce: [u8; 8]) -> [u8; LEN] {
    packet(PROBE, nonce)
}

/// The relay's answer to `datagram`, if it is a probe.
pub fn answer_to(datagram: &[u8]) -> Option<[u8; LEN]> {
    parse(datagram, PROBE).map(|nonce| packet(ANSWER, nonce))
}

/// Whether `datagram` answers the probe with `nonce`.
pub fn is_answer(datagram: &[u8], nonce: [u8; 8]) -> bool {
    parse(datagram, ANSWER) == Some(nonce)
}

/// Whether `first` could start a probe: a cheap test for the receive path, which sees
/// every datagram (QUIC's short-header packets, nearly all of them, fail it at once).
pub fn may_be_probe(first: u8) -> bool {
    first == FIRST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_answered_with_its_nonce_and_nothing_else_is() {
        let nonce = *b"12345678";
        let p = probe(nonce);
        assert_eq!(p.len(), LEN);
        assert!(may_be_probe(p[0]));
        let a = answer_to(&p).expect("a probe");
        assert!(is_answer(&a, nonce));
        assert!(!is_answer(&a, *b"87654321"));
        // An answer is not a probe (no ping-pong between two relays), nor a probe an answer.
        assert!(answer_to(&a).is_none());
        assert!(!is_answer(&p, nonce));
        // Anything else, a byte off or a length off, is neither.
        for i in 0..LEN {
            if (6..14).contains(&i) {
                continue;
            }
            let mut bad = p;
            bad[i] ^= 0x40;
            assert!(answer_to(&bad).is_none(), "byte {i}");
        }
        assert!(answer_to(&p[..LEN - 1]).is_none());
        let mut long = p.to_vec();
        long.push(0);
        assert!(answer_to(&long).is_none());
    }

    #[test]
    fn a_real_quic_initial_is_not_a_probe() {
        // A QUIC v1 Initial: long header, version 1, padded to 1200 bytes.
        let mut initial = vec![0xc3, 0, 0, 0, 1, 8];
        initial.resize(1200, 0);
        assert!(answer_to(&initial).is_none());
    }
}

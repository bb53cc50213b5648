//! Whether UDP gets through to a relay's QUIC port again, for an agent on the TLS/TCP
//! link: one 16-byte probe and its answer (PROTOCOL.md §2c), far cheaper than a QUIC
//! handshake attempt on a network that drops UDP. When to probe is `mod.rs`'s schedule.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;

use crate::proto::probe;

/// How long an answer may take: a round trip on any path a device is on.
pub const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The first pause after falling back to TCP, doubled after each probe that went
/// unanswered, up to the configured `quic_probe_secs`.
pub const FIRST_PAUSE: Duration = Duration::from_secs(5);

/// A relay without the `udp-probe` feature (an older one) can only be tried with a QUIC
/// handshake, so that is done as rarely as before probes existed.
pub const LEGACY_PAUSE: Duration = Duration::from_secs(600);

/// Sends one probe to `addr` and waits up to `wait` for its answer; `Err` says why not.
pub async fn probe(addr: SocketAddr, wait: Duration) -> Result<(), String> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    // Connected, so that an ICMP "port unreachable" ends the wait at once.
    socket
        .connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let nonce: [u8; 8] = rand::rng().random();
    socket
        .send(&probe::probe(nonce))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let answered = async {
        let mut buf = [0u8; 64];
        loop {
            let n = socket.recv(&mut buf).await?;
            if probe::is_answer(&buf[..n], nonce) {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    match tokio::time::timeout(wait, answered).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("no answer from {addr} within {wait:?}")),
    }
}

/// The pause before the next probe after `unanswered` probes in a row: from
/// [`FIRST_PAUSE`], doubling, up to `cap`, give or take a tenth (so a fleet's probes do
/// not line up). Against a relay without probes, [`LEGACY_PAUSE`] give or take a fifth.
pub fn pause(unanswered: u32, cap: Duration, relay_answers_probes: bool) -> Duration {
    let (base, spread) = if relay_answers_probes {
        let doubled = FIRST_PAUSE.saturating_mul(1u32 << unanswered.min(16));
        (doubled.min(cap), 10)
    } else {
        (LEGACY_PAUSE, 5)
    };
    let ms = base.as_millis() as u64;
    let jitter = ms / spread;
    Duration::from_millis(ms - jitter + rand::rng().random_range(0..=2 * jitter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_backs_off_to_its_cap() {
        let cap = Duration::from_secs(45);
        let within = |d: Duration, of: u64| {
            let of = Duration::from_secs(of);
            d >= of - of / 10 && d <= of + of / 10
        };
        assert!(within(pause(0, cap, true), 5));
        assert!(within(pause(1, cap, true), 10));
        assert!(within(pause(2, cap, true), 20));
        assert!(within(pause(3, cap, true), 40));
        for n in 4..40 {
            assert!(within(pause(n, cap, true), 45), "{n}");
        }
        // A cap below the first pause wins.
        assert!(pause(0, Duration::from_secs(2), true) <= Duration::from_millis(2200));
        let legacy = pause(0, cap, false);
        assert!(legacy >= Duration::from_secs(480) && legacy <= Duration::from_secs(720));
    }

    #[tokio::test]
    async fn an_answer_gets_through_and_silence_does_not() {
        let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = relay.local_addr().unwrap();
        let answering = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, from) = relay.recv_from(&mut buf).await.unwrap();
            let answer = probe::answer_to(&buf[..n]).expect("a probe");
            relay.send_to(&answer, from).await.unwrap();
            relay
        });
        probe(addr, Duration::from_secs(5)).await.unwrap();
        let silent = answering.await.unwrap();
        let err = probe(silent.local_addr().unwrap(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        drop(silent);
        // Nothing listens there now: the ICMP error ends the wait early.
        let err = probe(addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(!err.contains("no answer"), "{err}");
    }
}

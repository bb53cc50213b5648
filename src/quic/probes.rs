//! The relay's QUIC socket, which also answers UDP probes (PROTOCOL.md §2c).
//!
//! A probe arrives on the QUIC port because that port is what a firewall lets through or
//! not. The socket quinn reads is wrapped: every received datagram whose first byte could
//! start a probe (QUIC short-header packets, nearly all traffic, cannot) is checked, and a
//! probe is answered at once from the same socket and address it came to. The probe is then
//! handed to quinn like any datagram, and quinn drops it (a long header of a version it
//! does not speak, shorter than an Initial). Answers are rate-limited: the same size as the
//! probe, they amplify nothing, but a relay should not echo floods either.

use std::io::IoSliceMut;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::proto::probe;

/// Answers per second at most, and the burst allowed.
const ANSWERS_PER_SEC: f64 = 1000.0;

/// Probe counts, for metrics.
#[derive(Debug, Default)]
pub struct ProbeStats {
    /// Probes answered.
    pub answered: AtomicU64,
    /// Probes not answered: over the rate limit, or the socket was full.
    pub dropped: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A UDP socket for quinn that answers probes on the side.
#[derive(Debug)]
pub struct Answering {
    inner: Arc<dyn AsyncUdpSocket>,
    stats: Arc<ProbeStats>,
    bucket: Mutex<Bucket>,
}

impl Answering {
    /// Wraps `inner`, counting into `stats`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, stats: Arc<ProbeStats>) -> Answering {
        Answering {
            inner,
            stats,
            bucket: Mutex::new(Bucket {
                tokens: ANSWERS_PER_SEC,
                at: Instant::now(),
            }),
        }
    }

    fn take_token(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * ANSWERS_PER_SEC;
        b.tokens = (b.tokens + refill).min(ANSWERS_PER_SEC);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn answer(&self, datagram: &[u8], meta: &RecvMeta) {
        let Some(answer) = probe::answer_to(datagram) else {
            return;
        };
        let sent = self.take_token()
            && self
                .inner
                .try_send(&Transmit {
                    destination: meta.addr,
                    ecn: None,
                    contents: &answer,
                    segment_size: None,
                    src_ip: meta.dst_ip,
                })
                .is_ok();
        let counter = if sent {
            &self.stats.answered
        } else {
            &self.stats.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncUdpSocket for Answering {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &polled {
            for (buf, meta) in bufs.iter().zip(meta.iter()).take(*n) {
                // One datagram of a probe's size (a GRO batch of several is not probes).
                if meta.len == probe::LEN && meta.stride == meta.len && probe::may_be_probe(buf[0])
                {
                    self.answer(&buf[..meta.len], meta);
                }
            }
        }
        polled
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

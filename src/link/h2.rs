//! The TLS/TCP device link's HTTP/2 layer (PROTOCOL.md §2b), on the `h2` crate: its
//! settings, tunnel streams as [`ChunkSend`](crate::link::ChunkSend) /
//! [`ChunkRecv`](crate::link::ChunkRecv), and keep-alive.
//!
//! The relay is the HTTP/2 client and the agent the server, although the agent dialed (as
//! cloudflared does): the side that opens tunnels is the side that sends requests.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use h2::{PingPong, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::chunks::End;

/// Each stream's receive window (`SETTINGS_INITIAL_WINDOW_SIZE`): what one stalled reader
/// can hold up, and what one tunnel can have in flight.
pub const STREAM_WINDOW: u32 = 4 << 20;

/// The connection's receive window, shared by every stream: HTTP/2's maximum, so that only
/// [`STREAM_WINDOW`] bounds buffering, as on the QUIC link. At 16 MiB, 16 tunnels whose
/// users stopped reading used it all up and stalled every other tunnel of the device;
/// what a relay holds is bounded instead by its tunnels per device times the stream window.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// The largest DATA frame either side accepts.
pub const MAX_FRAME: u32 = 64 << 10;

/// Tunnels open at once on one link (the agent's `SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_STREAMS: u32 = 4096;

/// The control stream's path (PROTOCOL.md §2b).
pub const CONTROL_PATH: &str = "/cloudlink/control";

/// Names the tunnel on a CONNECT stream, as the §2 `open` frame's `tunnel`.
pub const TUNNEL_HEADER: &str = "cloudlink-tunnel";

/// Names the user on a CONNECT stream, as the §2 `open` frame's `user`.
pub const USER_HEADER: &str = "cloudlink-user";

/// On a CONNECT stream to an agent that announced `credit`, the initial credit, as the
/// §2 `open` frame's `credit` (PROTOCOL.md §2d).
pub const CREDIT_HEADER: &str = "cloudlink-credit";

/// On a refusal, its §2 code (`connect`, `forbidden` or `gone`).
pub const REFUSED_HEADER: &str = "cloudlink-refused";

/// On a CONNECT that resumes a tunnel (PROTOCOL.md §2e), the tunnel's id.
pub const RESUME_HEADER: &str = "cloudlink-resume";

/// On a resume and its answer, the sender's `written` (and `; fin`): [`offsets_header`].
pub const WRITTEN_HEADER: &str = "cloudlink-written";

/// The value of [`WRITTEN_HEADER`]: `N`, or `N; fin` once the FIN was passed on.
pub fn offsets_header(written: u64, fin: bool) -> String {
    if fin {
        format!("{written}; fin")
    } else {
        written.to_string()
    }
}

/// Reads a [`WRITTEN_HEADER`] value; `None` if it is not one.
pub fn parse_offsets(value: &str) -> Option<(u64, bool)> {
    let (n, fin) = match value.split_once(';') {
        Some((n, rest)) if rest.trim() == "fin" => (n.trim(), true),
        Some(_) => return None,
        None => (value.trim(), false),
    };
    n.parse().ok().map(|n| (n, fin))
}

/// The relay's side: an HTTP/2 client with §2b's settings.
pub fn client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .enable_push(false);
    b
}

/// The agent's side: an HTTP/2 server with §2b's settings.
pub fn server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .max_concurrent_streams(MAX_STREAMS);
    b
}

/// How an `h2` error ends a tunnel: a stream reset, or the link itself lost.
fn end_of(e: h2::Error) -> End {
    if e.is_reset() {
        End::LinkReset
    } else {
        End::ConnectionLost(e.to_string())
    }
}

/// Sends `chunk`, waiting for flow-control credit; the pieces never exceed the credit
/// granted, so nothing is buffered beyond the window.
pub async fn write_chunk(s: &mut SendStream<Bytes>, mut chunk: Bytes) -> Result<(), End> {
    while !chunk.is_empty() {
        s.reserve_capacity(chunk.len());
        let mut credit = s.capacity();
        while credit == 0 {
            credit = match poll_fn(|cx| s.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(end_of(e)),
                // The stream can no longer send: the peer reset it, or the connection is
                // gone (which a resumable tunnel must not take for a reset).
                None => return Err(why_closed(s).await),
            };
        }
        let piece = chunk.split_to(credit.min(chunk.len()));
        s.send_data(piece, false).map_err(end_of)?;
    }
    Ok(())
}

/// Why a stream that can no longer send ended: a RST_STREAM from the peer, or the
/// connection's end.
async fn why_closed(s: &mut SendStream<Bytes>) -> End {
    match poll_fn(|cx| s.poll_reset(cx)).await {
        Ok(_) => End::LinkReset,
        Err(e) => end_of(e),
    }
}

/// Ends the stream (END_STREAM, a FIN). A stream already reset shows that on its other
/// direction, so an error here loses nothing.
pub fn finish(s: &mut SendStream<Bytes>) {
    let _ = s.send_data(Bytes::new(), true);
}

/// Takes the DATA that has arrived (at least one frame, waiting if none has), returning
/// its credit to the sender at once; `None` at END_STREAM.
pub async fn read_chunks(r: &mut RecvStream, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
    poll_fn(|cx| {
        let mut n = 0;
        while n < bufs.len() {
            match r.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = r.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        bufs[n] = data;
                        n += 1;
                    }
                }
                // What came before an end or error goes first; the end shows next call.
                Poll::Ready(_) | Poll::Pending if n > 0 => return Poll::Ready(Ok(Some(n))),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(end_of(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(None)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(Some(n)))
    })
    .await
}

/// An HTTP/2 request or response body read as a byte stream (for §2 frames on the control
/// stream).
pub struct BodyReader {
    body: RecvStream,
    buf: Bytes,
}

impl BodyReader {
    /// Reads `body`.
    pub fn new(body: RecvStream) -> BodyReader {
        BodyReader {
            body,
            buf: Bytes::new(),
        }
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match self.body.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.body.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        e,
                    )))
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// An HTTP/2 request or response body written as a byte stream (for §2 frames on the
/// control stream): each write sends what the stream's flow control allows.
pub struct BodyWriter {
    body: SendStream<Bytes>,
}

impl BodyWriter {
    /// Writes to `body`.
    pub fn new(body: SendStream<Bytes>) -> BodyWriter {
        BodyWriter { body }
    }
}

impl AsyncWrite for BodyWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.body.reserve_capacity(buf.len());
        let reset = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let room = match self.body.capacity() {
            0 => match self.body.poll_capacity(cx) {
                Poll::Ready(Some(Ok(n))) => n,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        e,
                    )))
                }
                Poll::Ready(None) => return Poll::Ready(Err(reset())),
                Poll::Pending => return Poll::Pending,
            },
            n => n,
        };
        if room == 0 {
            // Capacity granted and taken in the same turn: ask again.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        self.body
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionReset, e))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.body.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// When bytes last arrived on a link, for keep-alive: a stream wrapper stamps it on every
/// read that returns data (one relaxed store).
#[derive(Clone)]
pub struct LastHeard {
    base: Instant,
    ms: Arc<AtomicU64>,
}

impl Default for LastHeard {
    fn default() -> Self {
        LastHeard {
            base: Instant::now(),
            ms: Arc::default(),
        }
    }
}

impl LastHeard {
    fn stamp(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.ms.store(ms, Ordering::Relaxed);
    }

    /// When something last arrived, as milliseconds on this stamp's own clock.
    pub fn stamp_ms(&self) -> u64 {
        self.ms.load(Ordering::Relaxed)
    }

    /// How long since anything arrived.
    pub fn silent_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.ms.load(Ordering::Relaxed)))
    }
}

/// A byte stream that stamps [`LastHeard`] whenever it reads something.
pub struct Heard<S> {
    inner: S,
    heard: LastHeard,
}

impl<S> Heard<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, heard: LastHeard) -> Heard<S> {
        heard.stamp();
        Heard { inner, heard }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.heard.stamp();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps the link alive and notices when it is dead: sends a PING whenever nothing has
/// arrived for `every` (never, when `None`: the other end keeps the link alive), and
/// returns (with why) once nothing has arrived for `idle`, or the connection is gone. The
/// caller then closes the connection. Without a PING handle (h2 hands it out once) it
/// never returns.
///
/// It wakes at its deadlines only (the next PING due, or the idle timeout), not on a
/// tick: a relay holding ten thousand idle links does not wake ten thousand times a
/// second, and the deadlines are kept to the millisecond.
pub async fn keep_alive(
    ping: Option<PingPong>,
    heard: LastHeard,
    every: Option<Duration>,
    idle: Duration,
) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    let mut pinging = false;
    loop {
        let silent = heard.silent_for();
        if silent >= idle {
            return format!("nothing heard for {} s", idle.as_secs());
        }
        let mut wait = idle - silent;
        if let (Some(every), false) = (every, pinging) {
            if silent >= every {
                if let Err(e) = ping.send_ping(h2::Ping::opaque()) {
                    return e.to_string();
                }
                pinging = true;
            } else {
                wait = wait.min(every - silent);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            pong = poll_fn(|cx| ping.poll_pong(cx)), if pinging => match pong {
                Ok(_) => pinging = false,
                Err(e) => return e.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{ChunkRecv, ChunkSend};
    use crate::link::{LinkRecv, LinkSend};

    /// One HTTP/2 connection over an in-memory pipe, with a CONNECT stream open both ways.
    async fn pair() -> (
        (LinkSend, LinkRecv),
        (LinkSend, LinkRecv),
        h2::client::SendRequest<Bytes>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = server().handshake::<_, Bytes>(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            (LinkSend::H2(send), LinkRecv::H2(req.into_body()))
        });
        let (requests, conn) = client().handshake::<_, Bytes>(a).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("127.0.0.1:22")
            .body(())
            .unwrap();
        let (response, send) = requests.clone().send_request(req, false).unwrap();
        let server_side = server.await.unwrap();
        let body = response.await.unwrap().into_body();
        (
            (LinkSend::H2(send), LinkRecv::H2(body)),
            server_side,
            requests,
        )
    }

    async fn read_all(r: &mut LinkRecv) -> Result<Vec<u8>, End> {
        let mut out = Vec::new();
        let mut bufs: [Bytes; 8] = Default::default();
        while let Some(n) = r.read_chunks(&mut bufs).await? {
            for b in &bufs[..n] {
                out.extend_from_slice(b);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn bytes_cross_beyond_the_window_and_end_stream_is_a_half_close() {
        let ((mut cs, mut cr), (mut ss, mut sr), _keep) = pair().await;
        let big: Vec<u8> = (0..3 * STREAM_WINDOW as usize + 17)
            .map(|i| i as u8)
            .collect();
        let sent = big.clone();
        let up = tokio::spawn(async move {
            cs.write_chunk(Bytes::from(sent)).await.unwrap();
            cs.finish();
            cs
        });
        assert_eq!(read_all(&mut sr).await.unwrap(), big);
        // The other direction still flows after the half-close.
        ss.write_chunk(Bytes::from_static(b"reply")).await.unwrap();
        ss.finish();
        assert_eq!(read_all(&mut cr).await.unwrap(), b"reply");
        drop(up.await.unwrap());
    }

    #[tokio::test]
    async fn a_reset_reaches_the_other_side_as_a_reset() {
        let ((mut cs, _cr), (_ss, mut sr), _keep) = pair().await;
        cs.write_chunk(Bytes::from_static(b"partial"))
            .await
            .unwrap();
        cs.reset(0);
        let mut bufs: [Bytes; 8] = Default::default();
        let mut got = Vec::new();
        let end = loop {
            match sr.read_chunks(&mut bufs).await {
                Ok(Some(n)) => bufs[..n].iter().for_each(|b| got.extend_from_slice(b)),
                Ok(None) => panic!("a reset read as a clean end"),
                Err(end) => break end,
            }
        };
        assert_eq!(end, End::LinkReset);
    }

    #[tokio::test]
    async fn a_writer_waits_for_credit_instead_of_buffering() {
        let ((mut cs, _cr), (_ss, _sr), _keep) = pair().await;
        // Nobody reads the server side: at most the stream window is accepted.
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let mut written = 0usize;
        let filled = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                cs.write_chunk(chunk.clone()).await.unwrap();
                written += chunk.len();
            }
        })
        .await;
        assert!(filled.is_err(), "the writer never blocked");
        assert!(
            written <= STREAM_WINDOW as usize + chunk.len(),
            "{written} bytes accepted past a {STREAM_WINDOW}-byte window"
        );
    }
}

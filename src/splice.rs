//! Joining two byte streams, at least one of them TCP: without a user-space copy
//! (`splice(2)` through a pipe) when both are plain TCP, by copying when one is TLS. Used
//! for tunnels that cross the peer link (PROTOCOL.md §3) and by `cloudlink device tunnel`.
//!
//! Each direction owns a pipe. Data moves socket → pipe → socket inside the kernel; the
//! pipe is always drained before more is read, so it never fills and a slow receiver
//! pushes back on the sender through TCP flow control, as a copy loop would. rustix's
//! `splice` is a safe wrapper (borrowed fds), so this module needs no `unsafe`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::forward::{copy_dir, join_dirs, Counters, Dir, Side, CHUNK};
use crate::link::End;

/// The pipe size asked for: bigger pipes mean fewer syscalls per megabyte. The kernel may
/// give less (`fs.pipe-max-size`), which still works.
const PIPE_SIZE: usize = 1 << 20;

/// One direction's pipe.
pub struct Pipe {
    /// Read end.
    r: OwnedFd,
    /// Write end.
    w: OwnedFd,
    /// How much one splice moves at most.
    chunk: usize,
}

impl Pipe {
    /// A non-blocking pipe, as large as the kernel allows up to [`PIPE_SIZE`].
    pub fn new() -> io::Result<Pipe> {
        let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let chunk = fcntl_setpipe_size(&w, PIPE_SIZE).unwrap_or(CHUNK);
        Ok(Pipe { r, w, chunk })
    }
}

/// Moves `src` to `dst` until `src` ends (then half-closes `dst`: [`Dir::Eof`]) or either
/// fails ([`Dir::Abnormal`]), counting bytes into `counter`.
pub async fn splice_dir(src: &TcpStream, dst: &TcpStream, pipe: &Pipe, counter: &AtomicU64) -> Dir {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        let n = match src
            .async_io(Interest::READABLE, || {
                splice(src, None, &pipe.w, None, pipe.chunk, flags).map_err(io::Error::from)
            })
            .await
        {
            Ok(0) => {
                return match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
                    Ok(()) => Dir::Eof,
                    Err(_) => Dir::Abnormal(End::SocketReset),
                };
            }
            Ok(n) => n,
            Err(_) => return Dir::Abnormal(End::SocketReset),
        };
        let mut left = n;
        while left > 0 {
            match dst
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe.r, None, dst, None, left, flags).map_err(io::Error::from)
                })
                .await
            {
                Ok(0) => return Dir::Abnormal(End::SocketReset),
                Ok(m) => left -= m,
                Err(_) => return Dir::Abnormal(End::SocketReset),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The one join of two byte streams that are not the device link: the peer hop's entry
/// side (the user's connection to the owner relay's) and `cloudlink device tunnel` (a local
/// client to the relay's proxy). Joins `halves`, one end of a tunnel, on `side`, to the TCP
/// socket `far` until both directions end (each FIN passed on as a half-close), one fails,
/// `cancel` fires or nothing moves for `idle`. The bytes move inside the kernel with
/// `splice(2)` when `plain` finds plain TCP under the halves and pipes can be made;
/// otherwise (TLS) they are copied. `counters` count up and down as `side` says.
pub async fn join<R, W>(
    (r, w): (&mut R, &mut W),
    plain: for<'a> fn(&'a R, &'a W) -> Option<&'a TcpStream>,
    side: Side,
    far: &mut TcpStream,
    counters: &Counters,
    cancel: &CancellationToken,
    idle: Option<Duration>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (out, back) = counters.ways(side);
    if let Some(near) = plain(r, w) {
        if let (Ok(there), Ok(here)) = (Pipe::new(), Pipe::new()) {
            return join_dirs(
                splice_dir(near, far, &there, out),
                splice_dir(far, near, &here, back),
                counters,
                cancel,
                idle,
            )
            .await;
        }
    }
    let (mut far_r, mut far_w) = far.split();
    join_dirs(
        copy_dir(r, &mut far_w, out),
        copy_dir(&mut far_r, w, back),
        counters,
        cancel,
        idle,
    )
    .await
}

/// [`join`]'s `plain` for a TCP socket split into owned halves.
pub fn owned_halves<'a>(r: &'a OwnedReadHalf, _w: &'a OwnedWriteHalf) -> Option<&'a TcpStream> {
    Some(r.as_ref())
}

/// [`join`]'s `plain` for halves with no plain TCP under them (TLS).
pub fn never_plain<'a, R, W>(_r: &'a R, _w: &'a W) -> Option<&'a TcpStream> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two ends of one loopback connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (dialled, accepted) = tokio::join!(dial, listener.accept());
        (dialled.unwrap(), accepted.unwrap().0)
    }

    /// [`join`]'s `plain` for owned halves, whichever of the two.
    type Plain = for<'a> fn(&'a OwnedReadHalf, &'a OwnedWriteHalf) -> Option<&'a TcpStream>;

    /// Joins the user's side `near`, split, to `far`, as the peer hop does.
    async fn join_user(
        near: TcpStream,
        far: &mut TcpStream,
        plain: Plain,
        counters: &Counters,
        cancel: &CancellationToken,
    ) -> End {
        let (mut r, mut w) = near.into_split();
        join(
            (&mut r, &mut w),
            plain,
            Side::User,
            far,
            counters,
            cancel,
            None,
        )
        .await
    }

    /// Runs a join between a user connection and a far one, with `plain` on the user's
    /// halves; the user sends, half-closes, and still reads the far side's answer.
    async fn half_close_both_ways(plain: Plain) {
        let (mut user, near) = pair().await;
        let (mut far, mut service) = pair().await;
        let counters = Counters::default();
        let cancel = CancellationToken::new();
        let joined = async {
            let (mut r, mut w) = near.into_split();
            join(
                (&mut r, &mut w),
                plain,
                Side::User,
                &mut far,
                &counters,
                &cancel,
                None,
            )
            .await
        };
        let ends = async {
            user.write_all(b"hello").await.unwrap();
            user.shutdown().await.unwrap();
            let mut got = Vec::new();
            service.read_to_end(&mut got).await.unwrap();
            assert_eq!(
                got, b"hello",
                "the service reads what was sent, then the FIN"
            );
            service.write_all(b"back").await.unwrap();
            service.shutdown().await.unwrap();
            let mut answer = Vec::new();
            user.read_to_end(&mut answer).await.unwrap();
            assert_eq!(
                answer, b"back",
                "the answer arrives after the user's half-close"
            );
        };
        let (end, ()) = tokio::join!(joined, ends);
        assert_eq!(end, End::Closed);
        assert_eq!(counters.up.load(Ordering::Relaxed), 5);
        assert_eq!(counters.down.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn spliced_join_passes_half_closes_and_counts() {
        half_close_both_ways(owned_halves).await;
    }

    #[tokio::test]
    async fn copied_join_passes_half_closes_and_counts() {
        half_close_both_ways(never_plain).await;
    }

    #[tokio::test]
    async fn a_reset_far_side_ends_the_join_as_a_reset() {
        for plain in [owned_halves, never_plain] {
            let (_user, near) = pair().await;
            let (mut far, service) = pair().await;
            let counters = Counters::default();
            let cancel = CancellationToken::new();
            crate::forward::arm_reset(&service);
            drop(service);
            let end = join_user(near, &mut far, plain, &counters, &cancel).await;
            assert_eq!(end, End::SocketReset);
        }
    }

    #[tokio::test]
    async fn a_cancelled_join_ends_as_cancelled() {
        let (_user, near) = pair().await;
        let (mut far, _service) = pair().await;
        let counters = Counters::default();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let end = join_user(near, &mut far, owned_halves, &counters, &cancel).await;
        assert_eq!(end, End::Cancelled);
    }
}

//! TCP to TCP without a user-space copy: `splice(2)` through a pipe, for tunnels that cross
//! the peer link when the user's side is plain TCP too (PROTOCOL.md §3), and for
//! `cloudlink device tunnel` when the relay's proxy is plain TCP.
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
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::forward::{Counters, Dir, CHUNK};
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

/// Joins two TCP sockets both ways with [`splice_dir`] until both directions end, one fails,
/// `cancel` fires or nothing moves for `idle` ([`crate::forward::join_dirs`]); `a` to `b`
/// counts as `up`. `None` when no pipe could be made: the caller copies instead.
pub async fn join(
    a: &TcpStream,
    b: &TcpStream,
    counters: &Counters,
    cancel: &CancellationToken,
    idle: Option<Duration>,
) -> Option<End> {
    let (up, down) = (Pipe::new().ok()?, Pipe::new().ok()?);
    Some(
        crate::forward::join_dirs(
            splice_dir(a, b, &up, &counters.up),
            splice_dir(b, a, &down, &counters.down),
            counters,
            cancel,
            idle,
        )
        .await,
    )
}

//! The hot path allocates nothing per chunk: both directions of `forward` are driven over
//! 1 GiB with in-memory streams while a counting allocator watches this thread.
//!
//! The allocator counts only while the flag of the current thread is set, and the loops
//! run on a current-thread runtime, so the count is exactly what the loops (and the
//! allocation-free fakes) allocate, not what quinn or the runtime do elsewhere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use cloudlink::forward::{self, Counters, Dir, CHUNK};
use cloudlink::link::{ChunkRecv, ChunkSend, End};

use tokio::io::AsyncReadExt;
// Without tokio's cooperative budget the loops never yield to the scheduler, whose queues
// would otherwise allocate now and then and blur the count.
use tokio::task::unconstrained;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: defers every operation to the system allocator unchanged; only counts calls,
// through const-initialised thread locals that never allocate themselves.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    let out = f();
    COUNTING.with(|on| on.set(false));
    (out, ALLOCATIONS.with(|n| n.get()))
}

const TOTAL: u64 = 1024 * 1024 * 1024;

/// A stream that takes chunks and drops them at once (as quinn does once they are acked).
struct DropSink {
    got: u64,
    finished: bool,
}

impl ChunkSend for DropSink {
    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), End> {
        self.got += chunk.len() as u64;
        Ok(())
    }
    fn finish(&mut self) {
        self.finished = true;
    }
}

/// A stream that yields slices of one static buffer.
struct StaticSource {
    left: u64,
}

static DATA: [u8; CHUNK] = [7; CHUNK];

impl StaticSource {
    /// Fills `bufs` with packet-sized chunks (as quinn hands them over), at most `cap`
    /// bytes in all; how many chunks.
    fn fill(&mut self, bufs: &mut [Bytes], mut cap: u64) -> usize {
        let mut filled = 0;
        for buf in bufs.iter_mut() {
            let n = self.left.min(cap).min(1200) as usize;
            if n == 0 {
                break;
            }
            self.left -= n as u64;
            cap -= n as u64;
            *buf = Bytes::from_static(&DATA[..n]);
            filled += 1;
        }
        filled
    }
}

impl ChunkRecv for StaticSource {
    async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
        if self.left == 0 {
            return Ok(None);
        }
        Ok(Some(self.fill(bufs, u64::MAX)))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Allocations of socket→QUIC over `total` bytes.
fn socket_to_quic_allocations(total: u64) -> u64 {
    let rt = runtime();
    let counters = Counters::default();
    let mut socket = tokio::io::repeat(1).take(total);
    let mut sink = DropSink {
        got: 0,
        finished: false,
    };
    let (dir, allocations) = counted(|| {
        rt.block_on(unconstrained(forward::socket_to_link(
            &mut socket,
            &mut sink,
            &counters.up,
            None,
            None,
        )))
    });
    assert_eq!(dir, Dir::Eof);
    assert!(sink.finished);
    assert_eq!(sink.got, total);
    allocations
}

/// Allocations of QUIC→socket over `total` bytes.
fn quic_to_socket_allocations(total: u64) -> u64 {
    let rt = runtime();
    let counters = Counters::default();
    let mut source = StaticSource { left: total };
    let mut socket = tokio::io::sink();
    let (dir, allocations) = counted(|| {
        rt.block_on(unconstrained(forward::link_to_socket(
            &mut source,
            &mut socket,
            &counters.down,
            None,
        )))
    });
    assert_eq!(dir, Dir::Eof);
    assert_eq!(
        counters.down.load(std::sync::atomic::Ordering::Relaxed),
        total
    );
    allocations
}

// A few one-off allocations (the first buffer, the runtime's first poll) are fine; what
// must not happen is a count that grows with the number of chunks.

#[test]
fn socket_to_quic_reuses_its_buffer() {
    let small = socket_to_quic_allocations(TOTAL / 64);
    let large = socket_to_quic_allocations(TOTAL);
    assert!(small <= 4, "{small} allocations for 256 chunks");
    assert_eq!(
        large, small,
        "allocations grew with the data: per-chunk allocation"
    );
}

#[test]
fn quic_to_socket_copies_nothing() {
    let small = quic_to_socket_allocations(TOTAL / 64);
    let large = quic_to_socket_allocations(TOTAL);
    assert!(small <= 2, "{small} allocations for 256 chunks");
    assert_eq!(
        large, small,
        "allocations grew with the data: per-chunk allocation"
    );
}

/// A device under credit: slices of one static buffer, never past the limit the relay's
/// grant has posted (it takes the posted limits itself, as the agent's control reader does).
struct CreditedSource {
    data: StaticSource,
    sent: u64,
    limit: u64,
    outbox: std::sync::Arc<cloudlink::credit::Outbox>,
    posted: Vec<(std::sync::Arc<str>, u64)>,
}

impl ChunkRecv for CreditedSource {
    async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
        if self.data.left == 0 {
            return Ok(None);
        }
        if self.sent == self.limit {
            self.outbox.next(&mut self.posted).await;
            for (_, limit) in self.posted.drain(..) {
                self.limit = self.limit.max(limit);
            }
        }
        let before = self.data.left;
        let filled = self.data.fill(bufs, self.limit - self.sent);
        self.sent += before - self.data.left;
        Ok(Some(filled))
    }
}

/// Allocations of the relay's credited QUIC→socket pump over `total` bytes.
fn credited_quic_to_socket_allocations(total: u64) -> u64 {
    use cloudlink::credit::{Budget, Grant, Outbox};
    let rt = runtime();
    let counters = Counters::default();
    let outbox = std::sync::Arc::new(Outbox::default());
    let mut grant = Grant::open(
        "t",
        outbox.clone(),
        std::sync::Arc::new(Budget::new(1 << 30)),
    );
    let mut source = CreditedSource {
        data: StaticSource { left: total },
        sent: 0,
        limit: grant.limit(),
        outbox,
        posted: Vec::with_capacity(4),
    };
    let mut socket = tokio::io::sink();
    let user = || cloudlink::credit::UserQueue::IN_PROCESS;
    let (dir, allocations) = counted(|| {
        rt.block_on(unconstrained(forward::link_to_user(
            &mut source,
            &mut socket,
            &counters.down,
            &mut grant,
            &user,
            None,
        )))
    });
    assert_eq!(dir, Dir::Eof);
    assert_eq!(
        counters.down.load(std::sync::atomic::Ordering::Relaxed),
        total
    );
    allocations
}

#[test]
fn the_relay_s_credited_pump_allocates_nothing_per_chunk_or_grant() {
    let small = credited_quic_to_socket_allocations(TOTAL / 64);
    let large = credited_quic_to_socket_allocations(TOTAL);
    assert!(small <= 4, "{small} allocations for 256 chunks");
    assert_eq!(
        large, small,
        "allocations grew with the data: per-chunk or per-grant allocation"
    );
}

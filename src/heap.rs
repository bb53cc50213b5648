//! Giving freed heap memory back to the system.
//!
//! The relay runs on glibc's malloc, which returns memory to the kernel only from the top
//! of a heap (and whole `mmap`ed blocks); free chunks in the middle of its arenas stay in
//! the process. After a burst of tunnels ends (2,000 stalled readers closing, say) that can
//! be hundreds of MiB of RSS the relay no longer uses (docs/memory.md). `malloc_trim(3)`
//! walks every arena and hands each whole free page back with `MADV_DONTNEED`, which is
//! the allocator behaviour the relay's "given back" bound relies on; it is measured in
//! `cargo bench --bench tunnel -- --scenarios k` and asserted in tests/suite/memory.rs.
//! Other C libraries have no such call: there this does nothing.

#![allow(unsafe_code)]

/// Returns the allocator's whole free pages to the kernel; whether any were returned
/// (always false where the C library has no `malloc_trim`).
pub fn give_back() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers and only rearranges the allocator's own
        // free lists under its arena locks; it is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Resident pages of this process, from `/proc/self/statm`.
    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    fn free_pages_in_the_middle_of_the_heap_go_back() {
        // 64 MiB in small blocks (below glibc's mmap threshold, so they come from the
        // heap), touched so that they are resident.
        let mut blocks: Vec<Box<[u8]>> = (0..16 * 1024)
            .map(|i| vec![(i % 251) as u8; 4096].into_boxed_slice())
            .collect();
        // Keep the last one: the heap's top stays in use, so glibc cannot give back the
        // freed ones by moving the top down, which it does on its own.
        let last = blocks.pop().unwrap();
        let before = resident_bytes();
        drop(blocks);
        let freed_alone = resident_bytes();
        give_back();
        let after = resident_bytes();
        assert_eq!(usize::from(last[4095]), (16 * 1024 - 1) % 251);
        // Other tests run beside this one and allocate too: compare with a wide margin.
        assert!(
            freed_alone + (16 << 20) > before,
            "glibc returned the middle of its heap by itself ({before} → {freed_alone} bytes)"
        );
        assert!(
            after + (32 << 20) < freed_alone,
            "RSS {freed_alone} → {after} bytes after giving back 64 MiB of free blocks"
        );
    }
}

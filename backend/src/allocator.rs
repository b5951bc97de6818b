//! The global allocator of the `moecast` binary and the benches: mimalloc, keeping the
//! memory it frees.
//!
//! Burn allocates and frees large intermediate tensors every training step. glibc hands
//! blocks above its mmap threshold back to the OS, and mimalloc purges freed pages after
//! a delay; either way the next step page-faults them in again and the kernel zeroes
//! them: about a tenth of a training step's CPU time in `perf`, and 2-14% of training
//! throughput (`make bench`, three alternating runs). With [`retain_freed_memory`] the
//! process keeps its peak memory until it exits, for reuse.

pub use mimalloc::MiMalloc as Allocator;

/// mimalloc's `mi_option_purge_delay` (position 15 of its options enum, v2 and v3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS (call it first in `main`).
pub fn retain_freed_memory() {
    // SAFETY: sets one of mimalloc's process-wide options, which it reads atomically.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

//! The global allocator of the `moecast` binary and the benches: mimalloc, keeping the
//! memory it frees, with freed large blocks kept for the next allocation of their size.
//!
//! Burn allocates and frees large intermediate tensors every training step, and the
//! offloading engine a decoded expert for every read (three 6 MB projections at
//! Qwen3-30B-A3B's size) while the cache drops another. glibc hands blocks above its
//! mmap threshold back to the OS, and mimalloc purges freed pages after a delay; either
//! way the next allocation page-faults fresh pages in and the kernel zeroes them: about
//! a tenth of a training step's CPU time in `perf`, and 2-14% of training throughput
//! (`make bench`, three alternating runs). With [`retain_freed_memory`] mimalloc keeps
//! its peak memory until the process exits, but still hands a new large allocation
//! fresh pages while freed ones wait (in the engine, 1 GB of first touches for a 450 MB
//! expert cache, the kernel's zeroing then 38% of the run's CPU time in `perf`). So
//! [`Allocator`] also keeps up to [`LARGE_CACHE_BLOCKS`] freed blocks of at least
//! [`LARGE_BLOCK`] bytes ([`LARGE_CACHE_BYTES`] in all, oldest dropped first) and hands
//! one back to the next allocation of the same size and alignment: its pages are
//! already touched.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;

use mimalloc::MiMalloc;

/// Blocks this large or larger are kept when freed.
pub const LARGE_BLOCK: usize = 1 << 20;
/// At most this many freed large blocks are kept...
pub const LARGE_CACHE_BLOCKS: usize = 64;
/// ... and at most this many bytes of them.
pub const LARGE_CACHE_BYTES: usize = 1 << 29;
/// Oldest blocks dropped at most to make room for one freed block (else it goes back).
const MAX_DROPPED: usize = 8;

/// A freed block: its address, size and alignment.
#[derive(Clone, Copy)]
struct Block {
    ptr: usize,
    size: usize,
    align: usize,
}

/// The kept blocks, oldest first.
struct LargeBlocks {
    blocks: [Block; LARGE_CACHE_BLOCKS],
    len: usize,
    bytes: usize,
}

impl LargeBlocks {
    const fn new() -> LargeBlocks {
        LargeBlocks {
            blocks: [Block {
                ptr: 0,
                size: 0,
                align: 0,
            }; LARGE_CACHE_BLOCKS],
            len: 0,
            bytes: 0,
        }
    }

    /// Takes a kept block of `layout`'s size and alignment.
    fn take(&mut self, layout: Layout) -> Option<*mut u8> {
        let i = self.blocks[..self.len]
            .iter()
            .rposition(|b| b.size == layout.size() && b.align == layout.align())?;
        let b = self.remove(i);
        Some(b.ptr as *mut u8)
    }

    fn remove(&mut self, i: usize) -> Block {
        let b = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= b.size;
        b
    }

    /// Keeps `b`, dropping the oldest blocks (into `dropped`) to make room; false
    /// (nothing kept or dropped) when `b` would need more than [`MAX_DROPPED`] of them.
    fn keep(&mut self, b: Block, dropped: &mut [Option<Block>; MAX_DROPPED]) -> bool {
        if b.size > LARGE_CACHE_BYTES {
            return false;
        }
        let (mut n, mut bytes) = (0, self.bytes);
        while self.len - n >= LARGE_CACHE_BLOCKS || bytes + b.size > LARGE_CACHE_BYTES {
            if n == MAX_DROPPED {
                return false;
            }
            bytes -= self.blocks[n].size;
            n += 1;
        }
        for slot in dropped.iter_mut().take(n) {
            *slot = Some(self.remove(0));
        }
        self.blocks[self.len] = b;
        self.len += 1;
        self.bytes += b.size;
        true
    }
}

static KEPT: Mutex<LargeBlocks> = Mutex::new(LargeBlocks::new());

/// mimalloc, handing freed large blocks to the next allocation of their size (see the
/// module's documentation).
pub struct Allocator;

impl Allocator {
    fn kept() -> std::sync::MutexGuard<'static, LargeBlocks> {
        KEPT.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// SAFETY: every block comes from mimalloc and goes back to it with the layout it was
// allocated with: a kept block is handed out only for the same size and alignment.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE_BLOCK {
            if let Some(p) = Self::kept().take(layout) {
                return p;
            }
        }
        MiMalloc.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        MiMalloc.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE_BLOCK {
            let b = Block {
                ptr: ptr as usize,
                size: layout.size(),
                align: layout.align(),
            };
            let mut dropped = [None; MAX_DROPPED];
            let kept = Self::kept().keep(b, &mut dropped);
            for d in dropped.into_iter().flatten() {
                MiMalloc.dealloc(
                    d.ptr as *mut u8,
                    Layout::from_size_align_unchecked(d.size, d.align),
                );
            }
            if kept {
                return;
            }
        }
        MiMalloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE_BLOCK && new_size < LARGE_BLOCK {
            return MiMalloc.realloc(ptr, layout, new_size);
        }
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

/// mimalloc's `mi_option_purge_delay` (position 15 of its options enum, v2 and v3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS (call it first in `main`).
pub fn retain_freed_memory() {
    // SAFETY: sets one of mimalloc's process-wide options, which it reads atomically.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A freed large block goes to the next allocation of its size and alignment, not
    /// to one of another size; small blocks are not kept.
    #[test]
    fn a_freed_large_block_is_handed_to_the_next_allocation_of_its_layout() {
        // A size no other test allocates.
        let layout = Layout::from_size_align(LARGE_BLOCK + 4096 * 3 + 8, 8).unwrap();
        let other = Layout::from_size_align(LARGE_BLOCK + 4096 * 5 + 8, 8).unwrap();
        unsafe {
            let a = Allocator.alloc(layout);
            assert!(!a.is_null());
            a.write_bytes(7, layout.size());
            Allocator.dealloc(a, layout);
            let b = Allocator.alloc(other);
            assert_ne!(a, b, "a block of another size was handed out");
            let c = Allocator.alloc(layout);
            assert_eq!(a, c, "the freed block was not handed back");
            assert_eq!(*c.add(layout.size() - 1), 7);
            // A zeroed allocation never gets a kept block's old bytes.
            Allocator.dealloc(c, layout);
            let z = Allocator.alloc_zeroed(layout);
            assert!((0..layout.size()).step_by(4096).all(|i| *z.add(i) == 0));
            Allocator.dealloc(z, layout);
            Allocator.dealloc(b, other);
        }
    }

    /// The kept blocks stay within their count and byte bounds, the oldest dropped
    /// first; a block too large to keep is refused.
    #[test]
    fn kept_blocks_stay_within_their_bounds_oldest_dropped_first() {
        let mut kept = LargeBlocks::new();
        let block = |i: usize, size: usize| Block {
            ptr: 4096 * (i + 1),
            size,
            align: 8,
        };
        let mut dropped = [None; MAX_DROPPED];
        for i in 0..LARGE_CACHE_BLOCKS {
            assert!(kept.keep(block(i, LARGE_BLOCK), &mut dropped));
        }
        assert!(dropped.iter().all(Option::is_none));
        assert!(kept.keep(block(100, LARGE_BLOCK), &mut dropped));
        assert_eq!(dropped[0].map(|b| b.ptr), Some(4096));
        assert_eq!(kept.len, LARGE_CACHE_BLOCKS);
        let mut dropped = [None; MAX_DROPPED];
        assert!(!kept.keep(block(101, LARGE_CACHE_BYTES + 1), &mut dropped));
        let big = LARGE_CACHE_BYTES - 10 * LARGE_BLOCK;
        assert!(
            !kept.keep(block(102, big), &mut dropped),
            "needs 54 dropped"
        );
        assert!(dropped.iter().all(Option::is_none));
        assert_eq!(kept.len, LARGE_CACHE_BLOCKS);
        let bytes = kept.bytes;
        let l = Layout::from_size_align(LARGE_BLOCK, 8).unwrap();
        assert_eq!(kept.take(l), Some((4096 * 101) as *mut u8), "newest first");
        assert_eq!(kept.bytes, bytes - LARGE_BLOCK);
        assert_eq!(
            kept.take(Layout::from_size_align(LARGE_BLOCK, 16).unwrap()),
            None
        );
    }
}

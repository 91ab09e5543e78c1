//! A global allocator that counts: the `kiln` binary installs [`Counting`] over mimalloc, so
//! `kiln bench --profile` can report allocations, bytes allocated and the heap's peak per step.
//! Off, an allocation pays one relaxed atomic load; on, a few relaxed atomic operations.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// The allocator `A`, counting allocations while [`enable`]d.
pub struct Counting<A>(pub A);

static ON: AtomicBool = AtomicBool::new(false);
static CALLS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated minus bytes freed while counting, and the highest value it reached since
/// [`take_peak`]: relative figures (blocks allocated before counting started are freed against
/// the same counter, as they should be: the heap really shrank).
static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);
/// Whether a [`Counting`] allocator is installed (set by its first allocation).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Allocations and bytes requested (reallocations count as one allocation of the new size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocCount {
    pub allocations: u64,
    pub bytes: u64,
}

// SAFETY: every call is forwarded unchanged to `A`; counting has no effect on the memory
// handed out.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ON.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from this allocator, that is from `A`, with `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if ON.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: as for `dealloc`, and the caller's contract for `realloc`.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

fn note(bytes: usize) {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
    if ON.load(Ordering::Relaxed) {
        CALLS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
        let live = LIVE.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

/// Starts or stops counting.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The heap's change since counting first started (bytes allocated minus freed), or `None`
/// when no [`Counting`] allocator is installed.
pub fn live() -> Option<i64> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed))
}

/// The highest [`live`] value since the last call, which restarts the peak from the heap as it
/// is now; `None` when no [`Counting`] allocator is installed.
pub fn take_peak() -> Option<i64> {
    INSTALLED.load(Ordering::Relaxed).then(|| {
        let now = LIVE.load(Ordering::Relaxed);
        PEAK.swap(now, Ordering::Relaxed).max(now)
    })
}

/// The counts so far, or `None` when no [`Counting`] allocator is installed (a library user's
/// binary, the tests).
pub fn count() -> Option<AllocCount> {
    INSTALLED.load(Ordering::Relaxed).then(|| AllocCount {
        allocations: CALLS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    })
}

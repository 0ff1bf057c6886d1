//! Per-thread reuse of the chunk buffers of the CPU vector-field ops. A field evaluation of a
//! 1024-row batch allocates a few dozen buffers of up to a few hundred KiB; fresh allocations
//! of that size go to mmap/munmap, whose page faults and TLB shootdowns cost more than the
//! arithmetic. Buffers taken here are handed back with [`recycle`] on the same thread.

use std::cell::RefCell;

/// Buffers kept per thread (more than one chunk's worth is never in flight).
const KEEP: usize = 64;
/// Values kept per thread (64 MiB), so that wide or deep fields cannot hoard memory.
const KEEP_VALUES: usize = 16 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A pooled buffer of exactly `len` values (the same shapes recur on every field evaluation),
/// or None.
fn take(len: usize) -> Option<Vec<f32>> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let i = p.iter().rposition(|v| v.len() == len)?;
        Some(p.swap_remove(i))
    })
}

/// A buffer of `len` zeros.
pub(super) fn zeros(len: usize) -> Vec<f32> {
    match take(len) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => vec![0.0; len],
    }
}

/// A buffer of `len` values with unspecified (stale but initialised) contents, for outputs
/// that are overwritten in full: saves the memset of [`zeros`].
pub(super) fn dirty(len: usize) -> Vec<f32> {
    take(len).unwrap_or_else(|| vec![0.0; len])
}

/// Hands a buffer back for reuse on this thread.
pub(super) fn recycle(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if v.len() > KEEP_VALUES {
            return;
        }
        // Shapes of past batches (e.g. larger active sets of a per-row solve) go first.
        let mut held: usize = p.iter().map(Vec::len).sum();
        while !p.is_empty() && (p.len() == KEEP || held + v.len() > KEEP_VALUES) {
            held -= p.remove(0).len();
        }
        p.push(v);
    });
}

pub(super) fn recycle_all(vs: impl IntoIterator<Item = Vec<f32>>) {
    vs.into_iter().for_each(recycle);
}

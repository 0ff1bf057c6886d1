//! The CPU backend's per-thread scratch arena: buffers taken by a chunk of work and handed back
//! to the thread's pool on drop. A chunk's activations are ~128 KiB per layer, the size at
//! which the allocator hands out fresh pages; reusing buffers avoids a page fault per page and
//! the zeroing of `vec![0.0; n]` on every call. (Shared by the coupling and MADE ops.)

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers above this many f32 (16 MiB) are freed instead of kept, and a thread keeps at most
/// `MAX_POOLED` buffers, so that one huge call does not pin its memory for the thread's life.
const MAX_POOLED_LEN: usize = 1 << 22;
const MAX_POOLED: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` f32 taken from this thread's pool and returned to it on drop. The
/// contents are unspecified unless made by [`Scratch::zeroed`].
pub struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    pub fn new(len: usize) -> Self {
        let mut buf = POOL
            .try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Scratch { buf, len }
    }

    pub fn zeroed(len: usize) -> Self {
        let mut s = Scratch::new(len);
        s.fill(0.0);
        s
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() <= MAX_POOLED_LEN {
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < MAX_POOLED {
                    p.push(buf);
                }
            });
        }
    }
}

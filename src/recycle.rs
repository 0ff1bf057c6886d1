//! Host buffers freed by tensors, kept per thread for the next tensors of a similar size.
//!
//! An op's outputs at batch 512 and up are hundreds of KiB each. The allocator serves them
//! from the top of its heap and gives that memory back to the system when they are freed at
//! the end of a step, so every step page-faults them in again and the kernel zeroes every
//! page: about a tenth of a training step on the CPU. Parameter gradients are smaller (a
//! 64 × 64 weight is 16 KiB) but there are dozens per step, and together they are enough for
//! the allocator to shrink its heap when they are freed, which costs the same page faults and
//! an interrupt of every other core to flush its TLB. A tensor's buffer goes back to its
//! thread's cache instead when it is dropped, and op outputs are taken from there. The cache
//! is bounded ([`MAX_BUFFERS`] buffers, [`MAX_BYTES`] in all, only buffers of [`MIN_LEN`] to
//! [`MAX_LEN`] values), and [`clear`] empties it.

use std::cell::RefCell;

/// Smaller buffers are left to the allocator (4 KiB).
pub const MIN_LEN: usize = 1 << 10;
/// Larger buffers are freed (64 MiB).
pub const MAX_LEN: usize = 1 << 24;
/// The most buffers a thread keeps (a training step's gradients of a deep flow, with room).
pub const MAX_BUFFERS: usize = 128;
/// The most memory a thread keeps (256 MiB).
pub const MAX_BYTES: usize = 1 << 28;

thread_local! {
    static CACHE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// An empty vector with room for `len` values: the smallest cached buffer that holds them
/// and is at most twice as large, or a new allocation.
pub fn take(len: usize) -> Vec<f32> {
    if (MIN_LEN..=MAX_LEN).contains(&len) {
        let found = CACHE.try_with(|c| {
            let mut c = c.borrow_mut();
            let fits = |v: &Vec<f32>| (len..=2 * len).contains(&v.capacity());
            let best = c
                .iter()
                .enumerate()
                .filter(|(_, v)| fits(v))
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            best.map(|i| c.swap_remove(i))
        });
        if let Ok(Some(v)) = found {
            return v;
        }
    }
    Vec::with_capacity(len)
}

/// Keeps a buffer for a later [`take`] on this thread (or frees it: too small or too large,
/// or no room), the oldest cached buffers making way for it.
pub fn give(mut v: Vec<f32>) {
    let cap = v.capacity();
    if !(MIN_LEN..=MAX_LEN).contains(&cap) {
        return;
    }
    v.clear();
    let _ = CACHE.try_with(|c| {
        let mut c = c.borrow_mut();
        let held = |c: &Vec<Vec<f32>>| c.iter().map(|v| v.capacity() * 4).sum::<usize>();
        while !c.is_empty() && (c.len() >= MAX_BUFFERS || held(&c) + cap * 4 > MAX_BYTES) {
            c.remove(0);
        }
        c.push(v);
    });
}

/// Frees every buffer this thread has cached.
pub fn clear() {
    let _ = CACHE.try_with(|c| c.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_buffer_is_taken_again_by_a_fitting_request_only() {
        clear();
        let v = vec![1.0f32; MIN_LEN * 3];
        let ptr = v.as_ptr();
        give(v);
        // Too large a buffer for this request (more than twice its size): a new one.
        let small = take(MIN_LEN);
        assert_ne!(small.as_ptr(), ptr);
        let again = take(MIN_LEN * 2);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty() && again.capacity() >= MIN_LEN * 2);
        // Small buffers are not kept.
        give(vec![0.0; 10]);
        assert!(take(MIN_LEN).capacity() >= MIN_LEN);
        clear();
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        clear();
        for _ in 0..MAX_BUFFERS + 5 {
            give(Vec::with_capacity(MIN_LEN));
        }
        let held = CACHE.with(|c| c.borrow().len());
        assert_eq!(held, MAX_BUFFERS);
        give(Vec::with_capacity(MAX_LEN));
        let bytes = CACHE.with(|c| c.borrow().iter().map(|v| v.capacity() * 4).sum::<usize>());
        assert!(bytes <= MAX_BYTES);
        clear();
        assert_eq!(CACHE.with(|c| c.borrow().len()), 0);
    }
}

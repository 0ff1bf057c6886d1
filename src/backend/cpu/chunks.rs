//! Running an op's chunks of rows on the calling thread and the pool's threads together.
//!
//! A rayon parallel iterator called from a thread outside the pool (a user's thread, the
//! trainer's loop) injects its work, sleeps, and is woken when the pool is done: two
//! cross-thread wake-ups per call, about 15 µs on a 2-core machine, which is a third of a
//! coupling layer's work at batch 512. Here the caller works too: it and `threads − 1`
//! helpers spawned into the pool take chunk indices from a shared counter until none are
//! left, then the caller waits only for the chunks a helper has already started. A helper
//! that wakes late finds nothing to do, and the caller never waits for it to wake.
//!
//! Results come back in chunk order whoever ran them, so reductions over them stay
//! deterministic.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Outcome<T> = std::result::Result<T, Box<dyn Any + Send>>;

/// Runs `work(i)` for every i in `0..n`, spread over the caller and the current rayon pool,
/// and returns the results in index order. A panic in any chunk is raised again here, after
/// every started chunk has finished.
pub fn run_chunks<T: Send>(n: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let helpers = rayon::current_num_threads()
        .saturating_sub(1)
        .min(n.saturating_sub(1));
    if helpers == 0 {
        return (0..n).map(work).collect();
    }
    let slots: Vec<Mutex<Option<Outcome<T>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let run = |i: usize| {
        let out = catch_unwind(AssertUnwindSafe(|| work(i)));
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
    };
    let run: &(dyn Fn(usize) + Sync) = &run;
    // SAFETY: only the lifetime is erased. `Shared::drain` calls `run` only for an index it
    // claimed below `n`, and this function does not return (so `run`, `work` and `slots`
    // stay alive) until `done` counts every such call as finished. A helper that starts
    // after that claims an index >= n and touches nothing but the counters in the `Arc`.
    let run: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(run) };
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        n,
        run,
    });
    for _ in 0..helpers {
        let shared = Arc::clone(&shared);
        rayon::spawn(move || shared.drain());
    }
    shared.drain();
    shared.wait();
    slots
        .into_iter()
        .map(|s| {
            let out = s.into_inner().unwrap_or_else(|e| e.into_inner());
            match out.expect("every chunk ran") {
                Ok(v) => v,
                Err(panic) => resume_unwind(panic),
            }
        })
        .collect()
}

/// The counters of one `run_chunks` call, shared with its helpers.
struct Shared {
    /// The next unclaimed chunk.
    next: AtomicUsize,
    /// Chunks whose `run` has returned.
    done: AtomicUsize,
    n: usize,
    /// Runs one chunk and stores its outcome; valid while `done < n` (see `run_chunks`).
    run: *const (dyn Fn(usize) + Sync),
}

// SAFETY: `run` points to a `Sync` closure, called through a shared reference only, and only
// while it is alive (see `run_chunks`); the counters are atomics.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Claims and runs chunks until none are left.
    fn drain(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: i < n was claimed by this call alone, so `done < n` until the matching
            // increment below, and `run` is alive (see `run_chunks`).
            unsafe { (*self.run)(i) };
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// Waits until every chunk has run: spins briefly (the last chunk is usually a helper's
    /// and nearly done), then yields the core.
    fn wait(&self) {
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < self.n {
            if spins < 2_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_and_comes_back_in_order() {
        for n in [0usize, 1, 2, 3, 17, 200] {
            let calls = AtomicUsize::new(0);
            let out = run_chunks(n, |i| {
                calls.fetch_add(1, Ordering::Relaxed);
                i * i
            });
            assert_eq!(out, (0..n).map(|i| i * i).collect::<Vec<_>>());
            assert_eq!(calls.load(Ordering::Relaxed), n);
        }
    }

    #[test]
    fn works_inside_the_pool_and_nested() {
        let out = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool")
            .install(|| run_chunks(5, |i| run_chunks(4, move |j| i * 10 + j)));
        let want: Vec<Vec<usize>> = (0..5)
            .map(|i| (0..4).map(|j| i * 10 + j).collect())
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn a_panicking_chunk_panics_the_caller_after_the_others_finish() {
        let finished = AtomicUsize::new(0);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            run_chunks(8, |i| {
                if i == 3 {
                    panic!("chunk 3");
                }
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(caught.is_err());
        assert_eq!(finished.load(Ordering::Relaxed), 7);
    }
}

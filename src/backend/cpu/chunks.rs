//! Running an op's chunks of rows on the calling thread and the pool's threads together.
//!
//! A rayon parallel iterator called from a thread outside the pool (a user's thread, the
//! trainer's loop) injects its work, sleeps, and is woken when the pool is done: two
//! cross-thread wake-ups per call, about 15 µs on a 2-core machine, which is a third of a
//! coupling layer's work at batch 512. Here the caller works too: each call posts its
//! chunks on a board, and the caller and up to `threads − 1` helpers take chunk indices from
//! a shared counter until none are left; the caller then waits only for the chunks a helper
//! has already started. A helper that wakes late finds nothing to do, and the caller never
//! waits for it to wake.
//!
//! Waking a sleeping pool thread costs tens of µs, so a helper with nothing left to do stays
//! awake for [`LINGER`], watching the board; a training step's ops follow each other
//! closely, and all but the first find their helpers already running. (This is the
//! spin-then-sleep policy of OpenMP runtimes; a lingering helper holds its pool thread, so
//! other rayon work waits at most that long.)
//!
//! Results come back in chunk order whoever ran them, so reductions over them stay
//! deterministic.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a helper with nothing to do keeps watching the board before it returns its
/// thread to the pool.
pub const LINGER: Duration = Duration::from_micros(200);

/// The chunks most recently posted, and how many helpers are alive to take them.
struct Board {
    /// Bumped on every post.
    generation: AtomicU64,
    latest: Mutex<Option<Arc<Shared>>>,
    /// Helpers spawned and not yet returned to the pool. Never more than the pool's threads
    /// less one (the caller is the other), so that on a machine with as many threads as cores
    /// a lingering helper never takes a core from one with work.
    helpers: AtomicUsize,
}

static BOARD: Board = Board {
    generation: AtomicU64::new(0),
    latest: Mutex::new(None),
    helpers: AtomicUsize::new(0),
};

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
    post(Arc::clone(&shared));
    // Live helpers join without a wake-up; spawn the rest.
    let mut live = BOARD.helpers.load(Ordering::Relaxed);
    while live < helpers {
        let more = live + 1;
        match BOARD
            .helpers
            .compare_exchange(live, more, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                rayon::spawn(help);
                live = more;
            }
            Err(now) => live = now,
        }
    }
    shared.drain();
    shared.wait();
    unpost(&shared);
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

/// Values handed out once each, by chunk index, to whichever thread runs that chunk: how
/// disjoint `&mut` blocks of an output reach the chunks.
pub struct Handout<T>(Vec<Mutex<Option<T>>>);

impl<T> Handout<T> {
    pub fn new(items: impl IntoIterator<Item = T>) -> Self {
        Handout(items.into_iter().map(|v| Mutex::new(Some(v))).collect())
    }

    /// Item `i`; each is taken once (a second take is a bug in the caller).
    pub fn take(&self, i: usize) -> T {
        self.0[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each item is handed out once")
    }
}

/// Puts a call's chunks on the board for watching helpers.
fn post(shared: Arc<Shared>) {
    *BOARD.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared);
    BOARD.generation.fetch_add(1, Ordering::Release);
}

/// Takes a finished call's chunks off the board, unless a later call has posted since.
fn unpost(done: &Arc<Shared>) {
    let mut latest = BOARD.latest.lock().unwrap_or_else(|e| e.into_inner());
    if latest.as_ref().is_some_and(|s| Arc::ptr_eq(s, done)) {
        *latest = None;
    }
}

/// A helper: runs the chunks of whatever is posted, until nothing new has come for
/// [`LINGER`].
fn help() {
    // Nothing seen yet, so the first look at the board finds the call that spawned it.
    let mut seen = None;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let now = BOARD.generation.load(Ordering::Acquire);
        if seen != Some(now) {
            seen = Some(now);
            let posted = BOARD
                .latest
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(shared) = posted {
                shared.drain();
            }
            idle_since = Instant::now();
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        // The clock is read now and then, not on every spin.
        if spins.is_multiple_of(64) && idle_since.elapsed() > LINGER {
            break;
        }
    }
    BOARD.helpers.fetch_sub(1, Ordering::Relaxed);
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

//! Bounded caches of things the CPU ops derive from their parameters (packed weights), keyed by
//! everything they are derived from, the parameters' stamps among it (`Tensor::stamp`: one
//! stamp, one set of values). Passes over unchanged weights (the layers of a density
//! evaluation, batch after batch, or the backward after the forward of one training step) then
//! share one packing. Training changes the weights at every step, so most entries are used a
//! few times and dropped: the caches are small, bounded in entries and in bytes.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::Result;
use crate::tensor::Tensor;

/// What a cached value holds in memory.
pub trait Footprint {
    fn bytes(&self) -> usize;
}

/// The stamps of a list of tensors, for a key.
pub fn stamps<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Vec<u64> {
    tensors.into_iter().map(Tensor::stamp).collect()
}

/// Values by key, most recently used last, at most `max_entries` of them and `max_bytes` in
/// all (a value larger than that is built and returned but not kept).
pub struct Cache<K, V> {
    kept: Mutex<Vec<(K, Arc<V>)>>,
    max_entries: usize,
    max_bytes: usize,
}

impl<K: PartialEq, V: Footprint> Cache<K, V> {
    pub const fn new(max_entries: usize, max_bytes: usize) -> Self {
        Cache {
            kept: Mutex::new(Vec::new()),
            max_entries,
            max_bytes,
        }
    }

    fn kept(&self) -> MutexGuard<'_, Vec<(K, Arc<V>)>> {
        // Entries are pushed and removed whole, so a panic elsewhere while the lock was held
        // cannot have left the list invalid.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value kept for `key`, or the one `build` makes, which is then kept.
    pub fn get_or_build(&self, key: K, build: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        {
            let mut kept = self.kept();
            if let Some(i) = kept.iter().position(|(k, _)| *k == key) {
                let hit = kept.remove(i);
                let value = hit.1.clone();
                kept.push(hit);
                return Ok(value);
            }
        }
        // Built outside the lock, so that other threads' ops go on meanwhile (two threads may
        // then build the same value; the later one replaces the earlier).
        let value = Arc::new(build()?);
        let size = value.bytes();
        if size <= self.max_bytes {
            let mut kept = self.kept();
            kept.retain(|(k, _)| *k != key);
            while !kept.is_empty()
                && (kept.len() >= self.max_entries || bytes(&kept) + size > self.max_bytes)
            {
                kept.remove(0);
            }
            kept.push((key, value.clone()));
        }
        Ok(value)
    }

    /// Drops every kept value (values still in use live on until their last user is done).
    pub fn clear(&self) {
        self.kept().clear();
    }

    /// The number of values kept and their bytes.
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        let kept = self.kept();
        (kept.len(), bytes(&kept))
    }
}

fn bytes<K, V: Footprint>(kept: &[(K, Arc<V>)]) -> usize {
    kept.iter().map(|(_, v)| v.bytes()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    impl Footprint for Vec<u8> {
        fn bytes(&self) -> usize {
            self.len()
        }
    }

    #[test]
    fn a_kept_value_is_returned_until_it_is_evicted() {
        let cache: Cache<u32, Vec<u8>> = Cache::new(2, 1000);
        let built = std::cell::Cell::new(0);
        let get = |k: u32| {
            cache
                .get_or_build(k, || {
                    built.set(built.get() + 1);
                    Ok(vec![k as u8; 10])
                })
                .unwrap()
        };
        let a = get(1);
        assert!(Arc::ptr_eq(&a, &get(1)));
        assert_eq!(built.get(), 1);
        get(2);
        get(1); // 1 is now the most recently used: 3 evicts 2.
        get(3);
        assert_eq!(cache.held(), (2, 20));
        assert!(Arc::ptr_eq(&a, &get(1)));
        assert_eq!(built.get(), 3);
        get(2);
        assert_eq!(built.get(), 4);
        // A failed build keeps nothing and passes the error on.
        let failed = cache.get_or_build(9, || Err(Error::invalid("no")));
        assert!(failed.is_err());
        assert_eq!(cache.held(), (2, 20));
        cache.clear();
        assert_eq!(cache.held(), (0, 0));
        assert!(!Arc::ptr_eq(&a, &get(1)), "a cleared value is built again");
        assert_eq!(built.get(), 5);
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let cache: Cache<u32, Vec<u8>> = Cache::new(10, 25);
        for k in 0..5 {
            cache.get_or_build(k, || Ok(vec![0; 10])).unwrap();
            assert!(cache.held().1 <= 25);
        }
        assert_eq!(cache.held(), (2, 20));
        // Larger than the whole bound: returned, not kept.
        let big = cache.get_or_build(7, || Ok(vec![0; 26])).unwrap();
        assert_eq!(big.len(), 26);
        assert_eq!(cache.held(), (2, 20));
    }
}

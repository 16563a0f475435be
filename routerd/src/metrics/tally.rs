//! Lock-free counters for a small, open set of label combinations (route x status, pool x
//! policy x branch). A key is packed into a nonzero `u64`; the first request that meets a new
//! key claims a free slot with one compare-and-swap, every later one finds it by a short scan
//! and adds with one atomic. Nothing on the request path takes a lock. The exposition reads the
//! slots when `/metrics` is scraped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub struct Tally {
    keys: Box<[AtomicU64]>,
    counts: Box<[AtomicU64]>,
    /// Adds whose key found no free slot (the set was larger than planned).
    pub overflow: AtomicU64,
}

impl Tally {
    pub fn new(slots: usize) -> Self {
        Self {
            keys: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            counts: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
        }
    }

    /// Adds `n` to `key`'s count (`key` must not be 0).
    pub fn add(&self, key: u64, n: u64) {
        debug_assert_ne!(key, 0, "0 marks a free slot");
        for (slot, count) in self.keys.iter().zip(self.counts.iter()) {
            let k = slot.load(Relaxed);
            let mine = k == key
                || (k == 0
                    && match slot.compare_exchange(0, key, Relaxed, Relaxed) {
                        Ok(_) => true,
                        Err(other) => other == key,
                    });
            if mine {
                count.fetch_add(n, Relaxed);
                return;
            }
        }
        self.overflow.fetch_add(n, Relaxed);
    }

    /// Every key seen, with its count.
    pub fn each(&self, mut f: impl FnMut(u64, u64)) {
        for (slot, count) in self.keys.iter().zip(self.counts.iter()) {
            match slot.load(Relaxed) {
                0 => return,
                k => f(k, count.load(Relaxed)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_adding_the_same_keys_lose_nothing() {
        let t = Arc::new(Tally::new(8));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        t.add(1 + i % 5, 1);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|h| h.join().unwrap());
        let mut seen = Vec::new();
        t.each(|k, n| seen.push((k, n)));
        seen.sort();
        assert_eq!(seen, (1..=5).map(|k| (k, 8_000)).collect::<Vec<_>>());
        for k in 6..=20 {
            t.add(k, 1);
        }
        assert_eq!(t.overflow.load(Relaxed), 12, "three slots were left for fifteen new keys");
    }
}

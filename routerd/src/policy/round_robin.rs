//! round_robin: a shared counter picks the next worker in registry order, skipping workers that
//! are not routable. Even spread, no memory of prefixes.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::{routable_from, Policy, RequestInfo};
use crate::registry::Worker;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize> {
        if workers.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed) % workers.len();
        routable_from(workers, start, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::{set_healthy, workers};

    #[test]
    fn cycles_and_skips_unroutable() {
        let ws = workers(3);
        let p = RoundRobin::default();
        let picks: Vec<_> =
            (0..6).map(|_| p.select(&ws, &RequestInfo::default()).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        set_healthy(&ws[1], false);
        let picks: Vec<_> =
            (0..3).map(|_| p.select(&ws, &RequestInfo::default()).unwrap()).collect();
        assert!(!picks.contains(&1));
        for w in &ws {
            set_healthy(w, false);
        }
        assert_eq!(p.select(&ws, &RequestInfo::default()), None);
        assert_eq!(p.select(&[], &RequestInfo::default()), None);
    }
}

//! random: a uniformly random routable worker.

use std::sync::Arc;

use rand::Rng;

use super::{routable_from, Policy, RequestInfo};
use crate::registry::Worker;

#[derive(Debug, Default)]
pub struct Random;

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize> {
        if workers.is_empty() {
            return None;
        }
        let pick = rand::rng().random_range(0..workers.len());
        if req.usable(&workers[pick]) {
            return Some(pick);
        }
        // Rare path: choose uniformly among the routable ones.
        let routable = super::usable(workers, req);
        match routable.len() {
            0 => routable_from(workers, 0, req),
            n => Some(routable[rand::rng().random_range(0..n)]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::{set_healthy, workers};

    #[test]
    fn spreads_over_routable_workers() {
        let ws = workers(4);
        set_healthy(&ws[3], false);
        let mut counts = [0; 4];
        for _ in 0..3000 {
            counts[Random.select(&ws, &RequestInfo::default()).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0);
        assert!(counts[..3].iter().all(|&c| c > 800), "{counts:?}");
    }
}

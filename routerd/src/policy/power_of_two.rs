//! power_of_two: pick two distinct routable workers at random and send to the less loaded
//! (ties go to either with equal chance). Load is the router's own in-flight count per worker,
//! raised to what the worker reports when `/get_load` polling is on. Avoids the herding of
//! "always the least loaded" while staying within a small factor of it.

use std::sync::Arc;

use rand::Rng;

use super::{Policy, RequestInfo};
use crate::registry::Worker;

#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize> {
        let routable = super::usable(workers, req);
        let mut rng = rand::rng();
        match routable.len() {
            0 => None,
            1 => Some(routable[0]),
            n => {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (a, b) = (routable[a], routable[b]);
                let (la, lb) = (workers[a].load(), workers[b].load());
                Some(if la < lb || (la == lb && rng.random_bool(0.5)) { a } else { b })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::workers;

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let ws = workers(2);
        let _busy: Vec<_> = (0..5).map(|_| ws[0].start_request()).collect();
        for _ in 0..100 {
            assert_eq!(PowerOfTwo.select(&ws, &RequestInfo::default()), Some(1));
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_many() {
        let ws = workers(4);
        let _busy: Vec<_> = (0..9).map(|_| ws[2].start_request()).collect();
        for _ in 0..500 {
            assert_ne!(PowerOfTwo.select(&ws, &RequestInfo::default()), Some(2));
        }
    }
}

//! bucket (prefill pools only, as sgl-router 0.3's `--prefill-policy bucket`): each prefill
//! worker owns a range of prompt lengths (in characters), so a worker sees prompts of similar
//! size and long prefills do not queue behind each other everywhere.
//!
//! 1. The ranges start equal over 0..4096 characters (the last one open-ended), in the order the
//!    workers are registered, and are refitted every `adjust_interval` from the requests of the
//!    last `adjust_interval` so that each range carries an equal share of their characters.
//! 2. A request goes to the worker whose range holds its length, unless the characters each
//!    worker received in the window are imbalanced (`max - min > balance_abs_threshold` and
//!    `max > min * balance_rel_threshold`, sgl-router's rule, counted in characters): then it goes
//!    to the worker that received the fewest.
//! 3. The set of routable workers changing (one leaves, fails or joins) starts the ranges afresh.
//!
//! sgl-router refits on a background timer and only when the per-range load moved by more than
//! 2x; here the refit happens on the first request after each interval (no task to run), every
//! time the window holds requests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Decision, Policy, RequestInfo};
use crate::registry::Worker;

/// Where the initial equal ranges end (sgl-router's `l_max`).
const INITIAL_SPAN: usize = 4096;
/// Requests kept in the window at most (a bound on memory under any load).
const MAX_WINDOW: usize = 100_000;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BucketConfig {
    #[serde(serialize_with = "crate::config::ser::duration")]
    pub adjust_interval: Duration,
    pub balance_abs_threshold: u64,
    pub balance_rel_threshold: f64,
}

pub struct Bucket {
    state: Mutex<State>,
}

struct State {
    cfg: BucketConfig,
    /// (worker URL, exclusive upper bound in characters), by range; the last is `usize::MAX`.
    ranges: Vec<(String, usize)>,
    /// The requests of the current window: when, how long, where.
    window: VecDeque<(Instant, usize, String)>,
    chars: HashMap<String, u64>,
    refit_at: Instant,
}

impl State {
    /// Equal ranges over `INITIAL_SPAN` for `urls`, the last open-ended.
    fn reset(&mut self, urls: &[&str]) {
        let gap = (INITIAL_SPAN / urls.len().max(1)).max(1);
        self.ranges = urls
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let end = if i + 1 == urls.len() { usize::MAX } else { (i + 1) * gap };
                (u.to_string(), end)
            })
            .collect();
        self.window.clear();
        self.chars.clear();
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, len, url)) = self.window.front() {
            if now.duration_since(*at) <= self.cfg.adjust_interval && self.window.len() < MAX_WINDOW
            {
                break;
            }
            if let Some(c) = self.chars.get_mut(url) {
                *c = c.saturating_sub(*len as u64);
            }
            self.window.pop_front();
        }
    }

    /// New upper bounds that give each range an equal share of the window's characters.
    fn refit(&mut self) {
        let n = self.ranges.len();
        if n < 2 || self.window.is_empty() {
            return;
        }
        let mut lens: Vec<usize> = self.window.iter().map(|(_, l, _)| *l).collect();
        lens.sort_unstable();
        let total: u64 = lens.iter().map(|l| *l as u64).sum();
        let share = (total / n as u64).max(1);
        let (mut acc, mut k, mut prev) = (0u64, 0usize, 0usize);
        for len in lens {
            acc += len as u64;
            while k + 1 < n && acc >= share * (k as u64 + 1) {
                // Bounds strictly increase, so every range stays non-empty.
                let end = (len + 1).max(prev + 1);
                self.ranges[k].1 = end;
                prev = end;
                k += 1;
            }
        }
        for r in &mut self.ranges[k..n - 1] {
            prev += 1;
            r.1 = prev;
        }
        self.ranges[n - 1].1 = usize::MAX;
    }
}

const BY_LENGTH: &str = "bucket";
const BALANCE: &str = "balance";

impl Bucket {
    pub fn new(cfg: BucketConfig) -> Self {
        Self {
            state: Mutex::new(State {
                refit_at: Instant::now() + cfg.adjust_interval,
                cfg,
                ranges: Vec::new(),
                window: VecDeque::new(),
                chars: HashMap::new(),
            }),
        }
    }

    /// The current ranges: (worker URL, exclusive upper bound in characters).
    pub fn ranges(&self) -> Vec<(String, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).ranges.clone()
    }
}

impl Policy for Bucket {
    fn name(&self) -> &'static str {
        "bucket"
    }

    fn needs_text(&self) -> bool {
        true
    }

    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize> {
        self.decide(workers, req).map(|d| d.index)
    }

    fn decide(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<Decision> {
        let usable = super::usable(workers, req);
        if usable.is_empty() {
            return None;
        }
        let len = req.text.chars().count();
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let same = st.ranges.len() == usable.len()
            && usable.iter().zip(&st.ranges).all(|(&i, (u, _))| workers[i].url() == u);
        if !same {
            let urls: Vec<&str> = usable.iter().map(|&i| workers[i].url()).collect();
            st.reset(&urls);
        }
        if now >= st.refit_at {
            // From the window as it stands: the requests of the last interval at least.
            st.refit();
            st.refit_at = now + st.cfg.adjust_interval;
        }
        st.expire(now);
        let loads: Vec<u64> =
            usable.iter().map(|&i| st.chars.get(workers[i].url()).copied().unwrap_or(0)).collect();
        let (min, max) =
            (*loads.iter().min().expect("usable"), *loads.iter().max().expect("usable"));
        let imbalanced = max - min > st.cfg.balance_abs_threshold
            && max as f64 > min as f64 * st.cfg.balance_rel_threshold;
        let (k, branch) = if imbalanced {
            (loads.iter().position(|l| *l == min).expect("the minimum is there"), BALANCE)
        } else {
            (
                st.ranges.iter().position(|(_, end)| len < *end).unwrap_or(usable.len() - 1),
                BY_LENGTH,
            )
        };
        let index = usable[k];
        let url = workers[index].url().to_owned();
        *st.chars.entry(url.clone()).or_default() += len as u64;
        st.window.push_back((now, len, url));
        Some(Decision { index, branch, imbalanced, ..Default::default() })
    }

    fn reconfigure(&self, cfg: &crate::config::PolicyConfig) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.cfg = cfg.bucket();
        st.refit_at = Instant::now() + st.cfg.adjust_interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::{set_healthy, workers};

    fn bucket(interval: Duration) -> Bucket {
        Bucket::new(BucketConfig {
            adjust_interval: interval,
            balance_abs_threshold: u64::MAX,
            balance_rel_threshold: 1.0,
        })
    }

    fn route(b: &Bucket, ws: &[Arc<Worker>], len: usize) -> usize {
        let text = "x".repeat(len);
        b.decide(ws, &RequestInfo { text: &text, ..Default::default() }).unwrap().index
    }

    #[test]
    fn lengths_map_to_equal_initial_ranges() {
        let ws = workers(4);
        let b = bucket(Duration::from_secs(3600));
        assert_eq!(route(&b, &ws, 10), 0);
        assert_eq!(route(&b, &ws, 1500), 1);
        assert_eq!(route(&b, &ws, 2500), 2);
        assert_eq!(route(&b, &ws, 100_000), 3);
        let ends: Vec<usize> = b.ranges().iter().map(|r| r.1).collect();
        assert_eq!(ends, [1024, 2048, 3072, usize::MAX]);
    }

    #[test]
    fn ranges_refit_to_equal_shares_of_recent_characters() {
        let ws = workers(2);
        let b = bucket(Duration::from_millis(50));
        // Short prompts only: the initial split (2048) would send them all to worker 0.
        for len in (1..=100).map(|i| i * 10) {
            route(&b, &ws, len);
        }
        std::thread::sleep(Duration::from_millis(60));
        for len in (1..=100).map(|i| i * 10) {
            route(&b, &ws, len);
        }
        let end = b.ranges()[0].1;
        assert!((600..=800).contains(&end), "half the characters lie below ~710: {end}");
        assert_eq!(route(&b, &ws, 100), 0);
        assert_eq!(route(&b, &ws, 990), 1);
    }

    #[test]
    fn imbalance_sends_to_the_least_loaded_and_churn_resets() {
        let ws = workers(3);
        let b = Bucket::new(BucketConfig {
            adjust_interval: Duration::from_secs(3600),
            balance_abs_threshold: 100,
            balance_rel_threshold: 1.5,
        });
        assert_eq!(route(&b, &ws, 500), 0);
        // Worker 0 now has 500 characters, the others none: imbalanced.
        let d = b.decide(&ws, &RequestInfo { text: "short", ..Default::default() }).unwrap();
        assert_eq!((d.branch, d.imbalanced), (BALANCE, true));
        assert_ne!(d.index, 0);
        set_healthy(&ws[1], false);
        assert_eq!(b.ranges().len(), 3);
        route(&b, &ws, 1);
        assert_eq!(b.ranges().len(), 2, "the routable set changed: ranges start afresh");
    }
}

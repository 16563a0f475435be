//! manual: sticky routing by a client-chosen key, as sgl-router 0.3's `manual` policy. A
//! request's key is its `X-SMG-Routing-Key` header. The first request of a key assigns it a
//! routable worker (`assignment_mode`: `random`; `min_load`, the fewest requests in flight;
//! `min_group`, the fewest keys), and every later request of that key goes to the same worker,
//! so a conversation keeps its KV cache. A key is assigned anew when its worker left, stopped
//! being routable, or the key was idle longer than `max_idle`. Requests without a key go to a
//! random routable worker.
//!
//! Memory is bounded: the table holds at most `max_keys` keys; a new key beyond that evicts the
//! longest-idle one, and keys idle past `max_idle` are dropped as new ones arrive.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use super::{Decision, Policy, RequestInfo};
use crate::registry::Worker;

/// How a new key is given a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentMode {
    Random,
    MinLoad,
    MinGroup,
}

impl AssignmentMode {
    pub const ALL: [(&'static str, AssignmentMode); 3] = [
        ("random", AssignmentMode::Random),
        ("min_load", AssignmentMode::MinLoad),
        ("min_group", AssignmentMode::MinGroup),
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ManualConfig {
    pub assignment_mode: AssignmentMode,
    #[serde(serialize_with = "crate::config::ser::duration")]
    pub max_idle: Duration,
    #[serde(rename = "max_routing_keys")]
    pub max_keys: usize,
}

pub struct Manual {
    state: Mutex<State>,
}

struct Entry {
    worker: String,
    last_used: Instant,
    /// Ties `last_used` in the idle index.
    seq: u64,
}

struct State {
    cfg: ManualConfig,
    keys: HashMap<String, Entry>,
    /// (last used, seq, key): the longest idle first.
    idle: BTreeSet<(Instant, u64, String)>,
    /// Keys per worker URL (for `min_group`).
    groups: HashMap<String, usize>,
    seq: u64,
}

impl State {
    fn forget(&mut self, key: &str) {
        if let Some(e) = self.keys.remove(key) {
            self.idle.remove(&(e.last_used, e.seq, key.to_owned()));
            self.leave_group(&e.worker);
        }
    }

    fn leave_group(&mut self, worker: &str) {
        if let Some(n) = self.groups.get_mut(worker) {
            *n -= 1;
            if *n == 0 {
                self.groups.remove(worker);
            }
        }
    }

    /// Drops keys idle past `max_idle`, and the longest idle while over `max_keys`.
    fn trim(&mut self, now: Instant, room_for: usize) {
        while let Some((at, _, key)) = self.idle.first().cloned() {
            let expired = now.duration_since(at) > self.cfg.max_idle;
            if !expired && self.keys.len() + room_for <= self.cfg.max_keys {
                break;
            }
            self.forget(&key);
        }
    }

    fn touch(&mut self, key: &str, worker: &str, now: Instant) {
        self.seq += 1;
        let seq = self.seq;
        match self.keys.get_mut(key) {
            Some(e) => {
                self.idle.remove(&(e.last_used, e.seq, key.to_owned()));
                if e.worker != worker {
                    let old = std::mem::replace(&mut e.worker, worker.to_owned());
                    (e.last_used, e.seq) = (now, seq);
                    self.leave_group(&old);
                    *self.groups.entry(worker.to_owned()).or_default() += 1;
                } else {
                    (e.last_used, e.seq) = (now, seq);
                }
            }
            None => {
                let entry = Entry { worker: worker.to_owned(), last_used: now, seq };
                self.keys.insert(key.to_owned(), entry);
                *self.groups.entry(worker.to_owned()).or_default() += 1;
            }
        }
        self.idle.insert((now, seq, key.to_owned()));
    }
}

/// Which rule chose the worker.
const STICKY: &str = "sticky";
const ASSIGNED: &str = "assigned";
const NO_KEY: &str = "no_key";

impl Manual {
    pub fn new(cfg: ManualConfig) -> Self {
        Self {
            state: Mutex::new(State {
                cfg,
                keys: HashMap::new(),
                idle: BTreeSet::new(),
                groups: HashMap::new(),
                seq: 0,
            }),
        }
    }

    /// Keys held now (for tests and `/admin/stats`).
    pub fn keys(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).keys.len()
    }

    fn assign(st: &State, workers: &[Arc<Worker>], usable: &[usize]) -> usize {
        let mut rng = rand::rng();
        let mut pick = |score: &dyn Fn(usize) -> u64| {
            usable
                .iter()
                .map(|&i| (score(i), rng.random::<u32>(), i))
                .min()
                .map(|(_, _, i)| i)
                .expect("usable is not empty")
        };
        match st.cfg.assignment_mode {
            AssignmentMode::Random => usable[rand::rng().random_range(0..usable.len())],
            AssignmentMode::MinLoad => pick(&|i| workers[i].load()),
            AssignmentMode::MinGroup => pick(&|i| {
                let keys = st.groups.get(workers[i].url()).copied().unwrap_or(0) as u64;
                // Fewest keys first, then the least loaded.
                (keys << 32) | workers[i].load().min(u64::from(u32::MAX))
            }),
        }
    }
}

impl Policy for Manual {
    fn name(&self) -> &'static str {
        "manual"
    }

    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize> {
        self.decide(workers, req).map(|d| d.index)
    }

    fn decide(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<Decision> {
        let usable = super::usable(workers, req);
        if usable.is_empty() {
            return None;
        }
        let decision = |index, branch| Some(Decision { index, branch, ..Default::default() });
        let Some(key) = req.routing_key.filter(|k| !k.is_empty()) else {
            return decision(usable[rand::rng().random_range(0..usable.len())], NO_KEY);
        };
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let current = st.keys.get(key).and_then(|e| {
            let fresh = now.duration_since(e.last_used) <= st.cfg.max_idle;
            let at = usable.iter().copied().find(|&i| workers[i].url() == e.worker);
            at.filter(|_| fresh)
        });
        let (index, branch) = match current {
            Some(i) => (i, STICKY),
            None => {
                let room = usize::from(!st.keys.contains_key(key));
                st.trim(now, room);
                (Self::assign(&st, workers, &usable), ASSIGNED)
            }
        };
        st.touch(key, workers[index].url(), now);
        decision(index, branch)
    }

    fn reconfigure(&self, cfg: &crate::config::PolicyConfig) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.cfg = cfg.manual.clone();
        st.trim(Instant::now(), 0);
    }

    fn worker_removed(&self, url: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> =
            st.keys.iter().filter(|(_, e)| e.worker == url).map(|(k, _)| k.clone()).collect();
        for k in gone {
            st.forget(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::{set_healthy, workers};

    fn manual(mode: AssignmentMode, max_keys: usize) -> Manual {
        Manual::new(ManualConfig {
            assignment_mode: mode,
            max_idle: Duration::from_secs(3600),
            max_keys,
        })
    }

    fn route(p: &Manual, ws: &[Arc<Worker>], key: &str) -> (usize, &'static str) {
        let req = RequestInfo { routing_key: Some(key), ..Default::default() };
        let d = p.decide(ws, &req).unwrap();
        (d.index, d.branch)
    }

    #[test]
    fn a_key_sticks_until_its_worker_is_unroutable() {
        let ws = workers(4);
        let p = manual(AssignmentMode::Random, 100);
        let (home, branch) = route(&p, &ws, "conv-1");
        assert_eq!(branch, ASSIGNED);
        for _ in 0..20 {
            assert_eq!(route(&p, &ws, "conv-1"), (home, STICKY));
        }
        set_healthy(&ws[home], false);
        let (moved, branch) = route(&p, &ws, "conv-1");
        assert_ne!(moved, home);
        assert_eq!(branch, ASSIGNED);
        set_healthy(&ws[home], true);
        assert_eq!(route(&p, &ws, "conv-1"), (moved, STICKY), "it stays where it moved");
        p.worker_removed(ws[moved].url());
        assert_eq!(p.keys(), 0, "a leaving worker's keys are dropped");
    }

    #[test]
    fn min_group_spreads_keys_and_min_load_follows_load() {
        let ws = workers(4);
        let p = manual(AssignmentMode::MinGroup, 100);
        let mut per = [0; 4];
        for k in 0..40 {
            per[route(&p, &ws, &format!("k{k}")).0] += 1;
        }
        assert_eq!(per, [10; 4]);
        let p = manual(AssignmentMode::MinLoad, 100);
        let _busy: Vec<_> = [0, 1, 3].iter().map(|&i| ws[i].start_request()).collect();
        for k in 0..5 {
            assert_eq!(route(&p, &ws, &format!("k{k}")).0, 2, "the idle worker");
        }
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_longest_idle() {
        let ws = workers(2);
        let p = manual(AssignmentMode::Random, 3);
        for k in ["a", "b", "c"] {
            route(&p, &ws, k);
        }
        route(&p, &ws, "a"); // b is now the longest idle
        route(&p, &ws, "d");
        assert_eq!(p.keys(), 3);
        let st = p.state.lock().unwrap();
        assert!(!st.keys.contains_key("b") && st.keys.contains_key("a"));
        assert_eq!(st.groups.values().sum::<usize>(), 3, "group counts follow evictions");
    }

    #[test]
    fn idle_keys_expire_and_unkeyed_requests_spread() {
        let ws = workers(3);
        let p = Manual::new(ManualConfig {
            assignment_mode: AssignmentMode::Random,
            max_idle: Duration::ZERO,
            max_keys: 100,
        });
        route(&p, &ws, "old");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(route(&p, &ws, "old").1, ASSIGNED, "idle past max_idle: assigned anew");
        route(&p, &ws, "new");
        assert_eq!(p.keys(), 1, "expired keys are dropped as new ones arrive");
        let mut seen = [0; 3];
        for _ in 0..300 {
            let d = p.decide(&ws, &RequestInfo::default()).unwrap();
            assert_eq!(d.branch, NO_KEY);
            seen[d.index] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}

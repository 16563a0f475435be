//! cost_aware: send each request where it will get its first token soonest, by an estimate
//! each worker's own answers keep correcting.
//!
//! For every routable worker `w` the request's time to first token is estimated as
//!
//! ```text
//! ttft(w) = c_w + p_w * (pending_w + uncached_w) / 1000 + q_w * in_flight_w      (ms)
//! ```
//!
//! - `uncached_w`: the characters of the prompt `w`'s prefix tree does not hold (the same
//!   approximate tree as cache_aware's);
//! - `pending_w`: characters sent to `w` that it has not yet answered and did not hold: the
//!   prefill work queued ahead of this request;
//! - `in_flight_w`: requests in flight on `w` (routerd's count, or the worker's own `/get_load`
//!   figure when that is polled and higher);
//! - `c_w`, `p_w` (ms per 1000 uncached characters) and `q_w` (ms per request in flight) are
//!   learned per worker by recursive least squares (forgetting factor 0.98) from the time to
//!   first token of each stream routerd relays, with the uncached part the worker itself
//!   reported (`cached_tokens`). A slower worker learns larger figures and is given less work,
//!   with no configuration. A worker that joins starts from the fleet's average.
//!
//! The request goes to the cheapest worker. Estimates within 10% (and 1 ms) of the cheapest are
//! near-ties, broken by the longest prefix match (locality), then load, then cache room (the
//! smaller tree), then at random.
//!
//! Self-correction: when a worker reports far fewer cached tokens than its tree predicted
//! (predicted share minus reported share above 0.25), its oldest tree entries are evicted
//! until its share of the tree is 20% smaller (its real cache is smaller than the tree
//! thought: LRU eviction under pressure, a flush). Three such answers in a row, each with less
//! than half the predicted share, mean the worker lost its cache (a restart): its entries are
//! dropped. A worker that comes back after being unhealthy starts empty too (`worker_reset`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::tree::{Tenant, TenantIds, Tree};
use super::{Decision, Observation, Policy, RequestInfo};
use crate::registry::Worker;

/// Near-ties: within this fraction of the cheapest estimate...
const TIE_FRACTION: f64 = 0.10;
/// ...or this many milliseconds.
const TIE_MS: f64 = 1.0;
/// Predicted minus reported cached share above which an answer counts as mispredicted.
const MISPREDICTED: f64 = 0.25;
/// Consecutive badly mispredicted answers that mean the worker lost its whole cache.
const LOST_CACHE_STREAK: u32 = 3;
/// A mispredicted worker's share of the tree shrinks to this fraction.
const SHRINK_TO: f64 = 0.8;
/// Forgetting factor of the estimator: about the last 50 answers count.
const FORGET: f64 = 0.98;

pub struct CostAware {
    state: Mutex<State>,
}

struct State {
    tree: Tree,
    ids: TenantIds,
    models: HashMap<Tenant, Model>,
    corrections: Corrections,
}

/// How often the picture was corrected from the workers' answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Corrections {
    /// A worker's tree share was shrunk after an answer with fewer cached tokens than predicted.
    pub shrunk: u64,
    /// A worker's tree share was dropped (its cache was lost: restart, flush, recovery).
    pub cleared: u64,
}

/// One worker's learned cost figures: `theta = [c, p, q]` (see the module docs) and the
/// estimator's covariance.
#[derive(Debug, Clone)]
struct Model {
    theta: [f64; 3],
    cov: [[f64; 3]; 3],
    /// A running mean of absolute errors: residuals are clipped to 4x it, so one stalled
    /// answer does not wreck the estimate.
    mean_abs_err: f64,
    samples: u64,
    mispredicted_streak: u32,
}

/// Starting figures: 5 ms fixed, 10 ms per 1000 uncached characters (~40 us a token, a mid-size
/// model on one GPU), 2 ms per request in flight. The first answers replace them.
const PRIOR: [f64; 3] = [5.0, 10.0, 2.0];
const PRIOR_VARIANCE: f64 = 100.0;
/// The estimator's covariance is kept below this (no wind-up while a worker is idle).
const MAX_VARIANCE: f64 = 1.0e4;
/// Floors on the figures used for decisions (learning may dip below them).
const MIN_FIGURES: [f64; 3] = [0.0, 0.05, 0.05];

impl Model {
    fn new(theta: [f64; 3]) -> Self {
        let mut cov = [[0.0; 3]; 3];
        for (i, row) in cov.iter_mut().enumerate() {
            row[i] = PRIOR_VARIANCE;
        }
        Self { theta, cov, mean_abs_err: 5.0, samples: 0, mispredicted_streak: 0 }
    }

    fn figures(&self) -> [f64; 3] {
        let mut f = self.theta;
        for (x, min) in f.iter_mut().zip(MIN_FIGURES) {
            *x = x.max(min);
        }
        f
    }

    /// Estimated time to first token, in ms, with `chars` of prefill ahead (its own included)
    /// and `in_flight` requests running or waiting.
    fn estimate(&self, chars: f64, in_flight: f64) -> f64 {
        let [c, p, q] = self.figures();
        c + p * chars / 1000.0 + q * in_flight
    }

    /// One observation: `ttft_ms` for a request sent with `chars` of prefill ahead (its own
    /// included) and `in_flight` requests on the worker. Recursive least squares.
    fn learn(&mut self, chars: f64, in_flight: f64, ttft_ms: f64) {
        let x = [1.0, chars / 1000.0, in_flight];
        let predicted: f64 = (0..3).map(|i| self.theta[i] * x[i]).sum();
        let limit = 4.0 * self.mean_abs_err.max(0.5);
        let err = (ttft_ms - predicted).clamp(-limit, limit);
        self.mean_abs_err = 0.9 * self.mean_abs_err + 0.1 * (ttft_ms - predicted).abs();
        let px: [f64; 3] = std::array::from_fn(|i| (0..3).map(|j| self.cov[i][j] * x[j]).sum());
        let denom = FORGET + (0..3).map(|i| x[i] * px[i]).sum::<f64>();
        if !(denom.is_finite() && denom > 0.0) {
            return;
        }
        let gain: [f64; 3] = std::array::from_fn(|i| px[i] / denom);
        for (t, g) in self.theta.iter_mut().zip(gain) {
            *t += g * err;
        }
        // cov = (cov - gain px^T) / forget, kept bounded.
        for (row, g) in self.cov.iter_mut().zip(gain) {
            for (v, p) in row.iter_mut().zip(px) {
                *v = (*v - g * p) / FORGET;
            }
        }
        let trace = (0..3).map(|i| self.cov[i][i]).sum::<f64>();
        if !(trace.is_finite()) || self.theta.iter().any(|t| !t.is_finite()) {
            *self = Model::new(PRIOR);
            return;
        }
        if trace > MAX_VARIANCE {
            let scale = MAX_VARIANCE / trace;
            self.cov.iter_mut().flatten().for_each(|v| *v *= scale);
        }
        self.samples += 1;
    }
}

impl Default for CostAware {
    fn default() -> Self {
        Self::new(16_777_216)
    }
}

impl CostAware {
    pub fn new(max_tree_size: usize) -> Self {
        Self {
            state: Mutex::new(State {
                tree: Tree::new(max_tree_size),
                ids: TenantIds::default(),
                models: HashMap::new(),
                corrections: Corrections::default(),
            }),
        }
    }

    pub fn corrections(&self) -> Corrections {
        self.state.lock().expect("cost_aware state").corrections
    }

    /// The learned `[c, p, q]` of a worker (for tests and the docs' examples).
    pub fn figures(&self, url: &str) -> Option<[f64; 3]> {
        let st = self.state.lock().expect("cost_aware state");
        let t = st.ids.get(url)?;
        st.models.get(&t).map(Model::figures)
    }
}

impl State {
    /// `t`'s model, made from the fleet's average figures if it has none yet.
    fn model(&mut self, t: Tenant) -> &mut Model {
        if !self.models.contains_key(&t) {
            let learned: Vec<&Model> = self.models.values().filter(|m| m.samples > 0).collect();
            let theta = if learned.is_empty() {
                PRIOR
            } else {
                let n = learned.len() as f64;
                std::array::from_fn(|i| learned.iter().map(|m| m.theta[i]).sum::<f64>() / n)
            };
            self.models.insert(t, Model::new(theta));
        }
        self.models.get_mut(&t).expect("inserted")
    }
}

impl Policy for CostAware {
    fn name(&self) -> &'static str {
        "cost_aware"
    }

    fn needs_text(&self) -> bool {
        true
    }

    fn learns(&self) -> bool {
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
        let loads: Vec<u64> = usable.iter().map(|&i| workers[i].load()).collect();
        let pending: Vec<u64> = usable
            .iter()
            .map(|&i| workers[i].pending_prefill.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        let text_chars = req.text.chars().count();
        let mut rng = rand::rng();
        let mut st = self.state.lock().expect("cost_aware state");
        let tenants: Vec<Tenant> =
            usable.iter().map(|&i| st.ids.id_for(workers[i].url())).collect();
        let matches = if text_chars > 0 { st.tree.prefix_match(req.text) } else { Vec::new() };
        let matched: Vec<usize> = tenants
            .iter()
            .map(|t| matches.iter().find(|(m, _)| m == t).map_or(0, |(_, n)| *n))
            .collect();
        let estimates: Vec<f64> = (0..usable.len())
            .map(|k| {
                let ahead = pending[k] as f64 + (text_chars - matched[k]) as f64;
                st.model(tenants[k]).estimate(ahead, loads[k] as f64)
            })
            .collect();
        let cheapest = estimates.iter().copied().fold(f64::INFINITY, f64::min);
        let bound = (cheapest * (1.0 + TIE_FRACTION)).max(cheapest + TIE_MS);
        let pick = (0..usable.len())
            .filter(|&k| estimates[k] <= bound)
            .map(|k| {
                let room = std::cmp::Reverse(st.tree.tenant_chars(tenants[k]));
                (k, (matched[k], std::cmp::Reverse(loads[k]), room, rng.random::<u32>()))
            })
            .max_by(|a, b| a.1.cmp(&b.1))
            .map(|(k, _)| k)
            .expect("the cheapest worker is always within the bound");
        let best_match = matched.iter().copied().max().unwrap_or(0);
        let branch = match (matched[pick], best_match) {
            (_, 0) => "miss",
            (m, best) if m == best => "hit",
            _ => "balance",
        };
        if text_chars > 0 {
            st.tree.insert(req.text, tenants[pick]);
        }
        Some(Decision {
            index: usable[pick],
            branch,
            match_ratio: (text_chars > 0).then(|| matched[pick] as f64 / text_chars as f64),
            imbalanced: false,
            matched_chars: matched[pick],
            estimate_ms: Some(estimates[pick]),
        })
    }

    fn observe(&self, worker: &Worker, o: &Observation) {
        let mut st = self.state.lock().expect("cost_aware state");
        let Some(t) = st.ids.get(worker.url()) else { return };
        let text = o.text_chars as f64;
        let mut uncached = (o.text_chars - o.predicted_chars.min(o.text_chars)) as f64;
        if let (Some(prompt), Some(cached)) = (o.prompt_tokens, o.cached_tokens) {
            if prompt > 0 && o.text_chars > 0 {
                let reported = cached.min(prompt) as f64 / prompt as f64;
                let predicted = o.predicted_chars as f64 / text;
                uncached = text * (1.0 - reported);
                let model = st.model(t);
                if predicted - reported > MISPREDICTED {
                    model.mispredicted_streak =
                        if reported < predicted / 2.0 { model.mispredicted_streak + 1 } else { 0 };
                    if model.mispredicted_streak >= LOST_CACHE_STREAK {
                        model.mispredicted_streak = 0;
                        st.tree.remove_tenant(t);
                        st.corrections.cleared += 1;
                        tracing::info!(
                            worker = worker.url(),
                            "the worker's answers say it lost its cache: its prefix entries are dropped"
                        );
                    } else {
                        let share = st.tree.tenant_chars(t);
                        st.tree.shrink_tenant(t, (share as f64 * SHRINK_TO) as usize);
                        st.corrections.shrunk += 1;
                    }
                } else {
                    model.mispredicted_streak = 0;
                }
            }
        }
        if let Some(ttft) = o.ttft {
            let ahead = o.pending_chars as f64 + uncached;
            st.model(t).learn(ahead, o.in_flight as f64, ttft.as_secs_f64() * 1000.0);
        }
    }

    fn worker_removed(&self, url: &str) {
        let mut st = self.state.lock().expect("cost_aware state");
        if let Some(t) = st.ids.remove(url) {
            st.tree.remove_tenant(t);
            st.models.remove(&t);
        }
    }

    fn worker_reset(&self, url: &str) {
        let mut st = self.state.lock().expect("cost_aware state");
        if let Some(t) = st.ids.get(url) {
            st.tree.remove_tenant(t);
            st.corrections.cleared += 1;
        }
    }

    fn reconfigure(&self, cfg: &crate::config::PolicyConfig) {
        self.state.lock().expect("cost_aware state").tree.set_max_chars(cfg.max_tree_size);
    }

    fn tree_stats(&self, url: &str) -> super::tree::TenantStats {
        let st = self.state.lock().expect("cost_aware state");
        st.ids.get(url).map(|t| st.tree.tenant_stats(t)).unwrap_or_default()
    }

    fn tree_totals(&self) -> Option<super::tree::TreeStats> {
        Some(self.state.lock().expect("cost_aware state").tree.stats())
    }
}

#[cfg(test)]
mod tests;

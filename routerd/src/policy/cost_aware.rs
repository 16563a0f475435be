//! cost_aware: send each request where it will get its first token soonest, by an estimate
//! the workers' own answers keep correcting, counting what the choice costs everyone else.
//!
//! For every routable worker `w`, in ms:
//!
//! ```text
//! ttft(w) = slowness_w * (c + p * (pending_w + uncached_w) / 1000 + q * waiting_w)
//! cost(w) = ttft(w) + (prefill_w * max(in_flight_w, mean in flight)        delays others
//!                      + prefill_w * tree_w / (mean tree + prompt)) / spread_w   may evict
//! ```
//!
//! - `uncached_w`: characters of the prompt `w`'s prefix tree does not hold (the same
//!   approximate tree as cache_aware's); `prefill_w` their prefill time;
//! - `pending_w`, `waiting_w`: characters and requests sent to `w` whose first bytes have not
//!   come back (the prefill and the queue ahead of this request);
//! - `c`, `p`, `q`: one fleet-wide non-negative least-squares fit over exponentially weighted
//!   sums of every streamed answer's time to first token; `slowness_w`: how much slower than
//!   that fit `w` answers (an exponential average of log ratios), so faster GPUs earn more work;
//! - `spread_w`: a copy of the prefix to a worker with nothing waiting and room is made once
//!   and relieves the holder's queue from then on, so its one-time costs are spread over it.
//!
//! The cheapest worker wins; costs within 10% (or 1 ms) are near-ties, broken by locality, then
//! load, then cache room. A new prefix (nobody holds a tenth of it) goes where the cache has
//! most room, as cache_aware's miss does; until the fit has 64 answers, a prefix's holder
//! always gets it.
//!
//! Self-correction: a worker whose predictions held (reported / predicted cached share averaging
//! above 0.7) and that then answers 5 times in a row with under a tenth of a predicted share of
//! at least 0.25 lost its cache (a restart, a flush behind the router's back): its entries are
//! dropped. A worker back from being unhealthy starts empty too (`worker_reset`).
//! docs/policies.md has the figures behind these choices.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::tree::{Tenant, TenantIds, Tree};
use super::{Decision, Observation, Policy, RequestInfo};
use crate::registry::Worker;

/// Near-ties: within this fraction of the cheapest cost...
const TIE_FRACTION: f64 = 0.10;
/// ...or this many milliseconds.
const TIE_MS: f64 = 1.0;
/// A prediction this large (a share of the prompt) that comes back as...
const MISPREDICTED: f64 = 0.25;
/// ...less than this fraction of itself is badly mispredicted.
const LOST: f64 = 0.1;
/// Consecutive badly mispredicted answers that mean the worker lost its whole cache...
const LOST_CACHE_STREAK: u32 = 5;
/// ...if its predictions held this well (an exponential average of reported / predicted
/// shares, weight 0.1 each) before.
const TRUSTED: f64 = 0.7;
const ACCURACY_RATE: f64 = 0.1;
/// Answers the fit needs before cost may trade a prefix match for a shorter wait.
const WARM_UP: u64 = 64;
/// Forgetting factor of the fleet's estimator: about the last 500 answers count.
const FORGET: f64 = 0.998;
/// Weight of each answer in a worker's slowness (an exponential average of log ratios).
const SLOWNESS_RATE: f64 = 0.05;
/// Slowness is kept within [1/4, 4] of the fleet's.
const SLOWNESS_LIMIT: f64 = 4.0;

pub struct CostAware {
    state: Mutex<State>,
}

struct State {
    tree: Tree,
    ids: TenantIds,
    /// The fleet's cost figures, learned from every streamed answer.
    fleet: Model,
    workers: HashMap<Tenant, WorkerState>,
    /// How often a worker's tree share was dropped (its cache was lost: restart, flush,
    /// recovery from unhealthy).
    cache_clears: u64,
}

/// What is learned of one worker: how much slower (> 1) or faster than the fleet's figures it
/// answers, and whether its last answers contradicted its tree.
#[derive(Debug, Clone, Copy)]
struct WorkerState {
    /// ln(slowness): exponential average of ln(observed / the fleet's estimate).
    log_slowness: f64,
    mispredicted_streak: u32,
    /// How well its answers bore out the tree's predictions (1: always); trust is earned, from
    /// 0.5.
    accuracy: f64,
}

impl WorkerState {
    fn slowness(&self) -> f64 {
        self.log_slowness.exp()
    }
}

/// The fleet's cost figures `theta = [c, p, q]` (see the module docs): a non-negative least
/// squares fit over exponentially weighted sums of the answers seen (the last few hundred
/// count), pulled gently towards the starting figures so that a fit from few answers stays
/// sensible.
#[derive(Debug, Clone)]
struct Model {
    /// Weighted sums of x x^T and x y, x = [1, kchars ahead, requests waiting], y = ms.
    xx: [[f64; 3]; 3],
    xy: [f64; 3],
    theta: [f64; 3],
    /// A running mean of absolute errors: answers are clipped to 4x it from the estimate, so
    /// one stalled answer does not wreck the fit.
    mean_abs_err: f64,
    samples: u64,
}

/// Starting figures: 5 ms fixed, 10 ms per 1000 uncached characters (~40 us a token, a mid-size
/// model on one GPU), 2 ms per request waiting. The first answers replace them.
const PRIOR: [f64; 3] = [5.0, 10.0, 2.0];
/// How many answers' worth the starting figures weigh: enough to keep the first fits from
/// few answers solvable, too little to bias a fit from many.
const PRIOR_WEIGHT: f64 = 0.1;
/// Floors on the figures used for decisions.
const MIN_FIGURES: [f64; 3] = [0.0, 0.01, 0.01];

impl Model {
    fn new() -> Self {
        Self { xx: [[0.0; 3]; 3], xy: [0.0; 3], theta: PRIOR, mean_abs_err: 5.0, samples: 0 }
    }

    fn figures(&self) -> [f64; 3] {
        let mut f = self.theta;
        for (x, min) in f.iter_mut().zip(MIN_FIGURES) {
            *x = x.max(min);
        }
        f
    }

    /// Estimated time to first token, in ms, on a worker of the fleet's speed with `chars` of
    /// prefill ahead (its own included) and `waiting` requests ahead.
    fn estimate(&self, chars: f64, waiting: f64) -> f64 {
        let [c, p, q] = self.figures();
        c + p * chars / 1000.0 + q * waiting
    }

    /// One observation: `ttft_ms` for a request sent with `chars` of prefill ahead (its own
    /// included) and `waiting` requests ahead of it on the worker.
    fn learn(&mut self, chars: f64, waiting: f64, ttft_ms: f64) {
        let x = [1.0, chars / 1000.0, waiting];
        let predicted = self.estimate(chars, waiting);
        // Clipped once the fit has seen enough to judge what is far off.
        let limit =
            if self.samples < 32 { f64::INFINITY } else { 4.0 * self.mean_abs_err.max(0.5) };
        let y = ttft_ms.clamp(predicted - limit, predicted + limit);
        self.mean_abs_err = 0.95 * self.mean_abs_err + 0.05 * (ttft_ms - predicted).abs();
        for i in 0..3 {
            for j in 0..3 {
                self.xx[i][j] = FORGET * self.xx[i][j] + x[i] * x[j];
            }
            self.xy[i] = FORGET * self.xy[i] + x[i] * y;
        }
        self.samples += 1;
        // The sums take every answer; the fit (7 small solves) is redone every 8th once warm.
        if self.samples < WARM_UP || self.samples.is_multiple_of(8) {
            if let Some(theta) = self.fit() {
                self.theta = theta;
            }
        }
    }

    /// The non-negative fit: the best of the fits with each subset of the figures free and the
    /// rest at zero, among those with no negative figure.
    fn fit(&self) -> Option<[f64; 3]> {
        let mut best: Option<([f64; 3], f64)> = None;
        for mask in 1u8..8 {
            let free: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
            let Some(theta) = self.solve(&free) else { continue };
            if theta.iter().any(|t| *t < 0.0 || !t.is_finite()) {
                continue;
            }
            let loss = self.loss(&theta);
            if best.is_none_or(|(_, l)| loss < l) {
                best = Some((theta, loss));
            }
        }
        best.map(|(t, _)| t)
    }

    /// Ridge least squares over the `free` figures (the others zero).
    fn solve(&self, free: &[usize]) -> Option<[f64; 3]> {
        let n = free.len();
        let mut a = [[0.0; 4]; 3];
        for (r, &i) in free.iter().enumerate() {
            for (c, &j) in free.iter().enumerate() {
                a[r][c] = self.xx[i][j] + if i == j { PRIOR_WEIGHT * scale(i) } else { 0.0 };
            }
            a[r][3] = self.xy[i] + PRIOR_WEIGHT * scale(i) * PRIOR[i];
        }
        // Gaussian elimination with partial pivoting on the n x (n+1) system.
        for col in 0..n {
            let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
            if a[pivot][col].abs() < 1e-12 {
                return None;
            }
            a.swap(col, pivot);
            for row in 0..n {
                if row != col {
                    let pivot_row = a[col];
                    let f = a[row][col] / pivot_row[col];
                    for (v, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                        *v -= f * p;
                    }
                }
            }
        }
        let mut theta = [0.0; 3];
        for (r, &i) in free.iter().enumerate() {
            theta[i] = a[r][3] / a[r][r];
        }
        Some(theta)
    }

    /// The weighted squared error of `theta` plus its pull towards the starting figures, up to
    /// a constant.
    fn loss(&self, theta: &[f64; 3]) -> f64 {
        let mut l = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                l += theta[i] * self.xx[i][j] * theta[j];
            }
            l -= 2.0 * theta[i] * self.xy[i];
            l += PRIOR_WEIGHT * scale(i) * (theta[i] - PRIOR[i]).powi(2);
        }
        l
    }
}

/// A typical squared size of feature `i` (1; 10 kchars; 10 requests), so that the pull
/// towards the starting figures weighs each about equally.
fn scale(i: usize) -> f64 {
    [1.0, 100.0, 100.0][i]
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
                fleet: Model::new(),
                workers: HashMap::new(),
                cache_clears: 0,
            }),
        }
    }

    /// How often a worker's tree share was dropped because its cache was lost.
    pub fn cache_clears(&self) -> u64 {
        self.state.lock().expect("cost_aware state").cache_clears
    }

    /// The fleet's learned `[c, p, q]`, and a worker's slowness (for tests and the docs).
    pub fn figures(&self, url: &str) -> Option<([f64; 3], f64)> {
        let st = self.state.lock().expect("cost_aware state");
        let t = st.ids.get(url)?;
        Some((st.fleet.figures(), st.workers.get(&t)?.slowness()))
    }
}

impl State {
    /// What is known of `t`, made neutral (the fleet's speed) if nothing is yet.
    fn worker(&mut self, t: Tenant) -> &mut WorkerState {
        self.workers.entry(t).or_insert(WorkerState {
            log_slowness: 0.0,
            mispredicted_streak: 0,
            accuracy: 0.5,
        })
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
        let pending: Vec<(u64, u64)> = usable
            .iter()
            .map(|&i| {
                let w = &workers[i];
                (w.pending_prefill.load(Relaxed), w.pending_requests.load(Relaxed))
            })
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
        // The cost of sending the request to each worker, in ms:
        // - its own wait: the estimated time to first token there;
        // - the wait its prefill adds to the requests in flight there (at least the fleet's
        //   average: in a busy fleet, work done anywhere delays someone);
        // - what caching it there may evict: its prefill again, weighted by how large that
        //   worker's share of the tree is against the others'.
        let [_, per_kchar, _] = st.fleet.figures();
        let sizes: Vec<f64> = tenants.iter().map(|t| st.tree.tenant_chars(*t) as f64).collect();
        // (Against the mean plus the prompt: trees much smaller than the prompt evict nothing.)
        let mean_size = sizes.iter().sum::<f64>() / sizes.len() as f64 + text_chars as f64 + 1.0;
        let mean_load = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
        // The queue at the best match's holder: a copy made to a worker with nothing queued
        // is made once and relieves that queue from then on, so its one-time costs are spread
        // over it. (Spread onto any worker, copies stormed onto newcomers and restarted workers.)
        let holder =
            (0..usable.len()).max_by_key(|&k| (matched[k], std::cmp::Reverse(pending[k].1)));
        let relief = holder.map_or(1.0, |h| (pending[h].1 as f64).max(1.0));
        let (mut estimates, mut costs) = (Vec::new(), Vec::new());
        for k in 0..usable.len() {
            let uncached = (text_chars - matched[k]) as f64;
            let slowness = st.worker(tenants[k]).slowness();
            let (chars, waiting) = pending[k];
            let own = slowness * st.fleet.estimate(chars as f64 + uncached, waiting as f64);
            let prefill = slowness * per_kchar * uncached / 1000.0;
            let delays = prefill * (loads[k] as f64).max(mean_load);
            let evicts = prefill * sizes[k] / mean_size;
            estimates.push(own);
            let spread = if waiting == 0 && sizes[k] <= mean_size { relief } else { 1.0 };
            costs.push(own + (delays + evicts) / spread);
        }
        let cheapest = costs.iter().copied().fold(f64::INFINITY, f64::min);
        let best_match = matched.iter().copied().max().unwrap_or(0);
        // A new prefix (nobody holds a tenth of it) starts a group that will come back: like
        // cache_aware's miss, it goes where the cache has most room, then to the less loaded.
        // (Placing it by the moment's queue instead left conversations unevenly spread and
        // cost 5-13% of multi-turn throughput.) Otherwise near-ties of cost go by locality.
        let new_prefix = best_match * 10 < text_chars;
        // A prompt that brings more new text than anyone holds (a first turn after a shared
        // system prompt) also opens a group: among the near-ties it goes by room too.
        let opening = best_match * 2 < text_chars;
        // Until the fit has seen enough answers its figures are guesses: keep to locality.
        let warming = st.fleet.samples < WARM_UP;
        let bound = if new_prefix || warming {
            f64::INFINITY
        } else {
            (cheapest * (1.0 + TIE_FRACTION)).max(cheapest + TIE_MS)
        };
        let pick = (0..usable.len())
            .filter(|&k| costs[k] <= bound)
            .map(|k| {
                // Larger is better. A match of under a tenth of the prompt (a common opening)
                // is no locality.
                let local = if matched[k] * 10 >= text_chars { matched[k] as u64 } else { 0 };
                let room = u64::MAX - sizes[k] as u64;
                let idle = u64::MAX - loads[k];
                let key = if opening { (room, idle, local) } else { (local, idle, room) };
                (k, (key, rng.random::<u32>()))
            })
            .max_by(|a, b| a.1.cmp(&b.1))
            .map(|(k, _)| k)
            .expect("the cheapest worker is always within the bound");
        // A match of a few characters (a common opening) is no hit; giving up more than a
        // tenth of the prompt's best match is a trade of cache for load.
        let branch = match (matched[pick], best_match) {
            (_, best) if best * 10 < text_chars => "miss",
            (m, best) if (best - m) * 10 <= text_chars => "hit",
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
            ..Default::default()
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
                let w = st.worker(t);
                // Nearly nothing of a well-predicted prompt was cached, again and again, on a
                // worker whose predictions held before: it lost its cache (a restart, a flush
                // behind the router's back). A worker evicting under pressure mispredicts now
                // and then and loses the trust first.
                if predicted > MISPREDICTED && reported < predicted * LOST {
                    w.mispredicted_streak += 1;
                } else if predicted > MISPREDICTED {
                    w.mispredicted_streak = 0;
                    let held = (reported / predicted).min(1.0);
                    w.accuracy += ACCURACY_RATE * (held - w.accuracy);
                }
                if w.mispredicted_streak >= LOST_CACHE_STREAK && w.accuracy < TRUSTED {
                    // Not trusted: an evicting worker's misses, not a lost cache.
                    w.mispredicted_streak = 0;
                    w.accuracy += ACCURACY_RATE * (0.0 - w.accuracy);
                }
                if w.mispredicted_streak >= LOST_CACHE_STREAK {
                    w.mispredicted_streak = 0;
                    st.tree.remove_tenant(t);
                    st.cache_clears += 1;
                    tracing::info!(
                        worker = worker.url(),
                        "the worker's answers say it lost its cache: its prefix entries are dropped"
                    );
                }
            }
        }
        if let Some(ttft) = o.ttft {
            let ahead = o.pending_chars as f64 + uncached;
            let (n, ms) = (o.pending_requests as f64, ttft.as_secs_f64() * 1000.0);
            let fleet = st.fleet.estimate(ahead, n);
            st.fleet.learn(ahead, n, ms);
            if fleet > 0.5 && ms > 0.0 {
                let w = st.worker(t);
                let ratio = (ms / fleet).ln().clamp(-SLOWNESS_LIMIT.ln(), SLOWNESS_LIMIT.ln());
                w.log_slowness += SLOWNESS_RATE * (ratio - w.log_slowness);
            }
        }
    }

    fn worker_removed(&self, url: &str) {
        let mut st = self.state.lock().expect("cost_aware state");
        if let Some(t) = st.ids.remove(url) {
            st.tree.remove_tenant(t);
            st.workers.remove(&t);
        }
    }

    fn worker_reset(&self, url: &str) {
        let mut st = self.state.lock().expect("cost_aware state");
        if let Some(t) = st.ids.get(url) {
            st.tree.remove_tenant(t);
            st.cache_clears += 1;
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

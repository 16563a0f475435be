//! Load-balancing policies. Each is small and pure: `select` looks at the snapshot's workers
//! and the request's routing text and picks one, with no I/O and no await. State a policy needs
//! (a counter, later a prefix tree) lives inside it; completion is reported by dropping the
//! request's `LoadGuard`, not by calling the policy.

mod bucket;
mod cache_aware;
mod cost_aware;
mod manual;
mod power_of_two;
mod random;
mod round_robin;
pub mod tree;

use std::sync::Arc;

pub use bucket::{Bucket, BucketConfig};
pub use cache_aware::{Branch, CacheAware, CacheAwareConfig};
pub use cost_aware::CostAware;
pub use manual::{AssignmentMode, Manual, ManualConfig};
pub use power_of_two::PowerOfTwo;
pub use random::Random;
pub use round_robin::RoundRobin;

use crate::config::{PolicyConfig, PolicyName};
use crate::registry::Worker;

/// What a policy may know about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    /// The text the request's prompt is made of (generate: `text`; completions: `prompt`;
    /// chat: the whole conversation). Empty when the request has none.
    pub text: &'a str,
    /// Every worker given is a candidate, routable or not (panic routing: when none is
    /// routable and `policy.panic_routing` asks for it).
    pub ignore_health: bool,
    /// The client's routing key (`X-SMG-Routing-Key`), for the `manual` policy.
    pub routing_key: Option<&'a str>,
    /// The prompt's token ids (the request's `input_ids`, or its text tokenized), when event
    /// routing can use them.
    pub tokens: Option<&'a [u32]>,
    /// The workers' KV-event index: cache_aware matches `tokens` on it where events flow.
    pub kv: Option<&'a crate::kv::KvState>,
    /// Peer replicas (`[peers]`): cache_aware matches `text` on what they routed, and tells
    /// them what it routes.
    pub peers: Option<&'a crate::peers::Peers>,
}

impl RequestInfo<'_> {
    /// Whether `w` may be chosen for this request.
    pub fn usable(&self, w: &Worker) -> bool {
        self.ignore_health || w.is_routable()
    }
}

/// A routing decision and why it was taken (for decision records and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Decision {
    /// Index into the workers given.
    pub index: usize,
    /// The rule that decided: cache_aware's `hit` or `miss`; the policy's name otherwise.
    pub branch: &'static str,
    /// cache_aware: the share of the prompt the chosen worker's tree matched.
    pub match_ratio: Option<f64>,
    /// cache_aware: loads were imbalanced, so overloaded workers were left out.
    pub imbalanced: bool,
    /// Prefix-tree policies: characters of the prompt the chosen worker's tree matched.
    pub matched_chars: usize,
    /// cost_aware: the estimated time to first token on the chosen worker, in milliseconds.
    pub estimate_ms: Option<f64>,
    /// Event routing: prompt tokens the chosen worker's cache holds (or was just sent), out of
    /// `prompt_tokens`.
    pub matched_tokens: Option<usize>,
    pub prompt_tokens: Option<usize>,
    /// cache_aware: what it predicted of the prompt's cache hits, for the accounting.
    pub predicted: Option<Predicted>,
}

/// What a prefix policy predicted of one prompt (docs/metrics.md, "Why the hit rate is what it
/// is"): its length, the longest cached prefix any routable worker had, and the chosen
/// worker's. In tokens where the workers' KV events flow, else in characters of the routing
/// text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Predicted {
    pub unit: Unit,
    pub prompt: usize,
    pub best: usize,
    pub chosen: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Tokens,
    Chars,
}

impl Unit {
    /// Both, in the order per-unit arrays keep them (`Worker::accounting`).
    pub const ALL: [Unit; 2] = [Unit::Tokens, Unit::Chars];

    /// The unit's place in those arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Chars => "chars",
        }
    }
}

/// What routerd saw of one answer, for policies that learn (`Policy::observe`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// Characters of the request's routing text, and how many of them the policy predicted the
    /// worker held.
    pub text_chars: usize,
    pub predicted_chars: usize,
    /// The worker's pending prefill characters and requests (sent, no first bytes yet) when
    /// the request was sent (this request not included).
    pub pending_chars: u64,
    pub pending_requests: u64,
    /// Time from sending the request to the first bytes of the answer's body (for a stream,
    /// its first event); `None` when the answer had no body.
    pub ttft: Option<std::time::Duration>,
    /// The prompt and cached tokens the worker reported, when it did.
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;

    /// Index into `workers` of the chosen worker; only routable workers may be chosen.
    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize>;

    /// `select`, with the reason.
    fn decide(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<Decision> {
        self.select(workers, req).map(|index| Decision {
            index,
            branch: self.name(),
            ..Default::default()
        })
    }

    /// Whether `select` looks at the routing text (others skip extracting it).
    fn needs_text(&self) -> bool {
        false
    }

    /// New parameters for the same policy (a reload): apply them keeping learned state.
    fn reconfigure(&self, _cfg: &PolicyConfig) {}

    /// A worker left the registry: forget what the policy kept about it.
    fn worker_removed(&self, _url: &str) {}

    /// A worker came back after being unhealthy: it may have restarted with an empty cache.
    fn worker_reset(&self, _url: &str) {}

    /// Whether the policy learns from the answers to the requests it routed (`observe`);
    /// the request path gathers nothing for the others.
    fn learns(&self) -> bool {
        false
    }

    /// What the worker's answer to a request this policy routed showed.
    fn observe(&self, _worker: &Worker, _o: &Observation) {}

    /// This worker's share of the policy's prefix tree (all zero for policies without one).
    fn tree_stats(&self, _url: &str) -> tree::TenantStats {
        tree::TenantStats::default()
    }

    /// The whole prefix tree's size and evictions, for policies that keep one.
    fn tree_totals(&self) -> Option<tree::TreeStats> {
        None
    }
}

pub fn build(cfg: &PolicyConfig) -> Arc<dyn Policy> {
    match cfg.name {
        PolicyName::RoundRobin => Arc::new(RoundRobin::default()),
        PolicyName::Random => Arc::new(Random),
        PolicyName::PowerOfTwo => Arc::new(PowerOfTwo),
        PolicyName::Manual => Arc::new(Manual::new(cfg.manual.clone())),
        PolicyName::Bucket => Arc::new(Bucket::new(cfg.bucket())),
        PolicyName::CostAware => Arc::new(CostAware::new(cfg.max_tree_size)),
        PolicyName::CacheAware => Arc::new(CacheAware::new(CacheAwareConfig {
            cache_threshold: cfg.cache_threshold,
            balance_abs_threshold: cfg.balance_abs_threshold,
            balance_rel_threshold: cfg.balance_rel_threshold,
            max_tree_size: cfg.max_tree_size,
        })),
    }
}

/// The indices of the workers `req` may be sent to, in order.
fn usable(workers: &[Arc<Worker>], req: &RequestInfo) -> Vec<usize> {
    (0..workers.len()).filter(|&i| req.usable(&workers[i])).collect()
}

/// The first routable worker at or after `start`, wrapping around.
fn routable_from(workers: &[Arc<Worker>], start: usize, req: &RequestInfo) -> Option<usize> {
    let n = workers.len();
    (0..n).map(|i| (start + i) % n).find(|&i| req.usable(&workers[i]))
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use crate::registry::{Worker, WorkerRole, WorkerSource, WorkerSpec};

    pub fn workers(n: usize) -> Vec<Arc<Worker>> {
        (0..n)
            .map(|i| {
                Arc::new(Worker::new(WorkerSpec {
                    url: format!("http://w{i}:1"),
                    role: WorkerRole::Regular,
                    bootstrap_port: None,
                    api_key: None,
                    source: WorkerSource::Config,
                    tls: Default::default(),
                }))
            })
            .collect()
    }

    pub fn set_healthy(w: &Worker, healthy: bool) {
        w.healthy.store(healthy, Relaxed);
    }
}

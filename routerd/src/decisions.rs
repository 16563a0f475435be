//! Why each request went where it went: a compact record per routing decision (policy, branch,
//! prefix match ratio, the loads it compared), kept for the last few hundred requests for the
//! dashboard (`GET /admin/decisions`) and returned on request in a response header
//! (`x-routerd-explain: 1` → `x-routerd-decision: {json}`). A record costs a copy of the
//! candidates and a lock, so it is built only when someone will read it: for a request that
//! asks for it, for every request while a reader has called `/admin/decisions` within the last
//! minute (`routerctl top` polls it), and otherwise for one request in `SAMPLE_EVERY`, so the
//! log is never empty when a reader arrives.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::HeaderValue;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::App;
use crate::policy::Decision;
use crate::registry::Worker;

/// Decisions kept.
pub const KEPT: usize = 256;

/// The request header that asks for the decision record in the response.
pub const EXPLAIN_HEADER: &str = "x-routerd-explain";
pub const DECISION_HEADER: &str = "x-routerd-decision";

/// One decision, kept cheaply (workers by reference); rendered when read.
#[derive(Clone)]
pub struct Record {
    seq: u64,
    at_unix_ms: u64,
    request_id: HeaderValue,
    route: &'static str,
    pool: &'static str,
    policy: &'static str,
    decision: Decision,
    /// The workers the policy could choose from, with the load each had.
    loads: Vec<(Arc<Worker>, u64)>,
    /// n for the n-th continuation of a stream its worker failed mid-way.
    migration: u32,
    /// What the worker reported cached, in the prediction's unit, once its answer ended
    /// (`u64::MAX` until then).
    actual: Option<Arc<AtomicU64>>,
}

/// A record as the admin API and the response header show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub request_id: String,
    pub route: String,
    /// `regular`, `prefill` or `decode`.
    pub pool: String,
    pub policy: String,
    pub branch: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_ratio: Option<f64>,
    /// cost_aware: the estimated time to first token on the chosen worker, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_ms: Option<f64>,
    pub imbalanced: bool,
    /// Event routing: prompt tokens the chosen worker's cache held, of the prompt's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<usize>,
    pub worker: String,
    /// The load of each worker the policy could choose from.
    pub loads: Vec<(String, u64)>,
    /// n when this decision placed the n-th continuation of a stream whose worker failed
    /// mid-way (absent for the request as sent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub migration: u32,
    /// Prefix policies: the prompt's length, the longest cached prefix any routable worker
    /// had, the chosen worker's (predicted), and what it reported cached (once its answer
    /// ended), in `unit` (tokens, or characters without a tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting: Option<AccountingView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountingView {
    pub unit: String,
    pub prompt: u64,
    pub best: u64,
    pub predicted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Record {
    pub fn new(
        request_id: &HeaderValue,
        route: &'static str,
        pool: &'static str,
        policy: &'static str,
        decision: &Decision,
        candidates: &[Arc<Worker>],
    ) -> Self {
        let at_unix_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self {
            seq: 0,
            at_unix_ms,
            request_id: request_id.clone(),
            route,
            pool,
            policy,
            decision: *decision,
            loads: candidates.iter().map(|w| (w.clone(), w.load())).collect(),
            migration: 0,
            actual: None,
        }
    }

    /// Where the answer's reported cache hit goes once it ends (`usage::Accounting`).
    pub fn actual_slot(&mut self) -> Arc<AtomicU64> {
        self.actual.get_or_insert_with(|| Arc::new(AtomicU64::new(u64::MAX))).clone()
    }

    /// Marks the decision as placing a continuation (`Ask::migration`).
    pub fn migration(mut self, n: u32) -> Self {
        self.migration = n;
        self
    }

    pub fn view(&self) -> View {
        let d = &self.decision;
        View {
            seq: self.seq,
            at_unix_ms: self.at_unix_ms,
            request_id: String::from_utf8_lossy(self.request_id.as_bytes()).into_owned(),
            route: self.route.into(),
            pool: self.pool.into(),
            policy: self.policy.into(),
            branch: d.branch.into(),
            match_ratio: d.match_ratio.map(|r| (r * 1000.0).round() / 1000.0),
            estimate_ms: d.estimate_ms.map(|e| (e * 100.0).round() / 100.0),
            imbalanced: d.imbalanced,
            matched_tokens: d.matched_tokens,
            prompt_tokens: d.prompt_tokens,
            worker: self.loads.get(d.index).map(|(w, _)| w.url().to_owned()).unwrap_or_default(),
            loads: self.loads.iter().map(|(w, l)| (w.url().to_owned(), *l)).collect(),
            migration: self.migration,
            accounting: d.predicted.map(|p| AccountingView {
                unit: p.unit.as_str().into(),
                prompt: p.prompt as u64,
                best: p.best as u64,
                predicted: p.chosen as u64,
                actual: self.actual.as_ref().map(|a| a.load(Relaxed)).filter(|a| *a != u64::MAX),
            }),
        }
    }

    /// The compact form for the response header.
    pub fn header_value(&self) -> String {
        let v = self.view();
        let loads: serde_json::Map<String, Value> =
            v.loads.into_iter().map(|(u, l)| (u, json!(l))).collect();
        let mut h = json!({"pool": v.pool, "policy": v.policy, "branch": v.branch,
                           "match_ratio": v.match_ratio, "imbalanced": v.imbalanced,
                           "worker": v.worker, "loads": loads});
        if let Some(e) = v.estimate_ms {
            h["estimate_ms"] = json!(e);
        }
        if let (Some(m), Some(p)) = (v.matched_tokens, v.prompt_tokens) {
            h["matched_tokens"] = json!(m);
            h["prompt_tokens"] = json!(p);
        }
        // The prediction (the worker's own figure comes with its answer, after this header).
        if let Some(a) = v.accounting {
            h["accounting"] = json!({"unit": a.unit, "prompt": a.prompt, "best": a.best,
                                     "predicted": a.predicted});
        }
        h.to_string()
    }
}

/// Without a reader, one decision in this many is recorded.
pub const SAMPLE_EVERY: u64 = 64;
/// How long a read of the log keeps every decision recorded.
const READER_WINDOW_MS: u64 = 60_000;

#[derive(Default)]
pub struct DecisionLog {
    ring: Mutex<VecDeque<Record>>,
    seq: AtomicU64,
    /// Decisions offered (for sampling).
    offered: AtomicU64,
    /// Until when (unix ms) a reader is counted as watching.
    reader_until: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl DecisionLog {
    /// Whether the next decision should be recorded (see the module comment). Lock-free.
    pub fn wanted(&self) -> bool {
        let n = self.offered.fetch_add(1, Relaxed);
        n.is_multiple_of(SAMPLE_EVERY) || now_ms() < self.reader_until.load(Relaxed)
    }

    /// A reader looked: record every decision for the next minute.
    pub fn watched(&self) {
        self.reader_until.store(now_ms() + READER_WINDOW_MS, Relaxed);
    }

    pub fn push(&self, mut r: Record) {
        r.seq = self.seq.fetch_add(1, Relaxed) + 1;
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(r);
    }

    /// The newest `limit` records, newest first.
    pub fn latest(&self, limit: usize) -> Vec<View> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().take(limit).map(Record::view).collect()
    }
}

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<usize>,
}

/// `GET /admin/decisions?limit=N` (default 50, at most 256): the latest routing decisions.
pub async fn admin_decisions(State(app): State<Arc<App>>, Query(q): Query<Limit>) -> Json<Value> {
    let limit = q.limit.unwrap_or(50).min(KEPT);
    app.decisions.watched();
    Json(json!({"decisions": app.decisions.latest(limit)}))
}

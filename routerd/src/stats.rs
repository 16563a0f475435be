//! What the live dashboard (`routerctl top`) polls, cheaply: `GET /admin/stats` returns the
//! router's cumulative totals, a latency histogram and every worker's view, plus a log of
//! recent events (workers added, removed, ejected and back, circuits opened, reloads). The
//! client turns the cumulative figures into rates and percentiles between two polls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::admin::WorkerView;
use crate::app::App;

/// Upper bounds of the latency buckets, in milliseconds (the last one catches the rest).
pub const LATENCY_BOUNDS_MS: [f64; 16] = [
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    f64::INFINITY,
];

/// Router-wide counters, one atomic add each per request.
#[derive(Debug, Default)]
pub struct Totals {
    pub requests: AtomicU64,
    /// Answers with a 5xx status (the router's or a worker's).
    pub errors: AtomicU64,
    latency: [AtomicU64; 16],
}

impl Totals {
    pub fn record(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Relaxed);
        }
        let ms = took.as_secs_f64() * 1000.0;
        let i = LATENCY_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(15);
        self.latency[i].fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub at_unix_ms: u64,
    /// `worker_added`, `worker_removed`, `worker_unhealthy`, `worker_healthy`,
    /// `circuit_opened`, `reload`.
    pub kind: String,
    pub message: String,
}

/// The latest events, oldest dropped first.
#[derive(Default)]
pub struct EventLog {
    ring: Mutex<VecDeque<Event>>,
    seq: AtomicU64,
}

const EVENTS_KEPT: usize = 200;

impl EventLog {
    pub fn push(&self, kind: &str, message: impl Into<String>) {
        let at_unix_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let seq = self.seq.fetch_add(1, Relaxed) + 1;
        let e = Event { seq, at_unix_ms, kind: kind.to_owned(), message: message.into() };
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == EVENTS_KEPT {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// The newest `n`, oldest first.
    pub fn latest(&self, n: usize) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().skip(ring.len().saturating_sub(n)).cloned().collect()
    }
}

/// The body of `GET /admin/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub generation: u64,
    pub uptime_secs: f64,
    pub policy: String,
    pub pd: bool,
    pub ready: bool,
    pub requests_total: u64,
    pub errors_total: u64,
    pub retries_total: u64,
    pub in_flight: u64,
    /// Cumulative request counts per latency bucket: `latency_counts[i]` took at most
    /// `latency_bounds_ms[i]`; the one extra last count took longer than every bound.
    pub latency_bounds_ms: Vec<f64>,
    pub latency_counts: Vec<u64>,
    pub workers: Vec<WorkerView>,
    pub events: Vec<Event>,
    /// Cache-routing accounting over every worker since start (docs/metrics.md).
    #[serde(default)]
    pub cache_accounting: CacheAccounting,
}

/// `routerd_cache_accounting_total` summed over the workers: the parts (`ACCOUNTING_PARTS`
/// order) in tokens and in characters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheAccounting {
    pub tokens: [u64; crate::registry::ACCOUNTING_PARTS.len()],
    pub chars: [u64; crate::registry::ACCOUNTING_PARTS.len()],
}

pub fn stats(app: &App, started: Instant) -> Stats {
    let snap = app.registry.snapshot();
    let workers: Vec<WorkerView> = snap.workers.iter().map(|w| WorkerView::new(w, app)).collect();
    let live = app.live();
    let ready = match live.config.pd {
        Some(_) => {
            workers.iter().any(|w| w.routable && w.role == crate::registry::WorkerRole::Prefill)
                && workers
                    .iter()
                    .any(|w| w.routable && w.role == crate::registry::WorkerRole::Decode)
        }
        None => workers.iter().any(|w| w.routable),
    };
    Stats {
        generation: app.reloader.generation(),
        uptime_secs: started.elapsed().as_secs_f64(),
        policy: live.policy.name().to_owned(),
        pd: live.config.pd.is_some(),
        ready: ready && !app.draining.load(Relaxed),
        requests_total: app.totals.requests.load(Relaxed),
        errors_total: app.totals.errors.load(Relaxed),
        retries_total: workers.iter().map(|w| w.retries_total).sum(),
        in_flight: workers.iter().map(|w| w.in_flight).sum(),
        latency_bounds_ms: LATENCY_BOUNDS_MS[..15].to_vec(),
        latency_counts: app.totals.latency.iter().map(|c| c.load(Relaxed)).collect(),
        cache_accounting: accounting(&snap.workers),
        workers,
        events: app.events.latest(50),
    }
}

fn accounting(workers: &[Arc<crate::registry::Worker>]) -> CacheAccounting {
    let [tokens, chars] = crate::registry::accounting_totals(workers.iter().map(|w| &**w));
    CacheAccounting { tokens, chars }
}

/// `GET /admin/stats`.
pub async fn admin_stats(State(app): State<Arc<App>>) -> Json<Stats> {
    Json(stats(&app, app.started))
}

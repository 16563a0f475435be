//! Prometheus metrics (docs/metrics.md). Each router owns its recorder (not a process-global
//! one, so routers in one process, tests included, do not mix figures). The request path only
//! touches atomics: counters live in this module's own atomics and lock-free tallies
//! (`tally.rs`) and are copied into the recorder when `/metrics` is scraped, as the per-worker
//! series are read from the registry's atomics then (a handle kept into the recorder would be
//! orphaned once the exporter drops a series idle for 10 minutes); latency histograms are the
//! exporter's lock-free buckets. Label values are bounded: route names, status codes, worker URLs
//! of the fleet, policy branches.

pub mod tally;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use metrics::{Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;

use crate::app::App;
use crate::proxy::Route;
use crate::registry::WorkerRole;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const RATIO_BUCKETS: [f64; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// What each metric is, for the `# HELP` lines and docs/metrics.md.
pub const DESCRIPTIONS: &[(&str, Unit, &str)] = &[
    ("sgl_router_requests_total", Unit::Count, "Inference requests answered, by route and HTTP status"),
    ("sgl_router_request_duration_seconds", Unit::Seconds, "Inference request latency, from the request head to the end of the response, by route"),
    ("sgl_router_time_to_first_token_seconds", Unit::Seconds, "Streamed requests: time from the request head to the first event sent to the client, by route"),
    ("sgl_router_retries_total", Unit::Count, "Requests sent again to another worker (or PD pair)"),
    ("sgl_router_routing_decisions_total", Unit::Count, "Routing decisions by pool, policy and branch"),
    ("sgl_router_cache_hits_total", Unit::Count, "cache_aware decisions whose prefix match passed cache_threshold"),
    ("sgl_router_cache_misses_total", Unit::Count, "cache_aware decisions that went to the worker with the most cache room"),
    ("sgl_router_cache_match_ratio", Unit::Count, "cache_aware: share of the prompt the chosen worker's tree matched"),
    ("sgl_router_queue_depth", Unit::Count, "Requests waiting for an admission slot"),
    ("routerd_cache_accounting_total", Unit::Count, "cache_aware: the prompts routed to the worker, split by part (workload: no routable worker held it; policy: another held more, given up for balance; stale: predicted cached and not; underpredicted: cached beyond the prediction; hit: reported cached), in tokens (KV events) or characters (no tokenizer), by unit"),
    ("routerd_pool_cache_accounting_total", Unit::Count, "routerd_cache_accounting_total summed over the pool's workers"),
    ("routerd_queue_wait_seconds", Unit::Seconds, "Time each request waited for an admission slot (0 when one was free), with max_concurrent_requests set; those refused (queue full) or that gave up (queue timeout) included"),
    ("routerd_pool_requests_active", Unit::Count, "Requests in flight on the pool's workers, by pool (regular, prefill, decode)"),
    ("routerd_pool_saturation", Unit::Count, "Requests in flight over the engines' max_running_requests, summed over the pool's workers that report it (absent when none does)"),
    ("routerd_worker_max_running_requests", Unit::Count, "The engine's max_running_requests, from its /get_server_info (absent when it does not say)"),
    ("routerd_worker_saturation", Unit::Count, "Requests in flight on the worker over its max_running_requests (above 1: requests wait in the engine's queue)"),
    ("routerd_migrations_total", Unit::Count, "Streams a worker failed after bytes reached the client, by what routerd did: continued (on another worker), and when it could not: excluded (the request cannot be continued), limit (migration_limit reached), budget (retry budget spent), no_worker, failed (every continuation attempt failed), disabled"),
    ("routerd_migration_seam_seconds", Unit::Seconds, "Migrated streams: time from the failure noticed to the continuation's first event sent to the client"),
    ("routerd_trace_spans_total", Unit::Count, "OpenTelemetry spans the collector took (exported) and lost to failed or timed-out exports (failed); spans dropped because the export queue was full are logged"),
    ("sgl_router_pd_leg_failures_total", Unit::Count, "PD requests whose prefill or decode leg failed (the other leg was cancelled)"),
    ("sgl_router_config_reloads_total", Unit::Count, "Configuration reloads by result: applied, unchanged, rejected"),
    ("sgl_router_config_last_reload_successful", Unit::Count, "1 if the last reload was applied or unchanged, 0 if rejected"),
    ("sgl_router_workers", Unit::Count, "Registered workers by role"),
    ("sgl_router_worker_requests_active", Unit::Count, "Requests in flight on the worker (streams until their end)"),
    ("sgl_router_worker_requests_total", Unit::Count, "Requests sent to the worker, retries included"),
    ("sgl_router_worker_errors_total", Unit::Count, "Failed requests on the worker: connection errors, timeouts, 5xx, streams cut"),
    ("sgl_router_worker_retries_total", Unit::Count, "Requests moved off the worker by a retry"),
    ("sgl_router_worker_health", Unit::Count, "1 if the worker passes its health checks, else 0"),
    ("sgl_router_cb_state", Unit::Count, "The worker's circuit: 0 closed, 1 open, 2 half-open"),
    ("sgl_router_cb_opened_total", Unit::Count, "Times the worker's circuit opened"),
    ("sgl_router_worker_prompt_tokens_total", Unit::Count, "Prompt tokens the worker reported in its responses"),
    ("sgl_router_worker_cached_tokens_total", Unit::Count, "Prompt tokens the worker reported as served from its prefix cache"),
    ("routerd_worker_predicted_cached_tokens_total", Unit::Count, "Event routing: prompt tokens routerd predicted the worker's cache held when it routed there"),
    ("routerd_kv_events_total", Unit::Count, "KV events applied from the workers' publishers"),
    ("routerd_kv_malformed_total", Unit::Count, "KV event messages dropped because they did not decode"),
    ("routerd_kv_replays_total", Unit::Count, "Gaps in a KV event stream asked of the engine's replay socket"),
    ("routerd_kv_resets_total", Unit::Count, "Times a worker rank's cache picture was dropped (publisher restart, unreplayable gap)"),
    ("routerd_kv_blocks", Unit::Count, "Blocks in the KV event index, all workers"),
    ("sgl_router_tree_size", Unit::Count, "cache_aware: characters of the worker's share of the prefix tree"),
    ("sgl_router_tree_nodes", Unit::Count, "cache_aware: nodes of the prefix tree, by pool"),
    ("sgl_router_discovery_up", Unit::Count, "Kubernetes discovery: 1 while every watch is listed and healthy, 0 while it fails or has not listed yet"),
    ("sgl_router_discovery_workers", Unit::Count, "Kubernetes discovery: workers it has registered"),
    ("sgl_router_discovery_pods", Unit::Count, "Kubernetes discovery: pods its watches report, by readiness (ready: Running, Ready and with an IP)"),
    ("sgl_router_discovery_lists_total", Unit::Count, "Kubernetes discovery: complete pod lists, the first and every relist after a lost watch"),
    ("sgl_router_discovery_errors_total", Unit::Count, "Kubernetes discovery: failed API calls (list, watch, client)"),
    ("sgl_router_tree_evicted_chars_total", Unit::Count, "cache_aware: characters evicted from the prefix tree, by pool"),
];

/// What became of a stream its worker failed mid-way (`routerd_migrations_total`).
pub const MIGRATION_OUTCOMES: [&str; 7] =
    ["continued", "excluded", "limit", "budget", "no_worker", "failed", "disabled"];

pub fn route_label(route: Route) -> &'static str {
    match route {
        Route::Generate => "generate",
        Route::Completions => "completions",
        Route::Chat => "chat_completions",
        Route::Embeddings => "embeddings",
    }
}

const ROUTES: [Route; 4] = [Route::Generate, Route::Completions, Route::Chat, Route::Embeddings];

fn route_index(route: Route) -> usize {
    ROUTES.iter().position(|r| *r == route).expect("listed")
}

/// Every label value a decision counter can carry: pools, policy names, branches. A policy
/// whose name or branch is missing here is caught by a test (`policy::tests`).
pub const DECISION_LABELS: [&str; 16] = [
    "regular",
    "prefill",
    "decode",
    "cache_aware",
    "cost_aware",
    "round_robin",
    "random",
    "power_of_two",
    "hit",
    "miss",
    "manual",
    "sticky",
    "assigned",
    "no_key",
    "bucket",
    "balance",
];

fn label_index(label: &str) -> u64 {
    DECISION_LABELS.iter().position(|l| *l == label).map_or(0xff, |i| i as u64 + 1)
}

fn label_of(index: u64) -> &'static str {
    DECISION_LABELS.get((index as usize).wrapping_sub(1)).copied().unwrap_or("other")
}

const RELOAD_RESULTS: [&str; 3] = ["applied", "unchanged", "rejected"];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// By (route index + 1) << 16 | status.
    requests: tally::Tally,
    duration: [Histogram; 4],
    ttft: [Histogram; 4],
    retries: AtomicU64,
    /// By pool, policy and branch (`DECISION_LABELS` indices + 1, 8 bits each).
    decisions: tally::Tally,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    match_ratio: Histogram,
    pd_leg_failures: [AtomicU64; 2],
    migrations: [AtomicU64; MIGRATION_OUTCOMES.len()],
    seam: Histogram,
    queue_wait: Histogram,
    reloads: [AtomicU64; 3],
    last_reload_ok: AtomicU64,
    /// Spans the trace exporter delivered and lost (`otel::Otel` counts them).
    pub trace_spans: std::sync::Arc<crate::otel::ExportCounts>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_ratio".into()), &RATIO_BUCKETS)
            })
            .expect("static buckets are valid")
            // Series of removed workers stop being updated and disappear after this.
            .idle_timeout(
                MetricKindMask::GAUGE | MetricKindMask::COUNTER,
                Some(Duration::from_secs(600)),
            )
            .build_recorder();
        for (name, unit, help) in DESCRIPTIONS {
            let key = KeyName::from_const_str(name);
            let help = (*help).into();
            if name.ends_with("_seconds") || name.ends_with("_ratio") {
                recorder.describe_histogram(key, Some(*unit), help);
            } else if name.ends_with("_total") {
                recorder.describe_counter(key, Some(*unit), help);
            } else {
                recorder.describe_gauge(key, Some(*unit), help);
            }
        }
        let handle = recorder.handle();
        let r = &recorder;
        let per_route = |name: &'static str| {
            ROUTES.map(|route| {
                r.register_histogram(&key(name, &[("route", route_label(route))]), &META)
            })
        };
        Self {
            duration: per_route("sgl_router_request_duration_seconds"),
            ttft: per_route("sgl_router_time_to_first_token_seconds"),
            retries: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            match_ratio: r.register_histogram(&key("sgl_router_cache_match_ratio", &[]), &META),
            pd_leg_failures: Default::default(),
            migrations: Default::default(),
            seam: r.register_histogram(&key("routerd_migration_seam_seconds", &[]), &META),
            queue_wait: r.register_histogram(&key("routerd_queue_wait_seconds", &[]), &META),
            last_reload_ok: AtomicU64::new(1),
            requests: tally::Tally::new(128),
            decisions: tally::Tally::new(64),
            reloads: Default::default(),
            trace_spans: Default::default(),
            handle,
            recorder,
        }
    }

    /// A request sent again to another worker (or PD pair).
    pub fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// One answered inference request.
    pub fn request(&self, route: Route, status: u16, took: Duration) {
        let i = route_index(route);
        self.duration[i].record(took.as_secs_f64());
        self.requests.add(((i as u64 + 1) << 16) | u64::from(status), 1);
    }

    pub fn first_token(&self, route: Route, after: Duration) {
        self.ttft[route_index(route)].record(after.as_secs_f64());
    }

    /// A routing decision of `policy` in `pool` (`regular`, `prefill`, `decode`).
    pub fn decision(&self, pool: &'static str, policy: &'static str, d: &crate::policy::Decision) {
        let k = label_index(pool) | label_index(policy) << 8 | label_index(d.branch) << 16;
        self.decisions.add(k, 1);
        match d.branch {
            "hit" => self.cache_hits.fetch_add(1, Relaxed),
            "miss" => self.cache_misses.fetch_add(1, Relaxed),
            _ => 0,
        };
        if let Some(r) = d.match_ratio {
            self.match_ratio.record(r);
        }
    }

    pub fn pd_leg_failed(&self, role: WorkerRole) {
        self.pd_leg_failures[usize::from(role == WorkerRole::Decode)].fetch_add(1, Relaxed);
    }

    /// A stream cut mid-way by its worker, and what became of it (`MIGRATION_OUTCOMES`).
    pub fn migration(&self, outcome: &'static str) {
        if let Some(i) = MIGRATION_OUTCOMES.iter().position(|o| *o == outcome) {
            self.migrations[i].fetch_add(1, Relaxed);
        }
    }

    /// A request waited this long for an admission slot (or gave up after it).
    pub fn queue_wait(&self, waited: Duration) {
        self.queue_wait.record(waited.as_secs_f64());
    }

    /// A continuation's first event reached the client `after` the failure was noticed.
    pub fn migration_seam(&self, after: Duration) {
        self.seam.record(after.as_secs_f64());
    }

    pub fn reload(&self, result: &'static str) {
        if let Some(i) = RELOAD_RESULTS.iter().position(|r| *r == result) {
            self.reloads[i].fetch_add(1, Relaxed);
        }
        self.last_reload_ok.store(u64::from(result != "rejected"), Relaxed);
    }

    /// Copies the router-wide counters into the recorder (re-registering a series the
    /// exporter dropped as idle).
    fn publish(&self) {
        let r = &self.recorder;
        let counter = |name: &'static str, labels: &[(&'static str, &str)], v: u64| {
            r.register_counter(&key(name, labels), &META).absolute(v)
        };
        self.requests.each(|k, n| {
            let route = route_label(ROUTES[((k >> 16) - 1) as usize]);
            let status = (k & 0xffff).to_string();
            counter("sgl_router_requests_total", &[("route", route), ("status", &status)], n);
        });
        self.decisions.each(|k, n| {
            let labels = [
                ("pool", label_of(k & 0xff)),
                ("policy", label_of((k >> 8) & 0xff)),
                ("branch", label_of(k >> 16)),
            ];
            counter("sgl_router_routing_decisions_total", &labels, n);
        });
        counter("sgl_router_retries_total", &[], self.retries.load(Relaxed));
        counter("sgl_router_cache_hits_total", &[], self.cache_hits.load(Relaxed));
        counter("sgl_router_cache_misses_total", &[], self.cache_misses.load(Relaxed));
        for (leg, n) in ["prefill", "decode"].iter().zip(&self.pd_leg_failures) {
            counter("sgl_router_pd_leg_failures_total", &[("leg", leg)], n.load(Relaxed));
        }
        for (outcome, n) in MIGRATION_OUTCOMES.iter().zip(&self.migrations) {
            let n = n.load(Relaxed);
            if n > 0 {
                counter("routerd_migrations_total", &[("outcome", outcome)], n);
            }
        }
        let spans =
            [("exported", &self.trace_spans.exported), ("failed", &self.trace_spans.failed)];
        for (outcome, n) in spans {
            let n = n.load(Relaxed);
            if n > 0 {
                counter("routerd_trace_spans_total", &[("outcome", outcome)], n);
            }
        }
        for (result, n) in RELOAD_RESULTS.iter().zip(&self.reloads) {
            let n = n.load(Relaxed);
            if n > 0 {
                counter("sgl_router_config_reloads_total", &[("result", result)], n);
            }
        }
        r.register_gauge(&key("sgl_router_config_last_reload_successful", &[]), &META)
            .set(self.last_reload_ok.load(Relaxed) as f64);
    }

    /// The exposition text, with per-worker series read from the registry now.
    pub fn render(&self, app: &App) -> String {
        self.publish();
        let r = &self.recorder;
        let snap = app.registry.snapshot();
        let live = app.live();
        for role in WorkerRole::ALL {
            let pool: Vec<&Arc<crate::registry::Worker>> =
                snap.workers.iter().filter(|w| w.spec.role == role).collect();
            let labels = [("role", role.as_str())];
            r.register_gauge(&key("sgl_router_workers", &labels), &META).set(pool.len() as f64);
            if pool.is_empty() {
                continue;
            }
            let labels = [("pool", role.as_str())];
            let totals = crate::registry::accounting_totals(pool.iter().map(|w| &***w));
            accounting(r, "routerd_pool_cache_accounting_total", labels[0], totals);
            let active: u64 = pool.iter().map(|w| w.in_flight.load(Relaxed)).sum();
            r.register_gauge(&key("routerd_pool_requests_active", &labels), &META)
                .set(active as f64);
            let known: Vec<_> = pool.iter().filter(|w| w.max_running.load(Relaxed) > 0).collect();
            if !known.is_empty() {
                let busy: u64 = known.iter().map(|w| w.in_flight.load(Relaxed)).sum();
                let max: u64 = known.iter().map(|w| w.max_running.load(Relaxed)).sum();
                r.register_gauge(&key("routerd_pool_saturation", &labels), &META)
                    .set(busy as f64 / max as f64);
            }
        }
        for w in &snap.workers {
            let labels = [("worker", w.url())];
            let gauge =
                |name: &'static str, v: f64| r.register_gauge(&key(name, &labels), &META).set(v);
            let counter = |name: &'static str, v: u64| {
                r.register_counter(&key(name, &labels), &META).absolute(v)
            };
            gauge("sgl_router_worker_requests_active", w.in_flight.load(Relaxed) as f64);
            let totals = crate::registry::accounting_totals([&**w]);
            accounting(r, "routerd_cache_accounting_total", labels[0], totals);
            let max = w.max_running.load(Relaxed);
            if max > 0 {
                gauge("routerd_worker_max_running_requests", max as f64);
                gauge("routerd_worker_saturation", w.in_flight.load(Relaxed) as f64 / max as f64);
            }
            gauge("sgl_router_worker_health", f64::from(u8::from(w.healthy.load(Relaxed))));
            gauge("sgl_router_cb_state", w.breaker.state() as u8 as f64);
            gauge(
                "sgl_router_tree_size",
                live.policy_for(w.spec.role).tree_stats(w.url()).chars as f64,
            );
            counter("sgl_router_worker_requests_total", w.requests_total.load(Relaxed));
            counter("sgl_router_worker_errors_total", w.errors_total.load(Relaxed));
            counter("sgl_router_worker_retries_total", w.retries_total.load(Relaxed));
            counter("sgl_router_cb_opened_total", w.breaker.opened_total.load(Relaxed));
            counter("sgl_router_worker_prompt_tokens_total", w.prompt_tokens.load(Relaxed));
            counter("sgl_router_worker_cached_tokens_total", w.cached_tokens.load(Relaxed));
            counter(
                "routerd_worker_predicted_cached_tokens_total",
                w.predicted_tokens.load(Relaxed),
            );
        }
        let kv = &app.kv;
        for (name, v) in [
            ("routerd_kv_events_total", &kv.events),
            ("routerd_kv_malformed_total", &kv.malformed),
            ("routerd_kv_replays_total", &kv.replays),
            ("routerd_kv_resets_total", &kv.resets),
        ] {
            r.register_counter(&key(name, &[]), &META).absolute(v.load(Relaxed));
        }
        r.register_gauge(&key("routerd_kv_blocks", &[]), &META).set(kv.blocks() as f64);
        let mut pools = vec![("regular", live.policy.clone())];
        if let Some(p) = &live.pools {
            pools = vec![("prefill", p.prefill.clone()), ("decode", p.decode.clone())];
        }
        for (pool, policy) in pools {
            if let Some(t) = policy.tree_totals() {
                let labels = [("pool", pool)];
                r.register_gauge(&key("sgl_router_tree_nodes", &labels), &META).set(t.nodes as f64);
                r.register_counter(&key("sgl_router_tree_evicted_chars_total", &labels), &META)
                    .absolute(t.evicted_chars);
            }
        }
        let d = app.discovery.get();
        if d.enabled {
            let gauge = |name, labels: &[(&'static str, &str)], v: u64| {
                r.register_gauge(&key(name, labels), &META).set(v as f64)
            };
            gauge("sgl_router_discovery_up", &[], u64::from(d.state == "watching"));
            gauge("sgl_router_discovery_workers", &[], d.workers);
            gauge("sgl_router_discovery_pods", &[("ready", "true")], d.ready_pods);
            gauge("sgl_router_discovery_pods", &[("ready", "false")], d.pods - d.ready_pods);
            r.register_counter(&key("sgl_router_discovery_lists_total", &[]), &META)
                .absolute(d.lists_total);
            r.register_counter(&key("sgl_router_discovery_errors_total", &[]), &META)
                .absolute(d.errors_total);
        }
        let waiting = live.limiter.as_ref().map_or(0, |l| l.waiting());
        r.register_gauge(&key("sgl_router_queue_depth", &[]), &META).set(waiting as f64);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// The cache accounting's counters under `name`, labelled `by` (a pool or a worker), unit and
/// part; parts still at 0 are left out.
fn accounting(
    r: &PrometheusRecorder,
    name: &'static str,
    by: (&'static str, &str),
    totals: [[u64; crate::registry::ACCOUNTING_PARTS.len()]; 2],
) {
    for (unit, parts) in crate::policy::Unit::ALL.into_iter().zip(totals) {
        for (part, n) in crate::registry::ACCOUNTING_PARTS.into_iter().zip(parts) {
            if n > 0 {
                let labels = [by, ("unit", unit.as_str()), ("part", part)];
                r.register_counter(&key(name, &labels), &META).absolute(n);
            }
        }
    }
}

/// Folds recorded latency samples into their buckets every second, so memory stays flat
/// between scrapes (or with no scraper at all).
pub async fn upkeep(app: Arc<App>, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => app.metrics.handle.run_upkeep(),
        }
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
    Key::from_parts(name, labels)
}

/// `GET /metrics` on the metrics listener.
pub async fn serve_metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render(&app))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Worker, WorkerSource, WorkerSpec};

    /// Every policy's name and every branch it reports has a label (else its decisions would be
    /// counted as `other`).
    #[test]
    fn every_policy_and_branch_has_a_label() {
        let w = Arc::new(Worker::new(WorkerSpec {
            url: "http://w:1".into(),
            role: WorkerRole::Regular,
            bootstrap_port: None,
            api_key: None,
            source: WorkerSource::Config,
            tls: Default::default(),
        }));
        let config = crate::config::Config::build(None, &Default::default()).unwrap();
        for (name, p) in crate::config::PolicyName::ALL {
            let policy = crate::policy::build(&config.policy.named(p));
            assert_ne!(label_index(policy.name()), 0xff, "{name}");
            for (text, key) in
                [("", None), ("some prompt", Some("k")), ("some prompt again", Some("k"))]
            {
                let req =
                    crate::policy::RequestInfo { text, routing_key: key, ..Default::default() };
                let d = policy.decide(std::slice::from_ref(&w), &req).unwrap();
                assert_ne!(label_index(d.branch), 0xff, "{name}: branch {}", d.branch);
            }
        }
        let m = Metrics::new();
        let d = crate::policy::Decision { branch: "hit", ..Default::default() };
        m.decision("prefill", "cache_aware", &d);
        m.request(Route::Chat, 503, Duration::from_millis(1));
        let text = m.handle.render();
        assert!(
            text.is_empty() || !text.contains("sgl_router_requests_total{"),
            "published at scrape"
        );
        m.publish();
        let text = m.handle.render();
        assert!(text.contains(r#"sgl_router_routing_decisions_total{pool="prefill",policy="cache_aware",branch="hit"} 1"#), "{text}");
        assert!(
            text.contains(r#"sgl_router_requests_total{route="chat_completions",status="503"} 1"#),
            "{text}"
        );
    }
}

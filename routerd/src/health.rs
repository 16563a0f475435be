//! Active health checks: every worker's health endpoint is fetched on a schedule, and
//! consecutive outcomes move it between healthy and unhealthy (`failure_threshold`,
//! `success_threshold`). A worker starts out routable (a worker added at runtime takes requests
//! at once) and is checked immediately; until it has passed one check it counts as starting:
//! one failure marks it down, one success up, and it is checked every
//! `startup_check_interval` for up to `startup_timeout`, so routerd serves with the workers that
//! are up while the others boot. Probes run concurrently, one at a time per worker.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, Method};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::HealthConfig;
use crate::proxy::upstream;
use crate::registry::Worker;

/// How often the loop looks for due probes and new workers.
const TICK: Duration = Duration::from_millis(100);

/// Checks every registered worker until `cancel`. The ranks of one data-parallel server
/// (`URL@0`, `URL@1`, ...) are one process: they share each probe, and each rank's own track
/// records its outcome.
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    let mut probes = JoinSet::new();
    loop {
        let cfg = app.live().config.health.clone();
        let now = Instant::now();
        let snap = app.registry.snapshot();
        // One entry per server: a worker alone, or the ranks of a dp server by base URL.
        let mut servers: Vec<Vec<Arc<Worker>>> = Vec::new();
        let mut dp_servers: HashMap<&str, usize> = HashMap::new();
        for w in snap.workers.iter() {
            if !cfg.enabled {
                // Checks turned off: nothing can vouch against a worker any more.
                w.healthy.store(true, Relaxed);
                continue;
            }
            if w.dp_rank.is_some() {
                let base = crate::registry::split_rank(w.url()).0;
                if let Some(&i) = dp_servers.get(base) {
                    servers[i].push(w.clone());
                    continue;
                }
                dp_servers.insert(base, servers.len());
            }
            servers.push(vec![w.clone()]);
        }
        for ranks in servers {
            let tracks: Vec<_> =
                ranks.iter().map(|w| w.health.lock().unwrap_or_else(|p| p.into_inner())).collect();
            let due = tracks.iter().any(|t| t.next.is_none_or(|n| n <= now));
            if due && !tracks.iter().any(|t| t.probing) {
                for mut t in tracks {
                    t.probing = true;
                }
                probes.spawn(probe(app.clone(), ranks, cfg.clone()));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                probes.abort_all();
                return;
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        while probes.try_join_next().is_some() {}
    }
}

/// One check of the server behind `ranks` (a single worker, or the ranks of one dp server),
/// recorded on each.
async fn probe(app: Arc<App>, ranks: Vec<Arc<Worker>>, cfg: HealthConfig) {
    let outcome = check(&app, &ranks[0], &cfg).await;
    for w in &ranks {
        record(&app, w, &cfg, &outcome);
    }
    if outcome.is_ok() && ranks.len() == 1 && ranks[0].dp_rank.is_none() {
        learn_capacity(&app, &ranks[0], cfg.timeout).await;
    }
}

/// How long a worker that did not say its `max_running_requests` waits to be asked again.
const CAPACITY_RETRY_MS: u64 = 30_000;

/// Learns the engine's `max_running_requests` from `/get_server_info` (SGLang's server
/// arguments, or its first scheduler's `internal_states`) once a worker is up, for the
/// saturation metrics; asked again when the worker comes back from failing its checks (it may
/// have restarted with other settings). A data-parallel rank's share is not known, so ranks
/// are not asked.
pub async fn learn_capacity(app: &App, w: &Worker, timeout: Duration) {
    let now = crate::registry::clock_ms();
    let asked = w.capacity_asked_ms.load(Relaxed);
    if w.max_running.load(Relaxed) > 0 || (asked > 0 && now - asked < CAPACITY_RETRY_MS) {
        return;
    }
    w.capacity_asked_ms.store(now, Relaxed);
    let Some(info) = app.http.get_json(w, "/get_server_info", timeout).await else { return };
    if let Some(m) = crate::info::server_info_count(&info, "max_running_requests") {
        w.max_running.store(m, Relaxed);
    }
}

fn record(app: &App, w: &Worker, cfg: &HealthConfig, outcome: &Result<(), String>) {
    let mut t = w.health.lock().unwrap_or_else(|p| p.into_inner());
    t.probing = false;
    t.checks_total += 1;
    let healthy = w.healthy.load(Relaxed);
    match outcome {
        Ok(()) => {
            w.breaker.probe_passed();
            t.passed += 1;
            t.failed = 0;
            if !healthy && (t.passed >= cfg.success_threshold || !t.ever_passed) {
                w.healthy.store(true, Relaxed);
                tracing::info!(worker = w.url(), "worker is healthy");
                app.events.push("worker_healthy", w.url());
                if t.ever_passed {
                    // Back after failing its checks: it may have restarted with an empty cache
                    // (and other settings).
                    app.policy_for(w.spec.role).worker_reset(w.url());
                    app.kv.reset_worker(w.url());
                    w.max_running.store(0, Relaxed);
                    w.capacity_asked_ms.store(0, Relaxed);
                }
            }
            t.ever_passed = true;
        }
        Err(e) => {
            t.failed += 1;
            t.passed = 0;
            if healthy && (t.failed >= cfg.failure_threshold || !t.ever_passed) {
                w.healthy.store(false, Relaxed);
                tracing::warn!(worker = w.url(), error = %e, "worker is unhealthy");
                app.events.push("worker_unhealthy", format!("{}: {e}", w.url()));
            }
            w.set_last_error(format!("health check: {e}"));
        }
    }
    let now = Instant::now();
    let starting = !t.ever_passed && now.duration_since(t.added) < cfg.startup_timeout;
    if !t.ever_passed && !starting && !t.warned {
        t.warned = true;
        tracing::warn!(
            worker = w.url(),
            timeout = ?cfg.startup_timeout,
            "worker has not passed a health check since it was added; checking it at the regular interval"
        );
    }
    t.next = Some(now + if starting { cfg.startup_check_interval } else { cfg.interval });
}

async fn check(app: &App, w: &Worker, cfg: &HealthConfig) -> Result<(), String> {
    let path = PathAndQuery::try_from(cfg.endpoint.as_str()).map_err(|e| e.to_string())?;
    let headers = upstream::worker_headers(w, &HeaderMap::new(), None);
    let answer = app
        .http
        .send(w, Method::GET, path, headers, Bytes::new(), cfg.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.response.status();
    let body = tokio::time::timeout_at(answer.deadline, answer.response.into_body().collect());
    match body.await {
        Ok(Ok(_)) if status.is_success() => Ok(()),
        Ok(Ok(_)) => Err(format!("{} answered {status}", cfg.endpoint)),
        Ok(Err(e)) => Err(format!("{} body failed: {e}", cfg.endpoint)),
        Err(_) => Err(format!("{} body took longer than {:?}", cfg.endpoint, cfg.timeout)),
    }
}

//! Worker management: sgl-router's 0.1/0.2 routes (`/add_worker`, `/remove_worker`,
//! `/list_workers`) with their shapes, and the workers API of sglang-router 0.3 that routerctl
//! uses too: `GET /workers`, `POST /workers` (202 with the new `worker_id` and a `Location`),
//! `GET /workers/{id}` (pollable until healthy), `DELETE /workers/{id}` (202). A worker is also
//! found by its URL (url-encoded). Registration is immediate: a worker added here takes traffic
//! from the next request on, and its `health_state` says whether it passed a health check yet.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::App;
use crate::config::normalize_worker_url;
use crate::error::RouterError;
use crate::registry::{RegistryError, Worker, WorkerRole, WorkerSource, WorkerSpec};

/// A worker as `GET /workers` shows it.
/// A worker's own load report, as `/admin/stats` shows it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoadReportView {
    pub requests: u64,
    pub own_then: u64,
    pub source: crate::registry::ReportSource,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerView {
    /// Stable for the worker's life (a UUID, as sgl-router 0.3's `worker_id`).
    pub id: String,
    pub url: String,
    pub role: WorkerRole,
    /// sgl-router 0.3's name for `role`: `regular`, `prefill` or `decode`.
    pub worker_type: WorkerRole,
    /// sgl-router 0.3's name for `healthy`.
    pub is_healthy: bool,
    /// `starting` until its first health check passed, then `healthy` or `unhealthy`.
    pub health_state: String,
    pub bootstrap_port: Option<u16>,
    /// The active health checks' verdict.
    pub healthy: bool,
    /// `closed`, `open` or `half_open`.
    pub circuit: String,
    /// Whether the policy may choose it now: healthy, circuit not open, not backing off after
    /// a 429 with `Retry-After`.
    pub routable: bool,
    /// Health checks done, times its circuit opened, retries that moved a request off it.
    pub health_checks_total: u64,
    pub circuit_opened_total: u64,
    pub retries_total: u64,
    /// The last failure seen on it (a request or a health check).
    pub last_error: Option<String>,
    pub in_flight: u64,
    /// The load policies compare: `in_flight` plus what other routers have running there, by
    /// the worker's own last report (`load_report`).
    pub load: u64,
    /// The worker's last load report while it counts: requests it had running and waiting,
    /// this router's in-flight count then, and where it came from (`published` on its load
    /// socket, `polled` from `/get_load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_report: Option<LoadReportView>,
    pub requests_total: u64,
    pub errors_total: u64,
    /// Prompt and cached tokens the worker reported in its responses, and their ratio: the
    /// worker's real prefix-cache hit rate (null before any response reported them).
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub hit_ratio: Option<f64>,
    /// Event routing: prompt tokens routerd predicted the worker's cache held when it routed
    /// there (compare with `cached_tokens`; docs/kv-events.md).
    #[serde(default)]
    pub predicted_tokens: u64,
    /// This worker's share of cache_aware's prefix tree: characters, nodes, approximate bytes.
    pub tree_chars: u64,
    pub tree_nodes: u64,
    pub tree_bytes: u64,
    pub source: WorkerSource,
}

impl WorkerView {
    pub fn new(w: &Worker, app: &App) -> Self {
        let tree = app.policy_for(w.spec.role).tree_stats(w.url());
        let prompt_tokens = w.prompt_tokens.load(Relaxed);
        let cached_tokens = w.cached_tokens.load(Relaxed);
        let healthy = w.healthy.load(Relaxed);
        let ever_passed = w.health.lock().map(|t| t.ever_passed).unwrap_or(false);
        let health_state = match (healthy, ever_passed) {
            (false, _) => "unhealthy",
            (true, false) => "starting",
            (true, true) => "healthy",
        };
        Self {
            id: w.id.clone(),
            url: w.url().to_owned(),
            role: w.spec.role,
            worker_type: w.spec.role,
            is_healthy: healthy,
            health_state: health_state.into(),
            bootstrap_port: w.spec.bootstrap_port,
            healthy: w.healthy.load(Relaxed),
            circuit: w.breaker.state().as_str().into(),
            routable: w.is_routable(),
            health_checks_total: w.health.lock().map(|t| t.checks_total).unwrap_or(0),
            circuit_opened_total: w.breaker.opened_total.load(Relaxed),
            retries_total: w.retries_total.load(Relaxed),
            last_error: w.last_error(),
            in_flight: w.in_flight.load(Relaxed),
            load: w.load(),
            load_report: w.report.fresh().map(|(requests, own_then, source)| LoadReportView {
                requests,
                own_then,
                source,
            }),
            requests_total: w.requests_total.load(Relaxed),
            errors_total: w.errors_total.load(Relaxed),
            prompt_tokens,
            cached_tokens,
            hit_ratio: (prompt_tokens > 0).then(|| cached_tokens as f64 / prompt_tokens as f64),
            predicted_tokens: w.predicted_tokens.load(Relaxed),
            tree_chars: tree.chars as u64,
            tree_nodes: tree.nodes as u64,
            tree_bytes: tree.approx_bytes as u64,
            source: w.spec.source,
        }
    }
}

/// The body of `POST /workers` (and the query of `/add_worker`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewWorker {
    pub url: String,
    #[serde(default)]
    pub role: Option<WorkerRole>,
    #[serde(default)]
    pub bootstrap_port: Option<u16>,
    #[serde(default)]
    pub api_key: Option<crate::secret::Secret>,
    /// Who registers it: `api` (the default) or `launch` (`routerctl launch`, which supervises
    /// the worker's process). `config` and `discovery` workers come from their own sources.
    #[serde(default)]
    pub source: Option<WorkerSource>,
}

async fn register(app: &App, new: NewWorker) -> Result<Arc<Worker>, RouterError> {
    let live = app.live();
    let pd = live.config.pd.is_some();
    let role = match (new.role, pd) {
        (None, false) | (Some(WorkerRole::Regular), false) => WorkerRole::Regular,
        (Some(r @ (WorkerRole::Prefill | WorkerRole::Decode)), true) => r,
        (_, true) => {
            return Err(RouterError::BadRequest(
                "the router is in PD mode: role must be prefill or decode".into(),
            ))
        }
        (Some(_), false) => {
            return Err(RouterError::BadRequest(
                "prefill and decode workers need PD mode (--pd-disaggregation)".into(),
            ))
        }
    };
    if new.bootstrap_port.is_some() && role != WorkerRole::Prefill {
        return Err(RouterError::BadRequest("bootstrap_port is for prefill workers".into()));
    }
    let source = match new.source.unwrap_or(WorkerSource::Api) {
        s @ (WorkerSource::Api | WorkerSource::Launch) => s,
        other => {
            return Err(RouterError::BadRequest(format!(
                "source must be `api` or `launch`, not `{}`: {} workers come from their own source",
                other.as_str(),
                other.as_str()
            )))
        }
    };
    let url = normalize_worker_url(&new.url).map_err(RouterError::BadRequest)?;
    let allowed = &live.config.security.allowed_worker_networks;
    crate::security::check_worker_url(&url, allowed).await.map_err(RouterError::BadRequest)?;
    if let Some(k) = &new.api_key {
        let v = k.expose();
        if v.trim().is_empty() || v.chars().any(|c| c.is_control() || !c.is_ascii()) {
            return Err(RouterError::BadRequest(
                "api_key must be non-empty printable ASCII text".into(),
            ));
        }
    }
    let tls = live.config.tls.for_worker(role, &Default::default());
    let spec = WorkerSpec {
        url,
        role,
        bootstrap_port: new.bootstrap_port,
        api_key: new.api_key,
        source,
        tls,
    };
    let role = spec.role;
    let via = match source {
        WorkerSource::Launch => "by routerctl launch",
        _ => "via the API",
    };
    // DP-aware: one target per rank, from the worker's own dp_size; the answer shows rank 0.
    let specs = if live.config.policy.dp_aware {
        let n = crate::dp::resolve(app, &spec)
            .await
            .map_err(|reason| RouterError::WorkerFailed { worker: spec.url.clone(), reason })?;
        crate::dp::ranks(&spec, n)
    } else {
        vec![spec]
    };
    // All ranks or none: a rank registered already refuses the whole worker.
    let added = app.registry.add_all(specs).map_err(registry_error)?;
    for w in &added {
        app.events.push("worker_added", format!("{} ({}, {via})", w.url(), role.as_str()));
    }
    added
        .into_iter()
        .next()
        .ok_or_else(|| RouterError::BadRequest("the worker has no ranks".into()))
}

fn registry_error(e: RegistryError) -> RouterError {
    match e {
        RegistryError::Duplicate(_) => RouterError::Conflict(e.to_string()),
        RegistryError::Unknown(_) => RouterError::UnknownWorker(e.to_string()),
    }
}

/// The registered worker with this id, or this URL.
fn find(app: &App, id_or_url: &str) -> Option<Arc<Worker>> {
    let snap = app.registry.load();
    if let Some(w) = snap.by_id(id_or_url) {
        return Some(w.clone());
    }
    let url = normalize_worker_url(id_or_url).unwrap_or_else(|_| id_or_url.to_owned());
    snap.get(&url).cloned()
}

fn unregister(app: &App, id_or_url: &str) -> Result<Arc<Worker>, RouterError> {
    if let Some(w) = app.registry.load().by_id(id_or_url).cloned() {
        return unregister(app, w.url());
    }
    let url = normalize_worker_url(id_or_url).unwrap_or_else(|_| id_or_url.to_owned());
    // DP-aware: a base URL removes every rank of it.
    let ranks: Vec<String> = app
        .registry
        .load()
        .workers
        .iter()
        .filter(|w| w.dp_rank.is_some() && crate::registry::split_rank(w.url()).0 == url)
        .map(|w| w.url().to_owned())
        .collect();
    if !ranks.is_empty() {
        let mut first = None;
        for r in ranks {
            if let Ok(w) = unregister(app, &r) {
                first.get_or_insert(w);
            }
        }
        return first.ok_or_else(|| RouterError::UnknownWorker(format!("unknown worker {url}")));
    }
    let removed = app.registry.remove(&url).map_err(registry_error)?;
    app.events.push("worker_removed", format!("{url} (via the API)"));
    Ok(removed)
}

pub async fn add_worker(State(app): State<Arc<App>>, Query(q): Query<NewWorker>) -> Response {
    match register(&app, q).await {
        Ok(w) => {
            (StatusCode::OK, format!("Successfully added worker: {}", w.url())).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct UrlQuery {
    url: String,
}

pub async fn remove_worker(State(app): State<Arc<App>>, Query(q): Query<UrlQuery>) -> Response {
    match unregister(&app, &q.url) {
        Ok(w) => {
            (StatusCode::OK, format!("Successfully removed worker: {}", w.url())).into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub async fn list_workers(State(app): State<Arc<App>>) -> Json<Value> {
    let urls: Vec<String> =
        app.registry.load().workers.iter().map(|w| w.url().to_owned()).collect();
    Json(json!({"urls": urls}))
}

/// `GET /workers`: every worker, with sgl-router 0.3's `total` and per-role `stats`.
pub async fn workers(State(app): State<Arc<App>>) -> Json<Value> {
    let views: Vec<WorkerView> =
        app.registry.load().workers.iter().map(|w| WorkerView::new(w, &app)).collect();
    let count = |role| views.iter().filter(|v| v.role == role).count();
    let stats = json!({
        "prefill_count": count(WorkerRole::Prefill),
        "decode_count": count(WorkerRole::Decode),
        "regular_count": count(WorkerRole::Regular),
    });
    Json(json!({"total": views.len(), "stats": stats, "workers": views}))
}

/// `POST /workers`: 202 with `{"status": "accepted", "worker_id", "url", "location",
/// "message"}` and a `Location` header, as sgl-router 0.3 answers; routerd adds `worker`, the
/// worker's state (registration is immediate). A URL already registered is 409.
pub async fn create_worker(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let new: NewWorker = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return RouterError::BadRequest(format!("invalid worker: {e}")).into_response(),
    };
    match register(&app, new).await {
        Ok(w) => {
            let location = format!("/workers/{}", w.id);
            let body = json!({
                "status": "accepted",
                "worker_id": w.id,
                "url": w.url(),
                "location": location,
                "message": "Worker registered; poll its location until health_state is healthy",
                "worker": WorkerView::new(&w, &app),
            });
            let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&location) {
                resp.headers_mut().insert(axum::http::header::LOCATION, v);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /workers/{id}` (or its url-encoded URL): the worker's state; 404 when unknown.
pub async fn get_worker(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match find(&app, &id) {
        Some(w) => Json(WorkerView::new(&w, &app)).into_response(),
        None => RouterError::UnknownWorker(format!("Worker {id} not found")).into_response(),
    }
}

/// `DELETE /workers/{id}` (or its url-encoded URL): 202 with `{"status": "accepted",
/// "worker_id", "message"}` as sgl-router 0.3 answers, plus `worker`; 404 when unknown. The
/// worker leaves routing at once; requests already on it finish.
pub async fn delete_worker(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match unregister(&app, &id) {
        Ok(w) => {
            let body = json!({
                "status": "accepted",
                "worker_id": w.id,
                "message": "Worker removed",
                "worker": WorkerView::new(&w, &app),
            });
            (StatusCode::ACCEPTED, Json(body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

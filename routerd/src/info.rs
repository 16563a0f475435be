//! Health, readiness and the informational routes: some answered by the router itself, the
//! rest fetched from a routable worker (`/get_server_info`, `/get_model_info`, `/v1/models`,
//! `/health_generate`) or fanned out to every worker (`/get_loads`, `/flush_cache`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::app::App;
use crate::error::RouterError;
use crate::policy::{Policy, RequestInfo};
use crate::proxy::upstream;
use crate::registry::{Worker, WorkerRole};

const INFO_TIMEOUT: Duration = Duration::from_secs(30);

/// A positive count from a worker's `/server_info` (or `/get_server_info`): SGLang merges its
/// scheduler's info into the server arguments there, and also lists each scheduler's state in
/// `internal_states`: the top-level value, else the first scheduler's.
pub fn server_info_count(info: &Value, key: &str) -> Option<u64> {
    info[key].as_u64().or_else(|| info["internal_states"][0][key].as_u64()).filter(|&n| n > 0)
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readiness(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"})))
            .into_response();
    }
    let snap = app.registry.load();
    if app.live().config.pd.is_some() {
        let (p, d) = (snap.routable_in(WorkerRole::Prefill), snap.routable_in(WorkerRole::Decode));
        let body = json!({"status": "ready", "routable_prefill": p, "routable_decode": d});
        if p == 0 || d == 0 {
            let pool = if p == 0 { "prefill" } else { "decode" };
            let reason = format!("no routable {pool} worker");
            let body = json!({"status": "not_ready", "reason": reason, "routable_prefill": p, "routable_decode": d});
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
        return Json(body).into_response();
    }
    let n = snap.routable();
    if n == 0 {
        let body = json!({"status": "not_ready", "reason": "no routable worker"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({"status": "ready", "routable_workers": n})).into_response()
}

/// Spreads informational requests over the routable workers, whatever the routing policy.
fn pick(app: &App) -> Result<Arc<Worker>, RouterError> {
    let snap = app.registry.load();
    let i = app
        .info_spread
        .select(&snap.workers, &RequestInfo::default())
        .ok_or(RouterError::NoWorkers)?;
    Ok(snap.workers[i].clone())
}

fn pq(path: &str) -> Result<PathAndQuery, RouterError> {
    PathAndQuery::try_from(path).map_err(|e| RouterError::BadRequest(e.to_string()))
}

/// GET the same path from one routable worker and relay its answer.
pub async fn passthrough(State(app): State<Arc<App>>, uri: Uri, headers: HeaderMap) -> Response {
    let result = async {
        let w = pick(&app)?;
        let h = upstream::worker_headers(&w, &headers, None);
        let answer =
            app.http.send(&w, Method::GET, pq(uri.path())?, h, Bytes::new(), INFO_TIMEOUT).await?;
        Ok::<_, RouterError>(upstream::relay(answer, w.url()))
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// sgl-router's `/get_loads`: each worker's own `/get_load` (`load` is -1 when it did not answer).
pub async fn get_loads(State(app): State<Arc<App>>) -> Json<Value> {
    let workers = app.registry.snapshot().workers.clone();
    let loads = futures_util::future::join_all(
        workers.iter().map(|w| app.http.get_json(w, "/get_load", INFO_TIMEOUT)),
    )
    .await;
    let out: Vec<Value> = workers
        .iter()
        .zip(loads)
        .map(|(w, v)| {
            let load = v.and_then(|v| v.get("load").and_then(Value::as_i64)).unwrap_or(-1);
            json!({"worker": w.url(), "load": load})
        })
        .collect();
    Json(json!({"workers": out}))
}

/// `/flush_cache` on every worker; 200 when all flushed, else 502 with each worker's outcome.
/// Each worker that flushed starts empty in its policy's prefix tree.
pub async fn flush_cache(State(app): State<Arc<App>>) -> Response {
    let workers = app.registry.snapshot().workers.clone();
    let calls = workers.iter().map(|w| {
        let h = upstream::worker_headers(w, &HeaderMap::new(), None);
        app.http.send(
            w,
            Method::POST,
            PathAndQuery::from_static("/flush_cache"),
            h,
            Bytes::new(),
            INFO_TIMEOUT,
        )
    });
    let results = futures_util::future::join_all(calls).await;
    let mut all_ok = true;
    let mut out = Vec::new();
    for (w, r) in workers.iter().zip(results) {
        match r {
            Ok(a) => {
                let s = a.response.status();
                all_ok &= s.is_success();
                if s.is_success() {
                    // The worker's cache is empty now: so is the policy's picture of it.
                    app.policy_for(w.spec.role).worker_reset(w.url());
                    app.kv.reset_worker(w.url());
                }
                out.push(json!({"url": w.url(), "status": s.as_u16()}));
            }
            Err(e) => {
                all_ok = false;
                out.push(json!({"url": w.url(), "status": null, "error": e.to_string()}));
            }
        }
    }
    let status = if all_ok { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
    (status, Json(json!({"flushed": all_ok, "workers": out}))).into_response()
}

//! The inference request path: admission, routing text, policy choice, in-flight accounting
//! and the upstream call, for `/generate`, `/v1/completions`, `/v1/chat/completions` and
//! `/v1/embeddings`.

pub mod extract;
pub mod upstream;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::app::App;
use crate::error::RouterError;
use crate::policy::RequestInfo;
pub use extract::Route;

/// The request id: the first configured header the client sent, else a new one under the first
/// configured name.
pub fn request_id(app: &App, headers: &HeaderMap) -> (HeaderName, HeaderValue) {
    for name in &app.config.server.request_id_headers {
        if let Some(v) = headers.get(name) {
            return (name.clone(), v.clone());
        }
    }
    let name = app
        .config
        .server
        .request_id_headers
        .first()
        .cloned()
        .unwrap_or(HeaderName::from_static("x-request-id"));
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    (name, HeaderValue::from_bytes(&id).expect("hex is a valid header value"))
}

pub async fn handle(
    State(app): State<Arc<App>>,
    route: Route,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (rid_name, rid) = request_id(&app, &headers);
    let mut resp = match dispatch(&app, route, &headers, body, (&rid_name, &rid)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(route = route.path(), error = %e, "request failed");
            e.into_response()
        }
    };
    resp.headers_mut().insert(rid_name, rid);
    resp
}

async fn dispatch(
    app: &App,
    route: Route,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    rid: (&HeaderName, &HeaderValue),
) -> Result<Response, RouterError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            RouterError::PayloadTooLarge(app.config.server.max_payload_size)
        }
        _ => RouterError::BadRequest(e.body_text()),
    })?;
    let probe = extract::probe(&body)?;
    let slot = match &app.limiter {
        Some(l) => Some(l.acquire().await?),
        None => None,
    };
    let worker = {
        let snap = app.registry.load();
        let text =
            if app.policy_needs_text() { probe.routing_text(route) } else { Default::default() };
        let idx = app
            .policy()
            .select(&snap.workers, &RequestInfo { text: &text })
            .ok_or(RouterError::NoWorkers)?;
        snap.workers[idx].clone()
    };
    let guard = worker.start_request();
    let wh = upstream::worker_headers(&worker, headers, Some(rid));
    let timeout = app.config.server.request_timeout;
    match app.http.send(&worker, Method::POST, route.path(), wh, body, timeout).await {
        Ok(answer) => Ok(upstream::relay(answer, worker.url(), (guard, slot))),
        Err(e) => {
            worker.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(e)
        }
    }
}

//! The inference request path: admission, routing text, policy choice, in-flight accounting
//! and the upstream call, for `/generate`, `/v1/completions`, `/v1/chat/completions` and
//! `/v1/embeddings`.

pub mod extract;
pub mod upstream;
pub mod usage;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::app::{App, Live};
use crate::config::Config;
use crate::error::RouterError;
use crate::policy::RequestInfo;
pub use extract::Route;

/// The request id: the first configured header the client sent, else a new one under the first
/// configured name.
pub fn request_id(config: &Config, headers: &HeaderMap) -> (HeaderName, HeaderValue) {
    let names = &config.server.request_id_headers;
    for name in names {
        if let Some(v) = headers.get(name) {
            return (name.clone(), v.clone());
        }
    }
    let name = names.first().cloned().unwrap_or(HeaderName::from_static("x-request-id"));
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    (name, HeaderValue::from_bytes(&id).expect("hex is a valid header value"))
}

pub async fn handle(State(app): State<Arc<App>>, route: Route, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // One consistent view of the configuration for the whole request, even across a reload.
    let live = app.live();
    let (rid_name, rid) = request_id(&live.config, &parts.headers);
    let mut resp = match dispatch(&app, &live, route, &parts.headers, body, (&rid_name, &rid)).await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(route = route.path(), error = %e, "request failed");
            e.into_response()
        }
    };
    resp.headers_mut().insert(rid_name, rid);
    resp
}

/// The whole request body, or 413 past `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, RouterError> {
    match Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(RouterError::PayloadTooLarge(limit)),
        Err(e) => Err(RouterError::BadRequest(format!("cannot read the request body: {e}"))),
    }
}

async fn dispatch(
    app: &App,
    live: &Live,
    route: Route,
    headers: &HeaderMap,
    body: Body,
    rid: (&HeaderName, &HeaderValue),
) -> Result<Response, RouterError> {
    let body = read_body(body, live.config.server.max_payload_size).await?;
    let probe = extract::probe(&body)?;
    let probe_stream = probe.stream.unwrap_or(false);
    let slot = match &live.limiter {
        Some(l) => Some(l.acquire().await?),
        None => None,
    };
    let worker = {
        let snap = app.registry.load();
        let text =
            if live.policy.needs_text() { probe.routing_text(route) } else { Default::default() };
        let idx = live
            .policy
            .select(&snap.workers, &RequestInfo { text: &text })
            .ok_or(RouterError::NoWorkers)?;
        snap.workers[idx].clone()
    };
    let guard = worker.start_request();
    let wh = upstream::worker_headers(&worker, headers, Some(rid));
    let timeout = live.config.server.request_timeout;
    let path = PathAndQuery::from_static(route.path());
    match app.http.send(&worker, Method::POST, path, wh, body, timeout).await {
        Ok(answer) => {
            let scan = usage::UsageScan::new(worker.clone(), probe_stream);
            Ok(upstream::relay(answer, worker.url(), (guard, slot), Some(scan)))
        }
        Err(e) => {
            worker.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(e)
        }
    }
}

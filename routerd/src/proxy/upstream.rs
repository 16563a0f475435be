//! Calls to workers and their way back: one pooled HTTP client, request headers chosen for the
//! worker, and the worker's response streamed to the client frame by frame, holding whatever
//! must live as long as the body (the in-flight guard, the admission slot).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::RouterError;
use crate::registry::Worker;

pub const WORKER_HEADER: HeaderName = HeaderName::from_static("x-routerd-worker");

/// Request headers passed from the client to the worker (besides `authorization`, which the
/// worker's own key replaces when it has one).
const PASSED: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .connect_timeout(std::time::Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client configuration is static")
}

/// Headers for a call to `worker`: the passed client headers, the worker's key, the request id.
pub fn worker_headers(
    worker: &Worker,
    client: &HeaderMap,
    request_id: Option<(&HeaderName, &HeaderValue)>,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    for name in &PASSED {
        if let Some(v) = client.get(name) {
            h.insert(name.clone(), v.clone());
        }
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    match (&worker.auth, client.get(header::AUTHORIZATION)) {
        (Some(key), _) => h.insert(header::AUTHORIZATION, key.clone()),
        (None, Some(v)) => h.insert(header::AUTHORIZATION, v.clone()),
        (None, None) => None,
    };
    if let Some((name, value)) = request_id {
        h.insert(name.clone(), value.clone());
    }
    h
}

pub async fn send(
    http: &reqwest::Client,
    worker: &Worker,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Option<Bytes>,
    timeout: std::time::Duration,
) -> Result<reqwest::Response, RouterError> {
    let mut req =
        http.request(method, format!("{}{path}", worker.url())).headers(headers).timeout(timeout);
    if let Some(b) = body {
        req = req.body(b);
    }
    req.send().await.map_err(|e| upstream_error(worker.url(), e, timeout))
}

pub fn upstream_error(
    worker: &str,
    e: reqwest::Error,
    timeout: std::time::Duration,
) -> RouterError {
    if e.is_timeout() {
        RouterError::WorkerTimeout { worker: worker.to_owned(), secs: timeout.as_secs() }
    } else {
        let reason = if e.is_connect() { format!("cannot connect: {e}") } else { e.to_string() };
        RouterError::WorkerFailed { worker: worker.to_owned(), reason }
    }
}

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The worker's response as the client's: status and end-to-end headers kept, body streamed
/// through unbuffered. `hold` is dropped when the body ends or the client goes away (which
/// also drops the upstream connection, cancelling the worker's request).
pub fn relay<H: Send + Sync + 'static>(resp: reqwest::Response, worker: &str, hold: H) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::with_capacity(resp.headers().len() + 1);
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(worker) {
        headers.insert(WORKER_HEADER, v);
    }
    let stream = resp.bytes_stream().map(move |chunk| {
        let _held = &hold;
        chunk
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

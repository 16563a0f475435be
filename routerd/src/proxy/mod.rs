//! The inference request path: admission, routing text, policy choice, in-flight accounting
//! and the upstream call, for `/generate`, `/v1/completions`, `/v1/chat/completions` and
//! `/v1/embeddings`.

pub mod extract;
pub mod pool;
pub mod relay;
pub mod upstream;
pub mod usage;

use std::sync::atomic::Ordering::Relaxed;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use bytes::Bytes;

use crate::app::{App, Live};
use crate::config::Config;
use crate::error::RouterError;
use crate::http1::head::Head;
use crate::http1::respond::{self, header_line};
use crate::http1::Conn;
use crate::policy::RequestInfo;
use crate::registry::Worker;
pub use extract::Route;
use relay::Stop;

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

/// Serves one inference request read from `c`; returns whether the connection stays open.
pub async fn forward(
    app: &App,
    live: &Live,
    c: &mut Conn,
    route: Route,
    head: &Head,
    body: Bytes,
    keep: bool,
) -> bool {
    let (rid_name, rid) = request_id(&live.config, &head.headers);
    match dispatch(app, live, c, route, head, body, (&rid_name, &rid), keep).await {
        Ok(keep) => keep,
        Err(Stop::Closed) => false,
        Err(Stop::Failed(e)) => {
            tracing::debug!(route = route.path(), error = %e, "request failed");
            let mut resp = e.into_response();
            resp.headers_mut().insert(rid_name, rid);
            respond::write(c, resp, head.version, keep, false).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    app: &App,
    live: &Live,
    c: &mut Conn,
    route: Route,
    head: &Head,
    body: Bytes,
    rid: (&HeaderName, &HeaderValue),
    keep: bool,
) -> Result<bool, Stop> {
    let probe = extract::probe(&body).map_err(Stop::Failed)?;
    let streaming = probe.stream.unwrap_or(false);
    let _slot = match &live.limiter {
        Some(l) => Some(l.acquire().await.map_err(Stop::Failed)?),
        None => None,
    };
    let worker = {
        let snap = app.registry.load();
        let text =
            if live.policy.needs_text() { probe.routing_text(route) } else { Default::default() };
        let idx = live
            .policy
            .select(&snap.workers, &RequestInfo { text: &text })
            .ok_or(Stop::Failed(RouterError::NoWorkers))?;
        snap.workers[idx].clone()
    };
    let _guard = worker.start_request();
    let timeout = live.config.server.request_timeout;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut request = Vec::with_capacity(body.len() + 256);
    write_request(&mut request, &worker, route.path(), &head.headers, rid, &body);
    let answer = match relay::exchange(&worker, &request, c, deadline.as_mut(), timeout).await {
        Ok(a) => a,
        Err(e) => {
            if let Stop::Failed(_) = e {
                worker.errors_total.fetch_add(1, Relaxed);
            }
            return Err(e);
        }
    };
    let scan = usage::UsageScan::new(worker.clone(), streaming);
    let extra: [(&[u8], &[u8]); 2] = [
        (rid.0.as_str().as_bytes(), rid.1.as_bytes()),
        (b"x-routerd-worker", worker.url().as_bytes()),
    ];
    let v = head.version;
    Ok(relay::respond(answer, &worker, c, v, keep, &extra, Some(scan), deadline.as_mut()).await)
}

/// The request as the worker gets it: the client's body unchanged, headers chosen for it.
fn write_request(
    out: &mut Vec<u8>,
    worker: &Worker,
    path: &str,
    client: &HeaderMap,
    rid: (&HeaderName, &HeaderValue),
    body: &[u8],
) {
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    header_line(out, b"host", worker.authority.as_str().as_bytes());
    upstream::each_worker_header(worker, client, Some(rid), |name, value| {
        header_line(out, name.as_str().as_bytes(), value.as_bytes())
    });
    header_line(out, b"content-length", body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

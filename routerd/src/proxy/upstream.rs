//! The router's own calls to workers outside the inference path (health checks, load polls,
//! info passthrough): hyper-util's pooled HTTP/1 client (over TLS for `https://` workers), the
//! request headers chosen for a worker (shared with the inference path), and an info answer
//! relayed to the client frame by frame within the request deadline. Inference requests go
//! through `proxy::relay`.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::uri::{PathAndQuery, Scheme};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::{Instant, Sleep};

use crate::error::RouterError;
use crate::http1::HOP_BY_HOP;
use crate::registry::Worker;

/// The response header naming the worker that answered.
pub const WORKER_HEADER_NAME: &str = "x-routerd-worker";
pub const WORKER_HEADER: HeaderName = HeaderName::from_static(WORKER_HEADER_NAME);

/// The W3C trace context header (passed to workers; replaced by routerd's own with traces on).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Request headers passed from the client to the worker (besides `authorization`, which the
/// worker's own key replaces when it has one).
const PASSED: [HeaderName; 4] =
    [header::CONTENT_TYPE, header::ACCEPT, TRACEPARENT, HeaderName::from_static("tracestate")];

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Upstream {
    fn default() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(conn);
        Self { client }
    }
}

/// A worker's response with the deadline of the request it answers.
pub struct Answer {
    pub response: Response<Incoming>,
    pub deadline: Instant,
}

impl Upstream {
    /// The plain-HTTP client and its connection pool, for calls that go to no worker (peer
    /// replicas).
    pub fn plain(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.client
    }

    /// Sends a request to `worker` and waits for the response head, all within `timeout`;
    /// the body that follows must arrive before the same deadline.
    pub async fn send(
        &self,
        worker: &Worker,
        method: Method,
        path: PathAndQuery,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, RouterError> {
        let deadline = Instant::now() + timeout;
        let tls = match &worker.tls {
            None => None,
            Some(Ok(tls)) => Some(&tls.client.hyper),
            Some(Err(e)) => {
                let reason = format!("cannot connect: {e}");
                return Err(RouterError::WorkerFailed { worker: worker.url().to_owned(), reason });
            }
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(if worker.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
        uri.authority = Some(worker.authority.clone());
        uri.path_and_query = Some(path);
        let uri = Uri::from_parts(uri)
            .map_err(|e| RouterError::BadRequest(format!("bad upstream URI: {e}")))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let answer = match tls {
            Some(client) => client.request(req),
            None => self.client.request(req),
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(response)) => Ok(Answer { response, deadline }),
            Ok(Err(e)) => {
                // A TLS failure says which (unknown CA, expired, name, client certificate).
                let reason = if e.is_connect() {
                    format!("cannot connect: {}", crate::tls::detail(&e))
                } else {
                    crate::tls::describe(&e).unwrap_or_else(|| e.to_string())
                };
                Err(RouterError::WorkerFailed { worker: worker.url().to_owned(), reason })
            }
            Err(_) => {
                Err(RouterError::WorkerTimeout { worker: worker.url().to_owned(), after: timeout })
            }
        }
    }

    /// GET `path` and parse the JSON answer; `None` on any failure.
    pub async fn get_json(
        &self,
        worker: &Worker,
        path: &'static str,
        timeout: Duration,
    ) -> Option<serde_json::Value> {
        let h = worker_headers(worker, &HeaderMap::new(), None);
        let path = PathAndQuery::from_static(path);
        let a = self.send(worker, Method::GET, path, h, Bytes::new(), timeout).await.ok()?;
        if !a.response.status().is_success() {
            return None;
        }
        let body = tokio::time::timeout_at(a.deadline, a.response.into_body().collect())
            .await
            .ok()?
            .ok()?;
        serde_json::from_slice(&body.to_bytes()).ok()
    }
}

/// Headers for a call to `worker`: the passed client headers, the worker's key, the request id.
pub fn worker_headers(
    worker: &Worker,
    client: &HeaderMap,
    request_id: Option<(&HeaderName, &HeaderValue)>,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    each_worker_header(worker, client, request_id, |name, value| {
        h.insert(name.clone(), value.clone());
    });
    h
}

/// Calls `put` with each header a call to `worker` carries (see `worker_headers`).
pub fn each_worker_header(
    worker: &Worker,
    client: &HeaderMap,
    request_id: Option<(&HeaderName, &HeaderValue)>,
    mut put: impl FnMut(&HeaderName, &HeaderValue),
) {
    for name in &PASSED {
        if let Some(v) = client.get(name) {
            put(name, v);
        }
    }
    if !client.contains_key(header::CONTENT_TYPE) {
        put(&header::CONTENT_TYPE, &HeaderValue::from_static("application/json"));
    }
    match (&worker.auth, client.get(header::AUTHORIZATION)) {
        (Some(key), _) => put(&header::AUTHORIZATION, key),
        (None, Some(v)) => put(&header::AUTHORIZATION, v),
        (None, None) => {}
    };
    if let Some((name, value)) = request_id {
        put(name, value);
    }
}

/// The worker's answer as the client's response: status and end-to-end headers kept, body
/// relayed frame by frame until the request deadline.
pub fn relay(answer: Answer, worker: &str) -> axum::response::Response {
    let (mut parts, body) = answer.response.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    if let Ok(v) = HeaderValue::from_str(worker) {
        parts.headers.insert(WORKER_HEADER, v);
    }
    let body = Relay { inner: body, deadline: Box::pin(tokio::time::sleep_until(answer.deadline)) };
    Response::from_parts(parts, Body::new(body))
}

struct Relay {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request deadline passed while the worker's response was streaming")]
struct DeadlinePassed;

impl HttpBody for Relay {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(DeadlinePassed.into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

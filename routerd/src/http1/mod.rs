//! routerd's own HTTP/1 server side. Inference requests take a short path: head parsed in
//! place, body read once, forwarded to a worker on a pooled connection driven by this same
//! task, and the answer relayed back verbatim (no per-request dispatch channel, connection
//! task or body re-framing, which is what makes a general-purpose client/server pair cost
//! ~25% of a core's throughput here). Every other route is handed to the axum `Router`
//! unchanged. HTTP/1.0 and 1.1 with keep-alive, pipelining, `Expect: 100-continue` and
//! chunked request bodies are supported; HTTP/2 is not.

pub mod chunked;
pub mod cors;

pub mod head;
pub mod respond;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, Version};
use axum::response::IntoResponse;
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::error::RouterError;
use crate::proxy::{self, Route};
use head::{BodyLen, Head};

/// How much of a pipelined next request is buffered while a response is relayed.
pub const MAX_BUFFERED: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;

/// One client connection.
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Bytes read from the client and not consumed yet.
    pub buf: BytesMut,
    /// Output assembled before each write.
    pub out: Vec<u8>,
    /// A worker read buffer kept from the previous answer, reused by the next.
    pub spare: BytesMut,
    /// When the current response's first body bytes were written.
    pub first_payload: Option<Instant>,
    /// The current request's `Origin`, echoed when CORS allows it.
    pub cors_origin: Option<axum::http::HeaderValue>,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            buf: BytesMut::new(),
            out: Vec::with_capacity(READ_CHUNK),
            spare: BytesMut::new(),
            first_payload: None,
            cors_origin: None,
        }
    }

    /// Reads more client bytes; `Ok(0)` is the end of the connection.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    async fn read_more_within(&mut self, deadline: Instant) -> std::io::Result<usize> {
        match tokio::time::timeout_at(deadline, self.read_more()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// The next request head; `None` when the client closed, stayed idle longer than
    /// `limits.idle`, or the server drains while the connection is idle. A head must arrive
    /// whole within `limits.head` of its first byte (of the connection, for the first
    /// request), else 408.
    async fn read_head(
        &mut self,
        drain: &CancellationToken,
        limits: HeadLimits,
    ) -> Result<Option<Head>, head::HeadError> {
        let mut deadline = limits.first.then(|| Instant::now() + limits.head);
        loop {
            if !self.buf.is_empty() {
                if let Some((head, n)) = head::parse(&self.buf)? {
                    self.buf.advance(n);
                    return Ok(Some(head));
                }
            }
            let read = if self.buf.is_empty() && deadline.is_none() {
                tokio::select! {
                    biased;
                    _ = drain.cancelled() => return Ok(None),
                    r = self.read_more_within(Instant::now() + limits.idle) => r,
                }
            } else {
                // A head has begun (or the connection is new): it must complete in time.
                let deadline = *deadline.get_or_insert(Instant::now() + limits.head);
                tokio::select! {
                    biased;
                    _ = drain.cancelled(), if self.buf.is_empty() => return Ok(None),
                    r = self.read_more_within(deadline) => r,
                }
            };
            match read {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && deadline.is_some() => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(head::HeadError {
                        status: StatusCode::REQUEST_TIMEOUT,
                        message: format!(
                            "the request head did not arrive within {}",
                            humantime::format_duration(limits.head)
                        ),
                    });
                }
                _ => return Ok(None),
            }
        }
    }

    async fn continue_100(&mut self, head: &Head) -> std::io::Result<()> {
        if head.expect_continue {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        Ok(())
    }

    /// The whole request body, up to `limit` bytes, each read within `timeout`.
    async fn read_body(
        &mut self,
        head: &Head,
        limit: usize,
        timeout: Duration,
    ) -> Result<Bytes, BodyError> {
        match head.body {
            BodyLen::Length(n) => {
                if n > limit as u64 {
                    return Err(BodyError::Refused(RouterError::PayloadTooLarge(limit)));
                }
                let n = n as usize;
                if self.buf.len() < n {
                    self.continue_100(head).await?;
                    self.buf.reserve(n - self.buf.len());
                }
                while self.buf.len() < n {
                    if self.read_more_within(Instant::now() + timeout).await? == 0 {
                        return Err(BodyError::Closed);
                    }
                }
                Ok(self.buf.split_to(n).freeze())
            }
            BodyLen::Chunked => {
                self.continue_100(head).await?;
                let mut dec = chunked::Chunked::default();
                let mut body = Vec::new();
                loop {
                    let used = dec
                        .feed(&self.buf, |d| body.extend_from_slice(d))
                        .map_err(|e| BodyError::Refused(RouterError::BadRequest(e.to_string())))?;
                    self.buf.advance(used);
                    if body.len() > limit {
                        return Err(BodyError::Refused(RouterError::PayloadTooLarge(limit)));
                    }
                    if dec.is_done() {
                        return Ok(body.into());
                    }
                    if self.read_more_within(Instant::now() + timeout).await? == 0 {
                        return Err(BodyError::Closed);
                    }
                }
            }
        }
    }
}

/// How long a client may take over a request head, and stay idle between requests.
#[derive(Clone, Copy)]
struct HeadLimits {
    head: Duration,
    idle: Duration,
    /// The connection's first request: the head deadline runs from the accept.
    first: bool,
}

/// Bodies of refused requests up to this size are read and dropped so the connection can
/// serve the next request; larger ones close it.
const DISCARD_LIMIT: usize = 64 * 1024;

enum BodyError {
    /// Answered with the error, then the connection is closed (the rest of the body unread).
    Refused(RouterError),
    Closed,
}

impl From<std::io::Error> for BodyError {
    fn from(_: std::io::Error) -> Self {
        BodyError::Closed
    }
}

fn inference_route(path: &str) -> Option<Route> {
    match path {
        "/generate" => Some(Route::Generate),
        "/v1/completions" => Some(Route::Completions),
        "/v1/chat/completions" => Some(Route::Chat),
        "/v1/embeddings" => Some(Route::Embeddings),
        _ => None,
    }
}

/// Serves one client connection until it closes, fails, or `drain` finds it idle.
pub async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    router: Router,
    drain: CancellationToken,
) {
    let mut c = Conn::new(stream, peer);
    let mut first = true;
    // Loaded once per request, after its head: the wait for the next head uses the limits
    // of the configuration the previous request saw.
    let mut live = app.live();
    loop {
        let limits = HeadLimits {
            head: live.config.server.header_read_timeout,
            idle: live.config.server.keep_alive_timeout,
            first: std::mem::take(&mut first),
        };
        let mut head = match c.read_head(&drain, limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                let err = RouterError::Protocol(e.status, e.message);
                respond::write(&mut c, err.into_response(), Version::HTTP_11, false, false).await;
                return;
            }
        };
        live = app.live();
        let read_timeout = live.config.server.header_read_timeout;
        let route = inference_route(head.path());
        if let Err(e) = admit(&live.config, &c, &head, route.is_some()) {
            // Refused before the body is read: a small one is skipped so the connection
            // can go on; a large one (or a broken one) is not worth reading.
            let keep = head.keep_alive
                && !drain.is_cancelled()
                && c.read_body(&head, DISCARD_LIMIT, read_timeout).await.is_ok();
            if !respond::write(&mut c, e.into_response(), head.version, keep, false).await {
                return;
            }
            continue;
        }
        if live.config.security.api_key.is_some() {
            // The client's key is the router's: it is not passed on to workers.
            head.headers.remove(axum::http::header::AUTHORIZATION);
        }
        let limit = live.config.server.max_payload_size;
        let body = match c.read_body(&head, limit, read_timeout).await {
            Ok(body) => body,
            Err(BodyError::Closed) => return,
            Err(BodyError::Refused(e)) => {
                respond::write(&mut c, e.into_response(), head.version, false, false).await;
                return;
            }
        };
        let keep = head.keep_alive && !drain.is_cancelled();
        c.first_payload = None;
        c.cors_origin = cors::allowed(&live.config.server.cors_allowed_origins, &head.headers);
        if let (Some(origin), true) = (&c.cors_origin, cors::is_preflight(&head)) {
            cors::preflight(origin, &head, keep, &mut c.out);
            if c.stream.write_all(&c.out).await.is_err() || !keep {
                return;
            }
            continue;
        }
        let keep = match route {
            Some(route) if head.method == Method::POST => {
                proxy::forward(&app, &live, &mut c, route, &head, body, keep).await
            }
            Some(_) => {
                let e = RouterError::MethodNotAllowed(head.path().to_owned());
                respond::write(&mut c, e.into_response(), head.version, keep, false).await
            }
            None => fallback(&mut c, &router, head, body, keep).await,
        };
        if !keep {
            return;
        }
    }
}

/// Whether a request may be served at all, judged on its head: the API or admin key (or a
/// loopback peer) its route needs (docs/security.md), and a JSON content type on inference
/// routes. CORS preflights carry no credentials and are answered by the CORS rules.
fn admit(
    config: &crate::config::Config,
    c: &Conn,
    head: &Head,
    inference: bool,
) -> Result<(), RouterError> {
    if cors::is_preflight(head) {
        return Ok(());
    }
    crate::security::authorize(&config.security, &head.method, head.path(), &head.headers, c.peer)?;
    if inference && head.method == Method::POST {
        if let Some(ct) = head.headers.get(axum::http::header::CONTENT_TYPE) {
            if !is_json(ct.as_bytes()) {
                return Err(RouterError::UnsupportedMediaType(format!(
                    "the body must be JSON (Content-Type: application/json), not {:?}",
                    String::from_utf8_lossy(ct.as_bytes())
                )));
            }
        }
    }
    Ok(())
}

/// `application/json` or `application/<anything>+json`, parameters allowed.
fn is_json(content_type: &[u8]) -> bool {
    let essence = content_type.split(|b| *b == b';').next().unwrap_or(b"").trim_ascii();
    let Ok(essence) = std::str::from_utf8(essence) else { return false };
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Any route but the inference ones: the axum router answers, the response is written here.
async fn fallback(c: &mut Conn, router: &Router, head: Head, body: Bytes, keep: bool) -> bool {
    let version = head.version;
    let head_only = head.method == Method::HEAD;
    let Ok(uri) = head.target.parse::<axum::http::Uri>() else {
        let e = RouterError::Protocol(StatusCode::BAD_REQUEST, "invalid request target".into());
        return respond::write(c, e.into_response(), version, false, false).await;
    };
    let mut req = Request::new(axum::body::Body::from(body));
    *req.method_mut() = head.method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = head.headers;
    req.extensions_mut().insert(ConnectInfo(c.peer));
    let resp = {
        use tower_service::Service;
        let mut router = router.clone();
        router.call(req).await.unwrap_or_else(|e| match e {})
    };
    respond::write(c, resp, version, keep, head_only).await
}

//! CORS for browsers calling the router directly (`server.cors_allowed_origins`): an allowed
//! `Origin` is echoed in `Access-Control-Allow-Origin` on every response, and preflight
//! `OPTIONS` requests are answered by the router itself on any path.

use axum::http::{header, HeaderMap, HeaderValue, Method};

use super::client::{Body, ClientSession};
use super::head::Head;

/// The origin to echo, if the request has one that `allowed` lists (or `allowed` has `*`).
pub fn allowed(allowed: &[String], headers: &HeaderMap) -> Option<HeaderValue> {
    if allowed.is_empty() {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let ok = allowed.iter().any(|a| a == "*" || a.as_bytes() == origin.as_bytes());
    ok.then(|| origin.clone())
}

pub fn is_preflight(head: &Head) -> bool {
    head.method == Method::OPTIONS
        && head.headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight from an allowed origin (assembled; the caller flushes it).
pub fn preflight(c: &mut ClientSession, head: &Head, keep: bool) -> bool {
    c.start_response(204, "No Content");
    c.header(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS");
    let asked = head.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
    c.header(b"access-control-allow-headers", asked.map_or(&b"*"[..], |h| h.as_bytes()));
    c.header(b"access-control-max-age", b"86400");
    c.end_head(Body::Empty, head.version, keep)
}

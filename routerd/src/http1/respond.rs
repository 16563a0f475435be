//! Writes a response built by axum (errors, admin and info routes) through a client session:
//! a known length goes out as `content-length` in one write, anything else is streamed (chunked,
//! or until close for an HTTP/1.0 client), each frame as it comes.

use axum::http::{header, StatusCode, Version};
use axum::response::Response;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::client::{Body, ClientSession};
use super::{has_body, is_hop_by_hop};

/// How long one write of an axum-built response may wait for a client that does not read.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes `resp`; returns whether the connection can serve another request.
pub async fn write(
    c: &mut ClientSession,
    resp: Response,
    version: Version,
    keep: bool,
    head_only: bool,
) -> bool {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let body_allowed = has_body(status.as_u16()) && status != StatusCode::SWITCHING_PROTOCOLS;
    let exact = body.size_hint().exact();
    c.start_response(status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) && name != header::CONTENT_LENGTH {
            c.header(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let framing = match exact {
        Some(n) if body_allowed || head_only => Body::Length(n),
        _ if !body_allowed || head_only => Body::Empty,
        _ => Body::Stream,
    };
    let keep = c.end_head(framing, version, keep);
    if head_only || !body_allowed {
        return c.flush(Instant::now() + WRITE_TIMEOUT).await && keep;
    }
    // A body of unknown length may take time: send the head first.
    if exact.is_none() && !c.flush(Instant::now() + WRITE_TIMEOUT).await {
        return false;
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        let Ok(data) = frame.into_data() else { continue };
        c.payload(&data);
        if exact.is_none() && !c.flush(Instant::now() + WRITE_TIMEOUT).await {
            return false;
        }
    }
    c.finish(Instant::now() + WRITE_TIMEOUT).await && keep
}

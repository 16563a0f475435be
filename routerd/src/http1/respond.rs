//! Writes a response built by axum (errors, admin and info routes) to a client connection:
//! a known length goes out as `content-length` in one write, anything else is streamed as
//! chunks (or until close for an HTTP/1.0 client), each frame as it comes.

use axum::http::{header, StatusCode, Version};
use axum::response::Response;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use super::Conn;

/// Connection-scoped headers that are never relayed; the server sets its own framing.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

pub fn status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa(status as u64).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn itoa(n: u64) -> String {
    n.to_string()
}

/// `Access-Control-Allow-Origin` for a request whose origin CORS allows (see `http1::cors`).
pub fn cors_lines(origin: &Option<axum::http::HeaderValue>, out: &mut Vec<u8>) {
    if let Some(o) = origin {
        header_line(out, b"access-control-allow-origin", o.as_bytes());
        header_line(out, b"vary", b"origin");
    }
}

/// Whether a response with this status carries a body.
pub fn has_body(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204 && status != 304
}

/// Writes `resp`; returns whether the connection can serve another request.
pub async fn write(
    c: &mut Conn,
    resp: Response,
    version: Version,
    keep: bool,
    head_only: bool,
) -> bool {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let body_allowed = has_body(status.as_u16());
    let exact = body.size_hint().exact();
    let chunked = exact.is_none() && version == Version::HTTP_11 && body_allowed;
    let keep = keep && (exact.is_some() || chunked || !body_allowed);
    c.out.clear();
    status_line(&mut c.out, status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) && name != header::CONTENT_LENGTH {
            header_line(&mut c.out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    cors_lines(&c.cors_origin, &mut c.out);
    match exact {
        Some(n) if body_allowed || head_only => {
            header_line(&mut c.out, b"content-length", itoa(n).as_bytes())
        }
        _ if chunked => header_line(&mut c.out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !keep {
        header_line(&mut c.out, b"connection", b"close");
    }
    c.out.extend_from_slice(b"\r\n");
    if head_only || !body_allowed || status == StatusCode::SWITCHING_PROTOCOLS {
        return c.stream.write_all(&c.out).await.is_ok() && keep;
    }
    // A body of unknown length may take time: send the head first.
    if exact.is_none() && !flush(c).await {
        return false;
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if chunked {
            c.out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            c.out.extend_from_slice(&data);
            c.out.extend_from_slice(b"\r\n");
        } else {
            c.out.extend_from_slice(&data);
        }
        if exact.is_none() && !flush(c).await {
            return false;
        }
    }
    if chunked {
        c.out.extend_from_slice(b"0\r\n\r\n");
    }
    flush(c).await && keep
}

async fn flush(c: &mut Conn) -> bool {
    let ok = c.stream.write_all(&c.out).await.is_ok();
    c.out.clear();
    ok
}

//! routerd's own HTTP/1 wire, sealed behind two session types. `ClientSession` reads a
//! client's requests and writes responses (head, payload, finish); `worker::exchange` sends a
//! request to a worker on a pooled connection and hands back a `WorkerResponse` whose body
//! comes out de-framed. Neither exposes a socket or a buffer: the proxy works with typed heads
//! and payload only. Heads are parsed in place with `httparse` (as pingora does), which measured
//! 56k requests/s per core against 43k for a bare hyper proxy (docs/benchmarks.md).
//! HTTP/1.0 and 1.1 with keep-alive, pipelining, `Expect: 100-continue` and chunked bodies are
//! supported; HTTP/2 is not.

pub mod chunked;
pub mod client;
pub mod cors;
pub mod head;
pub mod pool;
pub mod respond;
pub mod worker;

pub use client::{Body, BodyError, ClientSession, HeadLimits, MAX_BUFFERED};

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

/// Whether a response with this status carries a body.
pub fn has_body(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204 && status != 304
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

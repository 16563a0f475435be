//! The client side of one HTTP/1 connection, sealed behind a few verbs: read the next request
//! head and its body; write a response head (`start_response`, `header`, `end_head`), payload
//! (`payload`, framed as the head announced) and the end (`finish`); watch for the client going
//! away while a worker thinks. Callers never see the socket or a buffer, so the framing toward
//! the client is decided in one place (as pingora's `HttpSession`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, Version};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::chunked::Chunked;
use super::head::{self, BodyLen, Head, HeadError};
use super::worker::ResponseHead;
use super::{header_line, status_line};
use crate::error::RouterError;
use crate::tls::Conn;

/// How much of a pipelined next request is buffered while a response is relayed.
pub const MAX_BUFFERED: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;

/// How long a client may take over a request head, and stay idle between requests.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub head: Duration,
    pub idle: Duration,
    /// The connection's first request: the head deadline runs from the accept.
    pub first: bool,
}

/// Why a request body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Answer with the error, then close (the rest of the body is unread).
    Refused(RouterError),
    /// The client went away or was too slow.
    Closed,
}

impl From<std::io::Error> for BodyError {
    fn from(_: std::io::Error) -> Self {
        BodyError::Closed
    }
}

/// What the response body will be, as the writer of the head knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body (or a HEAD answer): nothing follows the head.
    Empty,
    /// Exactly this many bytes follow.
    Length(u64),
    /// Of unknown length: chunked for HTTP/1.1 clients, delimited by closing for HTTP/1.0.
    Stream,
}

/// How the body being written is delimited toward the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Plain,
    Chunked,
}

/// One client connection.
pub struct ClientSession {
    stream: Conn,
    peer: SocketAddr,
    /// Bytes read from the client and not consumed yet.
    buf: BytesMut,
    /// Output assembled before each write.
    out: Vec<u8>,
    /// Whether `out` holds body bytes (their first write is the response's first payload).
    out_payload: bool,
    framing: Framing,
    /// A worker read buffer kept from the previous answer, reused by the next.
    spare: BytesMut,
    /// When the current response's first body bytes were written.
    first_payload: Option<Instant>,
    /// The current request's `Origin`, echoed when CORS allows it.
    cors_origin: Option<HeaderValue>,
}

impl ClientSession {
    pub fn new(stream: Conn, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            buf: BytesMut::new(),
            out: Vec::with_capacity(READ_CHUNK),
            out_payload: false,
            framing: Framing::Plain,
            spare: BytesMut::new(),
            first_payload: None,
            cors_origin: None,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The origin echoed on every response to the current request (`None`: no CORS).
    pub fn set_cors_origin(&mut self, origin: Option<HeaderValue>) {
        self.cors_origin = origin;
    }

    pub fn cors_origin(&self) -> Option<&HeaderValue> {
        self.cors_origin.as_ref()
    }

    /// When the current response's first body bytes reached the client's socket.
    pub fn first_payload(&self) -> Option<Instant> {
        self.first_payload
    }

    /// A read buffer for a worker's answer: the previous answer's, when there is one.
    pub fn take_spare(&mut self) -> BytesMut {
        let mut b = std::mem::take(&mut self.spare);
        b.clear();
        if b.capacity() == 0 {
            b.reserve(16 * 1024);
        }
        b
    }

    /// Keeps a worker read buffer for the next answer (small ones only).
    pub fn keep_spare(&mut self, buf: BytesMut) {
        if buf.capacity() <= 64 * 1024 {
            self.spare = buf;
        }
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
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

    /// Resolves when the client goes away (closes, resets). Bytes it sends meanwhile (a
    /// pipelined request) are kept for later, up to `MAX_BUFFERED`; past that the client is no
    /// longer watched and this never resolves.
    pub async fn gone(&mut self) {
        loop {
            if self.buf.len() >= MAX_BUFFERED {
                return std::future::pending().await;
            }
            match self.read_more().await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// The next request head; `None` when the client closed, stayed idle longer than
    /// `limits.idle`, or the server drains while the connection is idle. A head must arrive
    /// whole within `limits.head` of its first byte (of the connection, for the first
    /// request), else 408.
    pub async fn read_head(
        &mut self,
        drain: &CancellationToken,
        limits: HeadLimits,
    ) -> Result<Option<Head>, HeadError> {
        let mut deadline = limits.first.then(|| Instant::now() + limits.head);
        loop {
            if !self.buf.is_empty() {
                if let Some((head, n)) = head::parse(&self.buf)? {
                    self.buf.advance(n);
                    self.first_payload = None;
                    self.cors_origin = None;
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
                    return Err(HeadError {
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
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// The whole request body, up to `limit` bytes, each read within `timeout`.
    pub async fn read_body(
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
                let mut dec = Chunked::default();
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

    /// Begins a response: its status line. Headers follow, then `end_head`.
    pub fn start_response(&mut self, status: u16, reason: &str) {
        self.out.clear();
        self.out_payload = false;
        self.framing = Framing::Plain;
        status_line(&mut self.out, status, reason);
    }

    pub fn header(&mut self, name: &[u8], value: &[u8]) {
        header_line(&mut self.out, name, value);
    }

    /// The worker's end-to-end headers, as it sent them.
    pub fn worker_headers(&mut self, head: &ResponseHead) {
        self.out.extend_from_slice(head.header_lines());
    }

    /// Ends the head: framing for `body`, CORS, `connection: close` unless `keep`. Returns
    /// whether the connection can serve another request after this response (an HTTP/1.0
    /// client's stream is delimited by closing).
    pub fn end_head(&mut self, body: Body, version: Version, keep: bool) -> bool {
        let mut keep = keep;
        match body {
            Body::Empty => {}
            Body::Length(n) => {
                header_line(&mut self.out, b"content-length", n.to_string().as_bytes())
            }
            Body::Stream if version == Version::HTTP_11 => {
                header_line(&mut self.out, b"transfer-encoding", b"chunked");
                self.framing = Framing::Chunked;
            }
            Body::Stream => keep = false,
        }
        if let Some(o) = &self.cors_origin {
            header_line(&mut self.out, b"access-control-allow-origin", o.as_bytes());
            header_line(&mut self.out, b"vary", b"origin");
        }
        if !keep {
            header_line(&mut self.out, b"connection", b"close");
        }
        self.out.extend_from_slice(b"\r\n");
        keep
    }

    /// Body bytes, framed as the head announced (one chunk per call when chunked).
    pub fn payload(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.framing == Framing::Chunked {
            self.out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            self.out.extend_from_slice(data);
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.out.extend_from_slice(data);
        }
        self.out_payload = true;
    }

    /// Writes what was assembled, giving up at `until`; false when the client cannot take it.
    pub async fn flush(&mut self, until: Instant) -> bool {
        if self.out.is_empty() {
            return true;
        }
        // (The flush matters on TLS: a record may still sit in the session's buffer.)
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        let wrote = matches!(tokio::time::timeout_at(until, write).await, Ok(Ok(())));
        self.out.clear();
        if wrote && self.out_payload && self.first_payload.is_none() {
            self.first_payload = Some(Instant::now());
        }
        self.out_payload = false;
        wrote
    }

    /// Ends the body (the chunked terminator when chunked) and writes it all.
    pub async fn finish(&mut self, until: Instant) -> bool {
        if self.framing == Framing::Chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        self.framing = Framing::Plain;
        self.flush(until).await
    }

    /// Closes after an error answer without losing it: the write side is shut, and what the
    /// client still sends (the rest of a refused request) is read and dropped for a moment (up
    /// to 1 MiB or 1 s), so the kernel does not reset the connection, discarding the answer,
    /// because unread bytes were left behind.
    pub async fn close_lingering(mut self) {
        let _ = self.stream.shutdown().await;
        let until = Instant::now() + Duration::from_secs(1);
        let mut sink = [0u8; 8192];
        let mut total = 0;
        while total < (1 << 20) {
            match tokio::time::timeout_at(until, self.stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => total += n,
                _ => return,
            }
        }
    }
}

//! The worker side of the wire, sealed: `exchange` sends a complete request on a pooled (or new)
//! connection and reads the response head, watching the client meanwhile (a client that goes
//! away drops the worker connection, which cancels the request on the worker); the answer's
//! body then comes out as de-framed payload (`drain_buffered`, `fill`), and a body read to its
//! end hands the connection back to the pool (`release`). Anything malformed from the worker
//! (head, length, chunk) is an error and the connection is dropped, never reused.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::uri::Authority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::chunked::Chunked;
use super::client::ClientSession;
use super::pool::IdleConns;
use super::{has_body, header_line, is_hop_by_hop};
use crate::tls::{Conn, WorkerTls};

/// Largest response head accepted from a worker.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A request to a worker as it goes on the wire: `POST path HTTP/1.1`, `host`, the headers
/// given, and the body with its length. The proxy says what is sent; this says how.
pub struct RequestWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> RequestWriter<'a> {
    pub fn post(out: &'a mut Vec<u8>, path: &str, host: &str) -> Self {
        out.clear();
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        header_line(out, b"host", host.as_bytes());
        Self { out }
    }

    pub fn header(&mut self, name: &[u8], value: &[u8]) {
        header_line(self.out, name, value);
    }

    /// Ends the head with the body's length, then the body.
    pub fn body(self, body: &[u8]) {
        header_line(self.out, b"content-length", body.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
    }
}

/// Where a request goes: the worker's address, its idle connections, and for an `https://`
/// worker its TLS client (or why it has none).
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub authority: &'a Authority,
    pub idle: &'a IdleConns,
    pub tls: Option<&'a Result<WorkerTls, String>>,
}

/// Why an exchange with a worker did not produce (the rest of) an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The client went away first; the worker connection was dropped.
    ClientGone,
    /// The deadline passed.
    Timeout,
    /// No connection could be made.
    Connect(String),
    /// The worker closed, reset or broke the protocol.
    Failed(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::ClientGone => f.write_str("the client went away"),
            WireError::Timeout => f.write_str("timed out"),
            WireError::Connect(e) => write!(f, "cannot connect: {e}"),
            WireError::Failed(e) => f.write_str(e),
        }
    }
}

/// How a worker delimits its response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A worker's response head: status, the headers worth relaying, and how the body is framed.
#[derive(Debug)]
pub struct ResponseHead {
    status: u16,
    reason: String,
    retry_after: Option<Duration>,
    event_stream: bool,
    /// The worker's end-to-end headers as `name: value\r\n` lines.
    lines: Vec<u8>,
    framing: Framing,
    reusable: bool,
}

impl ResponseHead {
    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// `Retry-After` in seconds, when the worker sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// A `text/event-stream` body.
    pub fn is_event_stream(&self) -> bool {
        self.event_stream
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub(super) fn header_lines(&self) -> &[u8] {
        &self.lines
    }
}

enum Body {
    Length(u64),
    Chunked(Chunked),
    UntilClose { eof: bool },
    Done,
}

/// A worker's answer: its head, and the connection its body follows on.
pub struct WorkerResponse {
    conn: Conn,
    /// Bytes read after the head and not handed out yet.
    buf: BytesMut,
    head: ResponseHead,
    body: Body,
}

/// A new connection (and for an `https://` worker its TLS handshake), within `timeout`.
async fn connect(target: Target<'_>, timeout: Duration) -> Result<Conn, WireError> {
    let tls = match target.tls {
        None => None,
        Some(Ok(tls)) => Some(tls),
        Some(Err(e)) => return Err(WireError::Connect(e.clone())),
    };
    let host = target.authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = target.authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let until = Instant::now() + timeout;
    let tcp = match tokio::time::timeout_at(until, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            s
        }
        Ok(Err(e)) => return Err(WireError::Connect(e.to_string())),
        Err(_) => return Err(WireError::Connect(format!("no answer in {timeout:?}"))),
    };
    let Some(tls) = tls else { return Ok(Conn::Plain(tcp)) };
    match tokio::time::timeout_at(until, tls.connect(tcp)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(WireError::Connect(e)),
        Err(_) => Err(WireError::Connect(format!("TLS handshake: no answer in {timeout:?}"))),
    }
}

/// An I/O error from a worker connection in words: a TLS failure says which.
fn io_failure(e: &std::io::Error) -> String {
    crate::tls::describe(e).unwrap_or_else(|| e.to_string())
}

enum Wait {
    Read(usize),
    ClientGone,
    Timeout,
    Failed(std::io::Error),
}

/// Reads from the worker until something arrives, the client (if watched) goes away or
/// `until` passes.
async fn wait(
    up: &mut Conn,
    buf: &mut BytesMut,
    client: Option<&mut ClientSession>,
    until: Instant,
) -> Wait {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(16 * 1024);
    }
    let gone = async {
        match client {
            Some(c) => c.gone().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = up.read_buf(buf) => match r {
            Ok(n) => Wait::Read(n),
            Err(e) => Wait::Failed(e),
        },
        _ = gone => Wait::ClientGone,
        _ = tokio::time::sleep_until(until) => Wait::Timeout,
    }
}

/// Sends `request` (a complete HTTP/1.1 request) to `target` and waits for its response head,
/// until `head_deadline`. A pooled connection the worker had closed is tried once more on a
/// new connection: nothing was answered on it, so the worker never saw the request.
pub async fn exchange(
    target: Target<'_>,
    request: &[u8],
    mut client: Option<&mut ClientSession>,
    connect_timeout: Duration,
    head_deadline: Instant,
) -> Result<WorkerResponse, WireError> {
    let mut fresh_tried = false;
    loop {
        let (mut conn, reused) = match target.idle.take() {
            Some(conn) if !fresh_tried => (conn, true),
            _ => {
                fresh_tried = true;
                let conn = tokio::time::timeout_at(head_deadline, connect(target, connect_timeout))
                    .await
                    .map_err(|_| WireError::Timeout)??;
                (conn, false)
            }
        };
        // (The flush matters on TLS: a record may still sit in the session's buffer.)
        let send = async {
            conn.write_all(request).await?;
            conn.flush().await
        };
        let sent =
            tokio::time::timeout_at(head_deadline, send).await.map_err(|_| WireError::Timeout)?;
        if let Err(e) = sent {
            if reused {
                continue;
            }
            return Err(WireError::Failed(format!("cannot send the request: {}", io_failure(&e))));
        }
        let mut buf = match client.as_deref_mut() {
            Some(c) => c.take_spare(),
            None => BytesMut::with_capacity(16 * 1024),
        };
        loop {
            match wait(&mut conn, &mut buf, client.as_deref_mut(), head_deadline).await {
                Wait::Read(0) | Wait::Failed(_) if reused && buf.is_empty() => break,
                Wait::Read(0) => {
                    return Err(WireError::Failed("closed the connection before answering".into()))
                }
                Wait::Failed(e) => return Err(WireError::Failed(io_failure(&e))),
                Wait::Timeout => return Err(WireError::Timeout),
                Wait::ClientGone => return Err(WireError::ClientGone),
                Wait::Read(_) => match parse_head(&buf) {
                    Ok(Some((head, n))) if (100..200).contains(&head.status) => buf.advance(n),
                    Ok(Some((head, n))) => {
                        buf.advance(n);
                        let body = match head.framing {
                            Framing::Empty => Body::Done,
                            Framing::Length(0) => Body::Done,
                            Framing::Length(n) => Body::Length(n),
                            Framing::Chunked => Body::Chunked(Chunked::default()),
                            Framing::UntilClose => Body::UntilClose { eof: false },
                        };
                        return Ok(WorkerResponse { conn, buf, head, body });
                    }
                    Ok(None) if buf.len() > MAX_RESPONSE_HEAD => {
                        return Err(WireError::Failed("response head larger than 64 KiB".into()))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(WireError::Failed(e)),
                },
            }
        }
        // A reused connection was closed under us: once more on a fresh one.
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut resp = httparse::Response::new(&mut slots);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = resp.code.unwrap_or(502);
    if !(100..=599).contains(&status) {
        return Err(format!("malformed response: status {status}"));
    }
    let mut lines = Vec::with_capacity(n);
    let (mut length, mut chunked, mut close, mut keep_alive) = (None, false, false, false);
    let (mut retry_after, mut event_stream) = (None, false);
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().map(str::trim).filter(|v| {
                !v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit())
            });
            match (v.and_then(|v| v.parse::<u64>().ok()), length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(l)) if v == l => {}
                _ => return Err("invalid Content-Length in response".into()),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value);
            chunked =
                v.split(',').next_back().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err(format!("unsupported Transfer-Encoding {v:?} in response"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            close |= v.contains("close");
            keep_alive |= v.contains("keep-alive");
        } else if !is_hop_by_hop(name) {
            if name.eq_ignore_ascii_case("retry-after") {
                retry_after = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
            } else if name.eq_ignore_ascii_case("content-type") {
                event_stream = h.value.starts_with(b"text/event-stream");
            }
            header_line(&mut lines, name.as_bytes(), h.value);
        }
    }
    let framing = if !has_body(status) {
        Framing::Empty
    } else if chunked {
        // Chunked wins over a length (RFC 9112 §6.3), but never both: the connection is not
        // reused, since the two may disagree on where the body ends.
        if length.is_some() {
            close = true;
        }
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let http10 = resp.version == Some(0);
    let reusable = !close && (!http10 || keep_alive) && framing != Framing::UntilClose;
    let reason = resp.reason.unwrap_or("").to_owned();
    let head = ResponseHead { status, reason, retry_after, event_stream, lines, framing, reusable };
    Ok(Some((head, n)))
}

impl WorkerResponse {
    pub fn head(&self) -> &ResponseHead {
        &self.head
    }

    /// Whether the body bytes already read are well-framed (checked before anything of the
    /// answer goes to the client, so that garbage from the worker can still become a 502).
    pub fn check_buffered(&self) -> Result<(), WireError> {
        if let Body::Chunked(dec) = &self.body {
            dec.clone().feed(&self.buf, |_| {}).map_err(|e| WireError::Failed(e.to_string()))?;
        }
        Ok(())
    }

    /// Hands the body bytes already read to `sink`, de-framed; true once the body is complete.
    /// A framing error ends the answer: the connection will not be reused.
    pub fn drain_buffered(&mut self, mut sink: impl FnMut(&[u8])) -> Result<bool, WireError> {
        match &mut self.body {
            Body::Done => Ok(true),
            Body::Length(left) => {
                let n = self.buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                if n > 0 {
                    sink(&self.buf[..n]);
                    self.buf.advance(n);
                    *left -= n as u64;
                }
                if *left == 0 {
                    self.body = Body::Done;
                }
                Ok(matches!(self.body, Body::Done))
            }
            Body::Chunked(dec) => {
                let n = dec.feed(&self.buf, &mut sink).map_err(|e| {
                    self.head.reusable = false;
                    WireError::Failed(e.to_string())
                })?;
                self.buf.advance(n);
                if dec.is_done() {
                    self.body = Body::Done;
                }
                Ok(matches!(self.body, Body::Done))
            }
            Body::UntilClose { eof } => {
                if !self.buf.is_empty() {
                    sink(&self.buf);
                    self.buf.clear();
                }
                if *eof {
                    self.body = Body::Done;
                }
                Ok(matches!(self.body, Body::Done))
            }
        }
    }

    /// Reads more of the body from the worker, until `until`, watching `client` if given.
    pub async fn fill(
        &mut self,
        client: Option<&mut ClientSession>,
        until: Instant,
    ) -> Result<(), WireError> {
        match wait(&mut self.conn, &mut self.buf, client, until).await {
            Wait::Read(0) => match &mut self.body {
                Body::UntilClose { eof } => {
                    *eof = true;
                    Ok(())
                }
                _ => Err(WireError::Failed("the worker closed the connection mid-response".into())),
            },
            Wait::Read(_) => Ok(()),
            Wait::ClientGone => Err(WireError::ClientGone),
            Wait::Timeout => Err(WireError::Timeout),
            Wait::Failed(e) => {
                Err(WireError::Failed(format!("reading from the worker failed: {e}")))
            }
        }
    }

    /// Ends the exchange. A body read to its end, with nothing after it, on a connection the
    /// worker keeps alive goes back to `idle`; anything else is dropped (which cancels an
    /// unfinished request on the worker). Returns the read buffer for reuse.
    pub fn release(self, idle: &IdleConns) -> BytesMut {
        let Self { conn, buf, head, body } = self;
        if head.reusable && matches!(body, Body::Done) && buf.is_empty() {
            idle.put(conn);
        }
        buf
    }

    /// The whole body into memory (at most `limit` bytes), until `until`; the connection goes
    /// back to `idle` when it can serve another request.
    pub async fn read_to_end(
        mut self,
        idle: &IdleConns,
        until: Instant,
        limit: usize,
    ) -> Result<Vec<u8>, WireError> {
        let too_large = || WireError::Failed(format!("answer larger than {limit} bytes"));
        if matches!(self.head.framing, Framing::Length(n) if n > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        loop {
            let done = self.drain_buffered(|d| body.extend_from_slice(d))?;
            if body.len() > limit {
                return Err(too_large());
            }
            if done {
                self.release(idle);
                return Ok(body);
            }
            self.fill(None, until).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<ResponseHead>, String> {
        parse_head(raw.as_bytes()).map(|o| o.map(|(h, _)| h))
    }

    #[test]
    fn malformed_heads_are_errors() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 999 Odd\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n").unwrap().is_none());
    }

    #[test]
    fn framing_and_reuse() {
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.framing(), h.reusable), (Framing::Length(3), true));
        assert_eq!(h.header_lines(), b"X-A: b\r\n");
        let h = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing(), h.reusable), (Framing::Chunked, false));
        let h = parse("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.framing(), h.reusable), (Framing::UntilClose, false));
        let h = parse("HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing(), Framing::Empty);
        let h =
            parse("HTTP/1.1 429 Slow\r\nRetry-After: 7\r\ncontent-type: text/event-stream\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!((h.retry_after(), h.is_event_stream()), (Some(Duration::from_secs(7)), true));
    }
}

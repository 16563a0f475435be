//! One inference request to one worker, driven inside the client connection's task: write
//! the request on a pooled connection, wait for the response head while watching the client
//! (a client that goes away closes the worker connection, which cancels its request), then
//! relay the body verbatim, chunk framing included, one client write per worker read.

use std::pin::Pin;
use std::time::Duration;

use axum::http::Version;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::usage::UsageScan;
use crate::error::RouterError;
use crate::http1::chunked::Chunked;
use crate::http1::respond::{cors_lines, has_body, header_line, is_hop_by_hop, itoa, status_line};
use crate::http1::{Conn, MAX_BUFFERED};
use crate::registry::Worker;

pub mod sse;
mod whole;
pub use whole::{fetch, respond_edited, Fetched};

const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why a relay stopped early.
#[derive(Debug)]
pub enum Stop {
    /// Nothing was sent to the client yet: answer with this error.
    Failed(RouterError),
    /// The client went away, or the response was cut after its head was sent: close.
    Closed,
}

/// A worker's answer: its head, and the connection its body follows on.
pub struct Answer {
    conn: TcpStream,
    /// Bytes read after the head.
    buf: BytesMut,
    pub head: Head,
}

/// A worker's response head, with the client's header lines already rendered.
pub struct Head {
    pub status: u16,
    reason: String,
    /// `Retry-After` in seconds, when the worker sent one.
    pub retry_after: Option<Duration>,
    /// A `text/event-stream` body: it can end with an error event if the worker fails.
    event_stream: bool,
    /// The worker's end-to-end headers as `name: value\r\n` lines.
    lines: Vec<u8>,
    framing: Framing,
    reusable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

enum Wait {
    Read(usize),
    ClientGone,
    Timeout,
    Failed(std::io::Error),
}

/// Reads from the worker until something arrives, the client (if watched) goes away or the
/// deadline passes. Bytes the client sends meanwhile (a pipelined request) are kept for later.
async fn wait(
    up: &mut TcpStream,
    buf: &mut BytesMut,
    mut client: Option<&mut Conn>,
    mut deadline: Pin<&mut Sleep>,
) -> Wait {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(16 * 1024);
    }
    loop {
        let watch = async {
            match client.as_deref_mut() {
                Some(c) if c.buf.len() < MAX_BUFFERED => c.read_more().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = up.read_buf(buf) => return match r {
                Ok(n) => Wait::Read(n),
                Err(e) => Wait::Failed(e),
            },
            r = watch => match r {
                Ok(n) if n > 0 => continue,
                _ => return Wait::ClientGone,
            },
            _ = deadline.as_mut() => return Wait::Timeout,
        }
    }
}

async fn connect(worker: &Worker, timeout: Duration) -> Result<TcpStream, RouterError> {
    let host = worker.authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = worker.authority.port_u16().unwrap_or(80);
    let failed = |reason: String| RouterError::WorkerFailed { worker: worker.url().into(), reason };
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(failed(format!("cannot connect: {e}"))),
        Err(_) => Err(failed(format!("cannot connect: no answer in {timeout:?}"))),
    }
}

/// Sends `request` (a complete HTTP/1.1 request) to `worker` and waits for its response head.
/// A pooled connection the worker had closed is retried once on a new connection: nothing
/// was answered on it, so the worker never saw the request.
pub async fn exchange(
    worker: &Worker,
    request: &[u8],
    mut client: Option<&mut Conn>,
    connect_timeout: Duration,
    header_timeout: Duration,
    deadline: Instant,
) -> Result<Answer, Stop> {
    let deadline = tokio::time::sleep_until(deadline.min(Instant::now() + header_timeout));
    tokio::pin!(deadline);
    let failed = |reason: String| {
        Stop::Failed(RouterError::WorkerFailed { worker: worker.url().into(), reason })
    };
    let timed_out = || {
        Stop::Failed(RouterError::WorkerTimeout {
            worker: worker.url().into(),
            after: header_timeout,
        })
    };
    let mut fresh_tried = false;
    loop {
        let (mut conn, reused) = match worker.idle.take() {
            Some(conn) if !fresh_tried => (conn, true),
            _ => {
                fresh_tried = true;
                let conn = tokio::select! {
                    r = connect(worker, connect_timeout) => r.map_err(Stop::Failed)?,
                    _ = deadline.as_mut() => return Err(timed_out()),
                };
                (conn, false)
            }
        };
        let sent = tokio::select! {
            r = conn.write_all(request) => r,
            _ = deadline.as_mut() => return Err(timed_out()),
        };
        if let Err(e) = sent {
            if reused {
                continue;
            }
            return Err(failed(format!("cannot send the request: {e}")));
        }
        // The buffer of the connection's previous answer, when there is one: no allocation.
        let mut buf = client
            .as_deref_mut()
            .map(|c| std::mem::take(&mut c.spare))
            .filter(|b| b.capacity() > 0)
            .unwrap_or_else(|| BytesMut::with_capacity(16 * 1024));
        buf.clear();
        loop {
            match wait(&mut conn, &mut buf, client.as_deref_mut(), deadline.as_mut()).await {
                Wait::Read(0) | Wait::Failed(_) if reused && buf.is_empty() => break,
                Wait::Read(0) => {
                    return Err(failed("closed the connection before answering".into()))
                }
                Wait::Failed(e) => return Err(failed(e.to_string())),
                Wait::Timeout => return Err(timed_out()),
                Wait::ClientGone => return Err(Stop::Closed),
                Wait::Read(_) => match parse_head(&buf) {
                    Ok(Some((head, n))) if (100..200).contains(&head.status) => buf.advance(n),
                    Ok(Some((head, n))) => {
                        buf.advance(n);
                        return Ok(Answer { conn, buf, head });
                    }
                    Ok(None) if buf.len() > MAX_RESPONSE_HEAD => {
                        return Err(failed("response head larger than 64 KiB".into()))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(failed(e)),
                },
            }
        }
        // A reused connection was closed under us: once more on a fresh one.
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut resp = httparse::Response::new(&mut slots);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = resp.code.unwrap_or(502);
    let mut lines = Vec::with_capacity(n);
    let (mut length, mut chunked, mut close, mut keep_alive) = (None, false, false, false);
    let (mut retry_after, mut event_stream) = (None, false);
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            match (v, length) {
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
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let http10 = resp.version == Some(0);
    let reusable = !close && (!http10 || keep_alive) && framing != Framing::UntilClose;
    let reason = resp.reason.unwrap_or("").to_owned();
    let head = Head { status, reason, retry_after, event_stream, lines, framing, reusable };
    Ok(Some((head, n)))
}

fn push_chunk(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// How the body goes to the client.
enum Mode {
    Length(u64),
    /// Chunked from the worker, relayed as is.
    Chunked(Chunked),
    /// Chunked from the worker, decoded for an HTTP/1.0 client.
    Dechunk(Chunked),
    /// Delimited by the worker closing: chunked for the client.
    Rechunk,
    /// Delimited by the worker closing, and by closing for the client.
    Raw,
}

/// How a relay ended.
pub struct Relayed {
    /// For event streams: when the first event reached the client.
    pub first_event: Option<Instant>,
    /// Whether the client connection can serve another request.
    pub keep: bool,
    /// The worker failed after the response began (closed, broke framing, went silent).
    pub worker_failure: Option<String>,
}

/// Limits on the body's delivery: the request's deadline, and the longest silence.
pub struct BodyTimeouts {
    pub deadline: Instant,
    pub idle: Duration,
}

/// Relays `answer` to the client, with `extra` headers added to the worker's. If the worker
/// fails mid-stream, an event stream still ends well-formed: one error event and `[DONE]`.
#[allow(clippy::too_many_arguments)]
pub async fn respond(
    answer: Answer,
    worker: &Worker,
    c: &mut Conn,
    version: Version,
    keep: bool,
    extra: &[(&[u8], &[u8])],
    mut usage: Option<UsageScan>,
    limits: BodyTimeouts,
) -> Relayed {
    let Answer { mut conn, mut buf, head } = answer;
    let http11 = version == Version::HTTP_11;
    let mut keep = keep;
    start_head(c, &head, extra);
    let mut mode = match head.framing {
        Framing::Empty => Mode::Length(0),
        Framing::Length(n) => {
            header_line(&mut c.out, b"content-length", itoa(n).as_bytes());
            Mode::Length(n)
        }
        Framing::Chunked if http11 => {
            header_line(&mut c.out, b"transfer-encoding", b"chunked");
            Mode::Chunked(Chunked::default())
        }
        Framing::UntilClose if http11 => {
            header_line(&mut c.out, b"transfer-encoding", b"chunked");
            Mode::Rechunk
        }
        Framing::Chunked => Mode::Dechunk(Chunked::default()),
        Framing::UntilClose => Mode::Raw,
    };
    if matches!(mode, Mode::Dechunk(_) | Mode::Raw) {
        keep = false;
    }
    if !keep {
        header_line(&mut c.out, b"connection", b"close");
    }
    c.out.extend_from_slice(b"\r\n");
    let timer = tokio::time::sleep_until(limits.deadline);
    tokio::pin!(timer);
    let mut tail = Tail::default();
    let mut eof = false;
    let failure = loop {
        let done = match take(&mut mode, &mut buf, &mut c.out, usage.as_mut(), &mut tail, eof) {
            Ok(done) => done,
            Err(e) => break e.to_string(),
        };
        if done {
            return complete(c, timer.as_mut(), tail.any, &head, (conn, buf), worker, keep).await;
        }
        if !c.out.is_empty() && !write_out(c, timer.as_mut(), tail.any).await {
            return ended(c, &head, false, None);
        }
        let idle_until = Instant::now() + limits.idle;
        let (until, idle_first) = if idle_until < limits.deadline {
            (idle_until, true)
        } else {
            (limits.deadline, false)
        };
        timer.as_mut().reset(until);
        match wait(&mut conn, &mut buf, Some(&mut *c), timer.as_mut()).await {
            Wait::Read(0) if matches!(mode, Mode::Rechunk | Mode::Raw) => eof = true,
            Wait::Read(0) => break "the worker closed the connection mid-response".into(),
            Wait::Read(_) => {}
            Wait::ClientGone => return ended(c, &head, false, None),
            Wait::Timeout if idle_first => {
                break format!("the worker sent nothing for {:?}", limits.idle)
            }
            Wait::Timeout => {
                tracing::debug!(worker = worker.url(), "request deadline passed mid-response");
                return ended(c, &head, false, None);
            }
            Wait::Failed(e) => break format!("reading from the worker failed: {e}"),
        }
    };
    // The worker failed mid-response. An event stream at an event boundary still ends
    // well-formed; anything else can only be cut.
    tracing::warn!(worker = worker.url(), error = %failure, "response cut short");
    // The timer may have fired (idle timeout): the last words get a moment of their own.
    timer.as_mut().reset(Instant::now() + Duration::from_secs(1));
    let at_boundary = match &mode {
        Mode::Chunked(dec) => dec.at_chunk_start(),
        Mode::Dechunk(_) | Mode::Rechunk | Mode::Raw => true,
        Mode::Length(_) => false,
    };
    if head.event_stream && at_boundary && tail.at_event_start() {
        let event = error_event(worker, &failure);
        let chunked = matches!(mode, Mode::Chunked(_) | Mode::Rechunk);
        push_chunk(&mut c.out, &event, chunked);
        if chunked {
            c.out.extend_from_slice(b"0\r\n\r\n");
        }
        let wrote = write_out(c, timer.as_mut(), tail.any).await;
        return ended(c, &head, wrote && keep, Some(failure));
    }
    let _ = write_out(c, timer.as_mut(), tail.any).await;
    ended(c, &head, false, Some(failure))
}

/// One SSE error event in the shape SGLang uses, then the end marker.
fn error_event(worker: &Worker, reason: &str) -> Vec<u8> {
    let message = format!("worker {} failed mid-stream: {reason}", worker.url());
    let v = serde_json::json!({"error": {"message": message, "type": "worker_stream_error", "code": 502}});
    format!("data: {v}\n\ndata: [DONE]\n\n").into_bytes()
}

/// Writes the assembled output; `payload` says whether it holds body bytes (the first such
/// write is when the client got its first event).
async fn write_out(c: &mut Conn, timer: Pin<&mut Sleep>, payload: bool) -> bool {
    let wrote = tokio::select! {
        r = c.stream.write_all(&c.out) => r.is_ok(),
        _ = timer => false,
    };
    c.out.clear();
    if wrote && payload && c.first_payload.is_none() {
        c.first_payload = Some(Instant::now());
    }
    wrote
}

/// Starts the client's response head: the worker's status and end-to-end headers, `extra`,
/// and CORS; the caller adds the framing headers and the blank line.
fn start_head(c: &mut Conn, head: &Head, extra: &[(&[u8], &[u8])]) {
    c.out.clear();
    status_line(&mut c.out, head.status, &head.reason);
    c.out.extend_from_slice(&head.lines);
    for (name, value) in extra {
        header_line(&mut c.out, name, value);
    }
    cors_lines(&c.cors_origin, &mut c.out);
}

/// The body is complete: write what is left, and pool the worker connection if it can serve
/// another request.
async fn complete(
    c: &mut Conn,
    timer: Pin<&mut Sleep>,
    payload: bool,
    head: &Head,
    (conn, buf): (TcpStream, BytesMut),
    worker: &Worker,
    keep: bool,
) -> Relayed {
    let wrote = write_out(c, timer, payload).await;
    if head.reusable && buf.is_empty() {
        worker.idle.put(conn);
    }
    if buf.capacity() <= 64 * 1024 {
        c.spare = buf;
    }
    ended(c, head, wrote && keep, None)
}

fn ended(c: &Conn, head: &Head, keep: bool, worker_failure: Option<String>) -> Relayed {
    let first_event = c.first_payload.filter(|_| head.event_stream);
    Relayed { keep, worker_failure, first_event }
}

/// The last bytes of payload relayed, to know whether the stream stands between two events.
#[derive(Default)]
struct Tail {
    last: [u8; 4],
    any: bool,
}

impl Tail {
    fn push(&mut self, d: &[u8]) {
        for &b in &d[d.len().saturating_sub(4)..] {
            self.last = [self.last[1], self.last[2], self.last[3], b];
        }
        self.any |= !d.is_empty();
    }

    fn at_event_start(&self) -> bool {
        !self.any || self.last[2..] == *b"\n\n" || self.last == *b"\r\n\r\n"
    }
}

/// Moves what `buf` holds of the body into `out`; true once the body is complete.
fn take(
    mode: &mut Mode,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    mut usage: Option<&mut UsageScan>,
    tail: &mut Tail,
    eof: bool,
) -> Result<bool, crate::http1::chunked::ChunkError> {
    let mut scan = |d: &[u8]| {
        tail.push(d);
        if let Some(u) = usage.as_mut() {
            u.frame(d)
        }
    };
    match mode {
        Mode::Length(left) => {
            let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            scan(&buf[..n]);
            out.extend_from_slice(&buf[..n]);
            buf.advance(n);
            *left -= n as u64;
            Ok(*left == 0)
        }
        Mode::Chunked(dec) => {
            let n = dec.feed(buf, &mut scan)?;
            out.extend_from_slice(&buf[..n]);
            buf.advance(n);
            Ok(dec.is_done())
        }
        Mode::Dechunk(dec) => {
            let n = dec.feed(buf, |d| {
                scan(d);
                out.extend_from_slice(d);
            })?;
            buf.advance(n);
            Ok(dec.is_done())
        }
        Mode::Rechunk => {
            if !buf.is_empty() {
                scan(buf);
                out.extend_from_slice(format!("{:x}\r\n", buf.len()).as_bytes());
                out.extend_from_slice(buf);
                out.extend_from_slice(b"\r\n");
                buf.clear();
            }
            if eof {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Ok(eof)
        }
        Mode::Raw => {
            scan(buf);
            out.extend_from_slice(buf);
            buf.clear();
            Ok(eof)
        }
    }
}

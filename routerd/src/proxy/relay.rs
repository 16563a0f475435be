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
use tokio::time::Sleep;

use super::usage::UsageScan;
use crate::error::RouterError;
use crate::http1::chunked::Chunked;
use crate::http1::respond::{has_body, header_line, is_hop_by_hop, itoa, status_line};
use crate::http1::{Conn, MAX_BUFFERED};
use crate::registry::Worker;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Reads from the worker until something arrives, the client goes away or the deadline passes.
/// Bytes the client sends meanwhile (a pipelined request) are kept for later.
async fn wait(
    up: &mut TcpStream,
    buf: &mut BytesMut,
    c: &mut Conn,
    mut deadline: Pin<&mut Sleep>,
) -> Wait {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(16 * 1024);
    }
    loop {
        tokio::select! {
            biased;
            r = up.read_buf(buf) => return match r {
                Ok(n) => Wait::Read(n),
                Err(e) => Wait::Failed(e),
            },
            r = c.read_more(), if c.buf.len() < MAX_BUFFERED => match r {
                Ok(n) if n > 0 => continue,
                _ => return Wait::ClientGone,
            },
            _ = deadline.as_mut() => return Wait::Timeout,
        }
    }
}

async fn connect(worker: &Worker) -> Result<TcpStream, RouterError> {
    let host = worker.authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = worker.authority.port_u16().unwrap_or(80);
    let failed = |reason: String| RouterError::WorkerFailed { worker: worker.url().into(), reason };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(failed(format!("cannot connect: {e}"))),
        Err(_) => Err(failed(format!("cannot connect: no answer in {CONNECT_TIMEOUT:?}"))),
    }
}

/// Sends `request` (a complete HTTP/1.1 request) to `worker` and waits for its response head.
/// A pooled connection the worker had closed is retried once on a new connection: nothing
/// was answered on it, so the worker never saw the request.
pub async fn exchange(
    worker: &Worker,
    request: &[u8],
    c: &mut Conn,
    mut deadline: Pin<&mut Sleep>,
    timeout: Duration,
) -> Result<Answer, Stop> {
    let failed = |reason: String| {
        Stop::Failed(RouterError::WorkerFailed { worker: worker.url().into(), reason })
    };
    let timed_out = || {
        Stop::Failed(RouterError::WorkerTimeout {
            worker: worker.url().into(),
            secs: timeout.as_secs(),
        })
    };
    let mut fresh_tried = false;
    loop {
        let (mut conn, reused) = match worker.idle.take() {
            Some(conn) if !fresh_tried => (conn, true),
            _ => {
                fresh_tried = true;
                let conn = tokio::select! {
                    r = connect(worker) => r.map_err(Stop::Failed)?,
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
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            match wait(&mut conn, &mut buf, c, deadline.as_mut()).await {
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
    Ok(Some((Head { status, reason, lines, framing, reusable }, n)))
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

/// Relays `answer` to the client, with `extra` headers added to the worker's. Returns whether
/// the client connection can serve another request.
pub async fn respond(
    answer: Answer,
    worker: &Worker,
    c: &mut Conn,
    version: Version,
    keep: bool,
    extra: &[(&[u8], &[u8])],
    mut usage: Option<UsageScan>,
    mut deadline: Pin<&mut Sleep>,
) -> bool {
    let Answer { mut conn, mut buf, head } = answer;
    let http11 = version == Version::HTTP_11;
    let mut keep = keep;
    c.out.clear();
    status_line(&mut c.out, head.status, &head.reason);
    c.out.extend_from_slice(&head.lines);
    for (name, value) in extra {
        header_line(&mut c.out, name, value);
    }
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
    let mut eof = false;
    loop {
        let done = match take(&mut mode, &mut buf, &mut c.out, usage.as_mut(), eof) {
            Ok(done) => done,
            Err(_) => return false,
        };
        if done {
            break;
        }
        if !c.out.is_empty() {
            let wrote = tokio::select! {
                r = c.stream.write_all(&c.out) => r.is_ok(),
                _ = deadline.as_mut() => false,
            };
            c.out.clear();
            if !wrote {
                return false;
            }
        }
        match wait(&mut conn, &mut buf, c, deadline.as_mut()).await {
            Wait::Read(0) if matches!(mode, Mode::Rechunk | Mode::Raw) => eof = true,
            Wait::Read(0) => {
                tracing::debug!(worker = worker.url(), "worker closed the connection mid-response");
                return false;
            }
            Wait::Read(_) => {}
            Wait::ClientGone | Wait::Timeout | Wait::Failed(_) => return false,
        }
    }
    let wrote = tokio::select! {
        r = c.stream.write_all(&c.out) => r.is_ok(),
        _ = deadline.as_mut() => false,
    };
    c.out.clear();
    if head.reusable && buf.is_empty() {
        worker.idle.put(conn);
    }
    wrote && keep
}

/// Moves what `buf` holds of the body into `out`; true once the body is complete.
fn take(
    mode: &mut Mode,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    mut usage: Option<&mut UsageScan>,
    eof: bool,
) -> Result<bool, crate::http1::chunked::ChunkError> {
    let mut scan = |d: &[u8]| {
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

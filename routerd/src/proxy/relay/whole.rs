//! Answers handled whole rather than relayed verbatim: a PD prefill leg read into memory, and
//! answers whose JSON is edited on the way (PD logprob merge), a plain body at once or a stream
//! event by event.

use std::time::Duration;

use axum::http::Version;
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{
    complete, ended, error_event, exchange, push_chunk, start_head, take, wait, write_out, Answer,
    BodyTimeouts, Framing, Head, Mode, Relayed, Stop, Tail, Wait,
};
use crate::error::RouterError;
use crate::http1::chunked::Chunked;
use crate::http1::respond::{header_line, itoa};
use crate::http1::Conn;
use crate::registry::Worker;

/// A whole answer read into memory, without watching a client (a PD prefill leg).
pub struct Fetched {
    pub status: u16,
    pub body: bytes::Bytes,
}

/// Sends `request` to `worker` and reads the whole answer (at most `limit` bytes of body).
pub async fn fetch(
    worker: &Worker,
    request: &[u8],
    timeouts: (Duration, Duration),
    deadline: Instant,
    limit: usize,
) -> Result<Fetched, RouterError> {
    let failed = |reason: String| RouterError::WorkerFailed { worker: worker.url().into(), reason };
    let answer = match exchange(worker, request, None, timeouts.0, timeouts.1, deadline).await {
        Ok(a) => a,
        Err(Stop::Failed(e)) => return Err(e),
        Err(Stop::Closed) => return Err(failed("closed".into())),
    };
    let Answer { conn, buf, head } = answer;
    let body = read_whole(worker, conn, buf, &head, deadline, limit).await?;
    Ok(Fetched { status: head.status, body: body.into() })
}

/// The rest of an answer's body, de-framed, into memory; the connection goes back to the pool.
async fn read_whole(
    worker: &Worker,
    mut conn: TcpStream,
    mut buf: BytesMut,
    head: &Head,
    deadline: Instant,
    limit: usize,
) -> Result<Vec<u8>, RouterError> {
    let failed = |reason: String| RouterError::WorkerFailed { worker: worker.url().into(), reason };
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut mode = match head.framing {
        Framing::Empty => Mode::Length(0),
        Framing::Length(n) if n > limit as u64 => {
            return Err(failed(format!("answer larger than {limit} bytes")))
        }
        Framing::Length(n) => Mode::Length(n),
        Framing::Chunked => Mode::Dechunk(Chunked::default()),
        Framing::UntilClose => Mode::Raw,
    };
    let (mut body, mut tail, mut eof) = (Vec::new(), Tail::default(), false);
    loop {
        match take(&mut mode, &mut buf, &mut body, None, &mut tail, eof) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(failed(e.to_string())),
        }
        if body.len() > limit {
            return Err(failed(format!("answer larger than {limit} bytes")));
        }
        match wait(&mut conn, &mut buf, None, timer.as_mut()).await {
            Wait::Read(0) if matches!(mode, Mode::Raw) => eof = true,
            Wait::Read(0) => return Err(failed("closed the connection mid-response".into())),
            Wait::Read(_) => {}
            Wait::Timeout => {
                return Err(failed("the request deadline passed while reading the answer".into()))
            }
            Wait::Failed(e) => return Err(failed(e.to_string())),
            Wait::ClientGone => unreachable!("no client is watched"),
        }
    }
    if head.reusable && buf.is_empty() {
        worker.idle.put(conn);
    }
    Ok(body)
}

/// Like `respond`, with `edit` applied to the JSON of the answer: to the whole body of a plain
/// answer, to each `data:` event of a stream (events are relayed whole, as they complete).
#[allow(clippy::too_many_arguments)]
pub async fn respond_edited(
    answer: Answer,
    worker: &Worker,
    c: &mut Conn,
    version: Version,
    keep: bool,
    extra: &[(&[u8], &[u8])],
    limits: BodyTimeouts,
    mut edit: impl FnMut(&mut serde_json::Value),
) -> Relayed {
    let Answer { mut conn, mut buf, head } = answer;
    let http11 = version == Version::HTTP_11;
    let keep = keep && (http11 || !head.event_stream);
    start_head(c, &head, extra);
    if !keep {
        header_line(&mut c.out, b"connection", b"close");
    }
    if !head.event_stream {
        let body = match read_whole(worker, conn, buf, &head, limits.deadline, usize::MAX).await {
            Ok(b) => b,
            Err(e) => return ended(c, &head, false, Some(e.to_string())),
        };
        let body = match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(mut v) => {
                edit(&mut v);
                serde_json::to_vec(&v).unwrap_or(body)
            }
            Err(_) => body,
        };
        header_line(&mut c.out, b"content-length", itoa(body.len() as u64).as_bytes());
        c.out.extend_from_slice(b"\r\n");
        c.out.extend_from_slice(&body);
        let timer = tokio::time::sleep_until(limits.deadline);
        tokio::pin!(timer);
        let wrote = write_out(c, timer.as_mut(), true).await;
        return ended(c, &head, wrote && keep, None);
    }
    if http11 {
        header_line(&mut c.out, b"transfer-encoding", b"chunked");
    }
    c.out.extend_from_slice(b"\r\n");
    let mut mode = match head.framing {
        Framing::Empty => Mode::Length(0),
        Framing::Length(n) => Mode::Length(n),
        Framing::Chunked => Mode::Dechunk(Chunked::default()),
        Framing::UntilClose => Mode::Raw,
    };
    let timer = tokio::time::sleep_until(limits.deadline);
    tokio::pin!(timer);
    let (mut events, mut piece) = (super::sse::Events::default(), Vec::new());
    let (mut tail, mut eof) = (Tail::default(), false);
    let failure = loop {
        piece.clear();
        let done = match take(&mut mode, &mut buf, &mut piece, None, &mut tail, eof) {
            Ok(done) => done,
            Err(e) => break e.to_string(),
        };
        events.push(&piece);
        while let Some(event) = events.next_event() {
            push_chunk(&mut c.out, &super::sse::edit(event, &mut edit), http11);
        }
        if done {
            // An unterminated last event is relayed as it came.
            let rest = std::mem::take(&mut events).finish();
            if !rest.is_empty() {
                push_chunk(&mut c.out, &rest, http11);
            }
            if http11 {
                c.out.extend_from_slice(b"0\r\n\r\n");
            }
            return complete(c, timer.as_mut(), tail.any, &head, (conn, buf), worker, keep).await;
        }
        if !c.out.is_empty() && !write_out(c, timer.as_mut(), tail.any).await {
            return ended(c, &head, false, None);
        }
        timer.as_mut().reset(limits.deadline.min(Instant::now() + limits.idle));
        match wait(&mut conn, &mut buf, Some(&mut *c), timer.as_mut()).await {
            Wait::Read(0) if matches!(mode, Mode::Raw) => eof = true,
            Wait::Read(0) => break "the worker closed the connection mid-response".into(),
            Wait::Read(_) => {}
            Wait::ClientGone => return ended(c, &head, false, None),
            Wait::Timeout => break format!("the worker sent nothing for {:?}", limits.idle),
            Wait::Failed(e) => break format!("reading from the worker failed: {e}"),
        }
    };
    // Only whole events were relayed: the stream can always end with an error event.
    timer.as_mut().reset(Instant::now() + Duration::from_secs(1));
    push_chunk(&mut c.out, &error_event(worker, &failure), http11);
    if http11 {
        c.out.extend_from_slice(b"0\r\n\r\n");
    }
    let wrote = write_out(c, timer.as_mut(), tail.any).await;
    ended(c, &head, wrote && keep, Some(failure))
}

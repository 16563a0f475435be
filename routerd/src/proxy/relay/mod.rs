//! Relays a worker's answer to the client through the two sessions of the wire: the worker's
//! status and headers (plus routerd's own), then its payload as it arrives, one client write per
//! worker read. An event stream is relayed in whole events (`sse::Cutter`), so that however it
//! ends early (the worker closes, breaks its framing, falls silent past the idle timeout, or the
//! request's deadline passes) the client's stream ends well-formed: one error event,
//! `data: [DONE]`, and the chunked terminator; the worker connection is dropped, which cancels
//! the request on the worker. Any other body cut short is cut for the client too (it sees an
//! incomplete response, never a silent hang or a falsely complete one).

use std::time::Duration;

use axum::http::Version;
use serde_json::Value;
use tokio::time::Instant;

use axum::response::IntoResponse;

use super::usage::UsageScan;
use crate::error::RouterError;
use crate::http1::worker::{Framing, WireError, WorkerResponse};
use crate::http1::{respond, Body, ClientSession};
use crate::registry::Worker;

pub mod sse;
mod whole;
pub use whole::{fetch, Fetched};

/// How a relay ended.
pub struct Relayed {
    /// For event streams: when the first event reached the client.
    pub first_event: Option<Instant>,
    /// Whether the client connection can serve another request.
    pub keep: bool,
    /// The worker failed after the response began (closed, broke framing, went silent).
    pub worker_failure: Option<String>,
    /// The status the client got instead of the worker's (a malformed answer became 502).
    pub replaced_status: Option<u16>,
}

/// Limits on the body's delivery: the request's deadline, and the longest silence.
#[derive(Clone, Copy)]
pub struct BodyTimeouts {
    pub deadline: Instant,
    pub idle: Duration,
}

/// Why a relay stopped before the body's end.
#[derive(Debug)]
pub enum Cut {
    /// The client went away: nothing more to say to it.
    ClientGone,
    /// The worker failed (its fault: it counts against its breaker).
    Worker(String),
    /// The request's deadline passed.
    Deadline,
}

/// Relays `answer` to the client, with `extra` headers added to the worker's.
#[allow(clippy::too_many_arguments)]
pub async fn respond(
    answer: WorkerResponse,
    worker: &Worker,
    c: &mut ClientSession,
    version: Version,
    keep: bool,
    extra: &[(&[u8], &[u8])],
    usage: Option<UsageScan>,
    limits: BodyTimeouts,
) -> Relayed {
    relay(answer, worker, c, (version, keep), extra, usage, limits, sse::Cutter::new()).await
}

/// Like `respond`, with `edit` applied to the JSON of the answer: to the whole body of a plain
/// answer, to each `data:` event of a stream (events are relayed whole, as they complete).
#[allow(clippy::too_many_arguments)]
pub async fn respond_edited(
    answer: WorkerResponse,
    worker: &Worker,
    c: &mut ClientSession,
    version: Version,
    keep: bool,
    extra: &[(&[u8], &[u8])],
    limits: BodyTimeouts,
    mut edit: impl FnMut(&mut Value) + Send,
) -> Relayed {
    if !answer.head().is_event_stream() {
        return whole::respond_edited(answer, worker, c, (version, keep), extra, limits, &mut edit)
            .await;
    }
    let mut filter = |e: &[u8]| sse::Verdict::Replace(sse::edit(e.to_vec(), &mut edit));
    let cutter = sse::Cutter::with_filter(&mut filter);
    relay(answer, worker, c, (version, keep), extra, None, limits, cutter).await
}

/// The client's head: the worker's status and end-to-end headers, then `extra`.
fn start_head(c: &mut ClientSession, answer: &WorkerResponse, extra: &[(&[u8], &[u8])]) {
    let head = answer.head();
    c.start_response(head.status(), head.reason());
    c.worker_headers(head);
    for (name, value) in extra {
        c.header(name, value);
    }
}

/// Writes the client's head for `answer`; returns whether the connection can be kept. An
/// event stream is always re-framed (chunked, or closed for HTTP/1.0), so that it can end with
/// an error event, or go on with another worker's events, whatever the worker's framing was.
pub(crate) fn begin(
    c: &mut ClientSession,
    answer: &WorkerResponse,
    extra: &[(&[u8], &[u8])],
    (version, keep): (Version, bool),
) -> bool {
    start_head(c, answer, extra);
    let body = match answer.head().framing() {
        _ if answer.head().is_event_stream() => Body::Stream,
        Framing::Empty => Body::Empty,
        Framing::Length(n) => Body::Length(n),
        Framing::Chunked | Framing::UntilClose => Body::Stream,
    };
    c.end_head(body, version, keep)
}

/// Relays `answer`'s body (events through `cutter`) until it ends (`Ok`; the connection goes
/// back to the idle pool) or is cut (the connection is dropped, which cancels the request on
/// the worker). Nothing is written to end the client's body.
pub(crate) async fn pump(
    mut answer: WorkerResponse,
    worker: &Worker,
    c: &mut ClientSession,
    cutter: &mut sse::Cutter<'_>,
    usage: &mut Option<UsageScan>,
    limits: BodyTimeouts,
) -> Result<(), Cut> {
    let events = answer.head().is_event_stream();
    loop {
        let drained = answer.drain_buffered(|d| {
            if let Some(u) = usage.as_mut() {
                u.frame(d);
            }
            if events {
                cutter.feed(d, &mut |e| c.payload(e));
            } else {
                c.payload(d);
            }
        });
        if let Some(reason) = cutter.take_failure() {
            return Err(Cut::Worker(reason));
        }
        match drained {
            Ok(true) => {
                cutter.finish(&mut |e| c.payload(e));
                if let Some(reason) = cutter.take_failure() {
                    return Err(Cut::Worker(reason));
                }
                c.keep_spare(answer.release(&worker.idle));
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => return Err(Cut::Worker(e.to_string())),
        }
        if !c.flush(limits.deadline).await {
            return Err(Cut::ClientGone);
        }
        let idle_until = Instant::now() + limits.idle;
        let until = idle_until.min(limits.deadline);
        match answer.fill(Some(&mut *c), until).await {
            Ok(()) => {}
            Err(WireError::ClientGone) => return Err(Cut::ClientGone),
            Err(WireError::Timeout) if until < idle_until => return Err(Cut::Deadline),
            Err(WireError::Timeout) => {
                return Err(Cut::Worker(format!(
                    "the worker sent nothing for {}",
                    humantime::format_duration(limits.idle)
                )))
            }
            Err(e) => return Err(Cut::Worker(e.to_string())),
        }
    }
}

/// Ends the client's body after the worker's ended.
pub(crate) async fn complete(
    c: &mut ClientSession,
    events: bool,
    keep: bool,
    limits: BodyTimeouts,
) -> Relayed {
    let wrote = c.finish(limits.deadline).await;
    ended(c, events, wrote && keep, None)
}

/// Ends the client's body after `cut`: an event stream with one error event and the end
/// marker (unless the worker had said `[DONE]`); any other body is cut for the client too.
pub(crate) async fn cut_short(
    c: &mut ClientSession,
    cutter: &mut sse::Cutter<'_>,
    cut: Cut,
    worker: &Worker,
    events: bool,
    keep: bool,
) -> Relayed {
    let (message, worker_failure) = match cut {
        Cut::ClientGone => return ended(c, events, false, None),
        Cut::Worker(reason) => {
            tracing::warn!(worker = worker.url(), error = %reason, "response cut short");
            (error_event(worker, &reason), Some(reason))
        }
        Cut::Deadline => {
            tracing::debug!(worker = worker.url(), "request deadline passed mid-response");
            (timeout_event(), None)
        }
    };
    if !events {
        // Part of a plain body is with the client: it can only be cut.
        let _ = c.flush(Instant::now() + Duration::from_secs(1)).await;
        return ended(c, events, false, worker_failure);
    }
    // The last words get a moment of their own, even past the deadline.
    cutter.fail(&message, &mut |e| c.payload(e));
    let wrote = c.finish(Instant::now() + Duration::from_secs(1)).await;
    ended(c, events, wrote && keep, worker_failure)
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    answer: WorkerResponse,
    worker: &Worker,
    c: &mut ClientSession,
    (version, keep): (Version, bool),
    extra: &[(&[u8], &[u8])],
    mut usage: Option<UsageScan>,
    limits: BodyTimeouts,
    mut cutter: sse::Cutter<'_>,
) -> Relayed {
    let events = answer.head().is_event_stream();
    if let Err(e) = answer.check_buffered() {
        return malformed(answer, worker, c, (version, keep), e).await;
    }
    let keep = begin(c, &answer, extra, (version, keep));
    match pump(answer, worker, c, &mut cutter, &mut usage, limits).await {
        Ok(()) => complete(c, events, keep, limits).await,
        Err(cut) => cut_short(c, &mut cutter, cut, worker, events, keep).await,
    }
}

/// An answer found malformed before anything of it was sent: 502 instead, connection dropped.
async fn malformed(
    answer: WorkerResponse,
    worker: &Worker,
    c: &mut ClientSession,
    (version, keep): (Version, bool),
    e: WireError,
) -> Relayed {
    drop(answer);
    let e = RouterError::WorkerFailed { worker: worker.url().into(), reason: e.to_string() };
    let reason = e.to_string();
    tracing::warn!(worker = worker.url(), error = %reason, "malformed answer");
    let keep = respond::write(c, e.into_response(), version, keep, false).await;
    Relayed { keep, worker_failure: Some(reason), first_event: None, replaced_status: Some(502) }
}

fn ended(c: &ClientSession, events: bool, keep: bool, worker_failure: Option<String>) -> Relayed {
    Relayed {
        keep,
        worker_failure,
        first_event: c.first_payload().filter(|_| events),
        replaced_status: None,
    }
}

/// One SSE error event in the shape SGLang uses, then the end marker.
fn end_event(message: &str, kind: &str, code: u16) -> Vec<u8> {
    let v = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    format!("data: {v}\n\ndata: [DONE]\n\n").into_bytes()
}

/// The end of a stream its worker failed.
fn error_event(worker: &Worker, reason: &str) -> Vec<u8> {
    let message = format!("worker {} failed mid-stream: {reason}", worker.url());
    end_event(&message, "worker_stream_error", 502)
}

/// The end of a stream cut by the request's deadline (`request_timeout`).
fn timeout_event() -> Vec<u8> {
    end_event("the request took longer than the router's request timeout", "request_timeout", 504)
}

//! Answers handled whole rather than relayed as they come: a PD prefill leg read into memory,
//! and a plain (not streamed) answer whose JSON is edited on the way (PD logprob merge).

use std::time::Duration;

use axum::http::Version;
use serde_json::Value;
use tokio::time::Instant;

use axum::response::IntoResponse;

use super::{ended, start_head, BodyTimeouts, Relayed};
use crate::error::RouterError;
use crate::http1::worker::{exchange, WireError, WorkerResponse};
use crate::http1::{respond, Body, ClientSession};
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
    let head_deadline = deadline.min(Instant::now() + timeouts.1);
    let answer = exchange(worker.target(), request, None, timeouts.0, head_deadline)
        .await
        .map_err(|e| worker.wire_error(e, timeouts.1))?;
    let status = answer.head().status();
    let body = answer.read_to_end(&worker.idle, deadline, limit).await.map_err(|e| {
        let reason = match e {
            WireError::Timeout => "the request deadline passed while reading the answer".into(),
            e => e.to_string(),
        };
        RouterError::WorkerFailed { worker: worker.url().into(), reason }
    })?;
    Ok(Fetched { status, body: body.into() })
}

/// A plain answer read whole, `edit` applied to its JSON, and sent with its new length.
pub(super) async fn respond_edited(
    answer: WorkerResponse,
    worker: &Worker,
    c: &mut ClientSession,
    (version, keep): (Version, bool),
    extra: &[(&[u8], &[u8])],
    limits: BodyTimeouts,
    edit: &mut (dyn FnMut(&mut Value) + Send),
) -> Relayed {
    start_head(c, &answer, extra);
    let body = match answer.read_to_end(&worker.idle, limits.deadline, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            // Nothing of the answer was sent yet: the client gets a 502 instead.
            let e =
                RouterError::WorkerFailed { worker: worker.url().into(), reason: e.to_string() };
            let reason = e.to_string();
            let keep = respond::write(c, e.into_response(), version, keep, false).await;
            let mut r = ended(c, false, keep, Some(reason));
            r.replaced_status = Some(502);
            return r;
        }
    };
    let body = match serde_json::from_slice::<Value>(&body) {
        Ok(mut v) => {
            edit(&mut v);
            serde_json::to_vec(&v).unwrap_or(body)
        }
        Err(_) => body,
    };
    let keep = c.end_head(Body::Length(body.len() as u64), version, keep);
    c.payload(&body);
    let wrote = c.finish(limits.deadline).await;
    ended(c, false, wrote && keep, None)
}

//! Runs one sequence of a request through the engine, including the PD leg it plays, and hands
//! its output back step by step. Dropping an `ItemRun` aborts the sequence in the engine.

use std::collections::VecDeque;
use std::future::pending;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::args::Role;
use super::engine::{Event, Job};
use super::error::SimError;
use super::pd::{fetch_handoff, Handoff};
use super::request::Item;
use super::server::SimState;
use super::tokenizer::{logprob, prompt_seed};

/// One decode step of one sequence, as a response writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub token: Option<u32>,
    pub finished: bool,
    /// An injected engine error ends the sequence here (`--fault-error-after-tokens`).
    pub failed: bool,
}

/// What a response reports about a sequence besides its tokens.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub seed: u64,
}

pub struct ItemRun {
    pub meta: Meta,
    events: mpsc::UnboundedReceiver<Event>,
    buffered: VecDeque<Event>,
    emitted: u32,
    finished: bool,
    stall_after: Option<u32>,
    error_after: Option<u32>,
}

impl ItemRun {
    /// The next step; `None` after the finishing step, or if the engine went away.
    pub async fn next(&mut self) -> Option<Step> {
        if self.finished {
            return None;
        }
        if self.stall_after.is_some_and(|n| self.emitted >= n) {
            // Injected mid-stream stall: nothing more, ever, until the client gives up.
            pending::<()>().await;
        }
        if self.error_after.is_some_and(|n| self.emitted >= n) {
            self.finished = true;
            return Some(Step { token: None, finished: true, failed: true });
        }
        let ev = match self.buffered.pop_front() {
            Some(ev) => ev,
            None => self.events.recv().await?,
        };
        match ev {
            Event::Token { id, last } => {
                self.emitted += 1;
                self.finished = last;
                Some(Step { token: Some(id), finished: last, failed: false })
            }
            // Only reached when no token came (max_new_tokens 0): the last token ends it otherwise.
            Event::Done => {
                self.finished = true;
                Some(Step { token: None, finished: true, failed: false })
            }
            Event::Started { .. } => None,
        }
    }

    /// Runs to the end, returning the output tokens.
    pub async fn collect(&mut self) -> Result<Vec<u32>, SimError> {
        let mut out = Vec::new();
        loop {
            let step = self.next().await.ok_or_else(engine_gone)?;
            if step.failed {
                return Err(injected_error());
            }
            out.extend(step.token);
            if step.finished {
                return Ok(out);
            }
        }
    }

    /// The sequence as a stream of steps (for merging the sequences of a batch).
    pub fn into_steps(self) -> impl futures_util::Stream<Item = Step> + Send {
        futures_util::stream::unfold(
            self,
            |mut run| async move { run.next().await.map(|s| (s, run)) },
        )
    }
}

impl Meta {
    /// SGLang's `input_token_logprobs` for this sequence on this worker: `[logprob, id, null]`
    /// per prompt token (the first has no logprob). A decode worker never saw the prompt.
    pub fn input_logprobs(&self, role: Role, tokens: &[u32]) -> serde_json::Value {
        if role == Role::Decode {
            return serde_json::Value::Array(Vec::new());
        }
        tokens
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let lp = (i > 0).then(|| logprob(self.seed, *id, i));
                serde_json::json!([lp, id, null])
            })
            .collect()
    }

    pub fn output_logprobs(&self, tokens: &[u32]) -> serde_json::Value {
        tokens
            .iter()
            .enumerate()
            .map(|(i, id)| serde_json::json!([logprob(self.seed ^ 1, *id, i), id, null]))
            .collect()
    }
}

/// What an engine error mid-generation looks like to the client.
pub fn injected_error() -> SimError {
    SimError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "injected fault: engine error mid-generation",
    )
}

fn engine_gone() -> SimError {
    SimError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "engine is shutting down")
}

/// Merges the steps of several sequences, tagged with their index, in the order they happen.
pub fn merge(runs: Vec<ItemRun>) -> impl futures_util::Stream<Item = (usize, Step)> + Send + Unpin {
    futures_util::stream::select_all(
        runs.into_iter().enumerate().map(|(i, r)| r.into_steps().map(move |s| (i, s)).boxed()),
    )
}

/// Starts every sequence of a request at once and waits until each is admitted (or its PD
/// rendezvous failed).
pub async fn start_all(state: &SimState, items: &[Item]) -> Result<Vec<ItemRun>, SimError> {
    let runs = futures_util::future::join_all(items.iter().map(|it| start_item(state, it))).await;
    runs.into_iter().collect()
}

async fn start_item(state: &SimState, item: &Item) -> Result<ItemRun, SimError> {
    let timeout = state.bootstrap_timeout();
    let mut job = Job {
        tokens: item.tokens.clone(),
        max_new_tokens: item.max_new_tokens,
        prompt_text: item.text.clone(),
        plain_text: item.plain_text,
        skip_prefill: false,
    };
    let role = state.args.role;
    let boot = match (role, &item.bootstrap) {
        (Role::Regular, _) => None,
        (_, Some(b)) => Some(b),
        (_, None) => {
            return Err(SimError::bad_request(format!(
                "this worker runs in disaggregation mode {}: bootstrap_host and bootstrap_room are required",
                role.disaggregation_mode()
            )))
        }
    };
    let mut handoff = None;
    if let Some(b) = boot {
        // Counted while this leg waits for the other; a cancelled leg stops waiting at once.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicU64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        state.counters.bootstrap_waiting.fetch_add(1, Relaxed);
        let waiting = Waiting(&state.counters.bootstrap_waiting);
        match role {
            Role::Prefill => {
                if let Err(e) = state.rooms.await_decode(b.room, timeout).await {
                    state.counters.bootstrap_timeouts.fetch_add(1, Relaxed);
                    return Err(e);
                }
                // A prefill server computes the KV cache and the first token only.
                job.max_new_tokens = job.max_new_tokens.min(1);
            }
            Role::Decode => {
                let port = b.port.unwrap_or(state.args.bootstrap_port);
                match fetch_handoff(&state.http, &b.host, port, b.room, timeout).await {
                    Ok(h) => handoff = Some(h),
                    Err(e) => {
                        state.counters.bootstrap_timeouts.fetch_add(1, Relaxed);
                        return Err(e);
                    }
                }
                job.skip_prefill = true;
            }
            Role::Regular => unreachable!("regular workers ignore bootstrap fields"),
        }
        drop(waiting);
    }
    let seed = prompt_seed(&item.tokens);
    let mut events = state.engine.submit(job);
    let cached = match events.recv().await {
        Some(Event::Started { cached_tokens }) => cached_tokens,
        _ => return Err(engine_gone()),
    };
    let mut buffered = VecDeque::new();
    if let (Role::Prefill, Some(b)) = (role, boot) {
        // The KV cache is ready once the prefill step produced the first token.
        let first = events.recv().await.ok_or_else(engine_gone)?;
        buffered.push_back(first);
        let h = Handoff { prompt_tokens: item.tokens.len(), cached_tokens: cached };
        state.rooms.mark_ready(b.room, h, timeout);
    }
    let (prompt_tokens, cached_tokens) = match handoff {
        Some(h) => (h.prompt_tokens, h.cached_tokens),
        None => (item.tokens.len(), cached),
    };
    let faults = state.faults();
    let (stall_after, error_after) = (faults.stall_after_tokens, faults.error_after_tokens);
    let meta = Meta { prompt_tokens, cached_tokens, seed };
    Ok(ItemRun { meta, events, buffered, emitted: 0, finished: false, stall_after, error_after })
}

/// Streams whatever `produce` writes as a `text/event-stream` body. `produce` runs in its own
/// task and is dropped as soon as the client goes away, which aborts its sequences.
pub fn sse_response<F, Fut>(produce: F) -> axum::response::Response
where
    F: FnOnce(SseTx) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let watch = tx.clone();
    let fut = produce(SseTx(tx));
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            _ = watch.closed() => {}
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    axum::response::Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(axum::body::Body::from_stream(body.boxed()))
        .expect("static response parts")
}

pub struct SseTx(mpsc::Sender<Bytes>);

impl SseTx {
    /// Sends `data: {json}\n\n`; false once the client is gone.
    pub async fn data(&self, v: &serde_json::Value) -> bool {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut buf, v).expect("JSON values serialise");
        buf.extend_from_slice(b"\n\n");
        self.0.send(Bytes::from(buf)).await.is_ok()
    }

    pub async fn done(&self) {
        let _ = self.0.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    }

    pub async fn error(&self, e: &SimError) {
        self.data(&serde_json::json!({"error": {"message": e.message, "code": e.status.as_u16()}}))
            .await;
        self.done().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(events: &[Event]) -> (ItemRun, mpsc::UnboundedSender<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in events {
            tx.send(e.clone()).unwrap();
        }
        let meta = Meta { prompt_tokens: 1, cached_tokens: 0, seed: 0 };
        let run = ItemRun {
            meta,
            events: rx,
            buffered: VecDeque::new(),
            emitted: 0,
            finished: false,
            stall_after: None,
            error_after: None,
        };
        (run, tx)
    }

    #[tokio::test]
    async fn the_last_token_finishes_even_before_done_arrives() {
        // The reader may wake between the engine's last token and its Done (another thread).
        let (mut run, tx) =
            run_with(&[Event::Token { id: 7, last: false }, Event::Token { id: 8, last: true }]);
        assert_eq!(run.next().await, Some(Step { token: Some(7), finished: false, failed: false }));
        assert_eq!(run.next().await, Some(Step { token: Some(8), finished: true, failed: false }));
        tx.send(Event::Done).unwrap();
        assert_eq!(run.next().await, None, "no extra empty final step after the last token");
    }

    #[tokio::test]
    async fn done_alone_finishes_a_sequence_without_tokens() {
        let (mut run, _tx) = run_with(&[Event::Done]);
        assert_eq!(run.next().await, Some(Step { token: None, finished: true, failed: false }));
        assert_eq!(run.next().await, None);
    }
}

//! SGLang's native `/generate`: a JSON object per sequence (an array for a batch), or with
//! `"stream": true` one `data: {...}` event per decode step with the text and `output_ids` so
//! far (only the new ones with `--incremental-streaming-output`; `meta_info.completion_tokens`
//! counts all either way), ending in `data: [DONE]`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::error::SimError;
use super::request::{parse_generate, Item};
use super::run::{injected_error, merge, sse_response, start_all, Meta, SseTx};
use super::server::SimState;
use super::tokenizer::token_text;

pub async fn generate(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let parsed = match state.admit("generate", &body, parse_generate).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let ids: Vec<String> =
        parsed.items.iter().map(|it| it.rid.clone().unwrap_or_else(|| state.new_id())).collect();
    if parsed.stream {
        return sse_response(move |tx| {
            stream(state, parsed.items, ids, parsed.batched, started, tx)
        });
    }
    let runs = match start_all(&state, &parsed.items).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let outputs = futures_util::future::join_all(runs.into_iter().map(|mut r| async move {
        let tokens = r.collect().await?;
        Ok::<_, SimError>((r.meta, tokens))
    }))
    .await;
    let mut objs = Vec::with_capacity(outputs.len());
    for ((item, id), out) in parsed.items.iter().zip(&ids).zip(outputs) {
        match out {
            Ok((meta, tokens)) => {
                objs.push(output(&state, item, id, &meta, &tokens, true, started))
            }
            Err(e) => return e.into_response(),
        }
    }
    if parsed.batched {
        Json(Value::Array(objs)).into_response()
    } else {
        Json(objs.pop().expect("one item")).into_response()
    }
}

async fn stream(
    state: Arc<SimState>,
    items: Vec<Item>,
    ids: Vec<String>,
    batched: bool,
    started: Instant,
    tx: SseTx,
) {
    let runs = match start_all(&state, &items).await {
        Ok(r) => r,
        Err(e) => return tx.error(&e).await,
    };
    let metas: Vec<Meta> = runs.iter().map(|r| r.meta).collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); runs.len()];
    // With incremental output, what event `i` already carried of its sequence.
    let mut sent: Vec<usize> = vec![0; runs.len()];
    let incremental = state.args.incremental_streaming_output;
    let mut steps = merge(runs);
    while let Some((i, step)) = steps.next().await {
        if step.failed {
            return tx.error(&injected_error()).await;
        }
        tokens[i].extend(step.token);
        let mut obj =
            output(&state, &items[i], &ids[i], &metas[i], &tokens[i], step.finished, started);
        if incremental {
            let new = &tokens[i][sent[i]..];
            obj["text"] = json!(new.iter().map(|t| token_text(*t)).collect::<String>());
            obj["output_ids"] = json!(new);
            sent[i] = tokens[i].len();
        }
        if batched {
            obj["index"] = json!(i);
        }
        if !tx.data(&obj).await {
            return;
        }
    }
    tx.done().await;
}

/// One sequence's output object; `finished` decides whether `finish_reason` is set.
fn output(
    state: &SimState,
    item: &Item,
    id: &str,
    meta: &Meta,
    tokens: &[u32],
    finished: bool,
    started: Instant,
) -> Value {
    let text: String = tokens.iter().map(|t| token_text(*t)).collect();
    let mut meta_info = json!({
        "id": id,
        "finish_reason": if finished { json!({"type": "length", "length": tokens.len()}) } else { Value::Null },
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": tokens.len(),
        "cached_tokens": meta.cached_tokens,
        "e2e_latency": started.elapsed().as_secs_f64(),
    });
    if item.return_logprob {
        meta_info["input_token_logprobs"] = meta.input_logprobs(state.args.role, &item.tokens);
        meta_info["output_token_logprobs"] = meta.output_logprobs(tokens);
    }
    json!({"text": text, "output_ids": tokens, "meta_info": meta_info})
}

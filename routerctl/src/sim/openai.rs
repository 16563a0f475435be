//! SGLang's OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (with streaming
//! chunks and `usage.prompt_tokens_details.cached_tokens`) and `/v1/embeddings`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::engine::Job;
use super::request::{parse_chat, parse_completions, Parsed};
use super::run::{injected_error, merge, sse_response, start_all, Meta, SseTx};
use super::server::SimState;
use super::tokenizer::{mix64, token_text};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

pub async fn completions(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    match state.admit("completions", &body, parse_completions).await {
        Ok(p) => respond(state, p, Kind::Completion).await,
        Err(resp) => resp,
    }
}

pub async fn chat(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    match state.admit("chat", &body, parse_chat).await {
        Ok(p) => respond(state, p, Kind::Chat).await,
        Err(resp) => resp,
    }
}

struct Envelope {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value, usage: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
               "model": self.model, "choices": choices, "usage": usage})
    }
}

fn usage(metas: &[Meta], completion_tokens: usize) -> Value {
    let prompt: usize = metas.iter().map(|m| m.prompt_tokens).sum();
    let cached: usize = metas.iter().map(|m| m.cached_tokens).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion_tokens,
           "total_tokens": prompt + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

async fn respond(state: Arc<SimState>, parsed: Parsed, kind: Kind) -> Response {
    let env = Envelope {
        id: state.new_id(),
        created: state.now_secs(),
        model: parsed.model.clone().unwrap_or_else(|| state.args.served_model().to_owned()),
        kind,
    };
    if parsed.stream {
        return sse_response(move |tx| stream(state, parsed, env, tx));
    }
    let runs = match start_all(&state, &parsed.items).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let metas: Vec<Meta> = runs.iter().map(|r| r.meta).collect();
    let outputs = futures_util::future::join_all(
        runs.into_iter().map(|mut r| async move { r.collect().await }),
    )
    .await;
    let mut choices = Vec::with_capacity(outputs.len());
    let mut completion_tokens = 0;
    for (i, out) in outputs.into_iter().enumerate() {
        let tokens = match out {
            Ok(t) => t,
            Err(e) => return e.into_response(),
        };
        completion_tokens += tokens.len();
        let text: String = tokens.iter().map(|t| token_text(*t)).collect();
        choices.push(match kind {
            Kind::Completion => json!({"index": i, "text": text, "logprobs": null,
                                       "finish_reason": "length", "matched_stop": null}),
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": text,
                                  "reasoning_content": null, "tool_calls": null},
                                 "logprobs": null, "finish_reason": "length", "matched_stop": null}),
        });
    }
    Json(env.wrap(false, Value::Array(choices), usage(&metas, completion_tokens))).into_response()
}

async fn stream(state: Arc<SimState>, parsed: Parsed, env: Envelope, tx: SseTx) {
    let runs = match start_all(&state, &parsed.items).await {
        Ok(r) => r,
        Err(e) => return tx.error(&e).await,
    };
    let metas: Vec<Meta> = runs.iter().map(|r| r.meta).collect();
    if env.kind == Kind::Chat {
        let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": null, "finish_reason": null}]);
        if !tx.data(&env.wrap(true, first, Value::Null)).await {
            return;
        }
    }
    let mut completion_tokens = 0;
    let mut steps = merge(runs);
    while let Some((i, step)) = steps.next().await {
        if step.failed {
            return tx.error(&injected_error()).await;
        }
        completion_tokens += usize::from(step.token.is_some());
        let text = step.token.map(token_text).unwrap_or("");
        let finish = if step.finished { json!("length") } else { Value::Null };
        let choice = match env.kind {
            Kind::Completion => json!({"index": i, "text": text, "logprobs": null,
                                       "finish_reason": finish, "matched_stop": null}),
            Kind::Chat => json!({"index": i, "delta": {"content": text}, "logprobs": null,
                                 "finish_reason": finish, "matched_stop": null}),
        };
        let usage = match parsed.continuous_usage {
            true => usage(&metas, completion_tokens),
            false => Value::Null,
        };
        if !tx.data(&env.wrap(true, json!([choice]), usage)).await {
            return;
        }
    }
    if parsed.include_usage {
        tx.data(&env.wrap(true, json!([]), usage(&metas, completion_tokens))).await;
    }
    tx.done().await;
}

/// `/v1/embeddings`: `input` is a string, a list of strings, token ids or lists of token ids.
pub async fn embeddings(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let parsed = match state.admit("embeddings", &body, parse_embeddings).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let (inputs, model) = parsed;
    let mut data = Vec::with_capacity(inputs.len());
    let mut prompt_tokens = 0;
    for (i, tokens) in inputs.into_iter().enumerate() {
        prompt_tokens += tokens.len();
        let vector = embed(&tokens, state.args.embedding_dim);
        // Embedding models run a prefill and no decode.
        let job = Job {
            tokens,
            max_new_tokens: 0,
            prompt_text: None,
            plain_text: false,
            skip_prefill: false,
        };
        let mut events = state.engine.submit(job);
        while let Some(ev) = events.recv().await {
            if ev == super::engine::Event::Done {
                break;
            }
        }
        data.push(json!({"object": "embedding", "embedding": vector, "index": i}));
    }
    let model = model.unwrap_or_else(|| state.args.served_model().to_owned());
    Json(json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}))
    .into_response()
}

type EmbeddingInputs = (Vec<Vec<u32>>, Option<String>);

fn parse_embeddings(body: &Value, ctx: &super::request::Ctx) -> Result<EmbeddingInputs, String> {
    let input = body.get("input").ok_or("input is required")?;
    let one = |v: &Value| -> Result<Vec<u32>, String> {
        match v {
            Value::String(s) => Ok(ctx.tokenizer.encode(s)),
            Value::Array(ids) => ids
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or("token ids must be integers".to_owned())
                })
                .collect(),
            _ => Err("input must be a string, a list of strings or token ids".into()),
        }
    };
    let inputs = match input {
        Value::Array(a) if a.is_empty() => return Err("input must not be empty".into()),
        Value::Array(a) if a[0].is_string() || a[0].is_array() => {
            a.iter().map(one).collect::<Result<_, _>>()?
        }
        other => vec![one(other)?],
    };
    Ok((inputs, body.get("model").and_then(Value::as_str).map(str::to_owned)))
}

/// A deterministic unit vector for a token sequence.
fn embed(tokens: &[u32], dim: usize) -> Vec<f64> {
    let seed = tokens.iter().fold(7u64, |a, t| mix64(a ^ u64::from(*t)));
    let raw: Vec<f64> =
        (0..dim).map(|i| (mix64(seed ^ i as u64) % 2001) as f64 / 1000.0 - 1.0).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    raw.into_iter().map(|x| x / norm).collect()
}

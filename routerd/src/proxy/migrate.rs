//! Mid-stream failover: a stream its worker fails after bytes reached the client (the
//! connection closes or resets, an error event arrives, the stream falls silent past its idle
//! timeout) goes on with another worker, spliced into the same client stream.
//!
//! `Resume` follows the stream as the client sees it (the text and output ids so far, the token
//! counts, the ids of the answer), builds the continuation (the prompt plus what was generated,
//! with the length limits reduced by it: `/generate` `input_ids` + output ids, or text + text;
//! completions prompt + text; chat the conversation plus the partial assistant message with
//! SGLang's `continue_final_message`) and rewrites the continuation's events so that the client
//! reads one answer: the same `id`, cumulative fields continued, usage counting the whole
//! answer. Requests whose state cannot be continued (several choices, logprobs, grammar
//! constraints, tools, batches, `echo`) end as before, with one error event.
//!
//! SGLang's streaming `/generate` sends, per event, the whole text and `output_ids` so far, or
//! only the new ones with `--incremental-streaming-output`; `meta_info.completion_tokens`
//! counts all of them either way, which tells the two apart from the second event on.

use std::borrow::Cow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::extract::{Probe, Route};
use super::relay::sse::{Cutter, Verdict};
use super::relay::{self, Cut};
use super::usage::UsageScan;
use super::{Ask, Served};
use crate::app::{App, Live};
use crate::http1::head::Head;
use crate::http1::worker::WorkerResponse;
use crate::http1::ClientSession;
use crate::registry::{LoadGuard, Worker};

/// Why a request's stream cannot be continued elsewhere (for the metric and the log).
pub type Excluded = &'static str;

/// Whether `route`'s request can be continued if its stream fails, and how. `Err` names the
/// reason it cannot; streams that are not event streams never get here.
pub fn plan(route: Route, probe: &Probe, limit: u32) -> Result<Resume, Excluded> {
    if limit == 0 {
        return Err("disabled");
    }
    let set = |v: Option<&RawValue>| v.is_some_and(|v| v.get() != "null");
    let truthy = |v: Option<&RawValue>| v.is_some_and(|v| !matches!(v.get(), "null" | "false"));
    let several = |v: Option<&RawValue>| v.is_some_and(|v| !matches!(v.get(), "null" | "1"));
    if probe.batch_size(route).is_some() {
        return Err("excluded");
    }
    if several(probe.n) || several(probe.best_of) {
        return Err("excluded");
    }
    if probe.wants_logprob() || truthy(probe.logprobs) || set(probe.top_logprobs) {
        return Err("excluded");
    }
    let format = probe.response_format.is_some_and(|f| {
        serde_json::from_str::<Value>(f.get())
            .map(|f| !(f.is_null() || f["type"] == "text"))
            .unwrap_or(true)
    });
    if format || set(probe.regex) || set(probe.json_schema) || set(probe.ebnf) {
        return Err("excluded");
    }
    if set(probe.structural_tag) || truthy(probe.echo) {
        return Err("excluded");
    }
    let tools = probe.tools.is_some_and(|t| !matches!(t.get(), "null" | "[]"));
    if tools && probe.tool_choice.is_none_or(|c| c.get() != "\"none\"") {
        return Err("excluded");
    }
    if let Some(sp) = probe.sampling_params {
        // A list is a batch; constraints inside are grammars.
        let Ok(sp) = serde_json::from_str::<Map<String, Value>>(sp.get()) else {
            return Err("excluded");
        };
        let constrained = ["regex", "json_schema", "ebnf", "structural_tag"]
            .iter()
            .any(|k| sp.get(*k).is_some_and(|v| !v.is_null()));
        if constrained || sp.get("n").is_some_and(|n| n.as_u64().is_some_and(|n| n > 1)) {
            return Err("excluded");
        }
    }
    if route == Route::Completions && probe.prompt_string(route).is_none() {
        // A prompt of token ids: the stream carries text only, so there is nothing to append.
        return Err("excluded");
    }
    if route == Route::Embeddings {
        return Err("excluded");
    }
    let options = probe.stream_options.and_then(|o| serde_json::from_str::<Value>(o.get()).ok());
    let flag = |k: &str| options.as_ref().and_then(|o| o[k].as_bool()).unwrap_or(false);
    Ok(Resume {
        route,
        client_usage: flag("include_usage"),
        client_continuous: flag("continuous_usage_stats"),
        options,
        ..Resume::default()
    })
}

/// What becomes of a request's answer if its worker fails mid-stream, decided once at dispatch
/// and used by both request paths (regular and PD): nothing for a request that does not
/// stream, else the continuation to follow or why there can be none.
pub(crate) struct Plan(Option<Result<Resume, Excluded>>);

impl Plan {
    pub fn new(streaming: bool, route: Route, probe: &Probe, limit: u32) -> Self {
        Self(streaming.then(|| plan(route, probe, limit)))
    }

    /// The first worker's request body (`Resume::first_body`).
    pub fn first_body<'b>(&self, body: &'b [u8]) -> Cow<'b, [u8]> {
        match &self.0 {
            Some(Ok(r)) => r.first_body(body),
            _ => Cow::Borrowed(body),
        }
    }

    /// The continuation to relay an answer with, when the answer is a stream that began well
    /// (200, an event stream) and the request can be continued; once.
    pub fn take_for(&mut self, status: u16, events: bool) -> Option<Resume> {
        if status != 200 || !events || !matches!(self.0, Some(Ok(_))) {
            return None;
        }
        self.0.take().and_then(Result::ok)
    }

    /// Why a stream cut mid-way was not continued (`routerd_migrations_total`'s outcome).
    pub fn why_not(&self) -> Excluded {
        match &self.0 {
            Some(Err(why)) => why,
            _ => "excluded",
        }
    }
}

/// How a `/generate` stream carries text and ids.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not known before the second event (the first is the same either way).
    #[default]
    Unknown,
    /// Each event has everything so far (SGLang's default).
    Cumulative,
    /// Each event has what is new (`--incremental-streaming-output`).
    Incremental,
}

/// What the client was told before the current leg began.
#[derive(Debug, Default, Clone)]
struct Base {
    text: String,
    ids: Vec<u32>,
    tokens: u64,
}

/// One stream followed as the client sees it; see the module docs.
#[derive(Debug, Default)]
pub struct Resume {
    route: Route,
    /// The client asked for a usage chunk (`stream_options.include_usage`), or for usage in
    /// every chunk (`continuous_usage_stats`).
    client_usage: bool,
    client_continuous: bool,
    /// The client's `stream_options`.
    options: Option<Value>,
    text: String,
    ids: Vec<u32>,
    /// The stream carried output ids (a `/generate` input_ids prompt can then be continued).
    ids_seen: bool,
    /// Output tokens so far.
    tokens: u64,
    /// Usage carried the completion count (exact), rather than counted per chunk.
    counted_by_usage: bool,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    id: Option<String>,
    created: Option<Value>,
    model: Option<Value>,
    mode: Mode,
    events: u64,
    /// The answer's end was sent (a finish reason): nothing is left to generate.
    finished: bool,
    /// Something this stream carried cannot be continued (reasoning, tool calls).
    blocked: bool,
    /// Continuations begun.
    legs: u32,
    base: Base,
    /// When the current continuation was asked for (until its first event is relayed).
    seam_from: Option<Instant>,
    /// How long the last seam took, once its first event was relayed.
    pub seam: Option<std::time::Duration>,
}

#[derive(Deserialize)]
struct GenEvent<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    output_ids: Option<Vec<u32>>,
    #[serde(borrow, default)]
    meta_info: Option<GenMeta<'a>>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct GenMeta<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(borrow, default)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OaEvent<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    created: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Option<Vec<OaChoice<'a>>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OaChoice<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<OaDelta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OaDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

fn set(v: Option<&RawValue>) -> bool {
    v.is_some_and(|v| v.get() != "null")
}

/// The JSON object of an event's `data:` line, when it has one (an event of several lines
/// does not parse as one object, and is passed on as it is).
fn data_of(event: &[u8]) -> Option<&str> {
    let data = event.trim_ascii_start().strip_prefix(b"data:")?.trim_ascii();
    // Checked once here, so the parsers below need not check the strings they read.
    data.starts_with(b"{").then(|| std::str::from_utf8(data).ok()).flatten()
}

/// The message of an error event's `error` field.
fn error_message(error: &RawValue) -> String {
    let v: Value = serde_json::from_str(error.get()).unwrap_or(Value::Null);
    let m = v.get("message").and_then(Value::as_str).map(str::to_owned);
    format!("the worker sent an error event: {}", m.unwrap_or_else(|| error.get().to_owned()))
}

impl Resume {
    /// Continuations begun so far.
    pub fn legs(&self) -> u32 {
        self.legs
    }

    /// The first leg's body: an OpenAI stream whose client asked for usage is asked for usage
    /// in every chunk (`continuous_usage_stats`), so a continuation knows the exact counts; the
    /// client still gets usage only where it asked (`on_event` takes the rest out).
    pub fn first_body<'b>(&self, body: &'b [u8]) -> Cow<'b, [u8]> {
        if self.route == Route::Generate || !self.client_usage || self.client_continuous {
            return Cow::Borrowed(body);
        }
        let mut options = self.options.clone().unwrap_or_else(|| json!({}));
        options["continuous_usage_stats"] = json!(true);
        Cow::Owned(super::extract::append_fields(body, &format!("\"stream_options\":{options}")))
    }

    /// Whether the stream can be continued now; `Err` says why not.
    pub fn continuable(&self, limit: u32) -> Result<(), Excluded> {
        if self.finished || self.blocked {
            return Err("excluded");
        }
        if self.legs >= limit {
            return Err("limit");
        }
        Ok(())
    }

    /// Sees one whole event of the stream: observed on the first leg, rewritten into the
    /// client's one answer on a continuation. An error event is the worker failing.
    pub fn on_event(&mut self, event: &[u8]) -> Verdict {
        let Some(data) = data_of(event) else { return Verdict::Pass };
        if self.legs > 0 {
            return self.rewrite(data);
        }
        match self.route {
            Route::Generate => self.observe_generate(data),
            _ => self.observe_openai(data, event),
        }
    }

    fn observe_generate(&mut self, data: &str) -> Verdict {
        let Ok(ev) = serde_json::from_str::<GenEvent>(data) else { return Verdict::Pass };
        if let Some(e) = ev.error {
            return Verdict::Failed(error_message(e));
        }
        let meta = ev.meta_info.as_ref();
        self.follow_generate(GenUpdate {
            text: ev.text,
            output_ids: ev.output_ids,
            id: meta.and_then(|m| m.id.clone()),
            prompt_tokens: meta.and_then(|m| m.prompt_tokens),
            completion_tokens: meta.and_then(|m| m.completion_tokens),
            cached_tokens: meta.and_then(|m| m.cached_tokens),
            finished: meta.is_some_and(|m| set(m.finish_reason)),
        });
        Verdict::Pass
    }

    fn follow_generate(&mut self, ev: GenUpdate) {
        let tokens = ev.completion_tokens;
        if self.id.is_none() {
            self.id = ev.id.map(Cow::into_owned);
        }
        self.prompt_tokens = ev.prompt_tokens.or(self.prompt_tokens);
        self.cached_tokens = ev.cached_tokens.or(self.cached_tokens);
        self.finished |= ev.finished;
        if self.mode == Mode::Unknown && self.events > 0 {
            if let (Some(ids), Some(n)) = (&ev.output_ids, tokens) {
                self.mode =
                    if ids.len() as u64 >= n { Mode::Cumulative } else { Mode::Incremental };
            }
        }
        self.events += 1;
        if self.mode == Mode::Incremental {
            if let Some(t) = ev.text {
                self.text.push_str(&t);
            }
            if let Some(ids) = ev.output_ids {
                self.ids_seen = true;
                self.ids.extend(ids);
            }
        } else {
            if let Some(t) = ev.text {
                self.text = t.into_owned();
            }
            if let Some(ids) = ev.output_ids {
                self.ids_seen = true;
                self.ids = ids;
            }
        }
        self.tokens = tokens.unwrap_or(self.ids.len() as u64);
    }

    fn observe_openai(&mut self, data: &str, event: &[u8]) -> Verdict {
        let Ok(ev) = serde_json::from_str::<OaEvent>(data) else { return Verdict::Pass };
        if let Some(e) = ev.error {
            return Verdict::Failed(error_message(e));
        }
        let has_choices = ev.choices.as_ref().is_some_and(|c| !c.is_empty());
        let usage = ev.usage.filter(|u| u.get() != "null");
        self.follow_openai(&ev);
        // Usage the client did not ask for in this chunk (asked of the worker for the exact
        // counts) goes back to null.
        match usage {
            Some(u) if has_choices && !self.client_continuous => {
                let start = u.get().as_ptr() as usize - data.as_ptr() as usize;
                let offset = data.as_ptr() as usize - event.as_ptr() as usize;
                let (a, b) = (offset + start, offset + start + u.get().len());
                Verdict::Replace([&event[..a], b"null", &event[b..]].concat())
            }
            _ => Verdict::Pass,
        }
    }

    fn follow_openai(&mut self, ev: &OaEvent) {
        if self.id.is_none() {
            self.id = ev.id.as_ref().map(|s| s.to_string());
            self.created = ev.created.and_then(|c| serde_json::from_str(c.get()).ok());
            self.model = ev.model.and_then(|m| serde_json::from_str(m.get()).ok());
        }
        let mut produced = false;
        if let Some(choice) = ev.choices.as_ref().and_then(|c| c.first()) {
            let piece = match &choice.delta {
                Some(d) => {
                    let reasoning = d.reasoning_content.as_ref().is_some_and(|r| !r.is_empty());
                    self.blocked |= reasoning || set(d.tool_calls);
                    d.content.as_deref()
                }
                None => choice.text.as_deref(),
            };
            if let Some(p) = piece.filter(|p| !p.is_empty()) {
                self.text.push_str(p);
                produced = true;
            }
            self.finished |= set(choice.finish_reason);
        }
        // (A `null` is not parsed: a failed parse allocates its error.)
        let usage = ev
            .usage
            .filter(|u| u.get() != "null")
            .and_then(|u| serde_json::from_str::<Usage>(u.get()).ok());
        match usage.as_ref().and_then(|u| u.completion_tokens) {
            Some(n) => {
                self.counted_by_usage = true;
                self.tokens = n;
                let u = usage.as_ref().expect("read above");
                self.prompt_tokens = u.prompt_tokens.or(self.prompt_tokens);
                let cached = u.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens);
                self.cached_tokens = cached.or(self.cached_tokens);
            }
            // Without usage, one chunk is one decode step's output (SGLang's stream interval 1).
            None if produced && !self.counted_by_usage => self.tokens += 1,
            None => {}
        }
    }

    /// The request for the next leg: the original `body` with what was generated appended and
    /// the length limits reduced; `None` when nothing is left to generate.
    pub fn continuation(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut req: Map<String, Value> = serde_json::from_slice(body).ok()?;
        let n = self.tokens;
        let reduce = |req: &mut Map<String, Value>, key: &str| -> bool {
            match req.get(key).and_then(Value::as_u64) {
                Some(max) if max <= n => false,
                Some(max) => {
                    req.insert(key.into(), json!(max - n));
                    true
                }
                None => true,
            }
        };
        let lower = |req: &mut Map<String, Value>, key: &str| {
            if let Some(min) = req.get(key).and_then(Value::as_u64) {
                req.insert(key.into(), json!(min.saturating_sub(n)));
            }
        };
        match self.route {
            Route::Generate => {
                let sp = req.entry("sampling_params").or_insert_with(|| json!({}));
                let sp = sp.as_object_mut()?;
                if !reduce(sp, "max_new_tokens") {
                    return None;
                }
                lower(sp, "min_new_tokens");
                if let Some(Value::Array(ids)) = req.get_mut("input_ids") {
                    if !self.ids_seen && n > 0 {
                        return None;
                    }
                    ids.extend(self.ids.iter().map(|i| json!(i)));
                } else {
                    let text = req.get("text")?.as_str()?;
                    req.insert("text".into(), json!(format!("{text}{}", self.text)));
                }
            }
            Route::Completions | Route::Chat => {
                if !reduce(&mut req, "max_tokens") || !reduce(&mut req, "max_completion_tokens") {
                    return None;
                }
                lower(&mut req, "min_tokens");
                let options = json!({"include_usage": true, "continuous_usage_stats": true});
                req.insert("stream_options".into(), options);
                if self.route == Route::Completions {
                    let prompt = req.get("prompt")?.as_str()?;
                    req.insert("prompt".into(), json!(format!("{prompt}{}", self.text)));
                } else if !self.text.is_empty() {
                    let continued = req.get("continue_final_message") == Some(&json!(true));
                    let messages = req.get_mut("messages")?.as_array_mut()?;
                    let last = messages.last_mut().filter(|m| m["role"] == "assistant");
                    match last {
                        Some(m) if continued => extend_content(m, &self.text)?,
                        _ => messages.push(json!({"role": "assistant", "content": self.text})),
                    }
                    req.insert("continue_final_message".into(), json!(true));
                }
            }
            Route::Embeddings => return None,
        }
        req.insert("stream".into(), json!(true));
        serde_json::to_vec(&req).ok()
    }

    /// A continuation begins (its worker's failure was noticed at `noticed`): its events are
    /// rewritten from now on.
    pub fn begin_leg(&mut self, noticed: Instant) {
        self.legs += 1;
        self.base = Base { text: self.text.clone(), ids: self.ids.clone(), tokens: self.tokens };
        self.seam_from = Some(noticed);
        self.seam = None;
    }

    fn rewrite(&mut self, data: &str) -> Verdict {
        let Ok(mut v) = serde_json::from_str::<Value>(data) else { return Verdict::Pass };
        if let Some(e) = v.get("error") {
            let raw = serde_json::value::to_raw_value(e).expect("JSON value");
            return Verdict::Failed(error_message(&raw));
        }
        let keep = match self.route {
            Route::Generate => self.rewrite_generate(&mut v),
            _ => self.rewrite_openai(&mut v),
        };
        if !keep {
            return Verdict::Drop;
        }
        if let Some(from) = self.seam_from.take() {
            self.seam = Some(from.elapsed());
        }
        let json = serde_json::to_vec(&v).expect("JSON value");
        Verdict::Replace([&b"data: "[..], &json, b"\n\n"].concat())
    }

    fn rewrite_generate(&mut self, v: &mut Value) -> bool {
        let base = &self.base;
        let incremental = self.mode == Mode::Incremental;
        if let Some(meta) = v.get_mut("meta_info").and_then(Value::as_object_mut) {
            let own = meta.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
            meta.insert("completion_tokens".into(), json!(base.tokens + own));
            if let Some(p) = self.prompt_tokens {
                meta.insert("prompt_tokens".into(), json!(p));
            }
            if let Some(c) = self.cached_tokens {
                meta.insert("cached_tokens".into(), json!(c));
            }
            if let Some(id) = &self.id {
                meta.insert("id".into(), json!(id));
            }
            if let Some(Value::Object(f)) = meta.get_mut("finish_reason") {
                if let (Some("length"), Some(l)) =
                    (f.get("type").and_then(Value::as_str), f.get("length").and_then(Value::as_u64))
                {
                    f.insert("length".into(), json!(l + base.tokens));
                }
            }
        }
        if !incremental {
            if let Some(Value::String(t)) = v.get_mut("text") {
                t.insert_str(0, &base.text);
            }
            if let Some(Value::Array(ids)) = v.get_mut("output_ids") {
                let mut all: Vec<Value> = base.ids.iter().map(|i| json!(i)).collect();
                all.append(ids);
                *ids = all;
            }
        }
        // Followed as the first leg's events are: the rewritten event is the client's view.
        let meta = v.get("meta_info");
        let number = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_u64);
        let ids = v.get("output_ids").and_then(|i| serde_json::from_value(i.clone()).ok());
        self.follow_generate(GenUpdate {
            text: v.get("text").and_then(Value::as_str).map(Cow::Borrowed),
            output_ids: ids,
            id: None,
            prompt_tokens: number("prompt_tokens"),
            completion_tokens: number("completion_tokens"),
            cached_tokens: number("cached_tokens"),
            finished: meta.is_some_and(|m| !m["finish_reason"].is_null()),
        });
        true
    }

    fn rewrite_openai(&mut self, v: &mut Value) -> bool {
        let Some(obj) = v.as_object_mut() else { return true };
        let choice = obj.get("choices").and_then(Value::as_array).and_then(|c| c.first());
        let role_only = choice.is_some_and(|c| {
            c["delta"].get("role").is_some()
                && c["delta"]["content"].as_str().unwrap_or("").is_empty()
                && c["finish_reason"].is_null()
        });
        let final_usage = choice.is_none();
        if role_only && self.route == Route::Chat {
            // The continuation's opening chunk: the client had its own.
            return false;
        }
        if let Some(id) = &self.id {
            obj.insert("id".into(), json!(id));
        }
        if let Some(c) = &self.created {
            obj.insert("created".into(), c.clone());
        }
        if let Some(m) = &self.model {
            obj.insert("model".into(), m.clone());
        }
        // The whole answer's usage, from the continuation's.
        let own: Usage = obj
            .get("usage")
            .filter(|u| !u.is_null())
            .and_then(|u| serde_json::from_value(u.clone()).ok())
            .unwrap_or_default();
        let whole = own.completion_tokens.map(|c| {
            let completion = self.base.tokens + c;
            let prompt = self
                .prompt_tokens
                .unwrap_or_else(|| own.prompt_tokens.unwrap_or(0).saturating_sub(self.base.tokens));
            let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion});
            let cached = self
                .cached_tokens
                .or_else(|| own.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens));
            if let Some(c) = cached {
                u["prompt_tokens_details"] = json!({"cached_tokens": c.min(prompt)});
            }
            u
        });
        // Followed before the usage is stripped to what the client asked for.
        if let Some(u) = &whole {
            obj.insert("usage".into(), u.clone());
        }
        if let Ok(ev) = serde_json::to_string(&*obj) {
            if let Ok(parsed) = serde_json::from_str::<OaEvent>(&ev) {
                self.follow_openai(&parsed);
            }
        }
        match (final_usage, whole.is_some()) {
            (true, _) if !self.client_usage => return false,
            (false, true) if !self.client_continuous => {
                obj.insert("usage".into(), Value::Null);
            }
            _ => {}
        }
        true
    }
}

/// What one `/generate` event tells about the answer so far.
struct GenUpdate<'a> {
    text: Option<Cow<'a, str>>,
    output_ids: Option<Vec<u32>>,
    id: Option<Cow<'a, str>>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    finished: bool,
}

/// Appends `text` to a message's content (a string, or a list of parts).
fn extend_content(message: &mut Value, text: &str) -> Option<()> {
    match message.get_mut("content") {
        Some(Value::String(s)) => s.push_str(text),
        Some(Value::Array(parts)) => parts.push(json!({"type": "text", "text": text})),
        _ => message["content"] = json!(text),
    }
    Some(())
}

/// What a continuation needs of the request it continues.
pub(crate) struct Request<'a> {
    pub app: &'a App,
    pub live: &'a Live,
    pub head: &'a Head,
    /// The client's body as it came (continuations are built from it).
    pub body: &'a [u8],
    pub ask: &'a Ask<'a>,
    pub rid: (&'a HeaderName, &'a HeaderValue),
    pub deadline: Instant,
    pub keep: bool,
}

/// A worker's answer that is being relayed, with the worker's in-flight count held.
pub(crate) struct Leg {
    pub answer: WorkerResponse,
    pub worker: Arc<Worker>,
    pub guards: Vec<LoadGuard>,
    pub usage: Option<UsageScan>,
    /// The worker attempt's trace span (ends with the leg).
    pub span: crate::otel::Attempt,
}

/// Relays an event stream to the client and, each time its worker fails mid-way, goes on
/// with a continuation on another worker (up to `migration_limit` times). The client's head is
/// the first worker's.
pub(crate) async fn relay(
    r: &Request<'_>,
    c: &mut ClientSession,
    mut leg: Leg,
    extra: &[(&[u8], &[u8])],
    mut resume: Resume,
) -> Served {
    let cfg = &r.live.config;
    let limits = relay::BodyTimeouts { deadline: r.deadline, idle: cfg.server.stream_idle_timeout };
    let status = leg.answer.head().status();
    let keep = relay::begin(c, &leg.answer, extra, (r.head.version, r.keep));
    let mut tried: Vec<Arc<Worker>> = Vec::new();
    // A continuation's seam is yet to be counted in the histogram.
    let mut seam_open = false;
    loop {
        let mut filter = |e: &[u8]| resume.on_event(e);
        let mut cutter = Cutter::with_filter(&mut filter);
        let Leg { answer, worker, guards, mut usage, span } = leg;
        let pumped = relay::pump(answer, &worker, c, &mut cutter, &mut usage, limits).await;
        drop(usage);
        match &pumped {
            Ok(()) => span.ended("relayed"),
            Err(Cut::Worker(reason)) => span.failed(reason),
            Err(Cut::ClientGone) => span.ended("client_gone"),
            Err(Cut::Deadline) => span.ended("deadline"),
        }
        drop(span);
        let mut cutter = cutter.unfiltered();
        let noticed = Instant::now();
        if let (true, Some(seam)) = (std::mem::take(&mut seam_open), resume.seam) {
            r.app.metrics.migration_seam(seam);
        }
        let reason = match pumped {
            Ok(()) => {
                let done = relay::complete(c, true, keep, limits).await;
                return served(done, status, &worker, &resume);
            }
            Err(Cut::Worker(reason)) => reason,
            Err(cut) => {
                let done = relay::cut_short(c, &mut cutter, cut, &worker, true, keep).await;
                return served(done, status, &worker, &resume);
            }
        };
        worker.errors_total.fetch_add(1, Relaxed);
        super::failed(r.app, &worker, &cfg.circuit_breaker);
        worker.set_last_error(&reason);
        let why_not = match (cutter.done_seen(), cutter.mid_event()) {
            // The stream had said all it had: nothing to continue, nothing to count.
            (true, _) => Some(None),
            (false, true) => Some(Some("excluded")),
            (false, false) => resume.continuable(cfg.retry.migration_limit).err().map(Some),
        };
        if let Some(outcome) = why_not {
            if let Some(outcome) = outcome {
                r.app.metrics.migration(outcome);
            }
            let cut = Cut::Worker(reason);
            let mut done = relay::cut_short(c, &mut cutter, cut, &worker, true, keep).await;
            done.worker_failure = None;
            return served(done, status, &worker, &resume);
        }
        drop(guards);
        tracing::warn!(worker = worker.url(), error = %reason, tokens = resume.tokens,
                       "stream cut mid-way: continuing on another worker");
        tried.push(worker.clone());
        match continue_on(r, c, &resume, &tried).await {
            Ok(next) => {
                r.app.metrics.migration("continued");
                worker.retries_total.fetch_add(1, Relaxed);
                resume.begin_leg(noticed);
                seam_open = true;
                leg = next;
            }
            Err(Failed::ClientGone) => {
                let done = relay::cut_short(c, &mut cutter, Cut::ClientGone, &worker, true, keep);
                return served(done.await, status, &worker, &resume);
            }
            Err(Failed::Outcome(outcome, why)) => {
                r.app.metrics.migration(outcome);
                tracing::warn!(error = %why, "no continuation: the stream ends here");
                let cut = Cut::Worker(reason);
                let mut done = relay::cut_short(c, &mut cutter, cut, &worker, true, keep).await;
                done.worker_failure = None;
                return served(done, status, &worker, &resume);
            }
        }
    }
}

fn served(done: relay::Relayed, status: u16, worker: &Arc<Worker>, resume: &Resume) -> Served {
    let mut s = Served::relayed(done, status, worker);
    s.migrations = resume.legs;
    s.seam = resume.seam;
    s
}

pub(crate) enum Failed {
    ClientGone,
    /// The metric's outcome, and why.
    Outcome(&'static str, String),
}

/// Sends the continuation to another worker (or PD pair) and waits for its stream's head: as
/// a retry does, up to `max_retries` attempts, each one withdrawn from the retry budget.
async fn continue_on(
    r: &Request<'_>,
    c: &mut ClientSession,
    resume: &Resume,
    tried: &[Arc<Worker>],
) -> Result<Leg, Failed> {
    let cfg = &r.live.config;
    let Some(body) = resume.continuation(r.body) else {
        return Err(Failed::Outcome("excluded", "nothing is left to generate".into()));
    };
    let mut avoid = tried.to_vec();
    let ask = Ask { migration: resume.legs + 1, ..*r.ask };
    let attempts = if cfg.retry.enabled { cfg.retry.max_retries + 1 } else { 1 };
    let mut last = String::from("no attempt");
    for attempt in 0..attempts {
        if Instant::now() >= r.deadline {
            return Err(Failed::Outcome("failed", "the request deadline passed".into()));
        }
        if !r.app.retry_budget.withdraw(&cfg.retry) {
            return Err(Failed::Outcome("budget", "the retry budget is spent".into()));
        }
        let got = match &r.live.pools {
            Some(pools) => {
                super::pd::continuation(r, pools, c, &ask, &body, &mut avoid, attempt).await
            }
            None => regular(r, c, &ask, &body, &mut avoid, attempt).await,
        };
        match got {
            Ok(leg) => return Ok(leg),
            Err(Failed::Outcome("no_worker", why)) if attempt == 0 => {
                return Err(Failed::Outcome("no_worker", why))
            }
            Err(Failed::Outcome(_, why)) => last = why,
            Err(gone) => return Err(gone),
        }
        r.app.metrics.retried();
    }
    Err(Failed::Outcome("failed", last))
}

/// One continuation attempt on a regular worker not tried yet.
async fn regular(
    r: &Request<'_>,
    c: &mut ClientSession,
    ask: &Ask<'_>,
    body: &[u8],
    avoid: &mut Vec<Arc<Worker>>,
    attempt: u32,
) -> Result<Leg, Failed> {
    let cfg = &r.live.config;
    let snap = r.app.registry.load();
    let picked = super::pick(r.app, "regular", &snap.workers, &*r.live.policy, ask, avoid)
        .ok_or_else(|| Failed::Outcome("no_worker", "no other worker is routable".into()))?;
    drop(snap);
    let worker = picked.worker;
    let guard = worker.start_request();
    let mut request = Vec::with_capacity(body.len() + 256);
    let span = ask.trace.attempt(&worker, attempt, ask.migration);
    let (path, tp) = (ask.route.path(), span.traceparent());
    super::write_request(&mut request, &worker, path, &r.head.headers, r.rid, tp, body);
    let timeouts = (cfg.server.connect_timeout, cfg.server.header_timeout);
    avoid.push(worker.clone());
    let answer = match super::send(&worker, &request, Some(c), timeouts, r.deadline).await {
        Ok(a) => {
            span.answered(a.head().status());
            a
        }
        Err(super::Stop::Closed) => return Err(Failed::ClientGone),
        Err(super::Stop::Failed(e)) => {
            span.failed(&e);
            worker.errors_total.fetch_add(1, Relaxed);
            super::failed(r.app, &worker, &cfg.circuit_breaker);
            worker.set_last_error(&e);
            return Err(Failed::Outcome("failed", e.to_string()));
        }
    };
    let usage = worker.clone();
    accept(r.app, answer, worker, vec![guard], usage, span, &cfg.circuit_breaker)
}

/// A continuation's answer is used when it is a stream that began well (the engine's usage
/// figures are credited to `usage_of`: the worker itself, or a PD pair's prefill worker).
pub(crate) fn accept(
    app: &App,
    answer: WorkerResponse,
    worker: Arc<Worker>,
    guards: Vec<LoadGuard>,
    usage_of: Arc<Worker>,
    span: crate::otel::Attempt,
    breaker: &crate::config::BreakerConfig,
) -> Result<Leg, Failed> {
    let status = answer.head().status();
    if status == 200 && answer.head().is_event_stream() && answer.check_buffered().is_ok() {
        worker.breaker.record_success(breaker);
        let usage = Some(UsageScan::new(usage_of, true));
        return Ok(Leg { answer, worker, guards, usage, span });
    }
    span.failed(&format!("answered the continuation with {status}"));
    if status >= 500 {
        worker.errors_total.fetch_add(1, Relaxed);
        super::failed(app, &worker, breaker);
        worker.set_last_error(format!("answered {status}"));
    }
    Err(Failed::Outcome(
        "failed",
        format!("{} answered the continuation with {status}", worker.url()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(route: Route, body: &str) -> Result<Resume, Excluded> {
        plan(route, &super::super::extract::probe(body.as_bytes()).unwrap(), 1)
    }

    fn feed(r: &mut Resume, events: &[Value]) -> Vec<Option<Value>> {
        events
            .iter()
            .map(|e| match r.on_event(format!("data: {e}\n\n").as_bytes()) {
                Verdict::Pass => Some(e.clone()),
                Verdict::Replace(b) => {
                    Some(serde_json::from_slice(b.strip_prefix(b"data: ").unwrap()).unwrap())
                }
                Verdict::Drop => None,
                Verdict::Failed(why) => panic!("failed: {why}"),
            })
            .collect()
    }

    fn gen(text: &str, ids: &[u32], n: u64) -> Value {
        json!({"text": text, "output_ids": ids,
               "meta_info": {"id": "x", "prompt_tokens": 5, "cached_tokens": 2,
                             "completion_tokens": n, "finish_reason": null}})
    }

    #[test]
    fn what_cannot_be_continued_is_named() {
        for (route, body) in [
            (Route::Generate, r#"{"text": ["a", "b"], "stream": true}"#),
            (Route::Generate, r#"{"text": "a", "return_logprob": true}"#),
            (Route::Generate, r#"{"text": "a", "sampling_params": {"json_schema": "{}"}}"#),
            (Route::Completions, r#"{"prompt": "a", "n": 2}"#),
            (Route::Completions, r#"{"prompt": [1, 2, 3]}"#),
            (Route::Completions, r#"{"prompt": "a", "echo": true}"#),
            (Route::Chat, r#"{"messages": [], "logprobs": true}"#),
            (Route::Chat, r#"{"messages": [], "response_format": {"type": "json_object"}}"#),
            (Route::Chat, r#"{"messages": [], "tools": [{"type": "function"}]}"#),
        ] {
            assert_eq!(resume(route, body).err(), Some("excluded"), "{body}");
        }
        for (route, body) in [
            (Route::Generate, r#"{"input_ids": [1, 2], "sampling_params": {"temperature": 0}}"#),
            (Route::Chat, r#"{"messages": [], "n": 1, "response_format": {"type": "text"}}"#),
            (Route::Chat, r#"{"messages": [], "tools": [{}], "tool_choice": "none"}"#),
        ] {
            assert!(resume(route, body).is_ok(), "{body}");
        }
        let probe = super::super::extract::probe(b"{\"text\": \"a\"}").unwrap();
        assert_eq!(plan(Route::Generate, &probe, 0).err(), Some("disabled"));
    }

    #[test]
    fn generate_continues_text_and_ids_and_rewrites_cumulative_events() {
        let mut r = resume(Route::Generate, r#"{"text": "Hi", "stream": true}"#).unwrap();
        feed(&mut r, &[gen(" a", &[7], 1), gen(" a b", &[7, 8], 2)]);
        let body = r#"{"text": "Hi", "stream": true, "sampling_params": {"max_new_tokens": 5}}"#;
        let next: Value =
            serde_json::from_slice(&r.continuation(body.as_bytes()).unwrap()).unwrap();
        assert_eq!(next["text"], "Hi a b");
        assert_eq!(next["sampling_params"]["max_new_tokens"], 3);
        r.begin_leg(Instant::now());
        let mut own = gen(" c", &[9], 1);
        own["meta_info"]["id"] = json!("other");
        own["meta_info"]["prompt_tokens"] = json!(7);
        own["meta_info"]["finish_reason"] = json!({"type": "length", "length": 3});
        let out = feed(&mut r, &[own]).pop().unwrap().unwrap();
        assert_eq!(out["text"], " a b c");
        assert_eq!(out["output_ids"], json!([7, 8, 9]));
        assert_eq!(out["meta_info"]["id"], "x");
        assert_eq!(out["meta_info"]["prompt_tokens"], 5);
        assert_eq!(out["meta_info"]["completion_tokens"], 3);
        assert_eq!(out["meta_info"]["finish_reason"]["length"], 5);
        assert!(r.continuable(5).is_err(), "finished: nothing to continue");

        let body = r#"{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}"#;
        let mut r = resume(Route::Generate, body).unwrap();
        feed(&mut r, &[gen(" a", &[7], 1), gen(" a b", &[7, 8], 2)]);
        assert!(r.continuation(body.as_bytes()).is_none(), "the length limit is reached");
        let body = r#"{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}}"#;
        let next: Value =
            serde_json::from_slice(&r.continuation(body.as_bytes()).unwrap()).unwrap();
        assert_eq!(next["input_ids"], json!([1, 2, 7, 8]));
    }

    #[test]
    fn incremental_generate_events_are_told_apart_and_left_as_they_are() {
        let mut r = resume(Route::Generate, r#"{"text": "Hi"}"#).unwrap();
        feed(&mut r, &[gen(" a", &[7], 1), gen(" b", &[8], 2), gen(" c", &[9], 3)]);
        assert_eq!(
            (r.text.as_str(), r.ids.clone(), r.mode),
            (" a b c", vec![7, 8, 9], Mode::Incremental)
        );
        r.begin_leg(Instant::now());
        let out = feed(&mut r, &[gen(" d", &[10], 1)]).pop().unwrap().unwrap();
        assert_eq!((out["text"].clone(), out["output_ids"].clone()), (json!(" d"), json!([10])));
        assert_eq!(out["meta_info"]["completion_tokens"], 4);
    }

    #[test]
    fn chat_continues_the_assistant_message_and_counts_the_whole_usage() {
        let body = r#"{"messages": [{"role": "user", "content": "q"}], "max_tokens": 10,
                       "stream": true, "stream_options": {"include_usage": true}}"#;
        let mut r = resume(Route::Chat, body).unwrap();
        let first = r.first_body(body.as_bytes());
        let sent: Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(
            sent["stream_options"],
            json!({"include_usage": true, "continuous_usage_stats": true})
        );
        let chunk = |content: &str, usage: Value| {
            json!({"id": "c1", "created": 1, "model": "m", "usage": usage,
                   "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
        };
        let u = |c: u64| json!({"prompt_tokens": 4, "completion_tokens": c, "prompt_tokens_details": {"cached_tokens": 3}});
        let out = feed(&mut r, &[chunk(" a", u(1)), chunk(" b", u(2))]);
        assert!(
            out.iter().all(|e| e.as_ref().unwrap()["usage"].is_null()),
            "usage the client did not ask for per chunk"
        );
        let next: Value =
            serde_json::from_slice(&r.continuation(body.as_bytes()).unwrap()).unwrap();
        assert_eq!(next["messages"][1], json!({"role": "assistant", "content": " a b"}));
        assert_eq!(
            (next["continue_final_message"].clone(), next["max_tokens"].clone()),
            (json!(true), json!(8))
        );
        r.begin_leg(Instant::now());
        let role = json!({"id": "c2", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
        let end = json!({"id": "c2", "choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 8,
                         "prompt_tokens_details": {"cached_tokens": 0}}});
        let mut cont = chunk(" c", json!({"prompt_tokens": 6, "completion_tokens": 1}));
        cont["id"] = json!("c2");
        let out = feed(&mut r, &[role, cont, end]);
        assert!(out[0].is_none(), "the continuation's opening chunk is dropped");
        let c = out[1].as_ref().unwrap();
        assert_eq!((c["id"].clone(), c["usage"].clone()), (json!("c1"), Value::Null));
        let end = out[2].as_ref().unwrap();
        assert_eq!(
            end["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14,
                                        "prompt_tokens_details": {"cached_tokens": 3}})
        );
    }

    #[test]
    fn a_second_continuation_carries_what_every_leg_produced() {
        let body = r#"{"prompt": "P", "max_tokens": 10, "stream": true}"#;
        let mut r = resume(Route::Completions, body).unwrap();
        let chunk = |t: &str| json!({"id": "c", "choices": [{"index": 0, "text": t, "finish_reason": null}]});
        feed(&mut r, &[chunk(" a")]);
        r.begin_leg(Instant::now());
        feed(&mut r, &[chunk(" b")]);
        let next: Value =
            serde_json::from_slice(&r.continuation(body.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            (next["prompt"].clone(), next["max_tokens"].clone()),
            (json!("P a b"), json!(8))
        );
    }

    #[test]
    fn an_error_event_is_the_worker_failing() {
        let mut r = resume(Route::Completions, r#"{"prompt": "a"}"#).unwrap();
        let v = r.on_event(b"data: {\"error\": {\"message\": \"boom\", \"code\": 500}}\n\n");
        assert!(matches!(v, Verdict::Failed(m) if m.contains("boom")));
        assert!(matches!(r.on_event(b"data: [DONE]\n\n"), Verdict::Pass));
        assert!(matches!(r.on_event(b": keep-alive\n\n"), Verdict::Pass));
    }
}

//! Parses the inference requests a SGLang server accepts (`/generate`, `/v1/completions`,
//! `/v1/chat/completions`) into one shape: a list of sequences to generate, with their PD
//! bootstrap fields. Anything malformed is a 400 with SGLang's error body.

use serde_json::Value;

use super::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub host: String,
    pub port: Option<u16>,
    pub room: u64,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub tokens: Vec<u32>,
    pub text: Option<String>,
    /// `text` is encoded without special tokens added (a rendered chat template).
    pub plain_text: bool,
    pub max_new_tokens: u32,
    pub return_logprob: bool,
    pub rid: Option<String>,
    pub bootstrap: Option<Bootstrap>,
}

#[derive(Debug, Clone)]
pub struct Parsed {
    pub items: Vec<Item>,
    /// The request was a batch (arrays in, an array out).
    pub batched: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats`: usage in every chunk.
    pub continuous_usage: bool,
    pub dp_rank: Option<u32>,
    pub model: Option<String>,
}

pub type ParseResult<T> = Result<T, String>;

/// Defaults a parser needs from the worker.
pub struct Ctx<'a> {
    pub tokenizer: &'a Tokenizer,
    /// The request body as received (a chat template renders its raw fields).
    pub body: &'a [u8],
    pub default_max_new_tokens: u32,
    pub context_length: usize,
    pub dp_size: u32,
}

pub fn parse_generate(body: &Value, ctx: &Ctx) -> ParseResult<Parsed> {
    let obj = body.as_object().ok_or("request body must be a JSON object")?;
    let (prompts, batched) = match (obj.get("text"), obj.get("input_ids")) {
        (Some(t), None) => texts(t, "text")?,
        (None, Some(ids)) => token_lists(ids, "input_ids")?,
        (Some(_), Some(_)) => {
            return Err("Either text or input_ids should be provided, not both".into())
        }
        (None, None) => return Err("Either text or input_ids should be provided".into()),
    };
    let n = prompts.len();
    let params = per_item(obj.get("sampling_params"), n, batched, "sampling_params")?;
    let logprob = per_item(obj.get("return_logprob"), n, batched, "return_logprob")?;
    let rids = per_item(obj.get("rid"), n, batched, "rid")?;
    let boots = bootstraps(obj, n, batched)?;
    let mut items = Vec::with_capacity(n);
    for (i, prompt) in prompts.into_iter().enumerate() {
        let max_new_tokens = match params[i].as_ref().and_then(|p| p.get("max_new_tokens")) {
            None | Some(Value::Null) => ctx.default_max_new_tokens,
            Some(v) => as_u32(v, "sampling_params.max_new_tokens")?,
        };
        items.push(make_item(
            prompt,
            ctx,
            max_new_tokens,
            &logprob[i],
            &rids[i],
            boots[i].clone(),
        )?);
    }
    Ok(Parsed {
        items,
        batched,
        stream: flag(obj.get("stream"), "stream")?,
        include_usage: false,
        continuous_usage: false,
        dp_rank: dp_rank(obj, ctx)?,
        model: None,
    })
}

pub fn parse_completions(body: &Value, ctx: &Ctx) -> ParseResult<Parsed> {
    let obj = body.as_object().ok_or("request body must be a JSON object")?;
    let prompt = obj.get("prompt").ok_or("prompt is required")?;
    let (prompts, batched) = match prompt {
        Value::String(_) => texts(prompt, "prompt")?,
        Value::Array(a) if a.first().is_some_and(Value::is_string) => texts(prompt, "prompt")?,
        Value::Array(_) => token_lists(prompt, "prompt")?,
        _ => return Err("prompt must be a string, a list of strings or token ids".into()),
    };
    let max_new_tokens = openai_max_tokens(obj, ctx)?;
    let logprobs =
        !matches!(obj.get("logprobs"), None | Some(Value::Null) | Some(Value::Bool(false)));
    let boots = bootstraps(obj, prompts.len(), batched)?;
    let items = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            make_item(p, ctx, max_new_tokens, &Some(Value::Bool(logprobs)), &None, boots[i].clone())
        })
        .collect::<ParseResult<Vec<_>>>()?;
    openai_parsed(obj, items, batched, ctx)
}

pub fn parse_chat(body: &Value, ctx: &Ctx) -> ParseResult<Parsed> {
    let obj = body.as_object().ok_or("request body must be a JSON object")?;
    let messages =
        obj.get("messages").and_then(Value::as_array).ok_or("messages must be a list")?;
    if messages.is_empty() {
        return Err("messages must not be empty".into());
    }
    let prompt = match ctx.tokenizer.chat_prompt(ctx.body) {
        Some(text) => Prompt::Rendered(text?),
        None => Prompt::Text(render_chat_request(obj, messages)?),
    };
    let max_new_tokens = openai_max_tokens(obj, ctx)?;
    let logprobs = flag(obj.get("logprobs"), "logprobs")?;
    let boot = bootstraps(obj, 1, false)?.pop().flatten();
    let item = make_item(prompt, ctx, max_new_tokens, &Some(Value::Bool(logprobs)), &None, boot)?;
    openai_parsed(obj, vec![item], false, ctx)
}

/// The simulated chat template applied as SGLang applies a real one: with
/// `continue_final_message`, a last assistant message is taken out, the rest rendered with the
/// generation prompt, and its content appended (so the answer continues it).
pub fn render_chat_request(
    obj: &serde_json::Map<String, Value>,
    messages: &[Value],
) -> ParseResult<String> {
    let continued = flag(obj.get("continue_final_message"), "continue_final_message")?;
    let last =
        messages.last().filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    match last {
        Some(m) if continued => {
            let mut out = render_chat(&messages[..messages.len() - 1])?;
            out.push_str(&content_text(m, messages.len() - 1)?);
            Ok(out)
        }
        _ => render_chat(messages),
    }
}

fn content_text(m: &Value, i: usize) -> ParseResult<String> {
    let mut out = String::new();
    match m.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        Some(_) => {
            return Err(format!("messages[{i}].content must be a string or a list of parts"))
        }
    }
    Ok(out)
}

/// The simulated chat template: every message as `<|role|>\ncontent<|end|>\n`, then the
/// assistant's header. A conversation's next turn extends the previous turn's prompt plus
/// answer, as with real templates, so multi-turn traffic hits the prefix cache.
pub fn render_chat(messages: &[Value]) -> ParseResult<String> {
    let mut out = String::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("messages[{i}].role must be a string"))?;
        out.push_str("<|");
        out.push_str(role);
        out.push_str("|>\n");
        out.push_str(&content_text(m, i)?);
        out.push_str("<|end|>\n");
    }
    out.push_str("<|assistant|>\n");
    Ok(out)
}

enum Prompt {
    Text(String),
    /// A chat template's rendering: encoded without special tokens added.
    Rendered(String),
    Ids(Vec<u32>),
}

fn make_item(
    prompt: Prompt,
    ctx: &Ctx,
    max_new_tokens: u32,
    logprob: &Option<Value>,
    rid: &Option<Value>,
    bootstrap: Option<Bootstrap>,
) -> ParseResult<Item> {
    let plain_text = matches!(prompt, Prompt::Rendered(_));
    let (tokens, text) = match prompt {
        Prompt::Text(t) => (ctx.tokenizer.encode(&t), Some(t)),
        Prompt::Rendered(t) => (ctx.tokenizer.encode_plain(&t), Some(t)),
        Prompt::Ids(ids) => (ids, None),
    };
    if tokens.len() + max_new_tokens as usize > ctx.context_length {
        return Err(format!(
            "Requested token count exceeds the model's maximum context length of {} tokens. \
             You requested a total of {} tokens: {} tokens from the input messages and {} tokens \
             for the completion. Please reduce the number of tokens in the input messages or the \
             completion to fit within the limit.",
            ctx.context_length,
            tokens.len() + max_new_tokens as usize,
            tokens.len(),
            max_new_tokens
        ));
    }
    let rid = match rid {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("rid must be a string".into()),
    };
    Ok(Item {
        tokens,
        text,
        plain_text,
        max_new_tokens,
        return_logprob: flag(logprob.as_ref(), "return_logprob")?,
        rid,
        bootstrap,
    })
}

fn texts(v: &Value, name: &str) -> ParseResult<(Vec<Prompt>, bool)> {
    match v {
        Value::String(s) => Ok((vec![Prompt::Text(s.clone())], false)),
        Value::Array(a) if !a.is_empty() => {
            let mut out = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                out.push(Prompt::Text(
                    x.as_str().ok_or_else(|| format!("{name}[{i}] must be a string"))?.to_owned(),
                ));
            }
            Ok((out, true))
        }
        _ => Err(format!("{name} must be a string or a non-empty list of strings")),
    }
}

fn token_lists(v: &Value, name: &str) -> ParseResult<(Vec<Prompt>, bool)> {
    let a = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("{name} must be a non-empty list"))?;
    if a[0].is_array() {
        let mut out = Vec::with_capacity(a.len());
        for (i, x) in a.iter().enumerate() {
            out.push(Prompt::Ids(ids(x, &format!("{name}[{i}]"))?));
        }
        Ok((out, true))
    } else {
        Ok((vec![Prompt::Ids(ids(v, name)?)], false))
    }
}

fn ids(v: &Value, name: &str) -> ParseResult<Vec<u32>> {
    let a = v.as_array().ok_or_else(|| format!("{name} must be a list of token ids"))?;
    a.iter().map(|x| as_u32(x, name)).collect()
}

fn as_u32(v: &Value, name: &str) -> ParseResult<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{name} must be a non-negative integer"))
}

fn flag(v: Option<&Value>, name: &str) -> ParseResult<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("{name} must be a boolean")),
    }
}

/// A field given once for the whole batch or as a list with one entry per item.
fn per_item(
    v: Option<&Value>,
    n: usize,
    batched: bool,
    name: &str,
) -> ParseResult<Vec<Option<Value>>> {
    match v {
        None | Some(Value::Null) => Ok(vec![None; n]),
        Some(Value::Array(a)) if batched => {
            if a.len() != n {
                return Err(format!("{name} has {} entries for a batch of {n}", a.len()));
            }
            Ok(a.iter().cloned().map(Some).collect())
        }
        Some(x) => Ok(vec![Some(x.clone()); n]),
    }
}

fn bootstraps(
    obj: &serde_json::Map<String, Value>,
    n: usize,
    batched: bool,
) -> ParseResult<Vec<Option<Bootstrap>>> {
    let Some(room) = obj.get("bootstrap_room").filter(|v| !v.is_null()) else {
        return Ok(vec![None; n]);
    };
    let rooms = per_item(Some(room), n, batched, "bootstrap_room")?;
    let hosts = per_item(obj.get("bootstrap_host"), n, batched, "bootstrap_host")?;
    let ports = per_item(obj.get("bootstrap_port"), n, batched, "bootstrap_port")?;
    (0..n)
        .map(|i| {
            let room = rooms[i]
                .as_ref()
                .and_then(Value::as_u64)
                .ok_or("bootstrap_room must be an integer")?;
            let host = match &hosts[i] {
                Some(Value::String(h)) => h.clone(),
                _ => {
                    return Err("bootstrap_host must be a string when bootstrap_room is set".into())
                }
            };
            let port = match &ports[i] {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or("bootstrap_port must be a port or null")?,
                ),
            };
            Ok(Some(Bootstrap { host, port, room }))
        })
        .collect()
}

fn dp_rank(obj: &serde_json::Map<String, Value>, ctx: &Ctx) -> ParseResult<Option<u32>> {
    match obj.get("data_parallel_rank") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let rank = as_u32(v, "data_parallel_rank")?;
            if rank >= ctx.dp_size {
                return Err(format!(
                    "data_parallel_rank {rank} is out of range for dp_size {}",
                    ctx.dp_size
                ));
            }
            Ok(Some(rank))
        }
    }
}

fn openai_max_tokens(obj: &serde_json::Map<String, Value>, ctx: &Ctx) -> ParseResult<u32> {
    match obj.get("max_completion_tokens").or(obj.get("max_tokens")) {
        None | Some(Value::Null) => Ok(ctx.default_max_new_tokens),
        Some(v) => as_u32(v, "max_tokens"),
    }
}

fn openai_parsed(
    obj: &serde_json::Map<String, Value>,
    items: Vec<Item>,
    batched: bool,
    ctx: &Ctx,
) -> ParseResult<Parsed> {
    let option = |key: &str| {
        let v = obj.get("stream_options").and_then(|o| o.get(key));
        flag(v, &format!("stream_options.{key}"))
    };
    let (include_usage, continuous_usage) =
        (option("include_usage")?, option("continuous_usage_stats")?);
    Ok(Parsed {
        items,
        batched,
        stream: flag(obj.get("stream"), "stream")?,
        include_usage,
        continuous_usage,
        dp_rank: dp_rank(obj, ctx)?,
        model: obj.get("model").and_then(Value::as_str).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(t: &Tokenizer) -> Ctx<'_> {
        Ctx { tokenizer: t, body: b"", default_max_new_tokens: 16, context_length: 100, dp_size: 2 }
    }

    #[test]
    fn generate_single_and_batch() {
        let t = Tokenizer::new(4);
        let p = parse_generate(
            &json!({"text": "hello world", "sampling_params": {"max_new_tokens": 3}}),
            &ctx(&t),
        )
        .unwrap();
        assert!(!p.batched);
        assert_eq!(p.items[0].max_new_tokens, 3);
        assert_eq!(p.items[0].tokens.len(), 3);
        let p = parse_generate(
            &json!({"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}],
                    "bootstrap_host": ["h", "h"], "bootstrap_port": [1, null], "bootstrap_room": [5, 6]}),
            &ctx(&t),
        )
        .unwrap();
        assert!(p.batched);
        assert_eq!(p.items[1].max_new_tokens, 2);
        assert_eq!(p.items[1].bootstrap, Some(Bootstrap { host: "h".into(), port: None, room: 6 }));
        let p = parse_generate(&json!({"input_ids": [[1, 2], [3]]}), &ctx(&t)).unwrap();
        assert_eq!(p.items[1].tokens, vec![3]);
        assert_eq!(p.items[0].max_new_tokens, 16);
    }

    #[test]
    fn generate_errors_name_the_field() {
        let t = Tokenizer::new(4);
        for (body, want) in [
            (json!({}), "Either text or input_ids"),
            (json!({"text": 5}), "text must be"),
            (json!({"input_ids": [1, -1]}), "input_ids must be a non-negative integer"),
            (json!({"text": "x", "stream": "yes"}), "stream must be a boolean"),
            (json!({"text": ["a", "b"], "sampling_params": [{}]}), "sampling_params has 1 entries"),
            (json!({"text": "x", "bootstrap_room": 1}), "bootstrap_host must be a string"),
            (json!([1]), "JSON object"),
            (
                json!({"input_ids": [1], "sampling_params": {"max_new_tokens": 100}}),
                "maximum context length of 100",
            ),
            (json!({"text": "x", "data_parallel_rank": 2}), "out of range for dp_size 2"),
        ] {
            let err = parse_generate(&body, &ctx(&t)).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn chat_renders_whole_conversation() {
        let t = Tokenizer::new(4);
        let msgs = json!({"messages": [{"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Q"}]}], "max_tokens": 2});
        let p = parse_chat(&msgs, &ctx(&t)).unwrap();
        assert_eq!(
            p.items[0].text.as_deref(),
            Some("<|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n")
        );
        assert_eq!(p.items[0].max_new_tokens, 2);
    }

    #[test]
    fn completions_prompt_forms() {
        let t = Tokenizer::new(4);
        assert!(!parse_completions(&json!({"prompt": "x"}), &ctx(&t)).unwrap().batched);
        assert_eq!(
            parse_completions(&json!({"prompt": ["x", "y"]}), &ctx(&t)).unwrap().items.len(),
            2
        );
        assert_eq!(
            parse_completions(&json!({"prompt": [1, 2, 3]}), &ctx(&t)).unwrap().items[0].tokens,
            vec![1, 2, 3]
        );
        let p = parse_completions(
            &json!({"prompt": "x", "stream": true, "stream_options": {"include_usage": true}}),
            &ctx(&t),
        )
        .unwrap();
        assert!(p.stream && p.include_usage);
    }
}

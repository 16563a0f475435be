//! Reads what routing needs from a request body without building a JSON tree or
//! re-serialising anything: the body is forwarded byte for byte. Parsing also rejects bodies
//! that are not a JSON object (400) before a worker is bothered.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::RouterError;

/// The inference routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    #[default]
    Generate,
    Completions,
    Chat,
    Embeddings,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Generate => "/generate",
            Route::Completions => "/v1/completions",
            Route::Chat => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
        }
    }
}

/// The fields of any inference body that routing looks at; everything else is skipped.
#[derive(Debug, Deserialize)]
pub struct Probe<'a> {
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_ids: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(borrow, default)]
    return_logprob: Option<&'a RawValue>,
    // What a chat template renders besides the messages.
    #[serde(borrow, default)]
    pub(crate) tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) tool_choice: Option<&'a RawValue>,
    #[serde(borrow, default)]
    continue_final_message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    chat_template_kwargs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning_effort: Option<&'a RawValue>,
    /// What decides whether a stream can be continued on another worker (`migrate`).
    #[serde(borrow, default)]
    pub(crate) n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) best_of: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) logprobs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) top_logprobs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) response_format: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) regex: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) json_schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) ebnf: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) structural_tag: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) echo: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) sampling_params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) stream_options: Option<&'a RawValue>,
}

pub fn probe(body: &[u8]) -> Result<Probe<'_>, RouterError> {
    if body.is_empty() {
        return Err(RouterError::BadRequest("the body is empty; a JSON object is expected".into()));
    }
    // Derived struct visitors also accept a JSON array (as a field sequence): insist on an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(RouterError::BadRequest("the body must be a JSON object".into()));
    }
    // serde_json does not check the UTF-8 of strings it skips (fields routing ignores), so a
    // body with bad bytes there would pass as JSON: check it all first (found by fuzzing).
    let text = std::str::from_utf8(body).map_err(|e| {
        RouterError::BadRequest(format!("the body is not valid UTF-8 (byte {})", e.valid_up_to()))
    })?;
    serde_json::from_str(text)
        .map_err(|e| RouterError::BadRequest(format!("not a valid JSON object: {e}")))
}

/// `body` (a JSON object) with `fields` (`"k":v,...`) appended as its last keys: JSON decoders
/// keep the last of duplicate keys, so these win over a client's own.
pub fn append_fields(body: &[u8], fields: &str) -> Vec<u8> {
    let end = body.iter().rposition(|b| *b == b'}').unwrap_or(body.len());
    let before = &body[..end];
    let empty =
        before.iter().rposition(|b| !b.is_ascii_whitespace()).map(|i| before[i]) == Some(b'{');
    let mut out = Vec::with_capacity(body.len() + fields.len() + 2);
    out.extend_from_slice(before);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(fields.as_bytes());
    out.push(b'}');
    out
}

impl<'a> Probe<'a> {
    /// How many prompts a batched request carries (`None`: a single prompt). Generate batches
    /// by `text` list or `input_ids` list of lists; completions by a `prompt` list.
    pub fn batch_size(&self, route: Route) -> Option<usize> {
        let field = match route {
            Route::Generate => self.text.or(self.input_ids),
            Route::Completions => self.prompt,
            Route::Chat | Route::Embeddings => None,
        }?;
        // One prompt of token ids is thousands of numbers: known by its first item, without
        // reading the list into values (that was a quarter of the router's CPU with them).
        let first = field.get().strip_prefix('[')?.trim_start().bytes().next();
        let a_number = first.is_some_and(|b| b == b'-' || b.is_ascii_digit());
        if a_number && (route != Route::Generate || self.text.is_none()) {
            return None;
        }
        let items: Vec<&RawValue> = serde_json::from_str(field.get()).ok()?;
        let nested =
            items.first().is_some_and(|v| v.get().starts_with('[') || v.get().starts_with('"'));
        let is_ids_of_one = route == Route::Generate && self.text.is_none() && !nested;
        let is_tokens_of_one = route == Route::Completions && !nested && !items.is_empty();
        (!is_ids_of_one && !is_tokens_of_one).then_some(items.len())
    }

    /// The prompt as token ids, when the request carries them: generate's (or a chat
    /// request's, which SGLang then takes instead of its messages) `input_ids`, or a
    /// completions `prompt` that is one list of integers.
    pub fn token_ids(&self, route: Route) -> Option<Vec<u32>> {
        let field = match route {
            Route::Generate | Route::Chat => self.input_ids,
            Route::Completions => self.prompt,
            _ => None,
        }?;
        if !field.get().starts_with('[') {
            return None;
        }
        id_list(field.get()).or_else(|| serde_json::from_str(field.get()).ok())
    }

    /// The prompt when it is one string: generate's `text`, a completions `prompt`.
    pub fn prompt_string(&self, route: Route) -> Option<Cow<'a, str>> {
        let field = match route {
            Route::Generate => self.text,
            Route::Completions => self.prompt,
            _ => None,
        }?;
        field.get().starts_with('"').then(|| text_of(field))
    }

    /// What a chat template renders for this request.
    pub fn chat_input(&self) -> crate::kv::chat::ChatInput<'a> {
        crate::kv::chat::ChatInput {
            messages: self.messages,
            tools: self.tools,
            tool_choice: self.tool_choice,
            continue_final_message: self.continue_final_message,
            chat_template_kwargs: self.chat_template_kwargs,
            reasoning_effort: self.reasoning_effort,
        }
    }

    /// Whether the native request asks for logprobs (`return_logprob`, for any item).
    pub fn wants_logprob(&self) -> bool {
        self.return_logprob.is_some_and(|v| v.get().contains("true"))
    }

    /// The prompt text a prefix-aware policy routes on: generate's `text` (or its
    /// `input_ids`), completions' `prompt`, the whole chat conversation, embeddings' `input`.
    /// Strings are decoded; other shapes (batches, token ids) route on their JSON text.
    pub fn routing_text(&self, route: Route) -> Cow<'a, str> {
        let field = match route {
            Route::Generate => self.text.or(self.input_ids),
            Route::Completions => self.prompt,
            Route::Embeddings => self.input,
            Route::Chat => return self.messages.map(conversation).unwrap_or_default(),
        };
        field.map(text_of).unwrap_or_default()
    }
}

/// A JSON array of unsigned 32-bit integers (`[1, 2, 3]`), read byte by byte: a prompt of
/// token ids is thousands of numbers, and serde_json's generic path was the largest cost of
/// event routing with `input_ids` (measured with perf). `None` for anything else (nested
/// lists, signs, fractions, exponents), which the caller then leaves to serde_json.
pub fn id_list(s: &str) -> Option<Vec<u32>> {
    let b = s.as_bytes();
    let skip = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = skip(0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    // About five bytes an id: "1234," or "123, ".
    let mut out = Vec::with_capacity(b.len() / 5 + 1);
    i = skip(i + 1);
    if b.get(i) == Some(&b']') {
        return (skip(i + 1) == b.len()).then_some(out);
    }
    loop {
        let start = i;
        let mut v: u64 = 0;
        while let Some(d) = b.get(i).map(|c| c.wrapping_sub(b'0')).filter(|&d| d < 10) {
            v = v.wrapping_mul(10).wrapping_add(u64::from(d));
            i += 1;
        }
        // Ten digits at most (u32::MAX has ten; more could wrap), and JSON numbers have no
        // leading zeros.
        let digits = i - start;
        if digits == 0 || digits > 10 || v > u64::from(u32::MAX) || (digits > 1 && b[start] == b'0')
        {
            return None;
        }
        out.push(v as u32);
        // The separator, most often "," or ", ", read without a call to `skip` (that call
        // cost a third of the time: 60 against 95 us for 8,000 ids, kv_index bench); anything
        // else, as the general case below.
        match b.get(i) {
            Some(b',') => i = if b.get(i + 1) == Some(&b' ') { skip(i + 2) } else { skip(i + 1) },
            Some(b']') => return (skip(i + 1) == b.len()).then_some(out),
            _ => {
                i = skip(i);
                match b.get(i) {
                    Some(b',') => i = skip(i + 1),
                    Some(b']') => return (skip(i + 1) == b.len()).then_some(out),
                    _ => return None,
                }
            }
        }
    }
}

fn text_of(raw: &RawValue) -> Cow<'_, str> {
    let s = raw.get();
    if s.starts_with('"') {
        if let Ok(t) = serde_json::from_str::<Cow<str>>(s) {
            return t;
        }
    }
    Cow::Borrowed(s)
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// Every message as `role: content\n`, in order: a conversation's next turn extends the
/// previous turn's text, so it shares the prefix the worker has cached.
fn conversation(raw: &RawValue) -> Cow<'_, str> {
    let Ok(messages) = serde_json::from_str::<Vec<Message>>(raw.get()) else {
        return Cow::Borrowed(raw.get());
    };
    let mut out = String::new();
    for m in messages {
        out.push_str(m.role.as_deref().unwrap_or(""));
        out.push_str(": ");
        if let Some(c) = m.content {
            match serde_json::from_str::<Vec<Part>>(c.get()) {
                Ok(parts) => {
                    parts.iter().filter_map(|p| p.text.as_deref()).for_each(|t| out.push_str(t))
                }
                Err(_) => out.push_str(&text_of(c)),
            }
        }
        out.push('\n');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(route: Route, body: &str) -> String {
        probe(body.as_bytes()).unwrap().routing_text(route).into_owned()
    }

    proptest::proptest! {
        #[test]
        fn id_lists_agree_with_serde_json(ids in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..64), spaced in proptest::prelude::any::<bool>()) {
            let s = if spaced { serde_json::to_string_pretty(&ids).unwrap() } else { serde_json::to_string(&ids).unwrap() };
            proptest::prop_assert_eq!(id_list(&s), Some(ids));
        }

        #[test]
        fn id_list_never_accepts_what_serde_json_refuses(s in "[\\[\\]0-9, .e-]{0,24}") {
            if let Some(v) = id_list(&s) {
                proptest::prop_assert_eq!(Some(v), serde_json::from_str::<Vec<u32>>(&s).ok());
            }
        }
    }

    #[test]
    fn id_lists_read_like_serde_json() {
        for s in ["[]", "[0]", " [1, 2,3 ] ", "[4294967295]", "[\n7,\t8]"] {
            assert_eq!(id_list(s), serde_json::from_str::<Vec<u32>>(s).ok(), "{s}");
        }
        for s in [
            "[4294967296]",
            "[-1]",
            "[1.5]",
            "[1e3]",
            "[01]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[[1]]",
            "[1]x",
            "",
            "[",
            "[\"1\"]",
        ] {
            assert_eq!(id_list(s), None, "{s}");
        }
    }

    #[test]
    fn routing_text_per_route() {
        assert_eq!(
            text(Route::Generate, r#"{"text": "a\"b", "sampling_params": {"x": [1]}}"#),
            "a\"b"
        );
        assert_eq!(text(Route::Generate, r#"{"input_ids": [1, 2]}"#), "[1, 2]");
        assert_eq!(text(Route::Completions, r#"{"prompt": "p", "max_tokens": 3}"#), "p");
        assert_eq!(text(Route::Embeddings, r#"{"input": ["a", "b"]}"#), r#"["a", "b"]"#);
        let chat = r#"{"messages": [{"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image_url", "image_url": {}}]},
            {"role": "assistant", "content": null}]}"#;
        assert_eq!(text(Route::Chat, chat), "system: S\nuser: Q\nassistant: \n");
        assert_eq!(text(Route::Generate, "{}"), "");
    }

    #[test]
    fn batch_sizes_per_shape() {
        let size = |route, body: &str| probe(body.as_bytes()).unwrap().batch_size(route);
        let g = Route::Generate;
        let c = Route::Completions;
        // One prompt of ids (read by its first item only, however long) is no batch.
        assert_eq!(size(g, r#"{"input_ids": [ 5, 6, 7]}"#), None);
        assert_eq!(size(g, r#"{"input_ids": []}"#), None);
        assert_eq!(size(c, r#"{"prompt": [5, 6]}"#), None);
        assert_eq!(size(c, r#"{"prompt": "p"}"#), None);
        assert_eq!(size(g, r#"{"text": "t"}"#), None);
        // Lists of prompts are batches of their length.
        assert_eq!(size(g, r#"{"input_ids": [[1, 2], [3]]}"#), Some(2));
        assert_eq!(size(g, r#"{"text": ["a", "b", "c"]}"#), Some(3));
        assert_eq!(size(g, r#"{"text": [1, 2]}"#), Some(2), "text items are prompts");
        assert_eq!(size(g, r#"{"text": []}"#), Some(0));
        assert_eq!(size(c, r#"{"prompt": ["a", "b"]}"#), Some(2));
        assert_eq!(size(c, r#"{"prompt": [[1], [2]]}"#), Some(2));
        assert_eq!(size(c, r#"{"prompt": []}"#), Some(0));
        assert_eq!(size(Route::Chat, r#"{"input_ids": [[1], [2]]}"#), None);
    }

    #[test]
    fn stream_flag_and_bad_bodies() {
        assert_eq!(probe(br#"{"stream": true}"#).unwrap().stream, Some(true));
        assert_eq!(probe(br#"{"stream": null}"#).unwrap().stream, None);
        let skipped_bad_utf8 = b"{\"text\": \"a\", \"sampling_params\": {\"max_\x96\x96\": 8}}";
        for bad in [&b""[..], b"{", b"[1]", b"\"x\"", br#"{"stream": "yes"}"#, skipped_bad_utf8] {
            assert!(matches!(probe(bad), Err(RouterError::BadRequest(_))), "{bad:?}");
        }
    }
}

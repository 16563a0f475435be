//! Chat templates: a chat request's messages rendered into the prompt text SGLang tokenizes, so
//! that chat requests can be hashed into the blocks the engines publish.
//!
//! SGLang (`serving_chat.py`, jinja path) does, in order:
//! - parse the messages into its pydantic models: roles lowercased, unknown keys dropped,
//!   `null` fields dropped, `content: null` made `""`;
//! - content given as a list of parts becomes one string (text parts joined by a space) unless
//!   the template loops over `message['content']` or mentions images, audio, video or vision
//!   (then the list is kept, text parts as they are);
//! - a last assistant message is removed and kept as a prefix when `continue_final_message`,
//!   else turned into a user message;
//! - the template is rendered by transformers' `apply_chat_template` (a sandboxed Jinja2 with
//!   `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` and a
//!   `tojson` that writes like Python's `json.dumps`) with `messages`, `tools` (when given and
//!   `tool_choice` is not `"none"`; only the chosen one when it names one),
//!   `add_generation_prompt=True`, the special tokens, `reasoning_effort` and
//!   `chat_template_kwargs`;
//! - the prefix is appended and the text encoded without adding special tokens.
//!
//! This module does the same with `minijinja` (and `minijinja-contrib`'s Python methods such as
//! `.strip()` and `.items()`). Multimodal messages are not rendered: the engine's processor
//! expands images into tokens a router cannot know, so those requests route on the approximate
//! tree. A difference from SGLang costs a misprediction (a miss), never a wrong answer.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Deserialize;
use serde_json::value::RawValue;

const NAME: &str = "chat";

/// The fields of a chat request that decide its prompt, as the client sent them.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct ChatInput<'a> {
    #[serde(borrow, default)]
    pub messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub tool_choice: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub continue_final_message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub chat_template_kwargs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub reasoning_effort: Option<&'a RawValue>,
}

impl<'a> ChatInput<'a> {
    /// The fields of a whole chat request body.
    pub fn parse(body: &'a str) -> Result<Self, String> {
        serde_json::from_str(body).map_err(|e| format!("not a chat request: {e}"))
    }
}

/// Why a chat request's prompt could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// Images, audio or video: their tokens come from the engine's processor.
    Multimodal,
    /// The request does not have the shape SGLang accepts (SGLang answers 400).
    Invalid(String),
    /// The template refused it (`raise_exception`) or failed.
    Template(String),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Multimodal => f.write_str("multimodal content is not rendered"),
            RenderError::Invalid(m) => write!(f, "invalid chat request: {m}"),
            RenderError::Template(m) => write!(f, "chat template: {m}"),
        }
    }
}

/// A compiled chat template and what it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from, for `/admin/kv`.
    pub origin: String,
    /// Content parts stay a list (SGLang's "openai" content format).
    parts_as_list: bool,
    /// `bos_token`, `eos_token`, ... as `tokenizer_config.json` gives them.
    specials: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `specials` are the template's special-token variables.
    pub fn new(
        source: &str,
        origin: String,
        specials: Vec<(String, Value)>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| format!("{origin}: the chat template does not compile: {e}"))?;
        Ok(Self { env, origin, parts_as_list: content_is_a_list(source), specials })
    }

    /// The prompt text SGLang would tokenize for this request (to be encoded without special
    /// tokens added).
    pub fn prompt(&self, input: &ChatInput) -> Result<String, RenderError> {
        let invalid = |m: &str| RenderError::Invalid(m.to_owned());
        let raw = input.messages.ok_or_else(|| invalid("messages is required"))?;
        let messages: Vec<RawMessage> =
            serde_json::from_str(raw.get()).map_err(|e| RenderError::Invalid(e.to_string()))?;
        if messages.is_empty() {
            return Err(invalid("messages must not be empty"));
        }
        let mut out: Vec<Message> =
            messages.into_iter().map(|m| self.message(m)).collect::<Result<_, _>>()?;

        let continue_final = match input.continue_final_message {
            None => false,
            Some(v) => serde_json::from_str::<Option<bool>>(v.get())
                .map_err(|_| invalid("continue_final_message must be a boolean"))?
                .unwrap_or(false),
        };
        let mut prefix = None;
        if let Some(last) = out.last() {
            if last.role == "assistant" {
                if let Some(text) = last.content.as_str().map(str::to_owned) {
                    if continue_final {
                        out.pop();
                        prefix = Some(text);
                    } else {
                        *out.last_mut().expect("checked") = Message::user(text);
                    }
                }
            }
        }

        let tools = self.tools(input)?;
        let mut ctx: Vec<(String, Value)> = self.specials.clone();
        ctx.push(("messages".into(), out.into_iter().map(Message::into_value).collect()));
        ctx.push(("tools".into(), tools));
        ctx.push(("documents".into(), none()));
        ctx.push(("add_generation_prompt".into(), Value::from(true)));
        if let Some(e) = input.reasoning_effort {
            let v: Value = serde_json::from_str(e.get()).map_err(|e| invalid(&e.to_string()))?;
            if !v.is_none() {
                ctx.push(("reasoning_effort".into(), v));
            }
        }
        if let Some(k) = input.chat_template_kwargs {
            let v: Value = serde_json::from_str(k.get()).map_err(|e| invalid(&e.to_string()))?;
            if !v.is_none() {
                if v.kind() != minijinja::value::ValueKind::Map {
                    return Err(invalid("chat_template_kwargs must be an object"));
                }
                for key in v.try_iter().map_err(|e| invalid(&e.to_string()))? {
                    let value = v.get_item(&key).unwrap_or_default();
                    ctx.push((key.as_str().unwrap_or_default().to_owned(), value));
                }
            }
        }
        // Later keys win, as Python's keyword arguments over the special tokens.
        let template = self.env.get_template(NAME).expect("added in new()");
        let mut text =
            template.render(map(ctx)).map_err(|e| RenderError::Template(error_chain(&e)))?;
        if let Some(p) = prefix {
            text.push_str(&p);
        }
        Ok(text)
    }

    fn message(&self, m: RawMessage) -> Result<Message, RenderError> {
        let content = match m.content {
            None => Value::from(""),
            Some(Content::Text(s)) => Value::from(s),
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::new();
                for p in parts {
                    match p.kind.as_str() {
                        "text" => texts.push(p.text.unwrap_or_default()),
                        "image_url" | "video_url" | "audio_url" => {
                            return Err(RenderError::Multimodal)
                        }
                        // Thinking parts and tool references are not shown to the template.
                        _ => {}
                    }
                }
                if self.parts_as_list {
                    texts
                        .into_iter()
                        .map(|t| map([("type", Value::from("text")), ("text", t.into())]))
                        .collect()
                } else {
                    Value::from(texts.join(" "))
                }
            }
        };
        let tools = m.tools.map(tool_values);
        Ok(Message {
            role: m.role.to_lowercase(),
            content,
            tool_call_id: m.tool_call_id,
            name: m.name,
            reasoning_content: m.reasoning_content,
            tool_calls: m.tool_calls,
            tools,
        })
    }

    /// The `tools` variable: none without tools or with `tool_choice: "none"`, the named one
    /// for a named choice, else all of them (as SGLang's pydantic models write them).
    fn tools(&self, input: &ChatInput) -> Result<Value, RenderError> {
        let invalid = |m: String| RenderError::Invalid(m);
        let tools: Option<Vec<RawTool>> = match input.tools {
            Some(t) => serde_json::from_str(t.get()).map_err(|e| invalid(format!("tools: {e}")))?,
            None => None,
        };
        let choice: Option<ToolChoice> = match input.tool_choice {
            Some(c) => {
                serde_json::from_str(c.get()).map_err(|e| invalid(format!("tool_choice: {e}")))?
            }
            None => None,
        };
        let Some(tools) = tools.filter(|t| !t.is_empty()) else {
            return Ok(none());
        };
        // SGLang's default is "none" only where no tools are given, and those render none.
        let tools = match choice.unwrap_or_else(|| ToolChoice::Mode("auto".into())) {
            ToolChoice::Mode(m) if m == "none" => return Ok(none()),
            ToolChoice::Mode(_) => tools,
            ToolChoice::Named { function } => tools
                .into_iter()
                .filter(|t| Some(&t.function.name) == function.name.as_ref())
                .collect(),
        };
        Ok(tool_values(tools))
    }
}

/// A message as SGLang's pydantic model writes it (fields in its order, `null`s dropped).
struct Message {
    role: String,
    content: Value,
    tool_call_id: Option<Value>,
    name: Option<Value>,
    reasoning_content: Option<Value>,
    tool_calls: Option<Value>,
    tools: Option<Value>,
}

impl Message {
    fn user(text: String) -> Self {
        Message {
            role: "user".into(),
            content: Value::from(text),
            tool_call_id: None,
            name: None,
            reasoning_content: None,
            tool_calls: None,
            tools: None,
        }
    }

    fn into_value(self) -> Value {
        let mut fields: Vec<(&str, Value)> =
            vec![("role", Value::from(self.role)), ("content", self.content)];
        let optional = [
            ("tool_call_id", self.tool_call_id),
            ("name", self.name),
            ("reasoning_content", self.reasoning_content),
            ("tool_calls", self.tool_calls),
            ("tools", self.tools),
        ];
        fields.extend(
            optional.into_iter().filter_map(|(k, v)| Some((k, v.filter(|v| !v.is_none())?))),
        );
        map(fields)
    }
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_call_id: Option<Value>,
    #[serde(default)]
    name: Option<Value>,
    #[serde(default)]
    reasoning_content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<RawTool>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct RawTool {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: RawFunction,
    #[serde(default)]
    defer_loading: Option<bool>,
}

#[derive(Deserialize)]
struct RawFunction {
    #[serde(default)]
    description: Option<String>,
    name: String,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
    #[serde(default)]
    defer_loading: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ToolChoice {
    Mode(String),
    Named { function: ChoiceName },
}

#[derive(Deserialize)]
struct ChoiceName {
    #[serde(default)]
    name: Option<String>,
}

/// Tools as SGLang's `Tool.model_dump()` writes them: `type`, then `function` with
/// `description`, `name`, `parameters` and `strict` (defaults included), then `defer_loading`.
fn tool_values(tools: Vec<RawTool>) -> Value {
    tools
        .into_iter()
        .map(|t| {
            let defer = t.function.defer_loading.or(t.defer_loading);
            let mut function: Vec<(&str, Value)> = vec![
                ("description", t.function.description.map_or(none(), Value::from)),
                ("name", Value::from(t.function.name)),
                ("parameters", t.function.parameters.unwrap_or_else(none)),
                ("strict", Value::from(t.function.strict.unwrap_or(false))),
            ];
            if let Some(d) = defer {
                function.push(("defer_loading", Value::from(d)));
            }
            map([
                ("type", Value::from(t.kind.unwrap_or_else(|| "function".into()))),
                ("function", map(function)),
                ("defer_loading", t.defer_loading.map_or(none(), Value::from)),
            ])
        })
        .collect()
}

/// SGLang's content-format test: the template iterates over a message's content (or speaks of
/// images, audio, video or vision), so content parts stay a list.
fn content_is_a_list(source: &str) -> bool {
    if ["image", "audio", "video", "vision"].iter().any(|k| source.contains(k)) {
        return true;
    }
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        rest = &rest[i + 2..];
        let end = rest.find("%}").unwrap_or(rest.len());
        let tag = rest[..end].trim_start_matches(['-', '+']).trim();
        if let Some(head) = tag.strip_prefix("for ") {
            if let Some((_, iter)) = head.split_once(" in ") {
                let iter: String = iter.chars().filter(|c| !c.is_whitespace()).collect();
                let over_content = ["message", "msg", "m"].iter().any(|v| {
                    [".content", "['content']", "[\"content\"]"]
                        .iter()
                        .any(|k| iter.starts_with(&format!("{v}{k}")))
                });
                if over_content {
                    return true;
                }
            }
        }
    }
    false
}

fn error_chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time, as transformers gives it to templates (Llama 3.1's
/// uses it for the date line).
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = jiff::Zoned::now();
    jiff::fmt::strtime::format(format.as_str(), &now)
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// Python's `None` (minijinja's default value is `undefined`).
fn none() -> Value {
    Value::from(())
}

/// A template map with its keys in the order given (a later duplicate key wins).
fn map<K: Into<Value>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
    Value::from(
        pairs.into_iter().map(|(k, v)| (k.into(), v)).collect::<indexmap::IndexMap<Value, Value>>(),
    )
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`: `", "` and `": "` between items unless
/// indented (then `","` and newlines), keys in their order, never HTML-escaped.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        Some(v) if !v.is_none() => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => " ".repeat(usize::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0)),
        }),
        _ => None,
    };
    let (item, key) = match separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<String> =
                s.try_iter()?.map(|p| p.as_str().unwrap_or_default().to_owned()).collect();
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
        ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
    ascii: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(i) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(i);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::Value::from(s).to_string();
        if !self.ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) -> Result<(), Error> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Number => {
                if let Some(i) = v.as_i64().filter(|_| v.is_integer()) {
                    out.push_str(&i.to_string());
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(0.0);
                    // Python writes floats with a fractional part (1.0, not 1).
                    if f.fract() == 0.0 && f.abs() < 1e16 {
                        out.push_str(&format!("{f:.1}"));
                    } else {
                        out.push_str(&f.to_string());
                    }
                }
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out);
                    self.write(x, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out);
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&k.to_string(), out),
                    }
                    out.push_str(&self.key);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("Object of type {} is not JSON serializable", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Case {
        name: String,
        template: String,
        specials: std::collections::BTreeMap<String, String>,
        request: Box<RawValue>,
        #[serde(default)]
        prompt: Option<String>,
        #[serde(default)]
        error: Option<String>,
    }

    /// Every case of testdata/chat_golden.json (rendered by Python's Jinja2 as transformers
    /// sets it up, after SGLang's message processing) renders to the same text here.
    #[test]
    fn renders_as_transformers_and_sglang_do() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("testdata/chat_golden.json")).expect("golden cases");
        assert!(cases.len() >= 10);
        for c in cases {
            let specials = c.specials.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
            let t = ChatTemplate::new(&c.template, c.name.clone(), specials).expect(&c.name);
            let input = ChatInput::parse(c.request.get()).expect(&c.name);
            match (t.prompt(&input), c.prompt, c.error) {
                (Ok(got), Some(want), None) => assert_eq!(got, want, "{}", c.name),
                (Err(RenderError::Template(got)), None, Some(want)) => {
                    assert!(got.contains(&want), "{}: {got}", c.name)
                }
                (got, want, error) => panic!("{}: {got:?}, expected {want:?} / {error:?}", c.name),
            }
        }
    }

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(include_str!("chatml.jinja"), "chatml".into(), vec![]).unwrap()
    }

    #[test]
    fn multimodal_and_malformed_requests_are_not_rendered() {
        let t = chatml();
        let image = r#"{"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}"#;
        assert_eq!(t.prompt(&ChatInput::parse(image).unwrap()), Err(RenderError::Multimodal));
        for bad in [
            r#"{"messages": []}"#,
            r#"{"model": "m"}"#,
            r#"{"messages": [{"content": "no role"}]}"#,
            r#"{"messages": [{"role": "user", "content": 3}]}"#,
            r#"{"messages": [{"role": "user", "content": "x"}], "continue_final_message": "yes"}"#,
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
        ] {
            let got = t.prompt(&ChatInput::parse(bad).unwrap());
            assert!(matches!(got, Err(RenderError::Invalid(_))), "{bad}: {got:?}");
        }
    }

    #[test]
    fn a_template_that_does_not_compile_says_where() {
        let e = ChatTemplate::new("{% for x in %}", "/m/chat_template.jinja".into(), vec![])
            .unwrap_err();
        assert!(e.contains("/m/chat_template.jinja") && e.contains("does not compile"), "{e}");
    }

    #[test]
    fn content_format_follows_sglangs_test() {
        assert!(!content_is_a_list(include_str!("chatml.jinja")));
        assert!(content_is_a_list("{%- for c in message['content'] %}{{ c.text }}{% endfor %}"));
        assert!(content_is_a_list(
            "{% for part in msg.content | selectattr('type') %}{% endfor %}"
        ));
        assert!(content_is_a_list("{{ '<image>' }}"));
        assert!(!content_is_a_list("{% for m in messages %}{{ m.content }}{% endfor %}"));
    }

    #[test]
    fn tojson_writes_like_python() {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.0, "é\n"], "a": {}, "c": null, "d": true}"#)
                .unwrap();
        let render = |src: &str| env.render_str(src, minijinja::context! { v => v.clone() });
        assert_eq!(
            render("{{ v | tojson }}").unwrap(),
            r#"{"b": [1, 2.0, "é\n"], "a": {}, "c": null, "d": true}"#
        );
        assert_eq!(
            render("{{ v | tojson(sort_keys=true, ensure_ascii=true) }}").unwrap(),
            r#"{"a": {}, "b": [1, 2.0, "\u00e9\n"], "c": null, "d": true}"#
        );
        assert_eq!(
            render("{{ v.b | tojson(indent=2) }}").unwrap(),
            "[\n  1,\n  2.0,\n  \"é\\n\"\n]"
        );
        assert_eq!(
            render("{{ v.b | tojson(separators=(',', ':')) }}").unwrap(),
            r#"[1,2.0,"é\n"]"#
        );
    }
}

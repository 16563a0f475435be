//! The model's tokenizer, so that text prompts can be hashed into the blocks the engines
//! publish. A Hugging Face `tokenizer.json` loaded with the `tokenizers` crate; prompts are
//! encoded with the special tokens added, as SGLang encodes `text`. Beside it, the model's chat
//! template (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`, unless
//! `--chat-template FILE` names one) renders chat requests as SGLang does (`chat.rs`).

use std::path::{Path, PathBuf};

use super::chat::{ChatInput, ChatTemplate, RenderError};

/// The `tokenizer.json` a path names: the file itself, or the one in a model directory.
pub fn tokenizer_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_owned()
    }
}

/// The files a tokenizer is loaded from (what the configuration names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenizerFiles {
    /// The `tokenizer.json`.
    pub path: PathBuf,
    /// A chat template file, else the one beside the tokenizer.
    pub chat_template: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Tokenizer {
    pub files: TokenizerFiles,
    inner: tokenizers::Tokenizer,
    /// The chat template, or why there is none (chat requests then route on the tree).
    pub chat: Result<ChatTemplate, String>,
}

impl Tokenizer {
    /// The tokenizer at `path` and the chat template beside it.
    pub fn load(path: &Path) -> Result<Self, String> {
        Self::load_files(&TokenizerFiles { path: path.to_owned(), chat_template: None })
    }

    /// The tokenizer and chat template `files` name.
    pub fn load_files(files: &TokenizerFiles) -> Result<Self, String> {
        let path = &files.path;
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            format!("{}: not a tokenizer.json routerd can load: {e}", path.display())
        })?;
        let chat = load_chat_template(path, files.chat_template.as_deref());
        Ok(Self { files: files.clone(), inner, chat })
    }

    /// A prompt's ids with the special tokens added (SGLang's `text`).
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        self.inner.encode(text, true).ok().map(|e| e.get_ids().to_vec())
    }

    /// Text's ids without special tokens added (a rendered chat template writes its own).
    pub fn encode_plain(&self, text: &str) -> Option<Vec<u32>> {
        self.inner.encode(text, false).ok().map(|e| e.get_ids().to_vec())
    }

    /// A chat request's prompt text: the chat template rendered.
    pub fn chat_prompt(&self, input: &ChatInput) -> Result<String, RenderError> {
        self.chat.as_ref().map_err(|e| RenderError::Template(e.clone()))?.prompt(input)
    }

    /// A chat request's prompt ids: the template rendered, encoded without special tokens
    /// added.
    pub fn chat_ids(&self, input: &ChatInput) -> Result<Vec<u32>, RenderError> {
        let text = self.chat_prompt(input)?;
        self.encode_plain(&text)
            .ok_or_else(|| RenderError::Template("the rendered prompt does not encode".into()))
    }
}

/// The chat template and its special-token variables: `explicit` (a Jinja file), else the
/// `chat_template.jinja` beside the tokenizer, else `tokenizer_config.json`'s `chat_template`
/// (a string, or a list of named templates: the one named `default`).
fn load_chat_template(tokenizer: &Path, explicit: Option<&Path>) -> Result<ChatTemplate, String> {
    let dir = tokenizer.parent().unwrap_or(Path::new("."));
    let config_path = dir.join("tokenizer_config.json");
    let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .map_err(|e| format!("{}: not JSON: {e}", config_path.display()))?,
        ),
        Err(_) => None,
    };
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
    };
    let jinja = dir.join("chat_template.jinja");
    let (source, origin) = if let Some(p) = explicit {
        (read(p)?, p.display().to_string())
    } else if jinja.is_file() {
        (read(&jinja)?, jinja.display().to_string())
    } else {
        let template = config.as_ref().and_then(|c| c.get("chat_template"));
        let source = match template {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
                .ok_or_else(|| {
                    format!("{}: no chat template named \"default\"", config_path.display())
                })?,
            _ => {
                return Err(format!(
                    "no chat template: neither {} nor a chat_template in {} (chat requests \
                     route on the approximate tree; --chat-template FILE names one)",
                    jinja.display(),
                    config_path.display()
                ))
            }
        };
        (source, config_path.display().to_string())
    };
    ChatTemplate::new(&source, origin, config.as_ref().map(special_tokens).unwrap_or_default())
}

/// transformers' `special_tokens_map`, which templates see as variables: each special token
/// as its text (`tokenizer_config.json` gives a string or an AddedToken object).
fn special_tokens(config: &serde_json::Value) -> Vec<(String, minijinja::Value)> {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    };
    let mut out = Vec::new();
    for key in
        ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    {
        if let Some(t) = config.get(key).and_then(text) {
            out.push((key.to_owned(), minijinja::Value::from(t)));
        }
    }
    if let Some(list) = config.get("additional_special_tokens").and_then(|v| v.as_array()) {
        let all: Vec<minijinja::Value> =
            list.iter().filter_map(text).map(minijinja::Value::from).collect();
        out.push(("additional_special_tokens".to_owned(), minijinja::Value::from(all)));
    }
    out
}

/// A byte-level tokenizer.json: each UTF-8 byte is one token (ids 0-255), no merges. Tests and
/// the benchmark build their fleets with it (`routerctl sim --write-tokenizer`), so that the
/// router and the simulated workers tokenize alike without downloading a model.
pub fn byte_level_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0u32..256).map(|b| (byte_char(b as u8).to_string(), serde_json::json!(b))).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// A `tokenizer_config.json` for the byte-level tokenizer, with a ChatML chat template (the
/// shape of Qwen's, tools included) and its special tokens: written beside `byte_level_json()`
/// it gives tests and the benchmark chat requests that route on KV events.
pub fn chatml_config_json() -> String {
    serde_json::json!({
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    })
    .to_string()
}

/// Writes `tokenizer.json` (byte-level) and `tokenizer_config.json` (ChatML) into `dir`.
pub fn write_byte_level(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("tokenizer.json"), byte_level_json())?;
    std::fs::write(dir.join("tokenizer_config.json"), chatml_config_json())
}

const CHATML: &str = include_str!("chatml.jinja");

/// GPT-2's byte-to-character map (what the ByteLevel pre-tokenizer produces for a byte).
fn byte_char(b: u8) -> char {
    let printable = |c: u8| (b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || c >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|c| !printable(*c)).count() as u32;
    char::from_u32(256 + n).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_tokenizer_gives_one_token_per_byte() {
        let dir = std::env::temp_dir().join(format!("routerd-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, byte_level_json()).unwrap();
        let t = Tokenizer::load(&path).unwrap();
        assert_eq!(
            t.encode("Hi there é").unwrap(),
            "Hi there é".bytes().map(u32::from).collect::<Vec<_>>()
        );
        std::fs::write(&path, "{}").unwrap();
        assert!(Tokenizer::load(&path).unwrap_err().contains("tokenizer.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The model's tokenizer, so that text prompts can be hashed into the blocks the engines
//! publish. A Hugging Face `tokenizer.json` loaded with the `tokenizers` crate; prompts are
//! encoded with the special tokens added, as SGLang encodes `text`.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Tokenizer {
    pub path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Self, String> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            format!("{}: not a tokenizer.json routerd can load: {e}", path.display())
        })?;
        Ok(Self { path: path.to_owned(), inner })
    }

    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        self.inner.encode(text, true).ok().map(|e| e.get_ids().to_vec())
    }
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

//! The simulated engine's tokenizer: fixed-width chunks of characters hashed to token ids, plus
//! the deterministic "model" that picks output tokens. Deterministic so that the same text always
//! yields the same ids (what makes prefix caching observable) and the same answer.

/// Size of the simulated vocabulary; output token ids are below it.
pub const VOCAB: u32 = 32_000;

/// Words the simulated model "says"; an output token id maps to one of them.
const WORDS: &[&str] = &[
    " the", " a", " of", " and", " to", " in", " is", " that", " it", " for", " on", " with",
    " as", " was", " at", " by", " this", " model", " router", " cache", " token", " prefix",
    " worker", " request", " stream", " batch", " GPU", " fleet", " Paris", " capital", " answer",
    " simple", " fast", " because", " so", " then", " data", " memory", " time", " value",
];

#[derive(Debug, Clone)]
pub struct Tokenizer {
    chars_per_token: usize,
    /// A real tokenizer.json, when given (`--tokenizer-path`).
    hf: Option<std::sync::Arc<routerd::kv::tokenize::Tokenizer>>,
}

impl Tokenizer {
    pub fn new(chars_per_token: usize) -> Self {
        Self { chars_per_token: chars_per_token.max(1), hf: None }
    }

    /// A tokenizer.json, or a model directory with one; the chat template beside it (as
    /// routerd finds it) renders chat requests.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let hf =
            routerd::kv::tokenize::Tokenizer::load(&routerd::kv::tokenize::tokenizer_file(path))?;
        if let Err(e) = &hf.chat {
            tracing::info!(reason = %e, "chat requests use the simulated chat format");
        }
        Ok(Self { chars_per_token: 1, hf: Some(std::sync::Arc::new(hf)) })
    }

    /// Text's ids without special tokens added (a rendered chat template writes its own).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        match &self.hf {
            Some(hf) => hf.encode_plain(text).unwrap_or_default(),
            None => self.encode(text),
        }
    }

    /// A chat request's prompt text from the model's chat template, as SGLang renders it (to
    /// be encoded with `encode_plain`); `None` without a template (or for multimodal content),
    /// when the simulated chat format applies.
    pub fn chat_prompt(&self, body: &[u8]) -> Option<Result<String, String>> {
        use routerd::kv::chat::{ChatInput, RenderError};
        let hf = self.hf.as_ref()?;
        hf.chat.as_ref().ok()?;
        let body = std::str::from_utf8(body).ok()?;
        let input = match ChatInput::parse(body) {
            Ok(i) => i,
            Err(e) => return Some(Err(e)),
        };
        match hf.chat_prompt(&input) {
            Ok(text) => Some(Ok(text)),
            Err(RenderError::Multimodal) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    }

    /// Splits `text` into chunks of `chars_per_token` characters (the last may be shorter) and
    /// hashes each chunk. Equal prefixes of whole chunks give equal token prefixes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if let Some(hf) = &self.hf {
            return hf.encode(text).unwrap_or_default();
        }
        let mut ids = Vec::with_capacity(text.len() / self.chars_per_token + 1);
        let mut start = 0;
        let mut count = 0;
        for (i, _) in text.char_indices() {
            if count == self.chars_per_token {
                ids.push(hash_chunk(&text.as_bytes()[start..i]));
                start = i;
                count = 0;
            }
            count += 1;
        }
        if count > 0 {
            ids.push(hash_chunk(&text.as_bytes()[start..]));
        }
        ids
    }
}

fn hash_chunk(bytes: &[u8]) -> u32 {
    // FNV-1a: stable across runs and platforms, unlike std's randomised hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A 64-bit mix (splitmix64 finaliser) used to derive deterministic outputs.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A seed that identifies a prompt, so the same prompt always gets the same answer.
pub fn prompt_seed(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0x1234_5678u64, |acc, t| mix64(acc ^ u64::from(*t)))
}

/// The simulated model: greedy decoding where the next token is a deterministic function of
/// the whole sequence so far. The sequence is what the engine was given: token ids for an
/// `input_ids` prompt, characters for a text prompt (a rendered chat template included), each
/// output token then extending it by its id or its text. So a request continued elsewhere with
/// prompt + output so far (ids + ids, or text + text) goes on exactly as the unbroken one would:
/// what makes a router's mid-stream failover checkable token for token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    state: u64,
    text: bool,
}

const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Sequence {
    /// A text prompt (its characters are the sequence).
    pub fn of_text(text: &str) -> Self {
        let mut s = Self { state: FNV64_OFFSET, text: true };
        s.bytes(text.as_bytes());
        s
    }

    /// A prompt of token ids.
    pub fn of_ids(ids: &[u32]) -> Self {
        let mut s = Self { state: FNV64_OFFSET, text: false };
        for id in ids {
            s.bytes(&id.to_le_bytes());
        }
        s
    }

    fn bytes(&mut self, b: &[u8]) {
        for x in b {
            self.state = (self.state ^ u64::from(*x)).wrapping_mul(FNV64_PRIME);
        }
    }

    /// The greedy choice after the sequence so far.
    pub fn next_token(&self) -> u32 {
        (mix64(self.state) % u64::from(VOCAB)) as u32
    }

    /// Extends the sequence by an output token.
    pub fn push(&mut self, id: u32) {
        if self.text {
            self.bytes(token_text(id).as_bytes());
        } else {
            self.bytes(&id.to_le_bytes());
        }
    }

    /// The next `n` tokens, as the engine would generate them.
    pub fn generate(mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                let id = self.next_token();
                self.push(id);
                id
            })
            .collect()
    }
}

/// The text of an output token.
pub fn token_text(id: u32) -> &'static str {
    WORDS[id as usize % WORDS.len()]
}

/// A deterministic log-probability in [-5, 0) for a token at a position.
pub fn logprob(seed: u64, id: u32, position: usize) -> f64 {
    let m = mix64(seed ^ u64::from(id) ^ ((position as u64) << 40));
    -((m % 5000) as f64 + 1.0) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_are_fixed_width() {
        let t = Tokenizer::new(4);
        assert_eq!(t.encode("").len(), 0);
        assert_eq!(t.encode("abcd").len(), 1);
        assert_eq!(t.encode("abcde").len(), 2);
        assert_eq!(t.encode("ééééé").len(), 2, "counts characters, not bytes");
        assert_ne!(t.encode("abcd"), t.encode("abce"));
    }

    #[test]
    fn a_sequence_continued_with_its_output_goes_on_as_the_unbroken_one() {
        let whole = Sequence::of_text("<|user|>\nhello<|end|>\n").generate(12);
        let first: Vec<u32> = whole[..5].to_vec();
        let said: String = first.iter().map(|t| token_text(*t)).collect();
        let rest = Sequence::of_text(&format!("<|user|>\nhello<|end|>\n{said}")).generate(7);
        assert_eq!([first, rest].concat(), whole, "text + text");

        let prompt = [5u32, 6, 7];
        let whole = Sequence::of_ids(&prompt).generate(10);
        let rest = Sequence::of_ids(&[&prompt[..], &whole[..4]].concat()).generate(6);
        assert_eq!(&whole[4..], &rest[..], "ids + ids");
        assert_ne!(Sequence::of_ids(&[1]).generate(4), Sequence::of_ids(&[2]).generate(4));
    }

    proptest! {
        #[test]
        fn shared_whole_chunks_share_tokens(prefix in "\\PC{0,40}", a in "\\PC{0,20}", b in "\\PC{0,20}") {
            let t = Tokenizer::new(4);
            let whole = prefix.chars().count() / 4;
            let x = t.encode(&format!("{prefix}{a}"));
            let y = t.encode(&format!("{prefix}{b}"));
            prop_assert!(x.len() >= whole && y.len() >= whole);
            prop_assert_eq!(&x[..whole], &y[..whole]);
        }
    }
}

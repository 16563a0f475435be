//! Reads the engine's own accounting out of relayed responses without parsing them: the last
//! `"prompt_tokens": N` and `"cached_tokens": N` of each response (a stream repeats cumulative
//! values, and SGLang's native and OpenAI shapes both use these names), so each worker's real
//! prefix-cache hit rate can be shown next to what the router predicted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::registry::Worker;

/// Tracks one response's figures; reports them to the worker when dropped (the body ended or the
/// client went away).
pub struct UsageScan {
    worker: Arc<Worker>,
    /// A batch answer (non-stream) lists one figure per sequence: sum them. A stream repeats
    /// cumulative figures: keep the last.
    sum: bool,
    prompt: u64,
    cached: u64,
    seen: bool,
}

impl UsageScan {
    pub fn new(worker: Arc<Worker>, streaming: bool) -> Self {
        Self { worker, sum: !streaming, prompt: 0, cached: 0, seen: false }
    }

    pub fn frame(&mut self, data: &[u8]) {
        let (sum, seen) = (self.sum, &mut self.seen);
        let (prompt, cached) = (&mut self.prompt, &mut self.cached);
        numbers_after(data, &PROMPT, |n| {
            *seen = true;
            *prompt = if sum { *prompt + n } else { n };
        });
        numbers_after(data, &CACHED, |n| *cached = if sum { *cached + n } else { n });
    }
}

impl Drop for UsageScan {
    fn drop(&mut self) {
        if self.seen {
            self.worker.prompt_tokens.fetch_add(self.prompt, Relaxed);
            self.worker.cached_tokens.fetch_add(self.cached.min(self.prompt), Relaxed);
        }
    }
}

// Built once: building a searcher costs more than running it on a small response.
static PROMPT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"prompt_tokens\""));
static CACHED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"cached_tokens\""));

/// Calls `found` with every integer that follows `key` and a colon in `data`.
fn numbers_after(data: &[u8], key: &Finder, mut found: impl FnMut(u64)) {
    for at in key.find_iter(data) {
        let rest = &data[at + key.needle().len()..];
        let rest = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map_or(&rest[rest.len()..], |i| &rest[i..]);
        let Some(rest) = rest.strip_prefix(b":") else { continue };
        let start = rest.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(rest.len());
        let digits = rest[start..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && digits <= 19 {
            let s = std::str::from_utf8(&rest[start..start + digits]).expect("ASCII digits");
            found(s.parse().expect("at most 19 digits"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{WorkerRole, WorkerSource, WorkerSpec};

    fn worker() -> Arc<Worker> {
        Arc::new(Worker::new(WorkerSpec {
            url: "http://w:1".into(),
            role: WorkerRole::Regular,
            bootstrap_port: None,
            api_key: None,
            source: WorkerSource::Config,
        }))
    }

    fn all(data: &[u8], key: &[u8]) -> Vec<u64> {
        let mut v = Vec::new();
        numbers_after(data, &Finder::new(key), |n| v.push(n));
        v
    }

    #[test]
    fn finds_numbers_in_both_shapes() {
        let native =
            br#"{"meta_info":{"prompt_tokens":12,"cached_tokens":8,"completion_tokens":2}}"#;
        assert_eq!(all(native, b"\"prompt_tokens\""), vec![12]);
        let openai =
            br#"{"usage": {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 39}}}"#;
        assert_eq!(all(openai, b"\"prompt_tokens\""), vec![40]);
        assert_eq!(all(openai, b"\"cached_tokens\""), vec![39]);
        assert_eq!(all(br#"{"prompt_tokens": null}"#, b"\"prompt_tokens\""), Vec::<u64>::new());
    }

    #[test]
    fn batches_sum_and_streams_keep_the_last() {
        let w = worker();
        let mut batch = UsageScan::new(w.clone(), false);
        batch.frame(br#"[{"meta_info":{"prompt_tokens":10,"cached_tokens":4}},{"meta_info":{"prompt_tokens":6,"cached_tokens":0}}]"#);
        drop(batch);
        assert_eq!((w.prompt_tokens.load(Relaxed), w.cached_tokens.load(Relaxed)), (16, 4));
        let mut stream = UsageScan::new(w.clone(), true);
        stream.frame(b"data: {\"meta_info\":{\"prompt_tokens\":20,\"cached_tokens\":19}}\n\n");
        stream.frame(b"data: {\"meta_info\":{\"prompt_tokens\":20,\"cached_tokens\":19}}\n\ndata: [DONE]\n\n");
        drop(stream);
        assert_eq!((w.prompt_tokens.load(Relaxed), w.cached_tokens.load(Relaxed)), (36, 23));
        drop(UsageScan::new(w.clone(), true));
        assert_eq!(w.prompt_tokens.load(Relaxed), 36, "a response without figures adds nothing");
    }
}

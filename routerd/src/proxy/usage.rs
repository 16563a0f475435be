//! Reads the engine's own accounting out of relayed responses without parsing them: the last
//! `"prompt_tokens": N` and `"cached_tokens": N` of each response (a stream repeats cumulative
//! values, and SGLang's native and OpenAI shapes both use these names), so each worker's real
//! prefix-cache hit rate can be shown next to what the router predicted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use std::sync::LazyLock;

use memchr::memmem::Finder;

use tokio::time::Instant;

use crate::policy::{Observation, Policy};
use crate::registry::Worker;

/// Tracks one response's figures; reports them to the worker when dropped (the body ended or the
/// client went away), and to the policy that routed it if that policy learns.
pub struct UsageScan {
    worker: Arc<Worker>,
    /// A batch answer (non-stream) lists one figure per sequence: sum them. A stream repeats
    /// cumulative figures: keep the last.
    sum: bool,
    prompt: u64,
    cached: u64,
    seen: bool,
    feedback: Option<Feedback>,
    accounting: Option<Accounting>,
}

/// A prompt's prediction, settled against what the worker reported (`cached_tokens`) when the
/// answer ends: counted on the worker by part, and the actual figure put in the decision
/// record if one was kept.
pub struct Accounting {
    pub predicted: crate::policy::Predicted,
    /// The decision record's `actual` (in the prediction's unit).
    pub record: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Accounting {
    /// The parts of the prompt, in the prediction's unit, given what the worker reported.
    pub fn split(&self, prompt_tokens: u64, cached_tokens: u64) -> [u64; 5] {
        let p = self.predicted;
        let actual = match p.unit {
            crate::policy::Unit::Tokens => cached_tokens.min(p.prompt as u64),
            // No tokenizer: the reported share of the prompt, in characters.
            crate::policy::Unit::Chars if prompt_tokens > 0 => {
                let share = cached_tokens.min(prompt_tokens) as f64 / prompt_tokens as f64;
                (share * p.prompt as f64).round() as u64
            }
            crate::policy::Unit::Chars => 0,
        };
        let (prompt, best, chosen) = (p.prompt as u64, p.best as u64, p.chosen as u64);
        [
            prompt.saturating_sub(best),
            best.saturating_sub(chosen),
            chosen.saturating_sub(actual),
            actual.saturating_sub(chosen),
            actual,
        ]
    }
}

/// A request routed by a learning policy: what it is told when the answer ends, and the
/// prefill work the request added to its worker's queue until its first bytes arrive.
pub struct Feedback {
    policy: Arc<dyn Policy>,
    worker: Arc<Worker>,
    sent: Instant,
    pending: u64,
    first: Option<Instant>,
    o: Observation,
    /// Still counted in the worker's `pending_requests`.
    waiting: bool,
}

impl Feedback {
    /// Counts the request's predicted prefill (`text_chars - matched_chars`) as pending on
    /// `worker`; call just before sending it.
    pub fn sent(
        policy: Arc<dyn Policy>,
        worker: Arc<Worker>,
        text_chars: usize,
        matched_chars: usize,
    ) -> Self {
        let pending = (text_chars - matched_chars.min(text_chars)) as u64;
        let o = Observation {
            text_chars,
            predicted_chars: matched_chars,
            pending_chars: worker.pending_prefill.fetch_add(pending, Relaxed),
            pending_requests: worker.pending_requests.fetch_add(1, Relaxed),
            ..Default::default()
        };
        Self { policy, worker, sent: Instant::now(), pending, first: None, o, waiting: true }
    }

    fn first_bytes(&mut self) {
        if self.first.is_none() {
            self.first = Some(Instant::now());
            self.release();
        }
    }

    fn release(&mut self) {
        self.worker.pending_prefill.fetch_sub(std::mem::take(&mut self.pending), Relaxed);
        if std::mem::take(&mut self.waiting) {
            self.worker.pending_requests.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Feedback {
    /// Unanswered (a failed attempt, a retry): the pending work goes, nothing is learned.
    fn drop(&mut self) {
        self.release();
    }
}

impl UsageScan {
    pub fn new(worker: Arc<Worker>, streaming: bool) -> Self {
        Self {
            worker,
            sum: !streaming,
            prompt: 0,
            cached: 0,
            seen: false,
            feedback: None,
            accounting: None,
        }
    }

    /// Also settles the routing policy's prediction when the answer ends.
    pub fn with_accounting(mut self, accounting: Option<Accounting>) -> Self {
        self.accounting = accounting;
        self
    }

    /// Also tells the routing policy what the answer showed (`Policy::observe`).
    pub fn with_feedback(mut self, feedback: Option<Feedback>) -> Self {
        self.feedback = feedback;
        self
    }

    pub fn frame(&mut self, data: &[u8]) {
        if let Some(f) = self.feedback.as_mut() {
            if !data.is_empty() {
                f.first_bytes();
            }
        }
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
            if let Some(a) = self.accounting.take() {
                let parts = a.split(self.prompt, self.cached);
                let unit = a.predicted.unit.index();
                for (counter, n) in self.worker.accounting[unit].iter().zip(parts) {
                    counter.fetch_add(n, Relaxed);
                }
                if let Some(r) = &a.record {
                    r.store(parts[4], Relaxed);
                }
            }
        }
        if let Some(mut f) = self.feedback.take() {
            f.release();
            // A plain answer arrives whole at the end: its first bytes are not a first token.
            f.o.ttft = f.first.filter(|_| !self.sum).map(|t| t.duration_since(f.sent));
            if self.seen {
                (f.o.prompt_tokens, f.o.cached_tokens) = (Some(self.prompt), Some(self.cached));
            }
            f.policy.observe(&f.worker, &f.o);
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
            tls: Default::default(),
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
    fn the_accounting_splits_the_prompt_into_its_parts() {
        use crate::policy::{Predicted, Unit};
        let a = |unit, prompt, best, chosen| Accounting {
            predicted: Predicted { unit, prompt, best, chosen },
            record: None,
        };
        // 100 tokens: 60 cached somewhere, the chosen worker believed to hold 40, holds 30.
        let [workload, policy, stale, under, hit] = a(Unit::Tokens, 100, 60, 40).split(100, 30);
        assert_eq!((workload, policy, stale, under, hit), (40, 20, 10, 0, 30));
        // Held more than believed (another replica sent it there): underpredicted.
        assert_eq!(a(Unit::Tokens, 100, 40, 40).split(100, 70), [60, 0, 0, 30, 70]);
        // Characters: the worker's reported share of its own tokens, of the prompt's characters.
        assert_eq!(a(Unit::Chars, 400, 400, 400).split(100, 50), [0, 0, 200, 0, 200]);
        assert_eq!(a(Unit::Chars, 400, 0, 0).split(0, 0), [400, 0, 0, 0, 0]);
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

//! The simulated engine's scheduler: continuous batching with a bounded running batch and a FIFO
//! waiting queue, prefill time proportional to uncached prompt tokens, a decode step per output
//! token, and the prefix cache. It owns the cache and the batch; requests talk to it through
//! channels, and a request whose receiver is dropped (the client went away) is aborted and frees
//! its slot at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::{CacheStats, PrefixCache};
use super::tokenizer::{token_text, Sequence, Tokenizer};

/// Timing and capacity of the simulated GPU.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per cache page, and whether the cache records KV events.
    pub page_size: usize,
    pub kv_events: bool,
    pub max_running_requests: usize,
    pub max_prefill_tokens: usize,
    pub cache_capacity_tokens: usize,
    pub prefill_time_per_token: Duration,
    pub decode_time_per_step: Duration,
    pub decode_time_per_running: Duration,
    /// All simulated durations are divided by this; `f64::INFINITY` means no compute time.
    pub speed: f64,
}

/// What the engine tells a request, in order: `Started` once, `Token` per output token (the
/// last one says so, in the same message, so no reader has to guess whether more will come),
/// then `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started { cached_tokens: usize },
    Token { id: u32, last: bool },
    Done,
}

/// One sequence to run.
#[derive(Debug)]
pub struct Job {
    pub tokens: Vec<u32>,
    pub max_new_tokens: u32,
    /// The prompt's text when it came as text: on completion the cache stores the tokens of
    /// prompt + answer text, which is what the next turn of a conversation will send.
    pub prompt_text: Option<String>,
    /// `prompt_text` is encoded without special tokens added (a rendered chat template).
    pub plain_text: bool,
    /// Decode leg of a PD pair: the KV cache arrived from the prefill worker, so no prefill
    /// compute and no cache lookup here.
    pub skip_prefill: bool,
}

struct Active {
    job: Job,
    out: mpsc::UnboundedSender<Event>,
    /// The model's view of the sequence: prompt and output so far.
    sequence: Sequence,
    generated: Vec<u32>,
}

/// Counters the engine keeps; `/sim/stats` serves them.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub admitted: AtomicU64,
    pub completed: AtomicU64,
    pub aborted: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// KV tokens held by running requests (prompt + output so far): SGLang's notion of load.
    pub running_tokens: AtomicU64,
}

#[derive(Clone)]
pub struct Engine {
    submit: mpsc::UnboundedSender<(Job, mpsc::UnboundedSender<Event>)>,
    pub counters: Arc<EngineCounters>,
    cache: Arc<Mutex<PrefixCache>>,
}

impl Engine {
    /// Starts the scheduler task; it stops when `stop` is cancelled.
    pub fn start(config: EngineConfig, tokenizer: Tokenizer, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(EngineCounters::default());
        let cache = Arc::new(Mutex::new(PrefixCache::paged(
            config.cache_capacity_tokens,
            config.page_size,
            config.kv_events,
        )));
        let sched = Scheduler {
            config,
            tokenizer,
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: counters.clone(),
            cache: cache.clone(),
        };
        tokio::spawn(sched.run(stop));
        Self { submit: tx, counters, cache }
    }

    /// Queues a job; events arrive on the returned receiver. Dropping it aborts the job.
    pub fn submit(&self, job: Job) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.counters.waiting.fetch_add(1, Relaxed);
        if self.submit.send((job, tx)).is_err() {
            self.counters.waiting.fetch_sub(1, Relaxed);
        }
        rx
    }

    /// The cache itself (the KV-event publisher takes its events).
    pub fn cache(&self) -> Arc<Mutex<PrefixCache>> {
        self.cache.clone()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.lock().expect("cache lock").stats()
    }

    /// Flushes the cache whatever runs (requests in flight keep their own KV; what they store
    /// when they finish is cached again).
    pub fn force_flush(&self) {
        self.cache.lock().expect("cache lock").flush();
    }

    /// Flushes the cache unless requests are running or waiting (SGLang refuses then too).
    pub fn flush_cache(&self) -> bool {
        let busy = self.counters.running.load(Relaxed) + self.counters.waiting.load(Relaxed);
        if busy > 0 {
            return false;
        }
        self.cache.lock().expect("cache lock").flush();
        true
    }
}

struct Scheduler {
    config: EngineConfig,
    tokenizer: Tokenizer,
    rx: mpsc::UnboundedReceiver<(Job, mpsc::UnboundedSender<Event>)>,
    waiting: VecDeque<(Job, mpsc::UnboundedSender<Event>)>,
    running: Vec<Active>,
    counters: Arc<EngineCounters>,
    cache: Arc<Mutex<PrefixCache>>,
}

impl Scheduler {
    async fn run(mut self, stop: CancellationToken) {
        // A virtual clock: each step is due `step time` after the previous one, so steps shorter
        // than the timer's resolution still add up to the right simulated time.
        let mut clock = Instant::now();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = self.rx.recv() => match got {
                        Some(item) => self.waiting.push_back(item),
                        None => return,
                    },
                }
                clock = Instant::now();
            }
            while let Ok(item) = self.rx.try_recv() {
                self.waiting.push_back(item);
            }
            let prefill_tokens = self.admit();
            let step = self.step_time(prefill_tokens);
            if step.is_zero() {
                tokio::task::yield_now().await;
            } else {
                clock += step;
                let now = Instant::now();
                if clock < now {
                    // Behind schedule (an overloaded host): do not try to catch up forever.
                    clock = clock.max(now - Duration::from_millis(5));
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(clock) => {}
                }
            }
            self.decode_step();
        }
    }

    /// Moves waiting jobs into the batch; returns the prompt tokens that need prefill compute.
    fn admit(&mut self) -> usize {
        let mut prefill_tokens = 0;
        let mut cache = self.cache.lock().expect("cache lock");
        while self.running.len() < self.config.max_running_requests {
            let Some((job, out)) = self.waiting.pop_front() else { break };
            self.counters.waiting.fetch_sub(1, Relaxed);
            if out.is_closed() {
                self.counters.aborted.fetch_add(1, Relaxed);
                continue;
            }
            // Like SGLang, at least the last prompt token is computed (its logits are needed),
            // so a repeated prompt reports len - 1 cached tokens.
            let cached = if job.skip_prefill {
                0
            } else {
                cache.match_prefix(&job.tokens).min(job.tokens.len().saturating_sub(1))
            };
            let uncached = job.tokens.len() - cached;
            if prefill_tokens > 0 && prefill_tokens + uncached > self.config.max_prefill_tokens {
                // This step's prefill budget is spent; the job goes first next step.
                self.waiting.push_front((job, out));
                self.counters.waiting.fetch_add(1, Relaxed);
                break;
            }
            if !job.skip_prefill {
                prefill_tokens += uncached;
                cache.insert(&job.tokens);
                self.counters.prompt_tokens.fetch_add(job.tokens.len() as u64, Relaxed);
                self.counters.cached_tokens.fetch_add(cached as u64, Relaxed);
            }
            self.counters.admitted.fetch_add(1, Relaxed);
            self.counters.running.fetch_add(1, Relaxed);
            self.counters.running_tokens.fetch_add(job.tokens.len() as u64, Relaxed);
            let _ = out.send(Event::Started { cached_tokens: cached });
            let sequence = match &job.prompt_text {
                Some(text) => Sequence::of_text(text),
                None => Sequence::of_ids(&job.tokens),
            };
            self.running.push(Active { job, out, sequence, generated: Vec::new() });
        }
        prefill_tokens
    }

    fn step_time(&self, prefill_tokens: usize) -> Duration {
        let c = &self.config;
        if !c.speed.is_finite() {
            return Duration::ZERO;
        }
        let mut t = c.prefill_time_per_token.mul_f64(prefill_tokens as f64);
        if !self.running.is_empty() {
            t += c.decode_time_per_step + c.decode_time_per_running * self.running.len() as u32;
        }
        t.div_f64(c.speed.max(f64::MIN_POSITIVE))
    }

    /// Every running request produces one token; finished and abandoned ones leave the batch.
    fn decode_step(&mut self) {
        let mut finished = Vec::new();
        let counters = &self.counters;
        self.running.retain_mut(|a| {
            let held = (a.job.tokens.len() + a.generated.len()) as u64;
            if a.out.is_closed() {
                counters.aborted.fetch_add(1, Relaxed);
                counters.running.fetch_sub(1, Relaxed);
                counters.running_tokens.fetch_sub(held, Relaxed);
                return false;
            }
            if (a.generated.len() as u32) < a.job.max_new_tokens {
                let id = a.sequence.next_token();
                a.sequence.push(id);
                a.generated.push(id);
                counters.generated_tokens.fetch_add(1, Relaxed);
                counters.running_tokens.fetch_add(1, Relaxed);
                let last = a.generated.len() as u32 >= a.job.max_new_tokens;
                let _ = a.out.send(Event::Token { id, last });
            }
            if a.generated.len() as u32 >= a.job.max_new_tokens {
                let _ = a.out.send(Event::Done);
                counters.completed.fetch_add(1, Relaxed);
                counters.running.fetch_sub(1, Relaxed);
                counters
                    .running_tokens
                    .fetch_sub((a.job.tokens.len() + a.generated.len()) as u64, Relaxed);
                if !a.job.skip_prefill {
                    finished.push(finished_sequence(&self.tokenizer, a));
                }
                return false;
            }
            true
        });
        if !finished.is_empty() {
            let mut cache = self.cache.lock().expect("cache lock");
            for seq in finished {
                cache.insert(&seq);
            }
        }
    }
}

/// What the cache keeps of a finished request: prompt and answer, as the next turn will send it.
fn finished_sequence(tokenizer: &Tokenizer, a: &mut Active) -> Vec<u32> {
    match a.job.prompt_text.take() {
        Some(mut text) => {
            for id in &a.generated {
                text.push_str(token_text(*id));
            }
            if a.job.plain_text {
                tokenizer.encode_plain(&text)
            } else {
                tokenizer.encode(&text)
            }
        }
        None => {
            let mut full = std::mem::take(&mut a.job.tokens);
            full.extend_from_slice(&a.generated);
            full
        }
    }
}

//! `routerctl bench`: a load generator for an LLM router. Sends a `shared-prefix`, `zipf` or
//! `multi-turn` workload (streaming, so it measures time to first token) at a fixed concurrency
//! or request rate, to a router or, with `--affinity`, straight to the workers with each group or
//! conversation pinned to one worker (the perfect-affinity baseline). Reports throughput,
//! latency, TTFT, requests per worker and the fleet's real cache hit rate, read from the
//! simulated workers' `/sim/stats` before and after (a worker that restarts or joins mid-run
//! counts from zero). `--at-fraction F --exec CMD` runs a command part-way through (restart a
//! worker, add one), for the churn scenarios.

mod report;
pub mod workload;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};

pub use report::{Output, Report};
use workload::{Job, Kind, Workload};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The router to load (ignored with --affinity, except to list workers).
    #[arg(long, env = "ROUTERCTL_ENDPOINT", default_value = "http://127.0.0.1:30000")]
    pub url: String,
    #[arg(long, value_enum, default_value_t = Kind::SharedPrefix)]
    pub workload: Kind,
    /// shared-prefix: number of system prompts.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// shared-prefix: questions per system prompt.
    #[arg(long, default_value_t = 16)]
    pub questions: usize,
    /// multi-turn: number of conversations.
    #[arg(long, default_value_t = 16)]
    pub conversations: usize,
    /// multi-turn: turns per conversation.
    #[arg(long, default_value_t = 6)]
    pub turns: usize,
    /// Characters of each system prompt.
    #[arg(long, default_value_t = 2000)]
    pub system_chars: usize,
    /// multi-turn: characters of a system prompt all conversations share, before their own.
    #[arg(long, default_value_t = 0)]
    pub shared_system_chars: usize,
    /// zipf: the skew exponent s (group k drawn with weight 1/k^s); groups x questions requests.
    #[arg(long, default_value_t = 1.1)]
    pub zipf_s: f64,
    /// Characters of each question.
    #[arg(long, default_value_t = 64)]
    pub question_chars: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Requests in flight at once (with --rate: the most in flight).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Start requests at this rate (per second) instead of keeping --concurrency busy.
    #[arg(long)]
    pub rate: Option<f64>,
    /// The workers (default: GET /workers from the router).
    #[arg(long, num_args = 1..)]
    pub workers: Option<Vec<String>>,
    /// Bypass the router: group/conversation k always goes to worker k mod N.
    #[arg(long)]
    pub affinity: bool,
    /// Router replicas to spread the clients over (comma-separated), as a Kubernetes Service
    /// would: each client keeps to one replica (round robin over clients; with --rate, over
    /// requests), and a request that no replica accepted (refused, reset before an answer)
    /// is sent to the next one. Default: --url alone.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub targets: Option<Vec<String>>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// shared-prefix, zipf: send prompts as `input_ids` (one id per UTF-8 byte) instead of
    /// text, so that routerd routes on KV events without a tokenizer (docs/kv-events.md).
    #[arg(long)]
    pub input_ids: bool,
    /// Check every answer against the simulated model's own (a `routerctl sim-worker` fleet
    /// without --tokenizer-path): an answer with a token missing, repeated or changed (as a
    /// badly spliced failover would give) counts in `wrong_answers`.
    #[arg(long)]
    pub check_answers: bool,
    /// Run --exec once this fraction of the requests has been answered.
    #[arg(long, requires = "exec", value_parser = fraction)]
    pub at_fraction: Option<f64>,
    /// A shell command (`sh -c`) to run part-way through, e.g. to restart or add a worker.
    #[arg(long, requires = "at_fraction")]
    pub exec: Option<String>,
    /// shared-prefix, zipf: send the workload's first N requests before measuring, and
    /// measure the rest: the caches and routers are then warm, as in a fleet that has run a
    /// while, instead of all starting empty together.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// The global `-o/--output` (set by `cli::run`).
    #[arg(skip = Output::Table)]
    pub output: Output,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ok: bool,
    pub latency: f64,
    pub ttft: Option<f64>,
    pub output_tokens: u64,
    pub worker: String,
    pub error: Option<String>,
    /// Failed before any answer (connection refused or closed): another replica may take it.
    pub unsent: bool,
    /// With --check-answers: the answer differs from the simulated model's.
    pub wrong: bool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let report = execute(&args).await?;
    report.print(args.output);
    Ok(if report.failed > 0 { 1 } else { 0 })
}

/// Runs the benchmark and returns its report (printing nothing but the progress bar).
pub async fn execute(args: &BenchArgs) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1024).build()?;
    let url = args.url.trim_end_matches('/').to_owned();
    let routers: Vec<String> = match &args.targets {
        Some(t) if !t.is_empty() => t.iter().map(|u| u.trim_end_matches('/').to_owned()).collect(),
        _ => vec![url.clone()],
    };
    // The first replica stands for the router (its worker list, the report's URL).
    let url = routers[0].clone();
    let workers = match &args.workers {
        Some(w) => w.iter().map(|u| u.trim_end_matches('/').to_owned()).collect(),
        None => list_workers(&http, &url).await?,
    };
    if args.affinity && workers.is_empty() {
        bail!("--affinity needs workers: none given with --workers and none registered at {url}");
    }
    let (groups, per_group) = match args.workload {
        Kind::SharedPrefix | Kind::Zipf => (args.groups, args.questions),
        Kind::MultiTurn => (args.conversations, args.turns),
    };
    let mut workload = Workload::new(&workload::Shape {
        kind: args.workload,
        groups,
        per_group,
        system_chars: args.system_chars,
        question_chars: args.question_chars,
        shared_system_chars: args.shared_system_chars,
        zipf_s: args.zipf_s,
        max_tokens: args.max_tokens,
        seed: args.seed,
        input_ids: args.input_ids,
    });
    let all = workload.total();
    let warmup = match args.warmup {
        0 => None,
        n => Some(workload.split_warmup(n).ok_or_else(|| {
            anyhow::anyhow!("--warmup works with the shared-prefix and zipf workloads")
        })?),
    };
    let total = workload.total();
    if total == 0 {
        bail!("--warmup {} leaves no request to measure: the workload has {all}", args.warmup);
    }
    let target = || Target {
        routers: routers.clone(),
        next: std::sync::atomic::AtomicUsize::new(0),
        workers: workers.clone(),
        affinity: args.affinity,
    };
    if let Some(warm) = warmup {
        let warm =
            Arc::new(Shared::new(args, warm, http.clone(), target(), None, CacheTally::default()));
        drive(&warm, args).await;
        warm.progress.finish_and_clear();
    }
    let mut tally = CacheTally::default();
    tally.sample(&http, &workers, true).await;
    let hook = args.at_fraction.zip(args.exec.clone()).map(|(f, cmd)| Hook {
        at: ((f * total as f64).round() as usize).clamp(1, total.max(1)),
        cmd,
    });
    let shared = Arc::new(Shared::new(args, workload, http, target(), hook, tally));
    let started = Instant::now();
    drive(&shared, args).await;
    let elapsed = started.elapsed().as_secs_f64();
    shared.progress.finish_and_clear();
    let hook_task = shared.hook_task.lock().expect("hook task").take();
    if let Some(task) = hook_task {
        let _ = task.await;
    }
    // Workers may have joined through the router mid-run: count them too.
    let mut workers = workers;
    if args.workers.is_none() && !args.affinity {
        if let Ok(now) = list_workers(&shared.http, &url).await {
            workers = now;
        }
    }
    let mut tally = shared.tally.lock().await;
    tally.sample(&shared.http, &workers, false).await;
    let sim = tally.totals();
    let samples = std::mem::take(&mut *shared.samples.lock().expect("samples"));
    let mut report = Report::build(args, &url, elapsed, &samples, sim);
    report.event = shared.event.lock().expect("event").take();
    Ok(report)
}

/// `--exec` and when to run it: after `at` answers.
struct Hook {
    at: usize,
    cmd: String,
}

/// The fleet's prefix-cache counters over the run, summed from `/sim/stats` samples. A worker
/// whose `instance` changed (it restarted) or that was not there at the start (it joined)
/// counts from zero; a worker that does not answer a sample is left out of that sample.
#[derive(Default)]
pub struct CacheTally {
    seen: std::collections::HashMap<String, (String, u64, u64)>,
    cached: u64,
    prompt: u64,
    /// Some worker answered the first sample: the figures mean something.
    known: bool,
}

impl CacheTally {
    /// (cached, prompt) tokens counted so far, when the first sample found any worker.
    pub fn totals(&self) -> Option<(u64, u64)> {
        self.known.then_some((self.cached, self.prompt))
    }

    /// Reads every worker's `/sim/stats`; `first` sets the baseline.
    pub async fn sample(&mut self, http: &reqwest::Client, workers: &[String], first: bool) {
        for w in workers {
            let Ok(resp) = http.get(format!("{w}/sim/stats")).send().await else { continue };
            let Ok(v) = resp.json::<Value>().await else { continue };
            let (Some(cached), Some(prompt)) =
                (v["cached_tokens"].as_u64(), v["prompt_tokens"].as_u64())
            else {
                continue;
            };
            let instance = v["instance"].as_str().unwrap_or_default().to_owned();
            self.known |= first;
            let (c0, p0) = match self.seen.get(w) {
                Some((i, c, p)) if *i == instance && *c <= cached && *p <= prompt => (*c, *p),
                None if first => (cached, prompt),
                _ => (0, 0),
            };
            self.cached += cached - c0;
            self.prompt += prompt - p0;
            self.seen.insert(w.clone(), (instance, cached, prompt));
        }
    }
}

struct Target {
    routers: Vec<String>,
    /// The next replica for a request that comes from no client of its own (--rate).
    next: std::sync::atomic::AtomicUsize,
    workers: Vec<String>,
    affinity: bool,
}

impl Target {
    /// Where `job` goes: its worker with --affinity, else the replica of `client` (or the next
    /// one in turn).
    fn base(&self, job: &Job, client: Option<usize>) -> (&str, usize) {
        if self.affinity {
            return (&self.workers[job.key % self.workers.len()], 0);
        }
        let k =
            client.unwrap_or_else(|| self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let k = k % self.routers.len();
        (&self.routers[k], k)
    }
}

struct Shared {
    workload: Mutex<Workload>,
    rng: Mutex<StdRng>,
    ready: Notify,
    samples: Mutex<Vec<Sample>>,
    progress: indicatif::ProgressBar,
    http: reqwest::Client,
    target: Target,
    hook: Mutex<Option<Hook>>,
    tally: tokio::sync::Mutex<CacheTally>,
    /// What the hook did, for the report.
    event: Mutex<Option<String>>,
    hook_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    check_answers: bool,
}

/// Keeps `--concurrency` requests busy, or starts them at `--rate`, until the workload is done.
async fn drive(shared: &Arc<Shared>, args: &BenchArgs) {
    match args.rate {
        None => drive_closed_loop(shared, args.concurrency.max(1)).await,
        Some(rate) => drive_open_loop(shared, rate, args.concurrency.max(1)).await,
    }
}

impl Shared {
    fn new(
        args: &BenchArgs,
        workload: Workload,
        http: reqwest::Client,
        target: Target,
        hook: Option<Hook>,
        tally: CacheTally,
    ) -> Self {
        let progress = indicatif::ProgressBar::new(workload.total() as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bar:40} {pos}/{len} requests {per_sec} {elapsed}",
            )
            .expect("static template"),
        );
        Shared {
            samples: Mutex::new(Vec::with_capacity(workload.total())),
            workload: Mutex::new(workload),
            rng: Mutex::new(StdRng::seed_from_u64(args.seed ^ 0x5eed)),
            check_answers: args.check_answers,
            ready: Notify::new(),
            progress,
            http,
            target,
            hook: Mutex::new(hook),
            tally: tokio::sync::Mutex::new(tally),
            event: Mutex::new(None),
            hook_task: Mutex::new(None),
        }
    }

    fn next(&self) -> Result<Option<Job>, ()> {
        let mut w = self.workload.lock().expect("workload");
        if w.finished() {
            return Err(());
        }
        Ok(w.next(&mut self.rng.lock().expect("rng")))
    }

    async fn run_one(self: &Arc<Self>, job: Job, client: Option<usize>) {
        let (base, k) = self.target.base(&job, client);
        let (mut sample, mut answer) = send(&self.http, base, &job).await;
        // A replica that took nothing (gone: refused or reset before any answer): the next.
        if !self.target.affinity {
            for t in 1..self.target.routers.len() {
                if !sample.unsent {
                    break;
                }
                let other = &self.target.routers[(k + t) % self.target.routers.len()];
                (sample, answer) = send(&self.http, other, &job).await;
            }
        }
        if self.check_answers && sample.ok {
            sample.wrong = crate::sim::expected_answer(job.path, &job.body())
                .is_some_and(|want| want != answer);
        }
        self.workload.lock().expect("workload").complete(&job, &answer);
        let answered = {
            let mut samples = self.samples.lock().expect("samples");
            samples.push(sample);
            samples.len()
        };
        self.progress.inc(1);
        self.ready.notify_waiters();
        let due = {
            let mut hook = self.hook.lock().expect("hook");
            if hook.as_ref().is_some_and(|h| answered >= h.at) {
                hook.take()
            } else {
                None
            }
        };
        if let Some(hook) = due {
            let s = self.clone();
            let task = tokio::spawn(async move { s.run_hook(hook, answered).await });
            *self.hook_task.lock().expect("hook task") = Some(task);
        }
    }

    /// Samples the caches (so a worker about to restart keeps what it counted), then runs the
    /// command; the load goes on meanwhile.
    async fn run_hook(&self, hook: Hook, answered: usize) {
        let workers = self.target.workers.clone();
        self.tally.lock().await.sample(&self.http, &workers, false).await;
        let started = Instant::now();
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&hook.cmd)
            .stdin(std::process::Stdio::null())
            .status()
            .await;
        let took = started.elapsed().as_secs_f64();
        let what = match status {
            Ok(s) if s.success() => "exited 0".to_owned(),
            Ok(s) => format!("failed ({s})"),
            Err(e) => format!("could not start: {e}"),
        };
        let event = format!("after {answered} answers ran `{}`: {what} in {took:.2} s", hook.cmd);
        *self.event.lock().expect("event") = Some(event);
    }
}

/// Keeps `concurrency` requests in flight until the workload is done.
async fn drive_closed_loop(shared: &Arc<Shared>, concurrency: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..concurrency {
        let s = shared.clone();
        tasks.spawn(async move {
            loop {
                let waiter = s.ready.notified();
                match s.next() {
                    Err(()) => return,
                    Ok(Some(job)) => s.run_one(job, Some(client)).await,
                    // Every unfinished conversation waits for an answer: wait for one.
                    Ok(None) => {
                        let _ = tokio::time::timeout(Duration::from_millis(50), waiter).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Starts a request every 1/rate seconds (when one is ready), at most `limit` in flight.
async fn drive_open_loop(shared: &Arc<Shared>, rate: f64, limit: usize) {
    let slots = Arc::new(Semaphore::new(limit));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tick.tick().await;
        match shared.next() {
            Err(()) => break,
            Ok(None) => continue,
            Ok(Some(job)) => {
                let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                let s = shared.clone();
                tasks.spawn(async move {
                    s.run_one(job, None).await;
                    drop(permit);
                });
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Sends one streaming request; returns its sample and the answer text.
async fn send(http: &reqwest::Client, base: &str, job: &Job) -> (Sample, String) {
    let started = Instant::now();
    let mut sample = Sample {
        ok: false,
        latency: 0.0,
        ttft: None,
        output_tokens: 0,
        worker: base.to_owned(),
        error: None,
        unsent: false,
        wrong: false,
    };
    let mut answer = String::new();
    let post = http
        .post(format!("{base}{}", job.path))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(job.raw.clone());
    let resp = match post.send().await {
        Ok(r) => r,
        Err(e) => {
            sample.unsent = e.is_connect() || e.is_request();
            sample.error = Some(e.to_string());
            sample.latency = started.elapsed().as_secs_f64();
            return (sample, answer);
        }
    };
    if let Some(w) = resp.headers().get("x-routerd-worker").and_then(|v| v.to_str().ok()) {
        sample.worker = w.to_owned();
    }
    let status = resp.status();
    if !status.is_success() {
        sample.error = Some(format!("HTTP {status}: {}", resp.text().await.unwrap_or_default()));
        sample.latency = started.elapsed().as_secs_f64();
        return (sample, answer);
    }
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut done = false;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                sample.error = Some(format!("stream broke: {e}"));
                break;
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let Some(data) = event.strip_prefix(b"data: ") else { continue };
            let data = &data[..data.len() - 2];
            if data == b"[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(data) else { continue };
            on_event(&v, started, &mut sample, &mut answer);
        }
    }
    sample.latency = started.elapsed().as_secs_f64();
    sample.ok = done && sample.error.is_none();
    if !done && sample.error.is_none() {
        sample.error = Some("the stream ended without [DONE]".into());
    }
    (sample, answer)
}

fn on_event(v: &Value, started: Instant, sample: &mut Sample, answer: &mut String) {
    if let Some(e) = v.get("error") {
        sample.error = Some(e.to_string());
        return;
    }
    let mut token = false;
    if let Some(meta) = v.get("meta_info") {
        // Native stream: cumulative text and token count.
        sample.output_tokens = meta["completion_tokens"].as_u64().unwrap_or(sample.output_tokens);
        if let Some(t) = v["text"].as_str() {
            answer.clear();
            answer.push_str(t);
        }
        token = sample.output_tokens > 0;
    } else if let Some(c) = v["choices"].get(0) {
        if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            answer.push_str(t);
            sample.output_tokens += 1;
            token = true;
        }
    }
    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
        sample.output_tokens = n;
    }
    if token && sample.ttft.is_none() {
        sample.ttft = Some(started.elapsed().as_secs_f64());
    }
}

async fn list_workers(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<String>> {
    let v: Value = http
        .get(format!("{url}/workers"))
        .send()
        .await
        .with_context(|| format!("cannot reach the router at {url}"))?
        .error_for_status()
        .with_context(|| format!("{url}/workers answered an error"))?
        .json()
        .await
        .context("GET /workers did not return JSON")?;
    Ok(v["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["url"].as_str().map(str::to_owned))
        .collect())
}

//! What `routerctl bench` prints: a table for people, `-o json` for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{BenchArgs, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: String,
    pub target: String,
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    /// Failed after the first token arrived (a stream cut by a worker failure), as opposed to
    /// failing before anything was streamed.
    pub failed_mid_stream: usize,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub output_tokens_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Cached / prompt tokens over the run, from the workers' `/sim/stats` (null if unknown).
    pub cache_hit_rate: Option<f64>,
    pub cached_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    pub per_worker: BTreeMap<String, usize>,
    /// With --check-answers: answers that differ from the simulated model's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrong_answers: Option<usize>,
    pub first_errors: Vec<String>,
    /// What `--exec` did, and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)] * 1000.0
}

impl Report {
    pub fn build(
        args: &BenchArgs,
        url: &str,
        seconds: f64,
        samples: &[Sample],
        sim: Option<(u64, u64)>,
    ) -> Self {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
        let mut lat: Vec<f64> = ok.iter().map(|s| s.latency).collect();
        let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
        lat.sort_by(f64::total_cmp);
        ttft.sort_by(f64::total_cmp);
        let tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();
        let mut per_worker = BTreeMap::new();
        for s in &ok {
            *per_worker.entry(s.worker.clone()).or_default() += 1;
        }
        let (cached, prompt) = (sim.map(|s| s.0), sim.map(|s| s.1));
        let workload = match args.workload {
            super::Kind::SharedPrefix => {
                format!("shared-prefix ({} groups x {} questions)", args.groups, args.questions)
            }
            super::Kind::Zipf => format!(
                "zipf (s={}, {} groups, {} requests)",
                args.zipf_s,
                args.groups,
                args.groups * args.questions
            ),
            super::Kind::MultiTurn if args.shared_system_chars > 0 => format!(
                "multi-turn ({} conversations x {} turns, {} shared system chars)",
                args.conversations, args.turns, args.shared_system_chars
            ),
            super::Kind::MultiTurn => {
                format!("multi-turn ({} conversations x {} turns)", args.conversations, args.turns)
            }
        };
        let workload = match args.warmup {
            0 => workload,
            n => format!("{workload}, the first {n} unmeasured"),
        };
        let target = if args.affinity {
            "perfect affinity (direct to workers)".to_owned()
        } else {
            url.to_owned()
        };
        Report {
            workload,
            target,
            requests: samples.len(),
            ok: ok.len(),
            failed: samples.len() - ok.len(),
            failed_mid_stream: samples.iter().filter(|s| !s.ok && s.ttft.is_some()).count(),
            seconds,
            requests_per_sec: ok.len() as f64 / seconds.max(1e-9),
            output_tokens_per_sec: tokens as f64 / seconds.max(1e-9),
            latency_p50_ms: percentile(&lat, 50.0),
            latency_p99_ms: percentile(&lat, 99.0),
            ttft_p50_ms: percentile(&ttft, 50.0),
            ttft_p99_ms: percentile(&ttft, 99.0),
            cache_hit_rate: cached
                .zip(prompt)
                .map(|(c, p)| if p == 0 { 0.0 } else { c as f64 / p as f64 }),
            cached_tokens: cached,
            prompt_tokens: prompt,
            per_worker,
            wrong_answers: args.check_answers.then(|| samples.iter().filter(|s| s.wrong).count()),
            first_errors: samples.iter().filter_map(|s| s.error.clone()).take(5).collect(),
            event: None,
        }
    }

    pub fn print(&self, output: Output) {
        if output == Output::Json {
            println!("{}", serde_json::to_string_pretty(self).expect("report serialises"));
            return;
        }
        println!("workload     {}", self.workload);
        println!("target       {}", self.target);
        println!(
            "requests     {} ok, {} failed ({} of them mid-stream) in {:.2} s",
            self.ok, self.failed, self.failed_mid_stream, self.seconds
        );
        println!(
            "throughput   {:.1} req/s, {:.0} output tokens/s",
            self.requests_per_sec, self.output_tokens_per_sec
        );
        println!(
            "latency      p50 {:.1} ms, p99 {:.1} ms",
            self.latency_p50_ms, self.latency_p99_ms
        );
        println!("ttft         p50 {:.1} ms, p99 {:.1} ms", self.ttft_p50_ms, self.ttft_p99_ms);
        if let Some(n) = self.wrong_answers {
            println!("answers      {n} differ from the simulated model's (checked: {})", self.ok);
        }
        match (self.cache_hit_rate, self.cached_tokens, self.prompt_tokens) {
            (Some(r), Some(c), Some(p)) => println!(
                "cache hits   {:.1}% ({c} of {p} prompt tokens, from /sim/stats)",
                r * 100.0
            ),
            _ => println!("cache hits   unknown (the workers have no /sim/stats)"),
        }
        println!("per worker");
        for (w, n) in &self.per_worker {
            println!("  {w:<32} {n}");
        }
        if let Some(e) = &self.event {
            println!("event        {e}");
        }
        for e in &self.first_errors {
            println!("error        {e}");
        }
    }
}

//! Routing decisions from several threads at once: what the request path pays for the policy
//! and the bookkeeping around it (`decide` on 8 workers, each request's in-flight guard, the
//! decision metrics) when the runtime runs one thread per CPU. Each policy is timed with 1, 2
//! and 4 threads deciding concurrently; the figure is wall time per decision over all threads
//! (the inverse of their total throughput): on 2 cores it halves from 1 to 2 threads when they
//! do not contend, and stays flat beyond.
//!
//!   cargo bench -p routerd --bench policy_threads

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use routerd::config::{Config, Flags};
use routerd::metrics::Metrics;
use routerd::policy::{Policy, RequestInfo};
use routerd::registry::{Worker, WorkerRole, WorkerSource, WorkerSpec};

fn workers(n: usize) -> Vec<Arc<Worker>> {
    (0..n)
        .map(|i| {
            Arc::new(Worker::new(WorkerSpec {
                url: format!("http://10.0.0.{i}:8000"),
                role: WorkerRole::Regular,
                bootstrap_port: None,
                api_key: None,
                source: WorkerSource::Config,
                tls: Default::default(),
            }))
        })
        .collect()
}

/// 64 conversations of ~1 000 characters that share 16 system prompts.
fn prompts() -> Vec<String> {
    (0..64)
        .map(|i| {
            let mut s = format!("System prompt {}: ", i % 16);
            while s.len() < 900 {
                s.push_str("You are a careful assistant who answers well. ");
            }
            s.push_str(&format!("user {i}: what is the capital of France?"));
            s
        })
        .collect()
}

/// `iters` decisions split over `threads` threads, all started together.
fn run(
    policy: &Arc<dyn Policy>,
    ws: &Arc<Vec<Arc<Worker>>>,
    threads: usize,
    iters: u64,
) -> Duration {
    let metrics = Arc::new(Metrics::new());
    let texts = Arc::new(prompts());
    let start = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (policy, ws, metrics, texts, start) =
                (policy.clone(), ws.clone(), metrics.clone(), texts.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let began = Instant::now();
                for i in 0..iters / threads as u64 {
                    let text = &texts[(i as usize * 7 + t * 13) % texts.len()];
                    let req = RequestInfo { text, ..Default::default() };
                    let d = policy.decide(&ws, &req).expect("a worker");
                    let _guard = ws[d.index].start_request();
                    metrics.decision("regular", policy.name(), &d);
                }
                began.elapsed()
            })
        })
        .collect();
    start.wait();
    handles.into_iter().map(|h| h.join().unwrap()).max().unwrap_or_default()
}

fn decide_from_threads(c: &mut Criterion) {
    let ws = Arc::new(workers(8));
    for name in ["cache_aware", "cost_aware", "round_robin", "power_of_two"] {
        let flags = Flags { policy: Some(name.into()), ..Default::default() };
        let policy = routerd::policy::build(&Config::build(None, &flags).unwrap().policy);
        let mut g = c.benchmark_group(format!("decide/{name}"));
        for threads in [1usize, 2, 4] {
            g.bench_function(BenchmarkId::new("threads", threads), |b| {
                b.iter_custom(|iters| run(&policy, &ws, threads, iters.max(threads as u64)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, decide_from_threads);
criterion_main!(benches);

//! The cache_aware prefix tree: insert and match latency for prompts of 100, 1 000 and 10 000
//! characters with 8 and 64 workers, plus two one-off measurements printed before the timings:
//! memory per stored character, and 1 000 000 distinct prompts against a bounded budget.
//!
//!   cargo bench -p routerd --bench tree

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use routerd::policy::tree::Tree;

/// A prompt of `len` characters: one of 16 shared system prompts, then a unique tail.
fn prompt(len: usize, i: u64) -> String {
    let mut s = format!("System prompt {}: ", i % 16);
    while s.len() < len.saturating_sub(24) {
        s.push_str("You are a careful assistant who answers well. ");
    }
    s.truncate(len.saturating_sub(24));
    s.push_str(&format!(" question {i:012} ?"));
    s
}

/// A tree already holding `n` prompts spread over `workers` tenants.
fn populated(len: usize, workers: u16, n: u64) -> Tree {
    let mut t = Tree::new(usize::MAX);
    for i in 0..n {
        t.insert(&prompt(len, i), (i % u64::from(workers)) as u16);
    }
    t
}

fn insert_and_match(c: &mut Criterion) {
    for len in [100usize, 1_000, 10_000] {
        for workers in [8u16, 64] {
            let mut g = c.benchmark_group(format!("tree/{len}chars"));
            let mut tree = populated(len, workers, 2_000);
            let mut i = 1_000_000u64;
            g.bench_function(BenchmarkId::new("insert", format!("{workers}workers")), |b| {
                b.iter_batched(
                    || {
                        i += 1;
                        (prompt(len, i), (i % u64::from(workers)) as u16)
                    },
                    |(text, w)| tree.insert(black_box(&text), w),
                    BatchSize::SmallInput,
                )
            });
            let probe = prompt(len, 7);
            g.bench_function(BenchmarkId::new("match", format!("{workers}workers")), |b| {
                b.iter(|| black_box(tree.prefix_match(black_box(&probe))))
            });
            g.finish();
        }
    }
}

fn one_off_measurements() {
    let t = populated(1_000, 8, 20_000);
    let s = t.stats();
    println!(
        "memory: {} chars in {} nodes, ~{} bytes, {:.2} bytes per stored char",
        s.chars,
        s.nodes,
        s.approx_bytes,
        s.approx_bytes as f64 / s.chars as f64
    );
    let budget = 2_000_000;
    let mut t = Tree::new(budget);
    let started = Instant::now();
    let mut max_seen = 0;
    for i in 0..1_000_000u64 {
        t.insert(&prompt(100, i), (i % 64) as u16);
        max_seen = max_seen.max(t.stats().chars);
    }
    let s = t.stats();
    println!(
        "1M distinct 100-char prompts, budget {budget} chars: {:.2}s, max {} chars held, {} evicted, ~{} MiB",
        started.elapsed().as_secs_f64(),
        max_seen,
        s.evicted_chars,
        s.approx_bytes >> 20
    );
    assert!(max_seen <= budget, "budget exceeded");
}

fn benches(c: &mut Criterion) {
    one_off_measurements();
    insert_and_match(c);
}

criterion_group! {
    name = tree;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(tree);

//! The KV-event index at 10^6 blocks: storing a 16-page prompt, removing it, and matching a
//! 128-page prompt against 8 workers (a full hit on one, misses on the rest), plus the memory
//! per block, printed before the timings.
//!
//!   cargo bench -p routerd --bench kv_index

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use routerd::kv::hash::page_hashes;
use routerd::kv::index::{BlockIndex, Holder};
use routerd::kv::wire::Medium;

const WORKERS: u32 = 8;
const BLOCKS: u64 = 1_000_000;

/// Block hashes of prompt `i`: 128 pages of 16 tokens.
fn prompt(i: u64, pages: usize) -> Vec<i64> {
    let tokens: Vec<u32> =
        (0..pages as u32 * 16).map(|t| t.wrapping_mul(2_654_435_761) ^ i as u32).collect();
    page_hashes(&tokens, 16)
}

fn populated() -> BlockIndex {
    let mut ix = BlockIndex::new(usize::MAX);
    let mut n = 0u64;
    let mut i = 0u64;
    while n < BLOCKS {
        let hs = prompt(i, 128);
        n += hs.len() as u64;
        ix.store(Holder { worker: (i % u64::from(WORKERS)) as u32, rank: 0 }, &hs, Medium::Gpu);
        i += 1;
    }
    ix
}

fn bench(c: &mut Criterion) {
    let t = Instant::now();
    let ix = populated();
    println!(
        "kv_index: {} blocks in {:?}; {} bytes of map, {:.1} bytes per block",
        ix.len(),
        t.elapsed(),
        ix.approx_bytes(),
        ix.approx_bytes() as f64 / ix.len() as f64
    );
    let mut ix = ix;
    let hit = prompt(3, 128); // held by worker 3
    let now = Instant::now();
    let ranks = [0u16];
    c.bench_function("kv_index/match 128 pages x 8 workers", |b| {
        b.iter(|| {
            (0..WORKERS).map(|w| ix.matched(w, &ranks, black_box(&hit), now).pages).sum::<usize>()
        })
    });
    let mut i = 10_000_000u64;
    c.bench_function("kv_index/store+remove 16 pages", |b| {
        b.iter(|| {
            i += 1;
            let hs = prompt(i, 16);
            let h = Holder { worker: (i % u64::from(WORKERS)) as u32, rank: 0 };
            ix.store(h, &hs, Medium::Gpu);
            ix.remove(h, &hs, Medium::Gpu);
        })
    });
    let tokens: Vec<u32> = (0..2048).collect();
    c.bench_function("kv_index/hash a 2048-token prompt (16-token pages)", |b| {
        b.iter(|| page_hashes(black_box(&tokens), 16))
    });
    // A zipf-bench prompt: 8,000 ids of a 150,000-token vocabulary, as a client sends them.
    let ids: Vec<u32> = (0..8000u32).map(|i| i.wrapping_mul(2_654_435_761) % 150_000).collect();
    let json = serde_json::to_string(&ids).expect("ids");
    c.bench_function("kv_index/read an 8000-id prompt's JSON", |b| {
        b.iter(|| routerd::proxy::extract::id_list(black_box(&json)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

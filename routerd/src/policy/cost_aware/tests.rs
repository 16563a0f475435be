use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::*;
use crate::policy::test_util::{set_healthy, workers};

fn req(text: &str) -> RequestInfo<'_> {
    RequestInfo { text, ..Default::default() }
}

fn observe(p: &CostAware, w: &Worker, chars: usize, in_flight: u64, ttft_ms: f64) {
    p.observe(
        w,
        &Observation {
            text_chars: chars,
            in_flight,
            ttft: Some(Duration::from_secs_f64(ttft_ms / 1000.0)),
            ..Default::default()
        },
    );
}

#[test]
fn the_estimator_learns_a_workers_figures() {
    let ws = workers(1);
    let p = CostAware::default();
    p.decide(&ws, &req("register the worker")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..400 {
        let chars = rng.random_range(0..20_000usize);
        let n = rng.random_range(0..40u64);
        let y = 3.0 + 20.0 * chars as f64 / 1000.0 + 1.5 * n as f64 + rng.random_range(-1.0..1.0);
        observe(&p, &ws[0], chars, n, y);
    }
    let [c, per_kchar, per_request] = p.figures(ws[0].url()).unwrap();
    assert!((c - 3.0).abs() < 1.0, "c {c}");
    assert!((per_kchar - 20.0).abs() < 1.0, "p {per_kchar}");
    assert!((per_request - 1.5).abs() < 0.3, "q {per_request}");
    // One answer that stalled for a minute moves the figures a little, not to a minute.
    observe(&p, &ws[0], 1000, 2, 60_000.0);
    let [c2, p2, _] = p.figures(ws[0].url()).unwrap();
    assert!(c2 < 40.0 && p2 < 60.0, "a stall wrecked the estimate: c {c2}, p {p2}");
}

#[test]
fn locality_wins_while_it_is_cheaper_than_the_queue() {
    let ws = workers(3);
    let p = CostAware::default();
    let sys = "a long shared system prompt ".repeat(200);
    let first = p.decide(&ws, &req(&format!("{sys} question 0"))).unwrap();
    assert_eq!(first.branch, "miss");
    let home = first.index;
    let second = p.decide(&ws, &req(&format!("{sys} question 1"))).unwrap();
    assert_eq!((second.index, second.branch), (home, "hit"));
    // The holder gets busy: past the point where its queue costs more than prefilling the
    // prompt elsewhere, the request goes elsewhere (and says it traded cache for load).
    let _busy: Vec<_> = (0..60).map(|_| ws[home].start_request()).collect();
    let third = p.decide(&ws, &req(&format!("{sys} question 2"))).unwrap();
    assert_ne!(third.index, home);
    assert_eq!(third.branch, "balance");
    assert!(third.estimate_ms.unwrap() > 0.0);
}

#[test]
fn pending_prefill_spreads_a_burst_of_new_prompts() {
    let ws = workers(2);
    let p = CostAware::default();
    // A burst of long, distinct prompts: each one sent is pending work on its worker until its
    // first bytes come back, so the burst alternates instead of piling onto one worker.
    let mut per_worker = [0; 2];
    let mut held = Vec::new();
    for i in 0..10 {
        let text = format!("{i} {}", "distinct document text ".repeat(400));
        let d = p.decide(&ws, &req(&text)).unwrap();
        per_worker[d.index] += 1;
        held.push(usage_like(&ws[d.index], text.chars().count(), d.matched_chars));
    }
    assert_eq!(per_worker, [5, 5]);
}

/// What the request path does per request: counts its predicted prefill as pending.
fn usage_like(w: &Arc<Worker>, text: usize, matched: usize) -> (Arc<Worker>, u64) {
    let n = (text - matched) as u64;
    w.pending_prefill.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    (w.clone(), n)
}

#[test]
fn a_slower_worker_gets_less_work() {
    let ws = workers(2);
    let p = CostAware::default();
    p.decide(&ws, &req("register both")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let chars = rng.random_range(0..8000usize);
        let n = rng.random_range(0..16u64);
        let y = 2.0 + 10.0 * chars as f64 / 1000.0 + 1.0 * n as f64;
        observe(&p, &ws[0], chars, n, y);
        observe(&p, &ws[1], chars, n, 2.0 * y);
    }
    // Both equally loaded, nothing cached: the fast one is cheaper.
    let mut fast = 0;
    for i in 0..20 {
        let d = p.decide(&ws, &req(&format!("prompt {i} {}", "x".repeat(4000)))).unwrap();
        fast += usize::from(d.index == 0);
    }
    assert_eq!(fast, 20);
    // Until it is busy enough that the slow one answers sooner.
    let _busy: Vec<_> = (0..40).map(|_| ws[0].start_request()).collect();
    assert_eq!(p.decide(&ws, &req("another prompt")).unwrap().index, 1);
}

fn answered(p: &CostAware, w: &Worker, text: &str, predicted: usize, cached_share: f64) {
    let prompt = (text.chars().count() / 4) as u64;
    p.observe(
        w,
        &Observation {
            text_chars: text.chars().count(),
            predicted_chars: predicted,
            prompt_tokens: Some(prompt),
            cached_tokens: Some((prompt as f64 * cached_share) as u64),
            ..Default::default()
        },
    );
}

#[test]
fn answers_with_fewer_cached_tokens_than_predicted_correct_the_tree() {
    let ws = workers(2);
    let p = CostAware::default();
    let texts: Vec<String> =
        (0..10).map(|i| format!("group {i} {}", "shared text ".repeat(100))).collect();
    for t in &texts {
        p.decide(&ws[..1], &req(t)).unwrap();
    }
    let before = p.tree_stats(ws[0].url()).chars;
    // The worker says it had half of what the tree predicted: its share shrinks (LRU first).
    let n = texts[9].chars().count();
    answered(&p, &ws[0], &texts[9], n, 0.6);
    let after = p.tree_stats(ws[0].url()).chars;
    assert!(after < before && after >= before * 7 / 10, "{before} -> {after}");
    assert_eq!(p.corrections(), Corrections { shrunk: 1, cleared: 0 });
    // An answer that matches the prediction breaks any streak.
    answered(&p, &ws[0], &texts[9], n, 0.99);
    // Three answers in a row with nearly nothing cached: the worker lost its cache.
    for _ in 0..3 {
        answered(&p, &ws[0], &texts[9], n, 0.0);
    }
    assert_eq!(p.tree_stats(ws[0].url()).chars, 0);
    assert_eq!(p.corrections().cleared, 1);
    // New prompts now go to the emptied worker, which has the room.
    p.decide(&ws[1..], &req("the other worker holds a little")).unwrap();
    let d = p.decide(&ws, &req("a brand new prompt")).unwrap();
    assert_eq!((d.index, d.branch), (0, "miss"));
}

#[test]
fn reset_removed_and_unroutable_workers() {
    let ws = workers(2);
    let p = CostAware::default();
    let text = "some prompt that lands somewhere";
    let home = p.decide(&ws, &req(text)).unwrap().index;
    assert!(p.tree_stats(ws[home].url()).chars > 0);
    p.worker_reset(ws[home].url());
    assert_eq!(p.tree_stats(ws[home].url()).chars, 0);
    let home = p.decide(&ws, &req(text)).unwrap().index;
    set_healthy(&ws[home], false);
    assert_eq!(p.decide(&ws, &req(text)).unwrap().index, 1 - home);
    p.worker_removed(ws[home].url());
    assert!(p.figures(ws[home].url()).is_none());
    set_healthy(&ws[1 - home], false);
    assert!(p.decide(&ws, &req(text)).is_none());
}

#[test]
fn a_new_worker_starts_from_the_fleets_figures_and_takes_new_prompts() {
    let ws = workers(3);
    let p = CostAware::default();
    for i in 0..6 {
        p.decide(&ws[..2], &req(&format!("{i} {}", "old prompt ".repeat(50)))).unwrap();
    }
    for _ in 0..50 {
        observe(&p, &ws[0], 2000, 4, 30.0);
        observe(&p, &ws[1], 2000, 4, 30.0);
    }
    let _a: Vec<_> = (0..3).map(|_| ws[0].start_request()).collect();
    let _b: Vec<_> = (0..3).map(|_| ws[1].start_request()).collect();
    let d = p.decide(&ws, &req("a prompt nobody has seen")).unwrap();
    assert_eq!((d.index, d.branch), (2, "miss"));
    let [c0, p0, q0] = p.figures(ws[0].url()).unwrap();
    let [c2, p2, q2] = p.figures(ws[2].url()).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(
        close(c0, c2) || close(p0, p2) || close(q0, q2),
        "the newcomer has the fleet's average"
    );
}

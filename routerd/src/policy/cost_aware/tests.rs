use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::*;
use crate::policy::test_util::{set_healthy, workers};

fn req(text: &str) -> RequestInfo<'_> {
    RequestInfo { text, ..Default::default() }
}

/// A streamed answer: `ttft_ms` after being sent with `chars` of prefill and `waiting`
/// requests ahead of it.
fn observe(p: &CostAware, w: &Worker, chars: usize, waiting: u64, ttft_ms: f64) {
    p.observe(
        w,
        &Observation {
            text_chars: chars,
            pending_requests: waiting,
            ttft: Some(Duration::from_secs_f64(ttft_ms / 1000.0)),
            ..Default::default()
        },
    );
}

/// Requests queued on `w` (sent, no first bytes yet), as the request path counts them.
fn queue(w: &Worker, n: u64) {
    w.pending_requests.fetch_add(n, Relaxed);
}

#[test]
fn the_estimator_learns_the_fleets_figures() {
    let ws = workers(1);
    let p = CostAware::default();
    p.decide(&ws, &req("register the worker")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..600 {
        let chars = rng.random_range(0..20_000usize);
        let n = rng.random_range(0..40u64);
        let y = 3.0 + 20.0 * chars as f64 / 1000.0 + 1.5 * n as f64 + rng.random_range(-1.0..1.0);
        observe(&p, &ws[0], chars, n, y);
    }
    let ([c, per_kchar, per_request], slowness) = p.figures(ws[0].url()).unwrap();
    assert!((c - 3.0).abs() < 1.0, "c {c}");
    assert!((per_kchar - 20.0).abs() < 1.0, "p {per_kchar}");
    assert!((per_request - 1.5).abs() < 0.3, "q {per_request}");
    assert!((slowness - 1.0).abs() < 0.1, "one worker is the fleet: {slowness}");
    // One answer that stalled for a minute moves the figures a little, not to a minute.
    observe(&p, &ws[0], 1000, 2, 60_000.0);
    let ([c2, p2, q2], _) = p.figures(ws[0].url()).unwrap();
    assert!(c2 < 10.0 && p2 < 30.0 && q2 < 5.0, "a stall wrecked the fit: {c2} {p2} {q2}");
}

#[test]
fn figures_stay_non_negative_on_data_that_fits_badly() {
    let ws = workers(1);
    let p = CostAware::default();
    p.decide(&ws, &req("register")).unwrap();
    // Time to first token falling as the queue grows (no real engine does this): the fit
    // keeps every figure at zero or above rather than learning a negative cost per request.
    for n in 0..200u64 {
        observe(&p, &ws[0], 1000, n % 20, 50.0 - 2.0 * (n % 20) as f64);
    }
    let (f, _) = p.figures(ws[0].url()).unwrap();
    assert!(f.iter().all(|x| *x >= 0.0 && x.is_finite()), "{f:?}");
}

#[test]
fn locality_wins_until_the_holders_queue_costs_more_than_the_prompt_elsewhere() {
    let ws = workers(3);
    let p = CostAware::default();
    let sys = "a long shared system prompt ".repeat(200);
    let first = p.decide(&ws, &req(&format!("{sys} question 0"))).unwrap();
    assert_eq!(first.branch, "miss");
    let home = first.index;
    let second = p.decide(&ws, &req(&format!("{sys} question 1"))).unwrap();
    assert_eq!((second.index, second.branch), (home, "hit"));
    // Requests in flight (decoding) do not move it; a long queue for a batch slot does, once
    // the fit has seen enough answers to be trusted (until then, locality holds).
    let _busy: Vec<_> = (0..10).map(|_| ws[home].start_request()).collect();
    assert_eq!(p.decide(&ws, &req(&format!("{sys} question 2"))).unwrap().index, home);
    queue(&ws[home], 200);
    let warming = p.decide(&ws, &req(&format!("{sys} question 3"))).unwrap();
    assert_eq!((warming.index, warming.branch), (home, "hit"));
    for i in 0..WARM_UP {
        observe(
            &p,
            &ws[(i % 3) as usize],
            2000 + 100 * i as usize,
            i % 7,
            5.0 + 2.0 * (i % 7) as f64,
        );
    }
    let moved = p.decide(&ws, &req(&format!("{sys} question 4"))).unwrap();
    assert_ne!(moved.index, home);
    assert_eq!(moved.branch, "balance");
    assert!(moved.estimate_ms.unwrap() > 0.0);
}

#[test]
fn a_copy_to_an_idle_worker_is_worth_it_when_the_holders_queue_is_long() {
    let ws = workers(2);
    let p = CostAware::default();
    let sys = "a hot group's system prompt ".repeat(200);
    p.decide(&ws[..1], &req(&sys)).unwrap();
    p.decide(&ws[1..], &req("the other worker holds a little of its own")).unwrap();
    for i in 0..WARM_UP {
        observe(
            &p,
            &ws[(i % 2) as usize],
            1000 + 50 * i as usize,
            i % 5,
            3.0 + 1.0 * (i % 5) as f64,
        );
    }
    // Both busy decoding; the holder has a queue for slots, the other none.
    let _a: Vec<_> = (0..20).map(|_| ws[0].start_request()).collect();
    let _b: Vec<_> = (0..16).map(|_| ws[1].start_request()).collect();
    queue(&ws[0], 4);
    assert_eq!(p.decide(&ws, &req(&format!("{sys} q1"))).unwrap().index, 0, "a short queue");
    // A long one: the copy, made once, relieves every request queued at the holder.
    queue(&ws[0], 40);
    let d = p.decide(&ws, &req(&format!("{sys} q2"))).unwrap();
    assert_eq!((d.index, d.branch), (1, "balance"));
    // From then on both hold it.
    let d = p.decide(&ws, &req(&format!("{sys} q3"))).unwrap();
    assert_eq!((d.index, d.branch), (1, "hit"));
}

#[test]
fn pending_prefill_spreads_a_burst_of_new_prompts() {
    let ws = workers(2);
    let p = CostAware::default();
    // A burst of long, distinct prompts: each one sent is pending prefill on its worker until
    // its first bytes come back, so the burst alternates instead of piling onto one worker.
    let mut per_worker = [0; 2];
    for i in 0..10 {
        let text = format!("{i} {}", "distinct document text ".repeat(400));
        let d = p.decide(&ws, &req(&text)).unwrap();
        per_worker[d.index] += 1;
        let w = &ws[d.index];
        w.pending_prefill.fetch_add((text.chars().count() - d.matched_chars) as u64, Relaxed);
        queue(w, 1);
    }
    assert_eq!(per_worker, [5, 5]);
}

#[test]
fn new_prefixes_go_where_the_cache_has_room() {
    let ws = workers(2);
    let p = CostAware::default();
    for i in 0..4 {
        p.decide(&ws[..1], &req(&format!("{i} {}", "held by worker zero ".repeat(50)))).unwrap();
    }
    // Worker 0 holds four groups, worker 1 nothing; worker 1 has a little more in flight.
    let _b: Vec<_> = (0..2).map(|_| ws[1].start_request()).collect();
    let d = p.decide(&ws, &req(&format!("new {}", "a new group's prompt ".repeat(50)))).unwrap();
    assert_eq!((d.index, d.branch), (1, "miss"));
}

#[test]
fn first_turns_after_a_shared_system_prompt_spread_by_room() {
    // A burst of conversations opening with one shared system prompt: each first turn
    // matches a third of its text on whoever holds the prompt, but brings more new text than
    // that. Each conversation is a group of its own, so they spread over the fleet as new
    // groups do (and do not all pile onto the first holder of the system prompt).
    let ws = workers(4);
    let p = CostAware::default();
    let sys = "you are a helpful assistant; ".repeat(70);
    let mut per_worker = [0usize; 4];
    for i in 0..64 {
        let text = format!(
            "{sys}{}",
            format!("conversation {i} opens with its own long question ").repeat(80)
        );
        let d = p.decide(&ws, &req(&text)).unwrap();
        per_worker[d.index] += 1;
    }
    assert!(per_worker.iter().all(|&n| n == 16), "conversations per worker: {per_worker:?}");
}

#[test]
fn a_slower_worker_gets_less_work() {
    let ws = workers(2);
    let p = CostAware::default();
    p.decide(&ws, &req("register both")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..300 {
        let chars = rng.random_range(0..8000usize);
        let n = rng.random_range(0..16u64);
        let y = 2.0 + 10.0 * chars as f64 / 1000.0 + 1.0 * n as f64;
        observe(&p, &ws[0], chars, n, y);
        observe(&p, &ws[1], chars, n, 2.0 * y);
    }
    let (_, fast) = p.figures(ws[0].url()).unwrap();
    let (_, slow) = p.figures(ws[1].url()).unwrap();
    assert!(slow / fast > 1.6 && slow / fast < 2.5, "{fast} vs {slow}");
    // Both idle and both holding the prompt's prefix: the fast one answers sooner.
    let sys = "a system prompt both workers hold ".repeat(100);
    p.decide(&ws[..1], &req(&sys)).unwrap();
    p.decide(&ws[1..], &req(&sys)).unwrap();
    for i in 0..10 {
        let d = p.decide(&ws, &req(&format!("{sys} question {i}"))).unwrap();
        assert_eq!((d.index, d.branch), (0, "hit"));
    }
    // Until its queue is long enough that the slow one answers sooner.
    queue(&ws[0], 200);
    let d = p.decide(&ws, &req(&format!("{sys} another question"))).unwrap();
    assert_eq!((d.index, d.branch), (1, "hit"));
}

fn answered(p: &CostAware, w: &Worker, text: &str, cached_share: f64) {
    let prompt = (text.chars().count() / 4) as u64;
    p.observe(
        w,
        &Observation {
            text_chars: text.chars().count(),
            predicted_chars: text.chars().count(),
            prompt_tokens: Some(prompt),
            cached_tokens: Some((prompt as f64 * cached_share) as u64),
            ..Default::default()
        },
    );
}

#[test]
fn a_worker_whose_answers_say_it_lost_its_cache_starts_empty() {
    let ws = workers(2);
    let p = CostAware::default();
    let text = format!("group {}", "shared text ".repeat(100));
    p.decide(&ws[..1], &req(&text)).unwrap();
    p.decide(&ws[1..], &req("the other worker holds a little")).unwrap();
    for _ in 0..10 {
        answered(&p, &ws[0], &text, 0.99);
    }
    for _ in 0..4 {
        answered(&p, &ws[0], &text, 0.0);
    }
    assert!(p.tree_stats(ws[0].url()).chars > 0, "four misses are not yet a lost cache");
    answered(&p, &ws[0], &text, 0.0);
    assert_eq!(p.tree_stats(ws[0].url()).chars, 0);
    assert_eq!(p.cache_clears(), 1);
    // New prompts now go to the emptied worker, which has the room.
    let d = p.decide(&ws, &req(&format!("brand new {}", "z".repeat(500)))).unwrap();
    assert_eq!((d.index, d.branch), (0, "miss"));
}

#[test]
fn an_evicting_worker_is_not_taken_for_a_restarted_one() {
    let ws = workers(1);
    let p = CostAware::default();
    let text = format!("group {}", "shared text ".repeat(100));
    p.decide(&ws, &req(&text)).unwrap();
    // Under memory pressure: predictions half borne out, and runs of complete misses.
    for round in 0..20 {
        for _ in 0..3 {
            answered(&p, &ws[0], &text, 0.4);
        }
        for _ in 0..(5 + round % 3) {
            answered(&p, &ws[0], &text, 0.0);
        }
    }
    assert_eq!(p.cache_clears(), 0);
    assert!(p.tree_stats(ws[0].url()).chars > 0);
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

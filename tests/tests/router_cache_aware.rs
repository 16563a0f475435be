//! cache_aware end to end: requests sharing a system prompt, and the turns of a conversation,
//! land where their prefix is cached, measured by the simulated workers' real cache hits.

use routerd_e2e::{fleet, get_json, post_json, router, router_config, shutdown_all, stats};
use serde_json::json;

/// Sends `groups` system prompts with `questions` each, interleaved; returns the fleet's hit
/// rate (cached / prompt tokens) as the workers measured it.
pub(crate) async fn shared_prefix_hit_rate(policy: &str) -> f64 {
    let ws = fleet(4, |a| a.zero_compute = true).await;
    let refs: Vec<_> = ws.iter().collect();
    let r = router(router_config(policy, &refs)).await;
    let systems: Vec<String> = (0..8)
        .map(|g| {
            format!("System prompt of group {g}: ") + &"You are a meticulous assistant. ".repeat(12)
        })
        .collect();
    // All 48 (group, question) pairs in a fixed pseudo-random order: a cyclic order would let
    // round robin map each group to the same worker every time.
    let mut order: Vec<(usize, usize)> = (0..6).flat_map(|q| (0..8).map(move |g| (g, q))).collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..order.len()).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    for (g, q) in order {
        let text = format!("{}Question {q} for group {g}?", systems[g]);
        let body = json!({"text": text, "sampling_params": {"max_new_tokens": 1}});
        assert_eq!(post_json(format!("{}/generate", r.url()), &body).await.0, 200);
    }
    let (mut cached, mut prompt) = (0.0, 0.0);
    for w in &ws {
        let s = stats(w).await;
        cached += s["cached_tokens"].as_f64().unwrap();
        prompt += s["prompt_tokens"].as_f64().unwrap();
    }
    // The router's own reading of the workers' reported figures agrees with the workers.
    let views = get_json(&format!("{}/workers", r.url())).await;
    let reported: (f64, f64) =
        views["workers"].as_array().unwrap().iter().fold((0.0, 0.0), |acc, w| {
            (
                acc.0 + w["cached_tokens"].as_f64().unwrap(),
                acc.1 + w["prompt_tokens"].as_f64().unwrap(),
            )
        });
    assert_eq!(reported, (cached, prompt), "router-side usage accounting matches /sim/stats");
    if policy != "round_robin" {
        let tree: u64 = views["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["tree_chars"].as_u64().unwrap())
            .sum();
        assert!(tree > 0, "the prefix tree is visible per worker");
    }
    r.shutdown().await;
    shutdown_all(ws).await;
    cached / prompt
}

#[tokio::test]
async fn cache_aware_beats_round_robin_on_shared_prefixes() {
    let ca = shared_prefix_hit_rate("cache_aware").await;
    let rr = shared_prefix_hit_rate("round_robin").await;
    // Perfect affinity: every group's first request misses, the other 5 hit about 96% of their
    // prompt, so about 0.8 of all prompt tokens; round robin makes each group miss on up to 4
    // workers.
    assert!(ca > 0.75, "cache_aware hit rate {ca:.3}");
    assert!(ca > rr + 0.1, "cache_aware {ca:.3} vs round_robin {rr:.3}");
    eprintln!("shared-prefix hit rate: cache_aware {ca:.3}, round_robin {rr:.3}");
}

#[tokio::test]
async fn a_conversation_stays_on_one_worker() {
    let ws = fleet(4, |a| a.zero_compute = true).await;
    let refs: Vec<_> = ws.iter().collect();
    let r = router(router_config("cache_aware", &refs)).await;
    let mut messages = vec![
        json!({"role": "system", "content": "You answer questions about routers. ".repeat(6)}),
    ];
    let mut home = None;
    for turn in 0..5 {
        messages.push(json!({"role": "user", "content": format!("Question number {turn}?")}));
        let resp = routerd_e2e::client()
            .post(format!("{}/v1/chat/completions", r.url()))
            .json(&json!({"messages": messages, "max_tokens": 8}))
            .send()
            .await
            .unwrap();
        let worker = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
        assert_eq!(home.get_or_insert_with(|| worker.clone()), &worker, "turn {turn} moved");
        let body: serde_json::Value = resp.json().await.unwrap();
        if turn > 0 {
            assert!(body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
        }
        messages.push(
            json!({"role": "assistant", "content": body["choices"][0]["message"]["content"]}),
        );
    }
    r.shutdown().await;
    shutdown_all(ws).await;
}

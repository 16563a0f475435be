//! cost_aware end to end: prefixes stay where they are cached, and a worker whose cache was
//! lost (flushed behind the router's back or through it, or back from being unhealthy) is seen
//! empty.

use std::time::Duration;

use routerd_e2e::{client, eventually, fleet, get_json, router, router_config, shutdown_all};
use serde_json::{json, Value};

use crate::router_cache_aware::shared_prefix_hit_rate;

#[tokio::test]
async fn cost_aware_keeps_shared_prefixes_local() {
    let cost = shared_prefix_hit_rate("cost_aware").await;
    // The same bound as cache_aware's: every group misses once, then hits on its worker.
    assert!(cost > 0.75, "cost_aware hit rate {cost:.3}");
}

/// Sends `text` to `/generate` (streamed when asked); returns the worker that answered and the
/// decision record.
async fn send(router: &str, text: &str, stream: bool) -> (String, Value) {
    let body = json!({"text": text, "stream": stream, "sampling_params": {"max_new_tokens": 2}});
    let (worker, decision, _) = routerd_e2e::explained(router, "/generate", &body).await;
    (worker, decision)
}

async fn tree_chars(router: &str, worker: &str) -> u64 {
    let v = get_json(&format!("{router}/workers")).await;
    v["workers"].as_array().unwrap().iter().find(|w| w["url"] == worker).unwrap()["tree_chars"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn a_worker_flushed_behind_the_routers_back_is_seen_empty() {
    let ws = fleet(1, |a| a.zero_compute = true).await;
    let r = router(router_config("cost_aware", &[&ws[0]])).await;
    let worker = ws[0].url();
    let groups: Vec<String> = (0..6)
        .map(|g| format!("Group {g} system prompt. {}Question?", "Some context here. ".repeat(30)))
        .collect();
    let (_, first) = send(&r.url(), &groups[0], true).await;
    assert_eq!(first["branch"], "miss");
    // The worker's answers bear the predictions out, again and again: it earns trust.
    for _ in 0..3 {
        for g in &groups {
            send(&r.url(), g, true).await;
        }
    }
    let (_, hit) = send(&r.url(), &groups[5], true).await;
    assert_eq!(hit["branch"], "hit");
    assert!(hit["estimate_ms"].as_f64().is_some(), "{hit}");
    assert!(tree_chars(&r.url(), &worker).await > 0);
    // Its cache is flushed directly, not through the router. Five answers in a row with
    // nothing cached of what the tree predicted: the router drops its picture of the worker.
    let flushed = client().post(format!("{worker}/flush_cache")).send().await.unwrap();
    assert_eq!(flushed.status(), 200);
    for g in &groups[..4] {
        send(&r.url(), g, true).await;
    }
    assert!(tree_chars(&r.url(), &worker).await > 0, "four misses are not yet a lost cache");
    send(&r.url(), &groups[4], true).await;
    eventually(Duration::from_secs(5), "the worker's entries are dropped", || async {
        tree_chars(&r.url(), &worker).await == 0
    })
    .await;
    let (_, after) = send(&r.url(), &groups[5], true).await;
    assert_eq!(after["branch"], "miss", "{after}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_worker_back_from_unhealthy_starts_empty() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let refs: Vec<_> = ws.iter().collect();
    let mut cfg = router_config("cost_aware", &refs);
    cfg.health.interval = Duration::from_millis(50);
    cfg.health.failure_threshold = 1;
    cfg.health.success_threshold = 1;
    let r = router(cfg).await;
    let prompt = format!("Another long prompt. {}", "Filler words here. ".repeat(30));
    let (home, _) = send(&r.url(), &prompt, false).await;
    assert!(tree_chars(&r.url(), &home).await > 0);
    let sick = ws.iter().find(|w| w.url() == home).unwrap();
    let url = format!("{home}/sim/faults");
    let fail = json!({"unhealthy": true});
    assert_eq!(client().post(&url).json(&fail).send().await.unwrap().status(), 200);
    let view = |r: String, home: String| async move {
        let v = get_json(&format!("{r}/workers")).await;
        v["workers"].as_array().unwrap().iter().find(|w| w["url"] == home).unwrap().clone()
    };
    eventually(Duration::from_secs(5), "the worker is marked unhealthy", || async {
        view(r.url(), home.clone()).await["healthy"] == false
    })
    .await;
    let heal = json!({"unhealthy": false});
    assert_eq!(client().post(&url).json(&heal).send().await.unwrap().status(), 200);
    eventually(Duration::from_secs(5), "the worker is healthy again", || async {
        view(r.url(), home.clone()).await["healthy"] == true
    })
    .await;
    assert_eq!(tree_chars(&r.url(), &sick.url()).await, 0);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_flush_through_the_router_empties_the_policys_picture() {
    for policy in ["cost_aware", "cache_aware"] {
        let ws = fleet(2, |a| a.zero_compute = true).await;
        let refs: Vec<_> = ws.iter().collect();
        let r = router(router_config(policy, &refs)).await;
        let prompt = format!("A prompt to be flushed. {}", "Filler words here. ".repeat(30));
        let (home, _) = send(&r.url(), &prompt, false).await;
        assert!(tree_chars(&r.url(), &home).await > 0, "{policy}");
        let flushed = client().post(format!("{}/flush_cache", r.url())).send().await.unwrap();
        assert_eq!(flushed.status(), 200, "{policy}");
        for w in &ws {
            assert_eq!(tree_chars(&r.url(), &w.url()).await, 0, "{policy}: {}", w.url());
        }
        let (_, again) = send(&r.url(), &prompt, false).await;
        assert_eq!(again["branch"], "miss", "{policy}: {again}");
        r.shutdown().await;
        shutdown_all(ws).await;
    }
}

//! How routerd behaves under load and change: distribution per policy, runtime removal with
//! in-flight requests, admission limits, client disconnects and graceful shutdown.

use std::num::NonZeroUsize;
use std::time::Duration;

use routerd::serve::Ended;
use routerd_e2e::{
    client, disconnect_twice, eventually, fleet, get_json, post_json, router, router_config,
    shutdown_all, sim, small_generate, stats,
};
use serde_json::json;

async fn requests(ws: &[routerctl::sim::SimWorker]) -> Vec<u64> {
    let mut out = Vec::new();
    for w in ws {
        out.push(stats(w).await["requests"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn round_robin_and_random_spread_evenly() {
    let ws = fleet(3, |_| {}).await;
    let refs: Vec<_> = ws.iter().collect();
    let r = router(router_config("round_robin", &refs)).await;
    for _ in 0..30 {
        post_json(format!("{}/generate", r.url()), &small_generate()).await;
    }
    assert_eq!(requests(&ws).await, vec![10, 10, 10]);
    r.shutdown().await;

    let r = router(router_config("random", &refs)).await;
    for _ in 0..300 {
        post_json(format!("{}/generate", r.url()), &small_generate()).await;
    }
    let got = requests(&ws).await;
    assert!(got.iter().all(|&n| n > 10 + 60), "random spread {got:?}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn power_of_two_balances_its_own_in_flight_requests() {
    let ws = fleet(2, |a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
    })
    .await;
    let r = router(router_config("power_of_two", &[&ws[0], &ws[1]])).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let resp = client()
            .post(format!("{}/generate", r.url()))
            .json(&json!({"text": "long", "stream": true, "sampling_params": {"max_new_tokens": 500}}))
            .send()
            .await
            .unwrap();
        streams.push(resp);
    }
    let views = get_json(&format!("{}/workers", r.url())).await;
    let loads: Vec<u64> =
        (0..2).map(|i| views["workers"][i]["in_flight"].as_u64().unwrap()).collect();
    assert_eq!(loads, vec![3, 3], "each new stream went to the less loaded worker");
    drop(streams);
    eventually(Duration::from_secs(5), "streams released", || async {
        let v = get_json(&format!("{}/workers", r.url())).await;
        v["workers"][0]["in_flight"] == 0 && v["workers"][1]["in_flight"] == 0
    })
    .await;
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn power_of_two_sees_load_from_outside_via_get_load() {
    let ws = fleet(2, |a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
    })
    .await;
    let mut cfg = router_config("power_of_two", &[&ws[0], &ws[1]]);
    cfg.policy.load_poll_interval = Some(Duration::from_millis(50));
    let r = router(cfg).await;
    // Traffic that bypasses this router (another router, a direct client) keeps worker 0 busy.
    let mut direct = Vec::new();
    for _ in 0..4 {
        let resp = client()
            .post(format!("{}/generate", ws[0].url()))
            .json(&json!({"text": "long", "stream": true, "sampling_params": {"max_new_tokens": 500}}))
            .send()
            .await
            .unwrap();
        direct.push(resp);
    }
    eventually(Duration::from_secs(5), "the poll sees worker 0's load", || async {
        get_json(&format!("{}/workers", r.url())).await["workers"][0]["load"] == 4
    })
    .await;
    let before = requests(&ws).await;
    for _ in 0..20 {
        post_json(format!("{}/generate", r.url()), &small_generate()).await;
    }
    let after = requests(&ws).await;
    assert_eq!(after[0], before[0], "nothing new for the busy worker: {before:?} -> {after:?}");
    assert_eq!(after[1], before[1] + 20);
    drop(direct);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn removed_worker_finishes_its_streams_and_gets_nothing_new() {
    let ws = fleet(2, |a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 5.0;
    })
    .await;
    let r = router(router_config("round_robin", &[&ws[0], &ws[1]])).await;
    let resp = client()
        .post(format!("{}/generate", r.url()))
        .json(&json!({"text": "s", "stream": true, "sampling_params": {"max_new_tokens": 40}}))
        .send()
        .await
        .unwrap();
    let on = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
    client().post(format!("{}/remove_worker?url={on}", r.url())).send().await.unwrap();
    let events = routerd_e2e::sse_events(&resp.text().await.unwrap());
    assert_eq!(events.len(), 41, "the stream on the removed worker ran to the end");
    let busy = ws.iter().position(|w| w.url() == on).unwrap();
    let before = requests(&ws).await;
    for _ in 0..6 {
        post_json(format!("{}/generate", r.url()), &small_generate()).await;
    }
    let after = requests(&ws).await;
    assert_eq!(after[busy], before[busy]);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn admission_queue_429_when_full_408_on_timeout() {
    let w = sim(|a| a.faults.latency_ms = 2500).await;
    let mut cfg = router_config("round_robin", &[&w]);
    cfg.server.max_concurrent_requests = NonZeroUsize::new(1);
    cfg.server.queue_size = 1;
    cfg.server.queue_timeout = Duration::from_millis(1000);
    let r = router(cfg).await;
    let u = format!("{}/generate", r.url());
    let spawn_post = |u: String| tokio::spawn(async move { post_json(u, &small_generate()).await });
    // Wait on the router's own state, not on sleeps: a loaded CI machine reorders sleeps.
    let first = spawn_post(u.clone());
    eventually(Duration::from_secs(5), "first request holds the slot", || async {
        get_json(&format!("{}/workers", r.url())).await["workers"][0]["in_flight"] == 1
    })
    .await;
    let queued = spawn_post(u.clone());
    let limiter = r.app.live().limiter.clone().expect("limits configured");
    eventually(Duration::from_secs(5), "second request waits in the queue", || {
        let l = limiter.clone();
        async move { l.waiting() == 1 }
    })
    .await;
    let (s, body) = post_json(u.clone(), &small_generate()).await;
    assert_eq!(s, 429, "{body}");
    let (s, body) = queued.await.unwrap();
    assert_eq!(s, 408, "{body}");
    assert_eq!(body["error"]["type"], "queue_timeout");
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(post_json(u, &small_generate()).await.0, 200, "slots are released");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_worker_request() {
    let w = sim(|a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 10.0;
    })
    .await;
    let r = router(router_config("round_robin", &[&w])).await;
    disconnect_twice(&format!("{}/generate", r.url()), &w).await;
    eventually(Duration::from_secs(5), "router released the slots", || async {
        get_json(&format!("{}/workers", r.url())).await["workers"][0]["in_flight"] == 0
    })
    .await;
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn shutdown_fails_readiness_and_drains_streams() {
    let w = sim(|a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 10.0;
    })
    .await;
    let r = router(router_config("round_robin", &[&w])).await;
    let u = r.url();
    let resp = client()
        .post(format!("{u}/generate"))
        .json(&json!({"text": "s", "stream": true, "sampling_params": {"max_new_tokens": 30}}))
        .send()
        .await
        .unwrap();
    let app = r.app.clone();
    let shutdown = tokio::spawn(r.shutdown());
    eventually(Duration::from_secs(2), "draining", || async {
        app.draining.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let events = routerd_e2e::sse_events(&resp.text().await.unwrap());
    assert_eq!(events.len(), 31, "the in-flight stream finished during the drain");
    assert_eq!(shutdown.await.unwrap(), Ended::Drained);
    assert!(client().get(format!("{u}/health")).send().await.is_err(), "no longer listening");
    assert_eq!(stats(&w).await["aborted"], 0);
    w.shutdown().await;
}

//! Each fault injection mode of the simulated worker, set by flag or at runtime.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use routerd::serve::Ended;
use routerd_e2e::{client, eventually, post_json, sim, stats};
use serde_json::{json, Value};

fn gen(url: &str) -> String {
    format!("{url}/generate")
}

#[tokio::test]
async fn fixed_latency_delays_the_answer() {
    let w = sim(|a| a.faults.latency_ms = 150).await;
    let t = Instant::now();
    let (s, _) =
        post_json(gen(&w.url()), &json!({"text": "x", "sampling_params": {"max_new_tokens": 1}}))
            .await;
    assert_eq!(s, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
    w.shutdown().await;
}

#[tokio::test]
async fn errors_for_the_first_n_then_success() {
    let w = sim(|a| {
        a.faults.error_first = 2;
        a.faults.error_status = 429;
        a.faults.retry_after_secs = Some(3);
    })
    .await;
    for _ in 0..2 {
        let resp = client().post(gen(&w.url())).json(&json!({"text": "x"})).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], 429);
    }
    let (s, _) = post_json(gen(&w.url()), &json!({"text": "x"})).await;
    assert_eq!(s, 200);
    let st = stats(&w).await;
    assert_eq!(st["injected_errors"], 2);
    assert_eq!(st["sequences"], 1, "failed requests never reached the engine");
    w.shutdown().await;
}

#[tokio::test]
async fn error_rate_one_fails_everything_and_zero_nothing() {
    let w = sim(|a| a.faults.error_rate = 1.0).await;
    for _ in 0..5 {
        assert_eq!(post_json(gen(&w.url()), &json!({"text": "x"})).await.0, 500);
    }
    let (s, f) = post_json(format!("{}/sim/faults", w.url()), &json!({"error_rate": 0.0})).await;
    assert_eq!(s, 200);
    assert_eq!(f["error_rate"], 0.0);
    for _ in 0..5 {
        assert_eq!(post_json(gen(&w.url()), &json!({"text": "x"})).await.0, 200);
    }
    w.shutdown().await;
}

#[tokio::test]
async fn hang_before_headers_until_the_client_gives_up() {
    let w = sim(|a| a.faults.hang = true).await;
    let err = client()
        .post(gen(&w.url()))
        .timeout(Duration::from_millis(200))
        .json(&json!({"text": "x", "stream": true}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    let st = stats(&w).await;
    assert_eq!(st["hung"], 1);
    assert_eq!(st["sequences"], 0);
    w.shutdown().await;
}

#[tokio::test]
async fn stall_mid_stream_after_n_tokens() {
    let w = sim(|a| a.faults.stall_after_tokens = Some(3)).await;
    let resp = client()
        .post(gen(&w.url()))
        .json(&json!({"text": "x", "stream": true, "sampling_params": {"max_new_tokens": 50}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let stalled = loop {
        match tokio::time::timeout(Duration::from_millis(500), body.next()).await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(stalled, "the stream should stall, got: {text}");
    assert_eq!(routerd_e2e::sse_events(&text).len(), 3, "three events, then silence: {text}");
    drop(body);
    eventually(Duration::from_secs(5), "stalled request released", || async {
        stats(&w).await["running"] == 0
    })
    .await;
    w.shutdown().await;
}

#[tokio::test]
async fn crash_after_n_requests_drops_connections() {
    let w = sim(|a| {
        a.faults.crash_after = Some(2);
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
    })
    .await;
    let u = gen(&w.url());
    let (s, _) =
        post_json(u.clone(), &json!({"text": "x", "sampling_params": {"max_new_tokens": 1}})).await;
    assert_eq!(s, 200);
    // Request 2 is a long stream, in flight when request 3 crashes the worker.
    let resp = client()
        .post(&u)
        .json(&json!({"text": "x", "stream": true, "sampling_params": {"max_new_tokens": 500}}))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let third = client().post(&u).json(&json!({"text": "x"})).send().await;
    assert!(third.is_err(), "the crashing request gets no answer");
    let mut cut = false;
    while let Some(chunk) = stream.next().await {
        if chunk.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "the in-flight stream is cut off, not finished");
    assert_eq!(w.wait().await, Ended::Aborted);
    assert!(client().get(&u).send().await.is_err(), "nothing listens any more");
}

#[tokio::test]
async fn unhealthy_health_and_runtime_toggle() {
    let w = sim(|a| a.faults.unhealthy = true).await;
    let health = |w: String| async move {
        client().get(format!("{w}/health")).send().await.unwrap().status().as_u16()
    };
    assert_eq!(health(w.url()).await, 503);
    assert_eq!(
        client().get(format!("{}/health_generate", w.url())).send().await.unwrap().status(),
        503
    );
    post_json(format!("{}/sim/faults", w.url()), &json!({"unhealthy": false})).await;
    assert_eq!(health(w.url()).await, 200);
    let (s, err) = post_json(format!("{}/sim/faults", w.url()), &json!({"error_rate": 2.0})).await;
    assert_eq!(s, 400);
    assert!(err["message"].as_str().unwrap().contains("error_rate"));
    let (s, err) = post_json(format!("{}/sim/faults", w.url()), &json!({"no_such_fault": 1})).await;
    assert_eq!(s, 400, "{err}");
    let faults: Value =
        client().get(format!("{}/sim/faults", w.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(faults["unhealthy"], false);
    assert_eq!(faults["error_rate"], 0.0, "rejected patches change nothing");
    w.shutdown().await;
}

#[tokio::test]
async fn api_key_required_except_on_health_and_sim_routes() {
    let w = sim(|a| a.api_key = Some("sekret".into())).await;
    let u = w.url();
    let c = client();
    assert_eq!(c.post(gen(&u)).json(&json!({"text": "x"})).send().await.unwrap().status(), 401);
    assert_eq!(
        c.post(gen(&u))
            .bearer_auth("wrong")
            .json(&json!({"text": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.post(gen(&u))
            .bearer_auth("sekret")
            .json(&json!({"text": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(c.get(format!("{u}/get_load")).send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{u}/health")).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(format!("{u}/health")).bearer_auth("sekret").send().await.unwrap().status(),
        200
    );
    let st = stats(&w).await;
    assert_eq!(st["unauthorized"], 3);
    assert_eq!(st["health_checks"], 2);
    assert_eq!(
        st["health_checks_with_key"], 1,
        "tests can tell whether health checks carry the key"
    );
    w.shutdown().await;
}

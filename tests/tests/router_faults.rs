//! Fault tolerance end to end: simulated workers crash, hang before headers, stall or die
//! mid-stream, fail every request, answer 429 with Retry-After, flap their health, or are all
//! down and come back. Each test checks what the client saw and what the workers received.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use routerctl::sim::SimWorker;
use routerd_e2e::{client, eventually, get_json, post_json, router, sim, sse_events, stats};
use serde_json::{json, Value};

/// A router over `urls` tuned for tests: checks every 100 ms, circuits open after 3 failures.
fn config(policy: &str, urls: Vec<String>) -> routerd::config::Config {
    let flags = routerd::config::Flags {
        policy: Some(policy.into()),
        worker_urls: Some(urls),
        ..Default::default()
    };
    let mut c = routerd::config::Config::build(None, &flags).expect("valid config");
    c.health.interval = Duration::from_millis(100);
    c.health.startup_check_interval = Duration::from_millis(100);
    c.health.timeout = Duration::from_millis(500);
    c.circuit_breaker.failure_threshold = 3;
    c.retry.initial_backoff = Duration::from_millis(5);
    c
}

fn urls(ws: &[&SimWorker]) -> Vec<String> {
    ws.iter().map(|w| w.url()).collect()
}

fn small() -> Value {
    json!({"text": "fault test", "sampling_params": {"max_new_tokens": 2}})
}

async fn workers_view(router: &str) -> Vec<Value> {
    get_json(&format!("{router}/workers")).await["workers"].as_array().unwrap().clone()
}

async fn view_of(router: &str, worker: &str) -> Value {
    workers_view(router).await.into_iter().find(|w| w["url"] == worker).expect("listed")
}

async fn requests(w: &SimWorker) -> u64 {
    stats(w).await["requests"].as_u64().unwrap()
}

#[tokio::test]
async fn always_500_opens_the_circuit_and_clients_never_see_it() {
    let good = sim(|_| {}).await;
    let bad = sim(|a| a.faults.error_rate = 1.0).await;
    let mut c = config("round_robin", urls(&[&good, &bad]));
    c.circuit_breaker.timeout = Duration::from_secs(60);
    // A passing health check lets trial requests through an open circuit: none in this test.
    c.health.interval = Duration::from_secs(60);
    let r = router(c).await;
    for i in 0..20 {
        let (status, _) = post_json(format!("{}/generate", r.url()), &small()).await;
        assert_eq!(status, 200, "request {i}: the failure was retried on the good worker");
    }
    assert_eq!(requests(&bad).await, 3, "three failures open the circuit, then it gets nothing");
    assert_eq!(requests(&good).await, 20);
    let v = view_of(&r.url(), &bad.url()).await;
    assert_eq!((v["circuit"].as_str(), v["routable"].as_bool()), (Some("open"), Some(false)));
    assert_eq!(v["circuit_opened_total"], 1);
    assert!(v["last_error"].as_str().unwrap().contains("500"), "{v}");
    assert_eq!(view_of(&r.url(), &good.url()).await["retries_total"], 0);
    r.shutdown().await;
    good.shutdown().await;
    bad.shutdown().await;
}

#[tokio::test]
async fn client_errors_pass_through_and_do_not_trip_the_circuit() {
    let w = sim(|a| {
        a.faults.error_rate = 1.0;
        a.faults.error_status = 422;
    })
    .await;
    let other = sim(|_| {}).await;
    let r = router(config("round_robin", urls(&[&w]))).await;
    for _ in 0..6 {
        let (status, _) = post_json(format!("{}/generate", r.url()), &small()).await;
        assert_eq!(status, 422, "a client error is the client's answer, never retried");
    }
    assert_eq!(requests(&w).await, 6);
    assert_eq!(view_of(&r.url(), &w.url()).await["circuit"], "closed");
    assert_eq!(requests(&other).await, 0);
    r.shutdown().await;
    w.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn a_crashed_worker_costs_no_client_a_failure_and_recovers_when_back() {
    let a = sim(|_| {}).await;
    let b = sim(|_| {}).await;
    let port = b.addr.port();
    let r = router(config("round_robin", urls(&[&a, &b]))).await;
    let b_url = b.url();
    b.crash().await;
    for i in 0..30 {
        let (status, _) = post_json(format!("{}/generate", r.url()), &small()).await;
        assert_eq!(status, 200, "request {i}");
    }
    let v = view_of(&r.url(), &b_url).await;
    assert!(v["requests_total"].as_u64().unwrap() <= 3, "ejected after 3 failures: {v}");
    assert!(v["last_error"].as_str().unwrap().contains("connect"), "{v}");
    eventually(Duration::from_secs(5), "health checks mark it down", || async {
        view_of(&r.url(), &b_url).await["healthy"] == false
    })
    .await;
    let back = sim(|s| s.port = port).await;
    let t = Instant::now();
    eventually(Duration::from_secs(5), "the worker is healthy again", || async {
        view_of(&r.url(), &b_url).await["healthy"] == true
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(2), "back within a few check intervals");
    r.shutdown().await;
    a.shutdown().await;
    back.shutdown().await;
}

#[tokio::test]
async fn a_hung_worker_times_out_before_headers_and_the_request_moves() {
    let hung = sim(|a| a.faults.hang = true).await;
    let fine = sim(|_| {}).await;
    let mut c = config("round_robin", urls(&[&hung, &fine]));
    c.server.header_timeout = Duration::from_millis(300);
    let r = router(c).await;
    for _ in 0..4 {
        let t = Instant::now();
        let (status, _) = post_json(format!("{}/generate", r.url()), &small()).await;
        assert_eq!(status, 200);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    assert!(stats(&hung).await["hung"].as_u64().unwrap() >= 1);
    r.shutdown().await;

    let mut c = config("round_robin", urls(&[&hung]));
    c.server.header_timeout = Duration::from_millis(300);
    let r = router(c).await;
    let t = Instant::now();
    let (status, body) = post_json(format!("{}/generate", r.url()), &small()).await;
    assert_eq!((status, body["error"]["type"].as_str()), (504, Some("worker_timeout")));
    assert!(t.elapsed() < Duration::from_secs(2), "one worker: no one to retry on");
    r.shutdown().await;
    hung.shutdown().await;
    fine.shutdown().await;
}

/// Reads a stream to its end, returning its events and how long it took.
async fn read_stream(url: String, body: Value) -> (Vec<String>, Duration) {
    let t = Instant::now();
    let resp = client().post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the stream ends in bounded time")
        .expect("a well-formed stream");
    (sse_events(&text), t.elapsed())
}

#[tokio::test]
async fn a_stall_mid_stream_ends_with_one_error_event() {
    let w = sim(|a| a.faults.stall_after_tokens = Some(2)).await;
    let mut c = config("round_robin", urls(&[&w]));
    c.server.stream_idle_timeout = Duration::from_millis(300);
    let r = router(c).await;
    let body = json!({"text": "stall", "stream": true, "sampling_params": {"max_new_tokens": 6}});
    let (events, took) = read_stream(format!("{}/generate", r.url()), body).await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let err: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(err["error"]["type"], "worker_stream_error", "{err}");
    assert_eq!(n - 2, 2, "the two tokens sent, once each: {events:?}");
    let v = view_of(&r.url(), &w.url()).await;
    assert!(v["last_error"].as_str().unwrap().contains("sent nothing"), "{v}");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn a_crash_mid_stream_ends_with_one_error_event() {
    let w = sim(|a| a.decode_ms_per_step = 40.0).await;
    let r = router(config("round_robin", urls(&[&w]))).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                      "stream": true, "max_tokens": 200});
    let resp =
        client().post(format!("{}/v1/chat/completions", r.url())).json(&body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    w.crash().await;
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = stream.next().await {
            text.push_str(std::str::from_utf8(&chunk.expect("well-formed framing")).unwrap());
        }
    });
    rest.await.expect("the stream ends promptly");
    let events = sse_events(&text);
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]", "{text}");
    let err: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(err["error"]["code"], 502);
    assert!(n - 2 < 200, "cut short");
    r.shutdown().await;
}

#[tokio::test]
async fn retry_after_keeps_a_worker_aside_and_is_relayed_when_alone() {
    let busy = sim(|a| {
        a.faults.error_first = 1;
        a.faults.error_status = 429;
        a.faults.retry_after_secs = Some(1);
    })
    .await;
    let free = sim(|_| {}).await;
    let r = router(config("round_robin", urls(&[&busy, &free]))).await;
    for _ in 0..6 {
        assert_eq!(post_json(format!("{}/generate", r.url()), &small()).await.0, 200);
    }
    assert_eq!(requests(&busy).await, 1, "asked to wait a second: it gets nothing meanwhile");
    assert_eq!(view_of(&r.url(), &busy.url()).await["routable"], false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..4 {
        assert_eq!(post_json(format!("{}/generate", r.url()), &small()).await.0, 200);
    }
    assert!(requests(&busy).await >= 2, "back in rotation after Retry-After");
    r.shutdown().await;

    let alone = sim(|a| {
        a.faults.error_rate = 1.0;
        a.faults.error_status = 429;
        a.faults.retry_after_secs = Some(7);
    })
    .await;
    let r = router(config("round_robin", urls(&[&alone]))).await;
    let resp = client().post(format!("{}/generate", r.url())).json(&small()).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7", "the client is told when to come back");
    r.shutdown().await;
    for w in [busy, free, alone] {
        w.shutdown().await;
    }
}

async fn set_unhealthy(w: &SimWorker, unhealthy: bool) {
    let (s, _) =
        post_json(format!("{}/sim/faults", w.url()), &json!({"unhealthy": unhealthy})).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn health_thresholds_eject_and_readmit_but_one_blip_does_not() {
    let a = sim(|_| {}).await;
    let b = sim(|_| {}).await;
    let mut c = config("round_robin", urls(&[&a, &b]));
    c.health.interval = Duration::from_millis(300);
    c.health.failure_threshold = 2;
    c.health.success_threshold = 2;
    let r = router(c).await;
    let checks_of = |w: &SimWorker| {
        let (router, url) = (r.url(), w.url());
        async move { view_of(&router, &url).await["health_checks_total"].as_u64().unwrap() }
    };
    eventually(Duration::from_secs(3), "first checks done", || async { checks_of(&a).await >= 1 })
        .await;

    // One failed check is a blip.
    let before = checks_of(&a).await;
    set_unhealthy(&a, true).await;
    eventually(Duration::from_secs(3), "one check", || async { checks_of(&a).await > before })
        .await;
    set_unhealthy(&a, false).await;
    assert_eq!(view_of(&r.url(), &a.url()).await["healthy"], true, "one failure is not enough");

    // Sustained failures eject it; traffic and readiness follow.
    set_unhealthy(&a, true).await;
    eventually(Duration::from_secs(3), "ejected", || async {
        view_of(&r.url(), &a.url()).await["healthy"] == false
    })
    .await;
    let before = requests(&a).await;
    for _ in 0..6 {
        assert_eq!(post_json(format!("{}/generate", r.url()), &small()).await.0, 200);
    }
    assert_eq!(requests(&a).await, before, "an unhealthy worker gets no requests");
    let ready = get_json(&format!("{}/readiness", r.url())).await;
    assert_eq!(ready["routable_workers"], 1);

    set_unhealthy(&a, false).await;
    eventually(Duration::from_secs(3), "readmitted", || async {
        view_of(&r.url(), &a.url()).await["healthy"] == true
    })
    .await;
    r.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn all_workers_down_then_back() {
    for panic_routing in [false, true] {
        all_down_then_back(panic_routing).await;
    }
}

async fn all_down_then_back(panic_routing: bool) {
    let a = sim(|_| {}).await;
    let b = sim(|_| {}).await;
    let ports = [a.addr.port(), b.addr.port()];
    let mut c = config("round_robin", urls(&[&a, &b]));
    c.policy.panic_routing = panic_routing;
    let r = router(c).await;
    a.crash().await;
    b.crash().await;
    let t = Instant::now();
    let (status, body) = post_json(format!("{}/generate", r.url()), &small()).await;
    // Tried and failed (502), or already known down (503 no_available_workers): at once.
    assert!(matches!(status, 502 | 503), "{status} {body}");
    assert!(t.elapsed() < Duration::from_secs(2), "fails fast when nothing answers");
    eventually(Duration::from_secs(3), "not ready", || async {
        client().get(format!("{}/readiness", r.url())).send().await.unwrap().status() == 503
    })
    .await;
    let (status, body) = post_json(format!("{}/generate", r.url()), &small()).await;
    if panic_routing {
        // Every worker is out of rotation, yet requests still go somewhere.
        assert_eq!((status, body["error"]["type"].as_str()), (502, Some("worker_error")));
    } else {
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("no_available_workers")));
    }
    let a = sim(|s| s.port = ports[0]).await;
    let b = sim(|s| s.port = ports[1]).await;
    if panic_routing {
        // Once the workers are back they succeed before any health check says so.
        let (status, _) = post_json(format!("{}/generate", r.url()), &small()).await;
        assert_eq!(status, 200);
    } else {
        eventually(Duration::from_secs(5), "served once a health check readmits one", || async {
            post_json(format!("{}/generate", r.url()), &small()).await.0 == 200
        })
        .await;
    }
    eventually(Duration::from_secs(3), "ready again", || async {
        client().get(format!("{}/readiness", r.url())).send().await.unwrap().status() == 200
    })
    .await;
    r.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn startup_serves_with_the_workers_that_are_up() {
    let up = sim(|_| {}).await;
    let later = sim(|_| {}).await;
    let port = later.addr.port();
    let later_url = later.url();
    later.shutdown().await;
    let r = router(config("round_robin", vec![up.url(), later_url.clone()])).await;
    eventually(Duration::from_secs(3), "the missing worker is marked down", || async {
        view_of(&r.url(), &later_url).await["healthy"] == false
    })
    .await;
    for _ in 0..4 {
        assert_eq!(post_json(format!("{}/generate", r.url()), &small()).await.0, 200);
    }
    let later = sim(|s| s.port = port).await;
    eventually(Duration::from_secs(3), "it joins once it answers", || async {
        view_of(&r.url(), &later_url).await["healthy"] == true
    })
    .await;
    for _ in 0..4 {
        assert_eq!(post_json(format!("{}/generate", r.url()), &small()).await.0, 200);
    }
    assert!(requests(&later).await >= 2, "it takes traffic");
    r.shutdown().await;
    up.shutdown().await;
    later.shutdown().await;
}

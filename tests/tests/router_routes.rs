//! routerd's routes end to end, with simulated workers behind it: inference (plain and
//! streaming), health and info, management and the workers API, errors and request ids.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use routerd_e2e::{
    client, fleet, get_json, post_json, post_stream, router, router_config, shutdown_all, sim,
    stats,
};
use serde_json::{json, Value};

#[tokio::test]
async fn inference_routes_are_proxied_with_worker_and_request_id_headers() {
    let ws = fleet(2, |_| {}).await;
    let r = router(router_config("round_robin", &[&ws[0], &ws[1]])).await;
    let u = r.url();
    for (path, body) in [
        ("generate", json!({"text": "hello", "sampling_params": {"max_new_tokens": 2}})),
        ("v1/completions", json!({"prompt": "hello", "max_tokens": 2})),
        (
            "v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ),
        ("v1/embeddings", json!({"input": "hi"})),
    ] {
        let resp = client()
            .post(format!("{u}/{path}"))
            .header("x-correlation-id", "corr-7")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let worker = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
        assert!(worker == ws[0].url() || worker == ws[1].url(), "{worker}");
        assert_eq!(
            resp.headers()["x-correlation-id"],
            "corr-7",
            "request id echoed under its own header"
        );
        let v: Value = resp.json().await.unwrap();
        assert!(v.is_object(), "{path}: {v}");
    }
    let resp =
        client().post(format!("{u}/generate")).json(&json!({"text": "x"})).send().await.unwrap();
    assert_eq!(
        resp.headers()["x-request-id"].len(),
        32,
        "a request id is generated when none is sent"
    );
    let served: u64 = futures_util::future::join_all(
        ws.iter().map(|w| async { stats(w).await["requests"].as_u64().unwrap() }),
    )
    .await
    .iter()
    .sum();
    assert_eq!(served, 5);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn streams_pass_through_unbuffered() {
    let w = sim(|a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
    })
    .await;
    let r = router(router_config("round_robin", &[&w])).await;
    let t = Instant::now();
    let resp = client()
        .post(format!("{}/generate", r.url()))
        .json(&json!({"text": "s", "stream": true, "sampling_params": {"max_new_tokens": 15}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    let first = t.elapsed();
    let in_flight =
        get_json(&format!("{}/workers", r.url())).await["workers"][0]["in_flight"].clone();
    assert_eq!(in_flight, 1, "a stream counts as in flight while it runs");
    while let Some(c) = body.next().await {
        c.unwrap();
    }
    let total = t.elapsed();
    assert!(first * 3 < total, "first event after {first:?}, end after {total:?}");
    assert_eq!(get_json(&format!("{}/workers", r.url())).await["workers"][0]["in_flight"], 0);
    let events = post_stream(
        format!("{}/v1/completions", r.url()),
        &json!({"prompt": "p", "max_tokens": 3, "stream": true}),
    )
    .await;
    assert_eq!(events.len(), 3);
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_info_routes() {
    let w = sim(|_| {}).await;
    let r = router(router_config("random", &[])).await;
    let u = r.url();
    let c = client();
    assert_eq!(c.get(format!("{u}/health")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(format!("{u}/liveness")).send().await.unwrap().status(), 200);
    let not_ready = c.get(format!("{u}/readiness")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503, "no worker, not ready");
    assert_eq!(c.get(format!("{u}/get_model_info")).send().await.unwrap().status(), 503);
    let (s, _) = post_json(format!("{u}/generate"), &json!({"text": "x"})).await;
    assert_eq!(s, 503);

    assert_eq!(
        c.post(format!("{u}/add_worker?url={}", w.url())).send().await.unwrap().status(),
        200
    );
    assert_eq!(c.get(format!("{u}/readiness")).send().await.unwrap().status(), 200);
    for path in ["get_server_info", "get_model_info", "v1/models"] {
        let resp = c.get(format!("{u}/{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-routerd-worker"], w.url().as_str());
    }
    assert_eq!(c.get(format!("{u}/health_generate")).send().await.unwrap().status(), 200);
    let loads = get_json(&format!("{u}/get_loads")).await;
    assert_eq!(loads, json!({"workers": [{"worker": w.url(), "load": 0}]}));
    let flush = c.post(format!("{u}/flush_cache")).send().await.unwrap();
    assert_eq!(flush.status(), 200);
    assert_eq!(stats(&w).await["flushes"], 1);
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn management_routes_and_workers_api() {
    let ws = fleet(2, |_| {}).await;
    let r = router(router_config("round_robin", &[&ws[0]])).await;
    let u = r.url();
    let c = client();
    assert_eq!(get_json(&format!("{u}/list_workers")).await, json!({"urls": [ws[0].url()]}));

    let created = c
        .post(format!("{u}/workers"))
        .json(&json!({"url": format!("{}/", ws[1].url())}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 202);
    let answer: Value = created.json().await.unwrap();
    assert_eq!(answer["url"], ws[1].url(), "normalised");
    let view = &answer["worker"];
    assert_eq!(view["url"], ws[1].url());
    assert_eq!(view["source"], "api");
    assert_eq!(view["role"], "regular");
    let dup =
        c.post(format!("{u}/workers")).json(&json!({"url": ws[1].url()})).send().await.unwrap();
    assert_eq!(dup.status(), 409);
    let body: Value = dup.json().await.unwrap();
    assert_eq!(body["error"]["code"], 409);
    for bad in [
        json!({"url": "ftp://x"}),
        json!({"nope": 1}),
        json!({"url": "http://x:1", "role": "prefill"}),
    ] {
        let resp = c.post(format!("{u}/workers")).json(&bad).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }
    assert_eq!(
        c.post(format!("{u}/add_worker?url={}", ws[1].url())).send().await.unwrap().status(),
        409
    );

    // Workers added at runtime take traffic from the next request on.
    for _ in 0..4 {
        post_json(
            format!("{u}/generate"),
            &json!({"text": "x", "sampling_params": {"max_new_tokens": 1}}),
        )
        .await;
    }
    assert_eq!(stats(&ws[1]).await["requests"], 2);
    let list = get_json(&format!("{u}/workers")).await;
    let workers = list["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for field in [
        "url",
        "role",
        "bootstrap_port",
        "healthy",
        "circuit",
        "in_flight",
        "requests_total",
        "tree_chars",
        "source",
    ] {
        assert!(workers[0].get(field).is_some(), "missing {field}");
    }
    assert_eq!(workers[0]["source"], "config");
    assert_eq!(workers[1]["requests_total"], 2);

    let encoded = ws[1].url().replace(':', "%3A").replace('/', "%2F");
    assert_eq!(c.delete(format!("{u}/workers/{encoded}")).send().await.unwrap().status(), 202);
    assert_eq!(c.delete(format!("{u}/workers/{encoded}")).send().await.unwrap().status(), 404);
    let removed = c.post(format!("{u}/remove_worker?url={}", ws[0].url())).send().await.unwrap();
    assert_eq!(removed.status(), 200);
    assert_eq!(
        removed.text().await.unwrap(),
        format!("Successfully removed worker: {}", ws[0].url())
    );
    assert_eq!(
        c.post(format!("{u}/remove_worker?url={}", ws[0].url())).send().await.unwrap().status(),
        404
    );
    assert_eq!(get_json(&format!("{u}/list_workers")).await, json!({"urls": []}));
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn client_errors_are_json() {
    let w = sim(|_| {}).await;
    let mut cfg = router_config("round_robin", &[&w]);
    cfg.server.max_payload_size = 1000;
    let r = router(cfg).await;
    let u = r.url();
    let c = client();
    for (req, status) in [
        (c.post(format!("{u}/generate")).body("{nope"), 400),
        (c.post(format!("{u}/generate")).body("[1, 2]"), 400),
        (c.post(format!("{u}/generate")).body(""), 400),
        (
            c.post(format!("{u}/generate")).body(format!("{{\"text\": \"{}\"}}", "x".repeat(2000))),
            413,
        ),
        (c.get(format!("{u}/no/such/route")), 404),
        (c.get(format!("{u}/generate")), 405),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), status);
        assert!(resp.headers().get("x-routerd-worker").is_none() || status == 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], status, "{body}");
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
    }
    assert_eq!(stats(&w).await["requests"], 0, "nothing reached the worker");
    // Errors the worker itself gives pass through with its status.
    let (s, body) = post_json(format!("{u}/generate"), &json!({"input_ids": "nope"})).await;
    assert_eq!(s, 400);
    assert_eq!(body["object"], "error");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn worker_failures_are_502_and_504() {
    let dead = sim(|_| {}).await;
    let dead_url = dead.url();
    dead.shutdown().await;
    let mut cfg = routerd::config::Config::build(
        None,
        &routerd::config::Flags {
            policy: Some("round_robin".into()),
            worker_urls: Some(vec![dead_url]),
            ..Default::default()
        },
    )
    .unwrap();
    cfg.server.request_timeout = Duration::from_millis(300);
    // The request must reach the dead worker (a health check would take it out of routing
    // first, and the answer would be 503 no_available_workers).
    cfg.health.enabled = false;
    let r = router(cfg).await;
    let (s, body) = post_json(format!("{}/generate", r.url()), &json!({"text": "x"})).await;
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["type"], "worker_error");

    let views = get_json(&format!("{}/workers", r.url())).await;
    assert_eq!(views["workers"][0]["errors_total"], 1);
    assert_eq!(views["workers"][0]["in_flight"], 0, "a failed request releases its slot");
    let dead_url = views["workers"][0]["url"].as_str().unwrap().to_owned();
    client().post(format!("{}/remove_worker?url={dead_url}", r.url())).send().await.unwrap();

    let slow = sim(|a| a.faults.latency_ms = 2000).await;
    client().post(format!("{}/add_worker?url={}", r.url(), slow.url())).send().await.unwrap();
    let t = Instant::now();
    let (s, body) = post_json(format!("{}/generate", r.url()), &json!({"text": "x"})).await;
    assert_eq!(s, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(2));
    r.shutdown().await;
    slow.shutdown().await;
}

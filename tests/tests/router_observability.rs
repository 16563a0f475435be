//! Observability end to end: Prometheus series after known traffic, decision records for each
//! cache_aware branch (header and admin API), CORS, and trace headers reaching workers.

use std::time::Duration;

use futures_util::StreamExt;
use routerd_e2e::{client, get_json, post_json, router, router_config, sim};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value of the series `name{labels}` in an exposition text (labels as written, sorted).
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(url: &str) -> String {
    client().get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn metrics_move_with_known_traffic() {
    let ws = [sim(|_| {}).await, sim(|_| {}).await];
    let r = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let metrics_url = routerd_e2e::serve_metrics(&r).await;
    let prompt = "a system prompt long enough to be recognised again later ".repeat(4);
    for _ in 0..3 {
        let (s, _) = post_json(
            format!("{}/generate", r.url()),
            &json!({"text": prompt, "sampling_params": {"max_new_tokens": 2}}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, _) = post_json(format!("{}/generate", r.url()), &json!([1])).await;
    assert_eq!(s, 400);
    let stream =
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 3});
    let resp = client()
        .post(format!("{}/v1/chat/completions", r.url()))
        .json(&stream)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    while body.next().await.is_some() {}

    let text = scrape(&metrics_url).await;
    let v = |s: &str| series(&text, s).unwrap_or_else(|| panic!("no series {s} in\n{text}"));
    assert_eq!(v(r#"sgl_router_requests_total{route="generate",status="200"}"#), 3.0);
    assert_eq!(v(r#"sgl_router_requests_total{route="generate",status="400"}"#), 1.0);
    assert_eq!(v(r#"sgl_router_requests_total{route="chat_completions",status="200"}"#), 1.0);
    assert_eq!(v(r#"sgl_router_request_duration_seconds_count{route="generate"}"#), 4.0);
    assert_eq!(v(r#"sgl_router_time_to_first_token_seconds_count{route="chat_completions"}"#), 1.0);
    assert_eq!(v("sgl_router_cache_misses_total"), 2.0, "the first prompt and the chat");
    assert_eq!(v("sgl_router_cache_hits_total"), 2.0, "the prompt again, twice");
    assert_eq!(v("sgl_router_cache_match_ratio_count"), 4.0);
    assert_eq!(
        v(
            r#"sgl_router_routing_decisions_total{pool="regular",policy="cache_aware",branch="hit"}"#
        ),
        2.0
    );
    let per_worker: f64 = ws
        .iter()
        .map(|w| v(&format!(r#"sgl_router_worker_requests_total{{worker="{}"}}"#, w.url())))
        .sum();
    assert_eq!(per_worker, 4.0);
    assert_eq!(v(&format!(r#"sgl_router_worker_health{{worker="{}"}}"#, ws[0].url())), 1.0);
    assert_eq!(v(&format!(r#"sgl_router_cb_state{{worker="{}"}}"#, ws[0].url())), 0.0);
    assert_eq!(v(r#"sgl_router_workers{role="regular"}"#), 2.0);
    assert!(v(r#"sgl_router_tree_nodes{pool="regular"}"#) >= 1.0);
    assert_eq!(v("sgl_router_queue_depth"), 0.0);
    assert!(text.contains("# HELP sgl_router_requests_total"), "described");

    let (s, _) = post_json(format!("{}/admin/reload", r.url()), &json!({})).await;
    assert_eq!(s, 400, "no configuration file to reload");
    let text = scrape(&metrics_url).await;
    assert_eq!(series(&text, r#"sgl_router_config_reloads_total{result="rejected"}"#), Some(1.0));
    assert_eq!(series(&text, "sgl_router_config_last_reload_successful"), Some(0.0));
    r.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}

async fn explained(url: &str, text: &str) -> Value {
    let resp = client()
        .post(format!("{url}/generate"))
        .header("x-routerd-explain", "1")
        .json(&json!({"text": text, "stream": true, "sampling_params": {"max_new_tokens": 40}}))
        .send()
        .await
        .unwrap();
    let record = resp.headers()["x-routerd-decision"].to_str().unwrap().to_owned();
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        while body.next().await.is_some() {}
    });
    serde_json::from_str(&record).unwrap()
}

#[tokio::test]
async fn decision_records_for_each_cache_aware_branch() {
    let ws =
        [sim(|a| a.decode_ms_per_step = 200.0).await, sim(|a| a.decode_ms_per_step = 200.0).await];
    let mut config = router_config("cache_aware", &[&ws[0], &ws[1]]);
    config.policy.balance_abs_threshold = 1;
    let r = router(config).await;
    let text = "the same long prefix for every request of this test, ".repeat(3);

    let miss = explained(&r.url(), &text).await;
    assert_eq!(
        (miss["policy"].as_str(), miss["branch"].as_str()),
        (Some("cache_aware"), Some("miss"))
    );
    assert_eq!(miss["match_ratio"], 0.0);
    assert_eq!(miss["loads"].as_object().unwrap().len(), 2);
    let home = miss["worker"].as_str().unwrap().to_owned();

    let hit = explained(&r.url(), &text).await;
    assert_eq!(
        (hit["branch"].as_str(), hit["worker"].as_str()),
        (Some("hit"), Some(home.as_str()))
    );
    assert!(hit["match_ratio"].as_f64().unwrap() > 0.9, "{hit}");
    assert_eq!(hit["imbalanced"], false);
    assert_eq!(hit["loads"][&home], 1, "the first stream is still running there");

    // Two streams on the home worker, none elsewhere: imbalanced, so it is left out.
    let third = explained(&r.url(), &text).await;
    assert_eq!(third["imbalanced"], true, "{third}");
    assert_ne!(third["worker"].as_str(), Some(home.as_str()));
    assert_eq!(third["branch"], "miss", "no match on the only candidate");

    let log = get_json(&format!("{}/admin/decisions?limit=2", r.url())).await;
    let decisions = log["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2);
    assert_eq!(decisions[0]["imbalanced"], true, "newest first");
    assert_eq!(decisions[1]["branch"], "hit");
    assert_eq!(decisions[0]["route"], "generate");
    assert_eq!(decisions[0]["request_id"].as_str().unwrap().len(), 32);
    r.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}

#[tokio::test]
async fn cors_preflight_and_allowed_origins() {
    let w = sim(|_| {}).await;
    let mut config = router_config("round_robin", &[&w]);
    config.server.cors_allowed_origins = vec!["https://ui.example".into()];
    let r = router(config).await;
    let c = client();
    let pre = c
        .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", r.url()))
        .header("origin", "https://ui.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.headers()["access-control-allow-origin"], "https://ui.example");
    assert_eq!(pre.headers()["access-control-allow-headers"], "content-type, authorization");
    let models = c
        .get(format!("{}/v1/models", r.url()))
        .header("origin", "https://ui.example")
        .send()
        .await
        .unwrap();
    assert_eq!(models.headers()["access-control-allow-origin"], "https://ui.example");
    let gen = c
        .post(format!("{}/generate", r.url()))
        .header("origin", "https://ui.example")
        .json(&json!({"text": "x", "sampling_params": {"max_new_tokens": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(gen.headers()["access-control-allow-origin"], "https://ui.example");
    let other = c
        .get(format!("{}/v1/models", r.url()))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn trace_context_reaches_the_worker() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).await.unwrap();
        let body = r#"{"text":"ok"}"#;
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        s.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
    });
    let flags = routerd::config::Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(vec![url]),
        ..Default::default()
    };
    let mut config = routerd::config::Config::build(None, &flags).unwrap();
    config.health.enabled = false;
    let r = router(config).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = client()
        .post(format!("{}/generate", r.url()))
        .header("traceparent", tp)
        .header("tracestate", "vendor=1")
        .json(&json!({"text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let head = tokio::time::timeout(Duration::from_secs(5), seen).await.unwrap().unwrap();
    assert!(head.contains(&format!("traceparent: {tp}")), "{head}");
    assert!(head.contains("tracestate: vendor=1"), "{head}");
    r.shutdown().await;
}

#[tokio::test]
async fn admin_stats_totals_latency_and_events() {
    let ws = [sim(|_| {}).await, sim(|_| {}).await];
    let r = router(router_config("round_robin", &[&ws[0]])).await;
    for _ in 0..5 {
        let (s, _) = post_json(
            format!("{}/generate", r.url()),
            &json!({"text": "x", "sampling_params": {"max_new_tokens": 1}}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, _) = post_json(format!("{}/workers", r.url()), &json!({"url": ws[1].url()})).await;
    assert_eq!(s, 202);
    let st: routerd::stats::Stats =
        serde_json::from_value(get_json(&format!("{}/admin/stats", r.url())).await).unwrap();
    assert_eq!((st.requests_total, st.errors_total, st.in_flight), (5, 0, 0));
    assert_eq!(st.latency_counts.iter().sum::<u64>(), 5);
    assert_eq!(st.latency_counts.len(), st.latency_bounds_ms.len() + 1);
    assert_eq!(st.workers.len(), 2);
    assert!(st.ready);
    let added = st.events.iter().find(|e| e.kind == "worker_added").expect("an event");
    assert!(added.message.contains(&ws[1].url()));
    r.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}

#[tokio::test]
async fn autoscaling_signals_under_a_burst() {
    // One worker that runs 4 requests at once, 400 ms each; routerd admits 2 at a time.
    let w = sim(|a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
        a.max_running_requests = 4;
    })
    .await;
    let mut c = router_config("round_robin", &[&w]);
    c.server.max_concurrent_requests = std::num::NonZeroUsize::new(2);
    c.server.queue_size = 100;
    let r = router(c).await;
    let metrics_url = routerd_e2e::serve_metrics(&r).await;
    let worker = format!("{{worker=\"{}\"}}", w.url());
    let max = format!("routerd_worker_max_running_requests{worker}");
    routerd_e2e::eventually(Duration::from_secs(5), "the engine's capacity is learned", || async {
        series(&scrape(&metrics_url).await, &max) == Some(4.0)
    })
    .await;
    let url = format!("{}/generate", r.url());
    let burst: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = json!({"text": format!("burst {i}"), "sampling_params": {"max_new_tokens": 20}});
                post_json(url, &body).await.0
            })
        })
        .collect();
    routerd_e2e::eventually(Duration::from_secs(5), "six wait, two run", || async {
        let text = scrape(&metrics_url).await;
        series(&text, "sgl_router_queue_depth") == Some(6.0)
            && series(&text, "routerd_pool_requests_active{pool=\"regular\"}") == Some(2.0)
            && series(&text, &format!("routerd_worker_saturation{worker}")) == Some(0.5)
            && series(&text, "routerd_pool_saturation{pool=\"regular\"}") == Some(0.5)
    })
    .await;
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }
    let text = scrape(&metrics_url).await;
    assert_eq!(series(&text, "routerd_queue_wait_seconds_count"), Some(8.0), "{text}");
    // The last two waited for three rounds of two: at least 1.2 s between them.
    let waited = series(&text, "routerd_queue_wait_seconds_sum").unwrap();
    assert!(waited > 1.5, "{waited}");
    assert_eq!(series(&text, "sgl_router_queue_depth"), Some(0.0));
    assert_eq!(series(&text, "routerd_pool_requests_active{pool=\"regular\"}"), Some(0.0));
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn the_cache_accounting_splits_each_prompt_and_sees_a_stale_prediction() {
    let ws = [sim(|_| {}).await, sim(|_| {}).await];
    let r = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let metrics_url = routerd_e2e::serve_metrics(&r).await;
    let prompt = "an accounting prompt, long enough that its prefix is cached ".repeat(8);
    let chars = prompt.chars().count() as u64;
    let body = json!({"text": prompt, "sampling_params": {"max_new_tokens": 1}});
    // The latest record of this router's decisions, once its answer has settled it (the
    // client may read the answer's end a moment before routerd is done with it).
    let settled = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let d = get_json(&format!("{}/admin/decisions?limit=1", r.url())).await;
            let a = d["decisions"][0]["accounting"].clone();
            if a.get("actual").is_some() || std::time::Instant::now() > deadline {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let split = |a: &Value| -> [u64; 4] {
        let n = |k: &str| a[k].as_u64().unwrap();
        [n("prompt"), n("best"), n("predicted"), n("actual")]
    };

    // New to the fleet: all of it is the workload's.
    let (first, d, _) = routerd_e2e::explained(&r.url(), "/generate", &body).await;
    assert_eq!(
        d["accounting"],
        json!({"unit": "chars", "prompt": chars, "best": 0, "predicted": 0})
    );
    let [_, _, _, actual] = split(&settled().await);
    assert_eq!(actual, 0);

    // Again: the same worker, predicted nearly whole, and the worker agrees.
    let (again, d, _) = routerd_e2e::explained(&r.url(), "/generate", &body).await;
    assert_eq!(again, first);
    let a = settled().await;
    let [p, best, predicted, actual] = split(&a);
    assert_eq!((p, best, predicted), (chars, chars, chars), "{d}");
    assert!(actual > chars * 9 / 10, "the worker reports most of it cached: {a}");

    // Its cache flushed behind the router's back: predicted, not there (stale).
    let holder = ws.iter().find(|w| w.url() == first).unwrap();
    client().post(format!("{}/sim/cache/flush", holder.url())).send().await.unwrap();
    let (third, _, _) = routerd_e2e::explained(&r.url(), "/generate", &body).await;
    assert_eq!(third, first, "the router still believes it holds the prompt");
    let [_, _, predicted, actual] = split(&settled().await);
    assert_eq!((predicted, actual), (chars, 0));

    routerd_e2e::eventually(Duration::from_secs(5), "three prompts settled", || async {
        let text = scrape(&metrics_url).await;
        let labels = "{pool=\"regular\",unit=\"chars\",part=\"stale\"}";
        series(&text, &format!("routerd_pool_cache_accounting_total{labels}")).unwrap_or(0.0)
            >= chars as f64
    })
    .await;
    let text = scrape(&metrics_url).await;
    let part = |p: &str| {
        let labels = format!("{{pool=\"regular\",unit=\"chars\",part=\"{p}\"}}");
        series(&text, &format!("routerd_pool_cache_accounting_total{labels}")).unwrap_or(0.0) as u64
    };
    assert_eq!(part("workload"), chars, "{text}");
    assert_eq!(part("policy"), 0);
    assert_eq!(part("stale"), chars + (chars - actual_of_second(&text)), "{text}");
    r.shutdown().await;
}

/// The hit the second request reported: all the `hit` part (the first and third had none).
fn actual_of_second(text: &str) -> u64 {
    let labels = "{pool=\"regular\",unit=\"chars\",part=\"hit\"}";
    series(text, &format!("routerd_pool_cache_accounting_total{labels}")).unwrap() as u64
}

//! `--dp-aware`: a worker's data-parallel ranks as targets of their own, `data_parallel_rank`
//! in the body, per-rank load accounting, runtime add/remove by base URL, PD, and a worker
//! that comes up after the router.

use std::time::Duration;

use futures_util::StreamExt;
use routerctl::sim::{Role, SimWorker};
use routerd::config::{Config, Flags, Secret};
use routerd_e2e::{client, eventually, router, sim, small_generate, stats};
use serde_json::{json, Value};

async fn workers(url: &str, key: Option<&str>) -> Vec<Value> {
    let mut req = client().get(format!("{url}/workers"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let v: Value = req.send().await.unwrap().json().await.unwrap();
    v["workers"].as_array().unwrap().clone()
}

fn urls(ws: &[Value]) -> Vec<String> {
    let mut u: Vec<String> = ws.iter().map(|w| w["url"].as_str().unwrap().to_owned()).collect();
    u.sort();
    u
}

fn dp_flags(tweak: impl FnOnce(&mut Flags)) -> Config {
    let mut f = Flags { dp_aware: true, policy: Some("round_robin".into()), ..Default::default() };
    tweak(&mut f);
    Config::build(None, &f).expect("valid config")
}

#[tokio::test]
async fn each_rank_is_a_target_with_its_own_load_and_gets_its_rank_in_the_body() {
    // The router's --api-key is the worker's too: /get_server_info is asked with it.
    let w = sim(|a| {
        a.dp_size = 4;
        a.api_key = Some("k".into());
    })
    .await;
    let r = router(dp_flags(|f| {
        f.worker_urls = Some(vec![w.url()]);
        f.api_key = Some(Secret::new("k"));
    }))
    .await;
    let url = r.url();
    let want: Vec<String> = (0..4).map(|i| format!("{}@{i}", w.url())).collect();
    eventually(Duration::from_secs(10), "four rank targets", || async {
        urls(&workers(&url, Some("k")).await) == want
    })
    .await;
    for _ in 0..8 {
        let resp = client()
            .post(format!("{url}/generate"))
            .bearer_auth("k")
            .json(&small_generate())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let target = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
        assert!(want.contains(&target), "{target}");
    }
    let s = stats(&w).await;
    assert_eq!(s["dp_rank_requests"], json!([2, 2, 2, 2]), "{s}");
    assert_eq!(s["unauthorized"], 0);
    assert!(workers(&url, Some("k")).await.iter().all(|w| w["requests_total"] == 2));

    // Per-rank load: four long streams, one on each rank.
    let long = json!({"text": "long", "stream": true, "sampling_params": {"max_new_tokens": 2000}});
    let mut streams = Vec::new();
    for _ in 0..4 {
        let resp = client()
            .post(format!("{url}/generate"))
            .bearer_auth("k")
            .json(&long)
            .send()
            .await
            .unwrap();
        let mut body = resp.bytes_stream();
        body.next().await.unwrap().unwrap();
        streams.push(body);
    }
    let ws = workers(&url, Some("k")).await;
    let loads: Vec<u64> = ws.iter().map(|w| w["in_flight"].as_u64().unwrap()).collect();
    assert_eq!(loads, [1, 1, 1, 1], "{ws:?}");
    drop(streams);
    eventually(Duration::from_secs(5), "the ranks are idle again", || async {
        workers(&url, Some("k")).await.iter().all(|w| w["in_flight"] == 0)
    })
    .await;
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn workers_added_at_runtime_are_expanded_and_removed_by_base_url() {
    let w = sim(|a| a.dp_size = 2).await;
    let r = router(dp_flags(|_| {})).await;
    let url = r.url();
    let c = client();
    let resp =
        c.post(format!("{url}/workers")).json(&json!({"url": w.url()})).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["url"], format!("{}@0", w.url()));
    assert_eq!(view["worker"]["url"], format!("{}@0", w.url()));
    assert_eq!(
        urls(&workers(&url, None).await),
        [format!("{}@0", w.url()), format!("{}@1", w.url())]
    );
    let again =
        c.post(format!("{url}/workers")).json(&json!({"url": w.url()})).send().await.unwrap();
    assert_eq!(again.status(), 409);
    for _ in 0..4 {
        let resp = c.post(format!("{url}/generate")).json(&small_generate()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(stats(&w).await["dp_rank_requests"], json!([2, 2]));
    let enc = w.url().replace(':', "%3A").replace('/', "%2F");
    // One rank removed alone; adding the worker again is refused whole (rank 1 is still
    // there), not half-done.
    let del = c.delete(format!("{url}/workers/{enc}%400")).send().await.unwrap();
    assert_eq!(del.status(), 202);
    let again =
        c.post(format!("{url}/workers")).json(&json!({"url": w.url()})).send().await.unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(urls(&workers(&url, None).await), [format!("{}@1", w.url())]);
    let del = c.delete(format!("{url}/workers/{enc}")).send().await.unwrap();
    assert_eq!(del.status(), 202);
    assert!(workers(&url, None).await.is_empty(), "every rank removed");
    // A worker that cannot tell its size is not registered.
    let dead = c
        .post(format!("{url}/workers"))
        .json(&json!({"url": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dead.status(), 502);
    let body: Value = dead.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("get_server_info"), "{body}");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_starts_after_the_router_gets_its_ranks_then() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut config = dp_flags(|f| f.worker_urls = Some(vec![base.clone()]));
    config.health.startup_check_interval = Duration::from_millis(50);
    let r = router(config).await;
    let url = r.url();
    assert!(workers(&url, None).await.is_empty(), "no ranks before the worker answers");
    let resp = client().get(format!("{url}/readiness")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let w = sim(|a| {
        a.port = port;
        a.dp_size = 3;
    })
    .await;
    eventually(Duration::from_secs(10), "three ranks once the worker is up", || async {
        workers(&url, None).await.len() == 3
    })
    .await;
    let resp =
        client().post(format!("{url}/generate")).json(&small_generate()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    r.shutdown().await;
    w.shutdown().await;
}

async fn pd_worker(role: Role, dp: u32) -> SimWorker {
    sim(|a| {
        a.role = role;
        a.dp_size = dp;
        a.bootstrap_timeout_secs = 10.0;
    })
    .await
}

#[tokio::test]
async fn pd_legs_each_get_their_own_rank() {
    let p = pd_worker(Role::Prefill, 2).await;
    let d = pd_worker(Role::Decode, 2).await;
    let config = dp_flags(|f| {
        f.pd_disaggregation = true;
        f.prefill = vec![p.url(), p.bootstrap_addr.unwrap().port().to_string()];
        f.decode = vec![d.url()];
    });
    let r = router(config).await;
    let url = r.url();
    eventually(Duration::from_secs(10), "two prefill and two decode ranks", || async {
        workers(&url, None).await.len() == 4
    })
    .await;
    for _ in 0..4 {
        let resp = client()
            .post(format!("{url}/generate"))
            .json(&json!({"text": "pd", "sampling_params": {"max_new_tokens": 3}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let prefill = resp.headers()["x-routerd-prefill-worker"].to_str().unwrap().to_owned();
        assert!(prefill.starts_with(&p.url()) && prefill.contains('@'), "{prefill}");
    }
    assert_eq!(stats(&p).await["dp_rank_requests"], json!([2, 2]));
    assert_eq!(stats(&d).await["dp_rank_requests"], json!([2, 2]));
    r.shutdown().await;
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn the_ranks_of_one_server_share_its_health_checks() {
    let w = sim(|a| a.dp_size = 3).await;
    let mut config = dp_flags(|f| f.worker_urls = Some(vec![w.url()]));
    config.health.interval = Duration::from_millis(50);
    config.health.startup_check_interval = Duration::from_millis(50);
    config.health.failure_threshold = 1;
    let r = router(config).await;
    let url = r.url();
    let checks = |ws: &[Value]| -> Vec<u64> {
        ws.iter().map(|w| w["health_checks_total"].as_u64().unwrap()).collect()
    };
    eventually(Duration::from_secs(10), "five checks on every rank", || async {
        let ws = workers(&url, None).await;
        ws.len() == 3 && checks(&ws).iter().all(|n| *n >= 5)
    })
    .await;
    // One probe per interval reaches the server, recorded on all three ranks (a probe may be
    // on its way while the two counts are read).
    let served = stats(&w).await["health_checks"].as_u64().unwrap();
    let recorded = checks(&workers(&url, None).await);
    assert!(recorded.iter().all(|n| *n == recorded[0]), "{recorded:?}");
    assert!(served <= recorded[0] + 1, "server saw {served} checks, ranks recorded {recorded:?}");

    // The server's failure marks every rank down at once, its recovery every rank up.
    let (status, _) =
        routerd_e2e::post_json(format!("{}/sim/faults", w.url()), &json!({"unhealthy": true}))
            .await;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(5), "every rank unhealthy", || async {
        workers(&url, None).await.iter().all(|w| w["healthy"] == false)
    })
    .await;
    routerd_e2e::post_json(format!("{}/sim/faults", w.url()), &json!({"unhealthy": false})).await;
    eventually(Duration::from_secs(5), "every rank healthy again", || async {
        workers(&url, None).await.iter().all(|w| w["healthy"] == true)
    })
    .await;
    r.shutdown().await;
    w.shutdown().await;
}

/// A worker whose `/get_server_info` answers `dp_size` 1 only after `delay`; `asked` is
/// notified when a request for it arrives.
async fn slow_info_worker(delay: Duration) -> (String, std::sync::Arc<tokio::sync::Notify>) {
    let asked = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = asked.clone();
    let app = axum::Router::new().route(
        "/get_server_info",
        axum::routing::get(move || {
            let notify = notify.clone();
            async move {
                notify.notify_one();
                tokio::time::sleep(delay).await;
                axum::Json(json!({"dp_size": 1}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, asked)
}

/// The dp resolver awaits the network; a reload that lands meanwhile must not be undone by the
/// worker set the resolver computed from the configuration it read before (it used to re-add
/// a worker the reload had just removed).
#[tokio::test]
async fn a_reload_during_dp_resolution_is_not_undone() {
    let b = sim(|a| a.dp_size = 2).await;
    let (a_url, asked) = slow_info_worker(Duration::from_millis(1500)).await;
    let dir = routerd_e2e::ConfigDir::new("dp-race");
    // B first: the resolver learns its size, then waits on A while the reload drops B.
    dir.write(&routerd_e2e::workers_toml("round_robin", &[b.url(), a_url.clone()]));
    let flags = Flags { dp_aware: true, no_watch_config: true, ..Default::default() };
    let r = dir.start(&dir.file.clone(), flags).await;
    tokio::time::timeout(Duration::from_secs(10), asked.notified()).await.expect("A is asked");
    dir.write(&routerd_e2e::workers_toml("round_robin", std::slice::from_ref(&a_url)));
    let app = r.app.clone();
    let outcome = tokio::task::spawn_blocking(move || routerd::reload::reload(&app)).await.unwrap();
    assert!(matches!(outcome, routerd::reload::Outcome::Applied { .. }), "{outcome:?}");
    let url = r.url();
    let want = vec![format!("{a_url}@0")];
    eventually(Duration::from_secs(10), "A's rank registered", || async {
        urls(&workers(&url, None).await).contains(&want[0])
    })
    .await;
    // A few resolver rounds later B's ranks must still be absent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(urls(&workers(&url, None).await), want, "B stays removed");
    r.shutdown().await;
    b.shutdown().await;
}

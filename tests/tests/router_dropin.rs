//! What a sglang-router 0.3 user relies on, end to end: no routable worker fails fast (503
//! `no_available_workers` with `Retry-After`, the worker gets nothing more; panic routing only
//! when asked), a queue timeout is 408, and the 0.3 workers API (202 + `worker_id` + `Location`,
//! poll by id, delete by id, ids stable and never reused); the `manual` and `bucket` policies.

use std::time::Duration;

use routerctl::sim::{Role, SimWorker};
use routerd_e2e::{
    client, eventually, get_json, router, router_config, sim, small_generate, stats,
};
use serde_json::{json, Value};

/// Circuits open after 3 failures and stay open for a minute; no health check closes them.
fn strict(mut c: routerd::config::Config) -> routerd::config::Config {
    c.circuit_breaker.failure_threshold = 3;
    c.circuit_breaker.timeout = Duration::from_secs(60);
    c.health.interval = Duration::from_secs(60);
    c.retry.initial_backoff = Duration::from_millis(5);
    c
}

async fn generate(url: &str) -> (u16, Option<String>, Value) {
    let resp = client()
        .post(format!("{url}/generate"))
        .json(&small_generate())
        .send()
        .await
        .expect("router answers");
    let status = resp.status().as_u16();
    let retry_after =
        resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, retry_after, body)
}

async fn requests(w: &SimWorker) -> u64 {
    stats(w).await["requests"].as_u64().unwrap()
}

#[tokio::test]
async fn a_lone_failing_worker_fails_fast_once_its_circuit_opens() {
    let bad = sim(|a| a.faults.error_rate = 1.0).await;
    let r = router(strict(router_config("round_robin", &[&bad]))).await;
    let url = r.url();
    for _ in 0..3 {
        let (status, _, _) = generate(&url).await;
        assert_eq!(status, 500, "the worker's own answer while its circuit is closed");
    }
    for _ in 0..5 {
        let (status, retry_after, body) = generate(&url).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            body,
            json!({"error": {"message": "No available workers (all circuits open or unhealthy)",
                             "type": "Service Unavailable", "code": "no_available_workers"}})
        );
        let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&secs), "until the circuit half-opens: {secs}");
    }
    assert_eq!(requests(&bad).await, 3, "nothing is sent to an open circuit");
    r.shutdown().await;
    bad.shutdown().await;
}

#[tokio::test]
async fn all_circuits_open_fails_fast_and_panic_routing_is_opt_in() {
    let (a, b) =
        (sim(|a| a.faults.error_rate = 1.0).await, sim(|a| a.faults.error_rate = 1.0).await);
    let r = router(strict(router_config("round_robin", &[&a, &b]))).await;
    let url = r.url();
    // Each request tries both (a retry), so three requests open both circuits.
    for _ in 0..3 {
        generate(&url).await;
    }
    let sent = requests(&a).await + requests(&b).await;
    assert_eq!(sent, 6);
    let (status, retry_after, body) = generate(&url).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("no_available_workers")));
    assert!(retry_after.is_some());
    assert_eq!(requests(&a).await + requests(&b).await, sent, "no worker was tried");
    r.shutdown().await;

    let mut c = strict(router_config("round_robin", &[&a, &b]));
    c.policy.panic_routing = true;
    let r = router(c).await;
    for _ in 0..3 {
        generate(&r.url()).await;
    }
    let before = requests(&a).await + requests(&b).await;
    let (status, _, _) = generate(&r.url()).await;
    assert_eq!(status, 500, "panic routing still sends to an open circuit");
    assert!(requests(&a).await + requests(&b).await > before);
    r.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn an_unhealthy_fleet_fails_fast_with_the_health_interval_as_retry_after() {
    let w = sim(|a| a.faults.unhealthy = true).await;
    let mut c = router_config("round_robin", &[&w]);
    c.health.interval = Duration::from_secs(7);
    c.health.startup_check_interval = Duration::from_millis(50);
    let r = router(c).await;
    let url = r.url();
    eventually(Duration::from_secs(10), "the worker is unhealthy", || async {
        get_json(&format!("{url}/workers")).await["workers"][0]["healthy"] == false
    })
    .await;
    let (status, retry_after, _) = generate(&url).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("7")));
    assert_eq!(requests(&w).await, 0);
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn a_request_that_waits_too_long_for_a_slot_is_408() {
    let w = sim(|a| a.faults.latency_ms = 1500).await;
    let mut c = router_config("round_robin", &[&w]);
    c.server.max_concurrent_requests = std::num::NonZeroUsize::new(1);
    c.server.queue_timeout = Duration::from_millis(300);
    let r = router(c).await;
    let url = r.url();
    let first = tokio::spawn({
        let url = url.clone();
        async move { generate(&url).await.0 }
    });
    eventually(Duration::from_secs(5), "the first request holds the slot", || async {
        requests(&w).await == 1
    })
    .await;
    let (status, _, body) = generate(&url).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(
        (body["error"]["type"].as_str(), body["error"]["code"].as_u64()),
        (Some("queue_timeout"), Some(408))
    );
    assert_eq!(first.await.unwrap(), 200);
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn the_workers_api_of_sglang_router_0_3() {
    let (a, b) = (sim(|_| {}).await, sim(|_| {}).await);
    let mut c = router_config("round_robin", &[&a]);
    c.health.interval = Duration::from_millis(100);
    c.health.startup_check_interval = Duration::from_millis(50);
    let r = router(c).await;
    let url = r.url();
    let http = client();

    let resp =
        http.post(format!("{url}/workers")).json(&json!({"url": b.url()})).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let v: Value = resp.json().await.unwrap();
    let id = v["worker_id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], "accepted");
    assert_eq!(
        (v["url"].as_str(), v["location"].as_str()),
        (Some(b.url().as_str()), Some(location.as_str()))
    );
    assert_eq!(location, format!("/workers/{id}"));
    assert_eq!(v["worker"]["id"], id.as_str());

    // Poll by id until it passed a health check.
    eventually(Duration::from_secs(10), "the new worker is healthy", || async {
        let w = get_json(&format!("{url}{location}")).await;
        w["health_state"] == "healthy" && w["is_healthy"] == true && w["id"] == id.as_str()
    })
    .await;
    let all = get_json(&format!("{url}/workers")).await;
    assert_eq!(all["total"], 2);
    assert_eq!(all["stats"], json!({"prefill_count": 0, "decode_count": 0, "regular_count": 2}));
    let ids: Vec<&str> =
        all["workers"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&id.as_str()));
    let config_id = ids.iter().find(|i| **i != id).unwrap().to_string();

    // A duplicate is refused; an unknown id is 404.
    let dup =
        http.post(format!("{url}/workers")).json(&json!({"url": b.url()})).send().await.unwrap();
    assert_eq!(dup.status(), 409);
    let missing = http
        .get(format!("{url}/workers/00000000-0000-4000-8000-000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Delete by id: 202, gone, a second delete 404; the same URL added again gets a new id.
    let del = http.delete(format!("{url}/workers/{id}")).send().await.unwrap();
    assert_eq!(del.status(), 202);
    let v: Value = del.json().await.unwrap();
    assert_eq!(
        (v["status"].as_str(), v["worker_id"].as_str()),
        (Some("accepted"), Some(id.as_str()))
    );
    assert_eq!(http.get(format!("{url}/workers/{id}")).send().await.unwrap().status(), 404);
    assert_eq!(http.delete(format!("{url}/workers/{id}")).send().await.unwrap().status(), 404);
    let again: Value = http
        .post(format!("{url}/workers"))
        .json(&json!({"url": b.url()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(again["worker_id"].as_str(), Some(id.as_str()), "ids are never reused");

    // A worker keeps its id while it stays, traffic included.
    for _ in 0..4 {
        assert_eq!(generate(&url).await.0, 200);
    }
    let w = get_json(&format!("{url}/workers/{config_id}")).await;
    assert_eq!(w["url"], a.url().as_str());
    // The older routes keep working beside it.
    let listed = get_json(&format!("{url}/list_workers")).await;
    assert_eq!(listed["urls"].as_array().unwrap().len(), 2);
    r.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// The worker (and in PD mode the prefill worker) that served one request with `key`.
async fn served_by(url: &str, key: Option<&str>) -> (String, Option<String>, Value) {
    let mut req = client()
        .post(format!("{url}/generate"))
        .header("x-routerd-explain", "1")
        .json(&small_generate());
    if let Some(k) = key {
        req = req.header("X-SMG-Routing-Key", k);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = |n: &str| resp.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let worker = h("x-routerd-worker").unwrap();
    let prefill = h("x-routerd-prefill-worker");
    let decision: Value = serde_json::from_str(&h("x-routerd-decision").unwrap()).unwrap();
    (worker, prefill, decision)
}

fn manual(
    workers: &[&SimWorker],
    mode: routerd::policy::AssignmentMode,
) -> routerd::config::Config {
    let mut c = router_config("manual", workers);
    c.policy.manual.assignment_mode = mode;
    c
}

#[tokio::test]
async fn manual_keys_stick_min_group_spreads_them_and_unkeyed_requests_spread() {
    let ws = routerd_e2e::fleet(4, |_| {}).await;
    let refs: Vec<&SimWorker> = ws.iter().collect();
    let r = router(manual(&refs, routerd::policy::AssignmentMode::MinGroup)).await;
    let url = r.url();
    let mut home = std::collections::HashMap::new();
    for round in 0..3 {
        for k in 0..8 {
            let key = format!("conversation-{k}");
            let (w, _, d) = served_by(&url, Some(&key)).await;
            assert_eq!(d["policy"], "manual");
            assert_eq!(d["branch"], if round == 0 { "assigned" } else { "sticky" }, "{d}");
            assert_eq!(home.entry(key).or_insert_with(|| w.clone()), &w, "a key sticks");
        }
    }
    let mut per: std::collections::HashMap<&String, usize> = Default::default();
    for w in home.values() {
        *per.entry(w).or_default() += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), [2, 2, 2, 2], "min_group: {per:?}");
    let mut unkeyed = std::collections::HashSet::new();
    for _ in 0..40 {
        let (w, _, d) = served_by(&url, None).await;
        assert_eq!(d["branch"], "no_key");
        unkeyed.insert(w);
    }
    assert!(unkeyed.len() >= 3, "no key: random: {unkeyed:?}");
    r.shutdown().await;
    routerd_e2e::shutdown_all(ws).await;
}

#[tokio::test]
async fn manual_reassigns_when_a_worker_leaves_or_a_key_idles_and_follows_reloads() {
    let ws = routerd_e2e::fleet(3, |_| {}).await;
    let dir = routerd_e2e::ConfigDir::new("manual");
    let toml = |mode: &str, idle: &str| {
        let mut s = format!(
            "[policy]\nname = \"manual\"\nassignment_mode = \"{mode}\"\nmax_idle = \"{idle}\"\n"
        );
        for w in &ws {
            s.push_str(&format!("[[workers]]\nurl = \"{}\"\n", w.url()));
        }
        s
    };
    dir.write(&toml("min_load", "1h"));
    let flags = routerd::config::Flags { no_watch_config: true, ..Default::default() };
    let r = dir.start(&dir.file.clone(), flags).await;
    let url = r.url();
    let (first, _, _) = served_by(&url, Some("k")).await;
    // The worker leaves: the key moves, and stays where it moved.
    let c = client();
    let id = get_json(&format!("{url}/workers")).await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["url"] == first.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(c.delete(format!("{url}/workers/{id}")).send().await.unwrap().status(), 202);
    let (moved, _, d) = served_by(&url, Some("k")).await;
    assert_ne!(moved, first);
    assert_eq!(d["branch"], "assigned");
    assert_eq!(served_by(&url, Some("k")).await.0, moved);

    // A reload shortens max_idle: an idle key is assigned anew (the table is the same).
    dir.write(&toml("min_load", "200ms"));
    let app = r.app.clone();
    let outcome = tokio::task::spawn_blocking(move || routerd::reload::reload(&app)).await.unwrap();
    assert!(matches!(outcome, routerd::reload::Outcome::Applied { .. }), "{outcome:?}");
    let cfg = get_json(&format!("{url}/admin/config")).await;
    assert_eq!(cfg["config"]["policy"]["manual"]["max_idle"], "200ms");
    assert_eq!(served_by(&url, Some("k")).await.2["branch"], "sticky");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_by(&url, Some("k")).await.2["branch"], "assigned", "idle past max_idle");
    r.shutdown().await;
    routerd_e2e::shutdown_all(ws).await;
}

/// `np` prefill and `nd` decode simulated workers, and the `--prefill URL PORT` flag values
/// of the prefill ones.
async fn pd_fleet(np: usize, nd: usize) -> (Vec<SimWorker>, Vec<SimWorker>, Vec<String>) {
    let one = |role| {
        sim(move |a| {
            a.role = role;
            a.bootstrap_timeout_secs = 10.0;
        })
    };
    let (mut ps, mut ds) = (Vec::new(), Vec::new());
    for _ in 0..np {
        ps.push(one(Role::Prefill).await);
    }
    for _ in 0..nd {
        ds.push(one(Role::Decode).await);
    }
    let flags =
        ps.iter().flat_map(|w| [w.url(), w.bootstrap_addr.unwrap().port().to_string()]).collect();
    (ps, ds, flags)
}

#[tokio::test]
async fn manual_in_pd_pools_keeps_both_legs() {
    let (ps, ds, prefill) = pd_fleet(2, 2).await;
    let flags = routerd::config::Flags {
        pd_disaggregation: true,
        policy: Some("round_robin".into()),
        prefill_policy: Some("manual".into()),
        decode_policy: Some("manual".into()),
        prefill,
        decode: ds.iter().map(|w| w.url()).collect(),
        ..Default::default()
    };
    let r = router(routerd::config::Config::build(None, &flags).unwrap()).await;
    for k in 0..4 {
        let key = format!("pd-{k}");
        let (d0, p0, _) = served_by(&r.url(), Some(&key)).await;
        for _ in 0..3 {
            let (d, p, _) = served_by(&r.url(), Some(&key)).await;
            assert_eq!((d, p), (d0.clone(), p0.clone()), "both legs stick for {key}");
        }
    }
    r.shutdown().await;
    for w in ps.into_iter().chain(ds) {
        w.shutdown().await;
    }
}

#[tokio::test]
async fn bucket_sends_prefill_by_prompt_length_and_balances_when_asked() {
    let (ps, mut ds, prefill) = pd_fleet(2, 1).await;
    let d = ds.remove(0);
    let flags = |abs: u64| routerd::config::Flags {
        pd_disaggregation: true,
        policy: Some("round_robin".into()),
        prefill_policy: Some("bucket".into()),
        balance_abs_threshold: Some(abs),
        prefill: prefill.clone(),
        decode: vec![d.url()],
        ..Default::default()
    };
    let prefill_of = |url: String, len: usize| async move {
        let body = json!({"text": "a".repeat(len), "sampling_params": {"max_new_tokens": 1}});
        let resp = client().post(format!("{url}/generate")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.headers()["x-routerd-prefill-worker"].to_str().unwrap().to_owned()
    };
    // Two workers: lengths below 2048 characters go to the first, the rest to the second.
    let r = router(routerd::config::Config::build(None, &flags(u64::MAX / 2)).unwrap()).await;
    for _ in 0..3 {
        assert_eq!(prefill_of(r.url(), 100).await, ps[0].url());
        assert_eq!(prefill_of(r.url(), 3000).await, ps[1].url());
    }
    r.shutdown().await;
    // A low imbalance threshold (in characters): short prompts alternate to even the load.
    let r = router(routerd::config::Config::build(None, &flags(10)).unwrap()).await;
    let a = prefill_of(r.url(), 100).await;
    let b = prefill_of(r.url(), 100).await;
    assert_ne!(a, b, "the second goes to the worker that got fewer characters");
    r.shutdown().await;
    for w in ps.into_iter().chain([d]) {
        w.shutdown().await;
    }
}

#[test]
fn bucket_is_refused_outside_a_prefill_pool() {
    let err = |f: routerd::config::Flags| {
        routerd::config::Config::build(None, &f)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = err(routerd::config::Flags { policy: Some("bucket".into()), ..Default::default() });
    assert!(e.contains("bucket routes prefill pools only"), "{e}");
    let e = err(routerd::config::Flags {
        pd_disaggregation: true,
        decode_policy: Some("bucket".into()),
        prefill: vec!["http://127.0.0.1:9".into()],
        decode: vec!["http://127.0.0.1:10".into()],
        ..Default::default()
    });
    assert!(e.contains("policy.decode_policy") && e.contains("prefill pools only"), "{e}");
}

#[tokio::test]
async fn manual_min_load_avoids_the_busy_worker_and_random_spreads_keys() {
    let ws = routerd_e2e::fleet(2, |a| a.speed = 1.0).await;
    let refs: Vec<&SimWorker> = ws.iter().collect();
    let r = router(manual(&refs, routerd::policy::AssignmentMode::MinLoad)).await;
    let url = r.url();
    // A long stream holds one worker busy.
    let body = json!({"text": "a long answer", "stream": true, "sampling_params": {"max_new_tokens": 500}});
    let busy = client()
        .post(format!("{url}/generate"))
        .header("X-SMG-Routing-Key", "busy")
        .json(&body)
        .send()
        .await
        .unwrap();
    let busy_worker = busy.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
    for k in 0..6 {
        let (w, _, d) = served_by(&url, Some(&format!("new-{k}"))).await;
        assert_eq!(d["branch"], "assigned");
        assert_ne!(w, busy_worker, "min_load: the idle worker gets new key {k}");
    }
    drop(busy);
    r.shutdown().await;

    let r = router(manual(&refs, routerd::policy::AssignmentMode::Random)).await;
    let mut homes = std::collections::HashSet::new();
    for k in 0..24 {
        homes.insert(served_by(&r.url(), Some(&format!("r-{k}"))).await.0);
    }
    assert_eq!(homes.len(), 2, "random: keys land on both workers");
    r.shutdown().await;
    routerd_e2e::shutdown_all(ws).await;
}

//! Reloading the configuration (POST /admin/reload; SIGHUP is tested on the binary): load,
//! validate, diff, apply whole or not at all, with state kept for what stays.

use routerd::config::Flags;
use routerd_e2e::{
    client, fleet, get_json, post_json, shutdown_all, small_generate, workers_toml, ConfigDir,
};
use serde_json::{json, Value};

/// These tests reload explicitly, so the watcher is off.
async fn start(s: &ConfigDir, flags: Flags) -> routerd::run::Running {
    s.start(&s.file, Flags { no_watch_config: true, ..flags }).await
}

async fn reload(url: &str) -> (u16, Value) {
    post_json(format!("{url}/admin/reload"), &json!({})).await
}

#[tokio::test]
async fn workers_change_live_and_those_that_stay_keep_their_state() {
    let ws = fleet(2, |a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 5.0;
    })
    .await;
    let (a, b) = (ws[0].url(), ws[1].url());
    let s = ConfigDir::new("workers");
    s.write(&workers_toml("round_robin", std::slice::from_ref(&a)));
    let r = start(&s, Flags::default()).await;
    let u = r.url();
    for _ in 0..2 {
        assert_eq!(post_json(format!("{u}/generate"), &small_generate()).await.0, 200);
    }
    s.write(&workers_toml("round_robin", &[a.clone(), b.clone()]));
    let (st, out) = reload(&u).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["result"], "applied");
    assert_eq!(out["generation"], 2);
    assert_eq!(out["changes"], json!([format!("worker added: {b}")]));
    let views = get_json(&format!("{u}/workers")).await;
    assert_eq!(views["workers"][0]["requests_total"], 2, "worker a kept its counters");
    assert_eq!(views["workers"][1]["source"], "config");

    // A stream on a, then a leaves the file: the stream finishes, new requests go to b only.
    let mut stream = None;
    while stream.is_none() {
        let resp = client()
            .post(format!("{u}/generate"))
            .json(&json!({"text": "s", "stream": true, "sampling_params": {"max_new_tokens": 30}}))
            .send()
            .await
            .unwrap();
        if resp.headers()["x-routerd-worker"] == a.as_str() {
            stream = Some(resp);
        }
    }
    s.write(&workers_toml("round_robin", std::slice::from_ref(&b)));
    let (st, out) = reload(&u).await;
    assert_eq!((st, out["changes"].clone()), (200, json!([format!("worker removed: {a}")])));
    let events = routerd_e2e::sse_events(&stream.unwrap().text().await.unwrap());
    assert_eq!(events.len(), 31, "the removed worker's stream ran to the end");
    for _ in 0..4 {
        let resp =
            client().post(format!("{u}/generate")).json(&small_generate()).send().await.unwrap();
        assert_eq!(resp.headers()["x-routerd-worker"], b.as_str());
    }
    assert_eq!(get_json(&format!("{u}/list_workers")).await, json!({"urls": [b]}));
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn invalid_files_are_rejected_whole_and_the_last_good_config_keeps_serving() {
    let ws = fleet(1, |_| {}).await;
    let s = ConfigDir::new("invalid");
    s.write(&workers_toml("random", &[ws[0].url()]));
    let r = start(&s, Flags::default()).await;
    let u = r.url();
    let (st, out) = reload(&u).await;
    assert_eq!((st, out["result"].as_str()), (200, Some("unchanged")));

    s.write("[policy]\nname = \"fastest\"\n[[workers]]\nurl = \"ftp://x\"\n");
    let (st, out) = reload(&u).await;
    assert_eq!(st, 400, "{out}");
    assert_eq!(out["result"], "rejected");
    let errors = out["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let file = s.file.display().to_string();
    assert!(
        errors[0].as_str().unwrap().starts_with(&format!("{file}:2:8: policy.name")),
        "{errors:?}"
    );
    assert!(
        errors[1].as_str().unwrap().starts_with(&format!("{file}:4:7: workers[0].url")),
        "{errors:?}"
    );
    assert_eq!(post_json(format!("{u}/generate"), &small_generate()).await.0, 200, "still serving");

    s.write("[server]\nport = 1\n[policy]\nname = \"random\"\n");
    let (st, out) = reload(&u).await;
    assert_eq!(st, 400);
    assert!(out["errors"][0].as_str().unwrap().contains("requires a restart"), "{out}");

    // Traces on or off (any [trace] key) need a restart too: the exporter is made at start.
    s.write("[policy]\nname = \"random\"\n[trace]\nenabled = true\n");
    let (st, out) = reload(&u).await;
    assert_eq!(st, 400);
    let e = out["errors"][0].as_str().unwrap();
    assert!(e.starts_with("trace") && e.contains("requires a restart"), "{out}");

    s.write("[server\n");
    assert_eq!(reload(&u).await.0, 400);
    let cfg = get_json(&format!("{u}/admin/config")).await;
    assert_eq!(cfg["generation"], 1);
    assert_eq!(cfg["reloads"], json!({"applied": 0, "rejected": 4}));
    assert_eq!(cfg["last_reload"]["outcome"]["result"], "rejected");
    assert_eq!(cfg["config"]["policy"]["name"], "random");
    assert_eq!(cfg["config"]["workers"][0]["url"], ws[0].url());
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn flags_keep_overriding_the_file_across_reloads() {
    let ws = fleet(1, |_| {}).await;
    let s = ConfigDir::new("flags");
    s.write(&workers_toml("random", &[ws[0].url()]));
    let r = start(&s, Flags { policy: Some("round_robin".into()), ..Default::default() }).await;
    let u = r.url();
    assert_eq!(
        get_json(&format!("{u}/admin/config")).await["config"]["policy"]["name"],
        "round_robin"
    );
    s.write(
        &(workers_toml("power_of_two", &[ws[0].url()]) + "[server]\nrequest_timeout = \"5s\"\n"),
    );
    let (st, out) = reload(&u).await;
    assert_eq!(st, 200, "{out}");
    let cfg = get_json(&format!("{u}/admin/config")).await;
    assert_eq!(cfg["config"]["policy"]["name"], "round_robin", "the flag still wins");
    assert_eq!(cfg["config"]["server"]["request_timeout"], "5s", "the file's other change applied");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn cache_aware_keeps_its_tree_when_only_parameters_change() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let s = ConfigDir::new("tree");
    s.write(&(workers_toml("cache_aware", &urls) + "api_key = \"secret-key\"\n"));
    let r = start(&s, Flags::default()).await;
    let u = r.url();
    post_json(format!("{u}/generate"), &json!({"text": "a prompt long enough to remember"})).await;
    let tree = |v: &Value| {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["tree_chars"].as_u64().unwrap())
            .sum::<u64>()
    };
    let before = tree(&get_json(&format!("{u}/workers")).await);
    assert!(before > 0);
    let cfg = get_json(&format!("{u}/admin/config")).await;
    assert_eq!(cfg["config"]["workers"][1]["api_key"], "<redacted>", "secrets never shown");

    let tuned = workers_toml("cache_aware", &urls)
        .replace("name = \"cache_aware\"\n", "name = \"cache_aware\"\ncache_threshold = 0.7\n");
    s.write(&(tuned + "api_key = \"secret-key\"\n"));
    let (st, out) = reload(&u).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["changes"], json!(["policy cache_aware reconfigured"]));
    assert_eq!(tree(&get_json(&format!("{u}/workers")).await), before, "tree kept");

    s.write(&(workers_toml("round_robin", &urls) + "api_key = \"secret-key\"\n"));
    let (_, out) = reload(&u).await;
    assert_eq!(out["changes"], json!(["policy cache_aware -> round_robin"]));
    assert_eq!(tree(&get_json(&format!("{u}/workers")).await), 0);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn without_a_file_there_is_nothing_to_reload() {
    let ws = fleet(1, |_| {}).await;
    let r = routerd_e2e::router(routerd_e2e::router_config("random", &[&ws[0]])).await;
    let (st, out) = reload(&r.url()).await;
    assert_eq!(st, 400);
    assert!(out["errors"][0].as_str().unwrap().contains("without --config"), "{out}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn each_kind_of_invalid_file_is_rejected_with_its_location() {
    let ws = fleet(1, |_| {}).await;
    let s = ConfigDir::new("invalid-kinds");
    let good = workers_toml("random", &[ws[0].url()]);
    s.write(&good);
    let r = start(&s, Flags::default()).await;
    let u = r.url();
    let file = s.file.display().to_string();
    let w = ws[0].url();
    for (text, want) in [
        ("[policy\nname = \"random\"\n".to_owned(), format!("{file}:1:")),
        (
            good.clone() + "[server]\nbogus = 1\n",
            format!("{file}:6:1: server.bogus: unknown field"),
        ),
        ("[server]\nport = \"eighty\"\n".to_owned(), format!("{file}:2:8: server.port")),
        (format!("[[workers]]\nurl = \"{w}/v1\"\n"), format!("{file}:2:7: workers[0].url")),
        (
            format!("[[workers]]\nurl = \"{w}\"\n[[workers]]\nurl = \"{w}\"\n"),
            format!("{file}:4:7: workers[1].url: duplicate worker"),
        ),
        (
            "[policy]\nname = \"fastest\"\n".to_owned(),
            format!("{file}:2:8: policy.name: unknown policy"),
        ),
    ] {
        s.write(&text);
        let (st, out) = reload(&u).await;
        assert_eq!(st, 400, "{text}: {out}");
        let first = out["errors"][0].as_str().unwrap();
        assert!(first.starts_with(&want), "{text}: got {first:?}, want {want:?}");
        assert_eq!(
            post_json(format!("{u}/generate"), &small_generate()).await.0,
            200,
            "still serving"
        );
    }
    assert_eq!(get_json(&format!("{u}/admin/config")).await["reloads"]["rejected"], 6);
    r.shutdown().await;
    shutdown_all(ws).await;
}

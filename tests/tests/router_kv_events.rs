//! Event routing end to end: simulated workers publish SGLang's KV events over ZMQ, routerd
//! subscribes and routes on what their caches really hold. Each case is one where the
//! approximate tree is wrong: a cache flushed behind the router's back (and warmed by another
//! router), a worker restarted, a working set that overflows the caches, and events lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use routerctl::sim::{SimArgs, SimWorker};
use routerd_e2e::{
    client, eventually, get_json, post_json, router, router_config, shutdown_all, sim, ConfigDir,
};
use serde_json::{json, Value};

/// The byte-level tokenizer both sides use, with its ChatML chat template beside it, in a
/// fresh directory.
fn tokenizer(dir: &ConfigDir) -> PathBuf {
    routerd::kv::tokenize::write_byte_level(&dir.dir).expect("write tokenizer");
    dir.dir.join("tokenizer.json")
}

fn kv_args(a: &mut SimArgs, tok: &Path, endpoint: &str, replay: &str, buffer: usize) {
    a.zero_compute = true;
    a.page_size = 4;
    a.tokenizer_path = Some(tok.to_owned());
    a.kv_events_config = Some(format!(
        r#"{{"publisher": "zmq", "endpoint": "{endpoint}", "replay_endpoint": "{replay}", "buffer_steps": {buffer}}}"#
    ));
}

async fn kv_sim(tok: &Path, tweak: impl FnOnce(&mut SimArgs)) -> SimWorker {
    sim(|a| {
        kv_args(a, tok, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 1000);
        tweak(a);
    })
    .await
}

async fn kv_router(ws: &[&SimWorker], tok: &Path) -> routerd::run::Running {
    let mut config = router_config("cache_aware", ws);
    config.tokenizer =
        Some(routerd::kv::tokenize::TokenizerFiles { path: tok.to_owned(), chat_template: None });
    config.health.interval = Duration::from_millis(100);
    config.health.failure_threshold = 1;
    config.health.success_threshold = 1;
    let r = router(config).await;
    wait_subscribed(&r, ws.len()).await;
    r
}

async fn kv_status(r: &routerd::run::Running) -> Value {
    get_json(&format!("{}/admin/kv", r.url())).await
}

async fn wait_subscribed(r: &routerd::run::Running, n: usize) {
    eventually(Duration::from_secs(10), "every worker's events subscribed", || async {
        let s = kv_status(r).await;
        let ws = s["workers"].as_array().unwrap();
        s["tokenizer"].is_string()
            && ws.len() == n
            && ws
                .iter()
                .all(|w| w["ranks"].as_array().unwrap().iter().all(|r| r["connected"] == true))
    })
    .await;
    // A SUB socket's subscription reaches the publisher just after the connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Blocks routerd's index holds for `w`.
async fn blocks(r: &routerd::run::Running, w: &str) -> u64 {
    let s = kv_status(r).await;
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["url"] == w)
        .map_or(0, |x| x["blocks"].as_u64().unwrap())
}

fn generate(text: &str) -> Value {
    json!({"text": text, "sampling_params": {"max_new_tokens": 1}})
}

/// Sends `body` to routerd's `path` with its decision explained: the worker chosen, the
/// decision record and the answer.
async fn explained(r: &routerd::run::Running, path: &str, body: &Value) -> (String, Value, Value) {
    routerd_e2e::explained(&r.url(), path, body).await
}

/// Routes `text` through routerd: the worker chosen and the decision record.
async fn route(r: &routerd::run::Running, text: &str) -> (String, Value) {
    let (worker, decision, _) = explained(r, "/generate", &generate(text)).await;
    (worker, decision)
}

/// Sends `text` straight to a worker (another router, a client that bypasses routerd).
async fn direct(w: &SimWorker, text: &str) {
    assert_eq!(post_json(format!("{}/generate", w.url()), &generate(text)).await.0, 200);
}

fn prompt(name: &str) -> String {
    format!("{name}: ") + &"a long shared system prompt that the cache keeps. ".repeat(4)
}

/// The other worker of two.
fn other<'a>(ws: &'a [SimWorker], url: &str) -> &'a SimWorker {
    ws.iter().find(|w| w.url() != url).unwrap()
}

#[tokio::test]
async fn a_cache_flushed_behind_the_routers_back_and_warmed_by_another_router() {
    let dir = ConfigDir::new("kv-flush");
    let tok = tokenizer(&dir);
    let ws = vec![kv_sim(&tok, |_| {}).await, kv_sim(&tok, |_| {}).await];
    let r = kv_router(&[&ws[0], &ws[1]], &tok).await;
    let p = prompt("flush");
    let (home, d) = route(&r, &p).await;
    assert_eq!(d["branch"], "miss");
    let away = other(&ws, &home);
    // Another router sends the same prompt to the other worker; then the first one's cache is
    // flushed directly. Only the events tell routerd either.
    direct(away, &p).await;
    eventually(Duration::from_secs(5), "both workers' blocks indexed", || async {
        blocks(&r, &home).await > 0 && blocks(&r, &away.url()).await > 0
    })
    .await;
    let flushed = client().post(format!("{home}/flush_cache")).send().await.unwrap();
    assert_eq!(flushed.status(), 200);
    eventually(Duration::from_secs(5), "the flush seen", || async { blocks(&r, &home).await == 0 })
        .await;
    for _ in 0..3 {
        let (to, d) = route(&r, &p).await;
        assert_eq!(to, away.url(), "the prompt goes where it is really cached: {d}");
        assert_eq!(d["branch"], "hit");
        let (m, n) = (d["matched_tokens"].as_u64().unwrap(), d["prompt_tokens"].as_u64().unwrap());
        assert_eq!(m, n - n % 4, "every whole page matched: {d}");
        // Accounted in tokens: the best any worker had is what the chosen one had.
        let a = &d["accounting"];
        assert_eq!((a["unit"].as_str(), a["prompt"].as_u64()), (Some("tokens"), Some(n)), "{d}");
        assert_eq!((a["best"].as_u64(), a["predicted"].as_u64()), (Some(m), Some(m)), "{d}");
    }
    // The prediction is exported next to what the worker reported.
    let metrics_url = routerd_e2e::serve_metrics(&r).await;
    let text = client().get(metrics_url).send().await.unwrap().text().await.unwrap();
    let series = |name: &str| -> f64 {
        let prefix = format!("{name}{{worker=\"{}\"}} ", away.url());
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{prefix}: {text}"))
            .parse()
            .unwrap()
    };
    let (predicted, reported) = (
        series("routerd_worker_predicted_cached_tokens_total"),
        series("sgl_router_worker_cached_tokens_total"),
    );
    assert!(
        predicted > 0.0 && reported > 0.0 && (predicted - reported).abs() <= 3.0 * 4.0,
        "predicted {predicted}, reported {reported}"
    );
    assert!(text.contains("routerd_kv_events_total "), "{text}");
    let hit = format!(
        "routerd_cache_accounting_total{{worker=\"{}\",unit=\"tokens\",part=\"hit\"}} ",
        away.url()
    );
    let hit: f64 = text.lines().find_map(|l| l.strip_prefix(&hit)).expect(&hit).parse().unwrap();
    assert_eq!(hit, reported, "the accounting's hits are what the worker reported");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_restarted_worker_is_empty_and_its_new_publisher_is_followed() {
    let dir = ConfigDir::new("kv-restart");
    let tok = tokenizer(&dir);
    let mut ws = vec![kv_sim(&tok, |_| {}).await, kv_sim(&tok, |_| {}).await];
    let r = kv_router(&[&ws[0], &ws[1]], &tok).await;
    let p = prompt("restart");
    let (home, _) = route(&r, &p).await;
    let i = ws.iter().position(|w| w.url() == home).unwrap();
    direct(&ws[1 - i], &p).await;
    eventually(Duration::from_secs(5), "indexed", || async {
        blocks(&r, &home).await > 0 && blocks(&r, &ws[1 - i].url()).await > 0
    })
    .await;
    // The worker restarts on the same port, with an empty cache and a publisher on new ports.
    let port = ws[i].addr.port();
    ws.remove(i).shutdown().await;
    eventually(Duration::from_secs(5), "the router saw it down", || async {
        routerd_e2e::worker_view(&r.url(), &home).await.is_some_and(|w| w["is_healthy"] == false)
    })
    .await;
    ws.insert(i, kv_sim(&tok, |a| a.port = port).await);
    let endpoint = format!("tcp://127.0.0.1:{}", ws[i].state.kv.as_ref().unwrap().port);
    eventually(Duration::from_secs(10), "the new publisher subscribed", || async {
        let s = kv_status(&r).await;
        let w = s["workers"].as_array().unwrap().iter().find(|w| w["url"] == home).cloned();
        w.is_some_and(|w| {
            w["ranks"][0]["connected"] == true
                && w["ranks"][0]["endpoint"] == endpoint.as_str()
                && w["blocks"] == 0
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (to, d) = route(&r, &p).await;
    assert_eq!(to, ws[1 - i].url(), "not to the restarted worker, whose cache is empty: {d}");
    // Its new publisher's events are applied: what it stores now is matched there.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let q = prompt("after the restart");
    direct(&ws[i], &q).await;
    eventually(Duration::from_secs(5), "new events indexed", || async {
        blocks(&r, &home).await > 0
    })
    .await;
    let (to, d) = route(&r, &q).await;
    assert_eq!((to.as_str(), &d["branch"]), (home.as_str(), &json!("hit")), "{d}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_working_set_that_overflows_the_cache_is_followed() {
    let dir = ConfigDir::new("kv-pressure");
    let tok = tokenizer(&dir);
    // Room for about two prompts per worker.
    let ws = vec![
        kv_sim(&tok, |a| a.cache_capacity_tokens = 512).await,
        kv_sim(&tok, |a| a.cache_capacity_tokens = 512).await,
    ];
    let r = kv_router(&[&ws[0], &ws[1]], &tok).await;
    let p = prompt("pressure");
    let (home, _) = route(&r, &p).await;
    let away = other(&ws, &home);
    direct(away, &p).await;
    let home_w = ws.iter().find(|w| w.url() == home).unwrap();
    // Other traffic reaches the home worker directly and evicts the prompt there.
    for k in 0..4 {
        direct(home_w, &prompt(&format!("evictor {k}"))).await;
    }
    eventually(Duration::from_secs(5), "evictions seen", || async {
        let s = get_json(&format!("{home}/sim/stats")).await;
        s["cache"]["evicted_tokens"].as_u64().unwrap() > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (to, d) = route(&r, &p).await;
    assert_eq!(to, away.url(), "the evicted prompt follows the worker that still holds it: {d}");
    assert_eq!(d["branch"], "hit");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_new_prefix_goes_to_the_cache_with_the_most_room_for_its_size() {
    let dir = ConfigDir::new("kv-sizes");
    let tok = tokenizer(&dir);
    let ws = vec![
        kv_sim(&tok, |a| a.cache_capacity_tokens = 4096).await,
        kv_sim(&tok, |a| a.cache_capacity_tokens = 1024).await,
    ];
    let (big, small) = (&ws[0], &ws[1]);
    let r = kv_router(&[big, small], &tok).await;
    // Each cache's size, from the workers' /server_info.
    let s = kv_status(&r).await;
    for (w, size) in [(big, 4096), (small, 1024)] {
        let x = s["workers"].as_array().unwrap().iter().find(|x| x["url"] == w.url()).unwrap();
        assert_eq!(x["capacity_tokens"], size, "{s}");
    }
    // Other traffic fills the small cache to about 40% (two prompts) and the big one to about
    // 25% (five): the big one holds more tokens, but has more room for its size.
    for k in 0..2 {
        direct(small, &prompt(&format!("small {k}"))).await;
    }
    for k in 0..5 {
        direct(big, &prompt(&format!("big {k}"))).await;
    }
    eventually(Duration::from_secs(5), "both caches indexed", || async {
        let (b, s) = (blocks(&r, &big.url()).await, blocks(&r, &small.url()).await);
        b * 4 > 1000 && s * 4 > 400
    })
    .await;
    let (to, d) = route(&r, &prompt("new")).await;
    assert_eq!((to.as_str(), d["branch"].as_str()), (big.url().as_str(), Some("miss")), "{d}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn lost_events_are_replayed_and_a_gap_older_than_the_buffer_runs_cold() {
    let dir = ConfigDir::new("kv-gap");
    let tok = tokenizer(&dir);
    // A replay buffer of one batch: a gap of two cannot be filled.
    let ws = vec![
        kv_sim(&tok, |_| {}).await,
        kv_sim(&tok, |a| kv_args(a, &tok, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 1)).await,
    ];
    let r = kv_router(&[&ws[0], &ws[1]], &tok).await;
    let drop = |w: &SimWorker, n: u64| {
        let url = format!("{}/sim/kv_events/drop?n={n}", w.url());
        async move { assert_eq!(client().post(url).send().await.unwrap().status(), 200) }
    };
    let (w0, w1) = (&ws[0], &ws[1]);
    // Worker 0: one batch lost, then another arrives: the gap is replayed.
    direct(w0, &prompt("first")).await;
    eventually(Duration::from_secs(5), "first batch", || async { blocks(&r, &w0.url()).await > 0 })
        .await;
    // (Each subscriber replayed the buffer once already, when it connected.)
    let replays = kv_status(&r).await["replays"].as_u64().unwrap();
    drop(w0, 1).await;
    let lost = prompt("lost then replayed");
    direct(w0, &lost).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    direct(w0, &prompt("after the gap")).await;
    // (A request's events may span two batches: the prompt stored at admission, the answer
    // at the end. Whichever was lost, the next live one shows the gap.)
    eventually(Duration::from_secs(5), "gap replayed", || async {
        kv_status(&r).await["replays"].as_u64().unwrap() > replays
    })
    .await;
    let (to, d) = route(&r, &lost).await;
    assert_eq!(
        (to.as_str(), &d["branch"]),
        (w0.url().as_str(), &json!("hit")),
        "replayed blocks are matched: {d}"
    );
    assert_eq!(kv_status(&r).await["resets"], 0);
    // Worker 1: two batches lost with a buffer of one: its state is dropped, not trusted.
    let known = prompt("known before the gap");
    direct(w1, &known).await;
    eventually(Duration::from_secs(5), "first batch", || async { blocks(&r, &w1.url()).await > 0 })
        .await;
    drop(w1, 2).await;
    direct(w1, &prompt("lost one")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    direct(w1, &prompt("lost two")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    direct(w1, &prompt("the next live batch")).await;
    eventually(Duration::from_secs(5), "the rank reset", || async {
        kv_status(&r).await["resets"].as_u64().unwrap() >= 1
    })
    .await;
    let (_, d) = route(&r, &known).await;
    assert!(
        d["matched_tokens"].as_u64().unwrap() == 0 || d["worker"] != w1.url(),
        "what was known before an unfillable gap is no longer trusted: {d}"
    );
    r.shutdown().await;
    shutdown_all(ws).await;
}

/// Routes a chat conversation through routerd: the worker chosen, the decision record and the
/// worker's answer.
async fn route_chat(r: &routerd::run::Running, messages: &Value) -> (String, Value, Value) {
    let body = json!({"model": "m", "messages": messages, "max_tokens": 1});
    explained(r, "/v1/chat/completions", &body).await
}

#[tokio::test]
async fn chat_requests_route_on_events_through_the_models_chat_template() {
    let dir = ConfigDir::new("kv-chat");
    let tok = tokenizer(&dir);
    let ws = vec![kv_sim(&tok, |_| {}).await, kv_sim(&tok, |_| {}).await];
    let r = kv_router(&[&ws[0], &ws[1]], &tok).await;
    let status = kv_status(&r).await;
    assert!(
        status["chat_template"]["from"].as_str().unwrap().ends_with("tokenizer_config.json"),
        "{status}"
    );
    let system = "You answer in one word. ".repeat(6);
    let messages =
        json!([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]);
    // The ChatML template the sims and routerd both render, one token per byte.
    let rendered = format!(
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let (home, d, answer) = route_chat(&r, &messages).await;
    let usage = &answer["usage"];
    assert_eq!(d["branch"], "miss");
    assert_eq!(d["prompt_tokens"], rendered.len(), "routerd rendered the template: {d}");
    assert_eq!(usage["prompt_tokens"], rendered.len(), "the worker rendered the same: {usage}");
    // The same conversation reaches the other worker behind routerd's back, and the first
    // worker's cache is flushed: only the events say where it is now.
    let away = other(&ws, &home);
    let body = json!({"model": "m", "messages": messages, "max_tokens": 1});
    assert_eq!(post_json(format!("{}/v1/chat/completions", away.url()), &body).await.0, 200);
    let flushed = client().post(format!("{home}/flush_cache")).send().await.unwrap();
    assert_eq!(flushed.status(), 200);
    eventually(Duration::from_secs(5), "the flush and the other worker's blocks seen", || async {
        blocks(&r, &home).await == 0 && blocks(&r, &away.url()).await > 0
    })
    .await;
    let (to, d, answer) = route_chat(&r, &messages).await;
    assert_eq!(to, away.url(), "the conversation goes where it is cached: {d}");
    assert_eq!(d["branch"], "hit");
    let matched = d["matched_tokens"].as_u64().unwrap();
    assert_eq!(matched as usize, rendered.len() - rendered.len() % 4, "{d}");
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], matched, "prediction = truth");
    // The next turn carries the answer: the worker cached prompt and answer as the template
    // renders them again, and routerd's events say so.
    let reply = answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let mut turn2 = messages.as_array().unwrap().clone();
    turn2.push(json!({"role": "assistant", "content": reply}));
    turn2.push(json!({"role": "user", "content": "And then?"}));
    eventually(Duration::from_secs(5), "the answer's blocks seen", || async {
        blocks(&r, &away.url()).await * 4 >= (rendered.len() + reply.len()) as u64 - 3
    })
    .await;
    let (to, d, answer) = route_chat(&r, &json!(turn2)).await;
    assert_eq!(to, away.url(), "{d}");
    let shared = rendered.len() + reply.len();
    let cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached as usize >= shared - shared % 4, "cached {cached} of {shared} shared: {d}");
    assert_eq!(d["matched_tokens"].as_u64().unwrap(), cached, "{d}");
    // A multimodal message is not rendered: it routes on the approximate tree, and is served.
    let image = json!([{"role": "user", "content": [{"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]);
    let (_, d, _) = route_chat(&r, &image).await;
    assert!(d.get("matched_tokens").is_none(), "no token match without a rendering: {d}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_workers_endpoint_from_the_config_wins_over_the_fleets() {
    let dir = ConfigDir::new("kv-config-endpoint");
    let tok = tokenizer(&dir);
    let w = kv_sim(&tok, |_| {}).await;
    let info = get_json(&format!("{}/server_info", w.url())).await;
    let port = info["kv_events"]["endpoint_port_base"].as_u64().unwrap();
    let replay = info["kv_events"]["replay_endpoint_port_base"].as_u64().unwrap();
    let mut config = router_config("cache_aware", &[&w]);
    config.tokenizer =
        Some(routerd::kv::tokenize::TokenizerFiles { path: tok.clone(), chat_template: None });
    // The fleet's template points nowhere; this worker's own entry points at its publisher.
    config.kv_events.endpoint = Some("tcp://{host}:9".into());
    config.kv_events.workers = vec![routerd::kv::KvWorkerEndpoint {
        url: w.url(),
        at: routerd::kv::KvEndpoint {
            endpoint: format!("tcp://127.0.0.1:{port}"),
            replay_endpoint: Some(format!("tcp://127.0.0.1:{replay}")),
            load_endpoint: None,
            dp_size: None,
        },
    }];
    let r = router(config).await;
    wait_subscribed(&r, 1).await;
    let s = kv_status(&r).await;
    assert_eq!(s["workers"][0]["ranks"][0]["endpoint"], format!("tcp://127.0.0.1:{port}"));
    let p = prompt("config");
    route(&r, &p).await;
    eventually(Duration::from_secs(5), "the prompt's blocks indexed", || async {
        blocks(&r, &w.url()).await > 0
    })
    .await;
    let (_, d) = route(&r, &p).await;
    assert_eq!(d["branch"], "hit", "{d}");
    assert!(d["matched_tokens"].as_u64().unwrap() > 0, "{d}");
    r.shutdown().await;
    shutdown_all(vec![w]).await;
}

/// A PD pool's own tokenizer (`[tokenizer.prefill]` / `[tokenizer.decode]`): that pool's
/// decisions are made on the prompt's tokens, the other pool's (no tokenizer) on the tree.
#[tokio::test]
async fn a_pd_pool_routes_on_events_with_its_own_tokenizer() {
    use routerctl::sim::Role;
    use routerd::kv::tokenize::TokenizerFiles;
    let dir = ConfigDir::new("pool-tokenizer");
    let tok = tokenizer(&dir);
    let leg = |role| {
        let tok = tok.clone();
        move |a: &mut SimArgs| {
            kv_args(a, &tok, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 1000);
            a.role = role;
            a.bootstrap_timeout_secs = 10.0;
        }
    };
    let (p, d) = (sim(leg(Role::Prefill)).await, sim(leg(Role::Decode)).await);
    for own in ["prefill", "decode"] {
        let flags = routerd::config::Flags {
            pd_disaggregation: true,
            policy: Some("cache_aware".into()),
            prefill: vec![p.url(), p.bootstrap_addr.unwrap().port().to_string()],
            decode: vec![d.url()],
            ..Default::default()
        };
        let mut config = routerd::config::Config::build(None, &flags).unwrap();
        let files = Some(TokenizerFiles { path: tok.clone(), chat_template: None });
        match own {
            "prefill" => config.pool_tokenizers.prefill = files,
            _ => config.pool_tokenizers.decode = files,
        }
        let r = router(config).await;
        eventually(Duration::from_secs(10), "both pools' events followed", || async {
            let s = kv_status(&r).await;
            s["tokenizers"][own].is_string()
                && s["workers"].as_array().unwrap().len() == 2
                && s["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|w| w["ranks"].as_array().unwrap().iter().all(|r| r["connected"] == true))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, decision, _) = explained(&r, "/generate", &generate(&prompt(own))).await;
        let other = if own == "prefill" { "decode" } else { "prefill" };
        assert!(decision[own]["prompt_tokens"].as_u64().unwrap() > 0, "{decision}");
        assert!(decision[other].get("prompt_tokens").is_none(), "{decision}");
        let s = kv_status(&r).await;
        assert!(s["tokenizers"].get(other).is_none(), "{s}");
        r.shutdown().await;
    }
    p.shutdown().await;
    d.shutdown().await;
}

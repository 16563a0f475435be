//! Mid-stream failover end to end: a worker killed, stalled or failing with an error event
//! mid-stream costs the client nothing: the stream goes on with another worker and the client
//! reads exactly the answer one unbroken worker gives (the simulated model is greedy and a
//! function of the whole sequence), for `/generate` (text and ids, cumulative and incremental
//! events), completions, chat and PD; the limit and the exclusions end streams as before.

use std::time::Duration;

use futures_util::StreamExt;
use routerctl::sim::{Role, SimArgs, SimWorker};
use routerd_e2e::{client, get_json, post_stream, router, sim, sse_events};
use serde_json::{json, Value};

/// A victim worker (faults as `fail` says) and a healthy spare, both slow enough (20 ms a
/// token) that a test can act mid-stream; routed round robin, the victim first.
async fn pair(
    mode: impl Fn(&mut SimArgs),
    fail: impl FnOnce(&mut SimArgs),
) -> (SimWorker, SimWorker) {
    let slow = |a: &mut SimArgs| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
        a.decode_us_per_running = 0.0;
        a.prefill_us_per_token = 0.0;
        mode(a);
    };
    let victim = sim(|a| {
        slow(a);
        fail(a);
    })
    .await;
    let spare = sim(slow).await;
    (victim, spare)
}

fn config(
    urls: Vec<String>,
    tweak: impl FnOnce(&mut routerd::config::Config),
) -> routerd::config::Config {
    let flags = routerd::config::Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(urls),
        ..Default::default()
    };
    let mut c = routerd::config::Config::build(None, &flags).expect("valid config");
    c.retry.initial_backoff = Duration::from_millis(5);
    c.server.stream_idle_timeout = Duration::from_millis(400);
    tweak(&mut c);
    c
}

/// What a client makes of a stream: the text (and ids) of the whole answer, the answer's ids,
/// its counts, and whether every event was well-formed and the stream ended with `[DONE]`.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    text: String,
    ids: Vec<u64>,
    /// Distinct response ids seen (one for one answer).
    response_ids: Vec<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    errors: Vec<String>,
}

fn read(route: &str, body: &str, incremental: bool) -> Answer {
    let mut events = sse_events(body);
    assert_eq!(events.pop().as_deref(), Some("[DONE]"), "ends with [DONE]: {body}");
    let mut a = Answer::default();
    for e in events {
        let v: Value = serde_json::from_str(&e).unwrap_or_else(|_| panic!("JSON event: {e}"));
        if let Some(err) = v.get("error") {
            a.errors.push(err.to_string());
            continue;
        }
        let id = match route {
            "/generate" => v["meta_info"]["id"].as_str(),
            _ => v["id"].as_str(),
        };
        if let Some(id) = id {
            if !a.response_ids.iter().any(|x| x == id) {
                a.response_ids.push(id.to_owned());
            }
        }
        match route {
            "/generate" => {
                let text = v["text"].as_str().unwrap_or("");
                let ids: Vec<u64> = v["output_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_u64().unwrap())
                    .collect();
                if incremental {
                    a.text.push_str(text);
                    a.ids.extend(ids);
                } else {
                    a.text = text.to_owned();
                    a.ids = ids;
                }
                a.prompt_tokens = v["meta_info"]["prompt_tokens"].as_u64();
                a.completion_tokens = v["meta_info"]["completion_tokens"].as_u64();
            }
            _ => {
                if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                    let piece = c["delta"]["content"].as_str().or(c["text"].as_str());
                    a.text.push_str(piece.unwrap_or(""));
                }
                if !v["usage"].is_null() {
                    a.prompt_tokens = v["usage"]["prompt_tokens"].as_u64();
                    a.completion_tokens = v["usage"]["completion_tokens"].as_u64();
                }
            }
        }
    }
    a
}

/// The answer `body` gets from `worker` directly: one unbroken worker.
async fn unbroken(worker: &SimWorker, route: &str, body: &Value, incremental: bool) -> Answer {
    let resp = client().post(format!("{}{route}", worker.url())).json(body).send().await.unwrap();
    read(route, &resp.text().await.unwrap(), incremental)
}

/// Sends `body` through the router; once `after` events arrived, runs `act` (a crash); returns
/// the worker the stream began on and the whole body.
async fn through<F, Fut>(
    router: &str,
    route: &str,
    body: &Value,
    after: usize,
    act: F,
) -> (String, String)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let resp = client().post(format!("{router}{route}")).json(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut act = Some(act);
    let rest = async {
        while let Some(chunk) = stream.next().await {
            text.push_str(std::str::from_utf8(&chunk.expect("well-formed framing")).unwrap());
            if sse_events(&text).len() >= after {
                if let Some(act) = act.take() {
                    act().await;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), rest).await.expect("the stream ends");
    (first, text)
}

/// A router with its metrics served; returns it and the metrics URL.
async fn routed(config: routerd::config::Config) -> (routerd::run::Running, String) {
    let r = router(config).await;
    let url = routerd_e2e::serve_metrics(&r).await;
    (r, url)
}

async fn migrations(metrics: &str) -> String {
    let text = client().get(metrics).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("routerd_migrations_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same(got: &Answer, want: &Answer) {
    assert!(got.errors.is_empty(), "no error event: {:?}", got.errors);
    assert_eq!(got.text, want.text, "the same text, token for token");
    assert_eq!(got.ids, want.ids, "the same output ids");
    assert_eq!(got.response_ids.len(), 1, "one answer id: {:?}", got.response_ids);
    assert_eq!(got.prompt_tokens, want.prompt_tokens, "prompt tokens of the original prompt");
    assert_eq!(
        got.completion_tokens, want.completion_tokens,
        "completion tokens of the whole answer"
    );
}

/// How the victim fails mid-stream.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Killed: every connection dropped at once, after some events reached the client.
    Kill,
    /// Falls silent after 6 tokens (the router's idle timeout is 400 ms here).
    Stall,
    /// Sends an error event after 6 tokens (an engine error mid-stream).
    ErrorEvent,
}

impl Fault {
    fn victim(self, a: &mut SimArgs) {
        match self {
            Fault::Kill => {}
            Fault::Stall => a.faults.stall_after_tokens = Some(6),
            Fault::ErrorEvent => a.faults.error_after_tokens = Some(6),
        }
    }
}

/// The requests every fault is tried with: route, body, and whether the stream's events are
/// incremental (`/generate` with `--incremental-streaming-output`).
fn cases() -> Vec<(&'static str, Value, bool)> {
    let usage = json!({"include_usage": true});
    vec![
        (
            "/generate",
            json!({"text": "The capital of France is", "stream": true,
                              "sampling_params": {"max_new_tokens": 24}}),
            false,
        ),
        (
            "/generate",
            json!({"input_ids": [11, 12, 13, 14, 15], "stream": true,
                              "sampling_params": {"max_new_tokens": 24}}),
            false,
        ),
        (
            "/generate",
            json!({"input_ids": [21, 22, 23], "stream": true,
                              "sampling_params": {"max_new_tokens": 24}}),
            true,
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "Once upon a time", "stream": true,
                                   "max_tokens": 24, "stream_options": usage}),
            false,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "stream": true, "max_tokens": 24,
                                        "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Tell me a story"}],
                                        "stream_options": usage}),
            false,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "stream": true, "max_completion_tokens": 24,
                                        "messages": [{"role": "user", "content": "What is a router?"}]}),
            false,
        ),
    ]
}

/// One case: the stream through the router, its first worker failing as `fault` says, must
/// equal the unbroken answer of a healthy worker.
async fn case(fault: Fault, route: &str, body: &Value, incremental: bool) {
    let mode = move |a: &mut SimArgs| a.incremental_streaming_output = incremental;
    let (victim, spare) = pair(mode, |a| fault.victim(a)).await;
    let (r, m) = routed(config(vec![victim.url(), spare.url()], |_| {})).await;
    let want = unbroken(&spare, route, body, incremental).await;
    // Every simulated token's text is one word after a space.
    let words = want.text.matches(' ').count();
    assert_eq!(words, 24, "{route}: the unbroken answer runs to its limit");
    let victim_url = victim.url();
    let mut victim = Some(victim);
    let kill = match fault {
        Fault::Kill => 8,
        _ => usize::MAX,
    };
    let (first, text) = through(&r.url(), route, body, kill, || async {
        if let Some(v) = victim.take() {
            v.crash().await;
        }
    })
    .await;
    let what = format!("{fault:?} {route} {body}");
    assert_eq!(first, victim_url, "{what}: round robin starts with the victim");
    let got = read(route, &text, incremental);
    assert!(got.errors.is_empty(), "{what}: no error event: {text}");
    assert_same(&got, &want);
    let events = sse_events(&text);
    if route == "/v1/chat/completions" {
        let roles = events.iter().filter(|e| e.contains("\"role\"")).count();
        assert_eq!(roles, 1, "{what}: one opening chunk: {text}");
    }
    if route != "/generate" {
        // Usage only where the client asked: once, at the end.
        let asked = body.get("stream_options").is_some();
        let with_usage = events.iter().filter(|e| e.contains("\"prompt_tokens\"")).count();
        assert_eq!(with_usage, usize::from(asked), "{what}: {text}");
    }
    assert!(migrations(&m).await.contains("outcome=\"continued\"} 1"), "{what}");
    if let Some(v) = victim {
        v.shutdown().await;
    }
    r.shutdown().await;
    spare.shutdown().await;
}

#[tokio::test]
async fn a_killed_worker_costs_no_stream_a_token() {
    for (route, body, incremental) in cases() {
        case(Fault::Kill, route, &body, incremental).await;
    }
}

#[tokio::test]
async fn a_stalled_worker_costs_no_stream_a_token() {
    for (route, body, incremental) in cases() {
        case(Fault::Stall, route, &body, incremental).await;
    }
}

#[tokio::test]
async fn an_error_event_mid_stream_costs_no_stream_a_token() {
    for (route, body, incremental) in cases() {
        case(Fault::ErrorEvent, route, &body, incremental).await;
    }
}

#[tokio::test]
async fn a_pd_stream_whose_decode_worker_fails_continues_on_a_new_pair() {
    for fault in [Fault::Kill, Fault::Stall, Fault::ErrorEvent] {
        let role = |r: Role, fail: bool| {
            move |a: &mut SimArgs| {
                a.role = r;
                a.bootstrap_timeout_secs = 10.0;
                a.speed = 1.0;
                a.decode_ms_per_step = 20.0;
                a.decode_us_per_running = 0.0;
                if fail {
                    fault.victim(a);
                }
            }
        };
        let p = sim(role(Role::Prefill, false)).await;
        let victim = sim(role(Role::Decode, true)).await;
        let spare = sim(role(Role::Decode, false)).await;
        let flags = routerd::config::Flags {
            pd_disaggregation: true,
            policy: Some("round_robin".into()),
            prefill: vec![p.url(), p.bootstrap_addr.unwrap().port().to_string()],
            decode: vec![victim.url(), spare.url()],
            ..Default::default()
        };
        let mut c = routerd::config::Config::build(None, &flags).unwrap();
        c.server.stream_idle_timeout = Duration::from_millis(400);
        let r = router(c).await;
        let body = json!({"text": "Disaggregated serving", "stream": true,
                          "sampling_params": {"max_new_tokens": 25}});
        // The unbroken answer: the same request on a regular worker (the model is the same).
        let regular = sim(|_| {}).await;
        let want = unbroken(&regular, "/generate", &body, false).await;
        let victim_url = victim.url();
        let mut victim = Some(victim);
        let kill = if matches!(fault, Fault::Kill) { 6 } else { usize::MAX };
        let (first, text) = through(&r.url(), "/generate", &body, kill, || async {
            if let Some(v) = victim.take() {
                v.crash().await;
            }
        })
        .await;
        assert_eq!(first, victim_url, "{fault:?}");
        assert_same(&read("/generate", &text, false), &want);
        r.shutdown().await;
    }
}

#[tokio::test]
async fn the_limit_and_the_exclusions_end_streams_with_one_error_event() {
    // Both workers fail: one continuation (the limit), then the error event.
    let (victim, second) = pair(|_| {}, |a| a.faults.error_after_tokens = Some(4)).await;
    sim_faults(&second, json!({"error_after_tokens": 4})).await;
    let (r, m) = routed(config(vec![victim.url(), second.url()], |_| {})).await;
    let body = json!({"text": "hello", "stream": true, "sampling_params": {"max_new_tokens": 20}});
    let (_, text) = through(&r.url(), "/generate", &body, usize::MAX, || async {}).await;
    let got = read("/generate", &text, false);
    assert_eq!(got.errors.len(), 1, "{text}");
    assert_eq!(got.ids.len(), 8, "four tokens from each worker, in one answer: {text}");
    let m = migrations(&m).await;
    assert!(m.contains("outcome=\"continued\"} 1") && m.contains("outcome=\"limit\"} 1"), "{m}");
    r.shutdown().await;

    // Off, and requests that cannot be continued: a stalled stream ends as before, with one
    // error event.
    let (stalling, _) = pair(|_| {}, |a| a.faults.stall_after_tokens = Some(4)).await;
    let (off, m) = routed(config(vec![stalling.url()], |c| c.retry.migration_limit = 0)).await;
    let (_, text) = through(&off.url(), "/generate", &body, usize::MAX, || async {}).await;
    assert_eq!(read("/generate", &text, false).errors.len(), 1);
    assert!(migrations(&m).await.contains("outcome=\"disabled\"} 1"));
    off.shutdown().await;
    let (r, m) = routed(config(vec![stalling.url()], |_| {})).await;
    for body in [
        json!({"text": "hello", "stream": true, "return_logprob": true,
               "sampling_params": {"max_new_tokens": 20}}),
        json!({"text": "hello", "stream": true,
               "sampling_params": {"max_new_tokens": 20, "regex": "[a-z ]+"}}),
        json!({"model": "m", "prompt": "hi", "stream": true, "max_tokens": 20, "n": 2}),
    ] {
        let route = if body.get("prompt").is_some() { "/v1/completions" } else { "/generate" };
        let (_, text) = through(&r.url(), route, &body, usize::MAX, || async {}).await;
        assert_eq!(
            sse_events(&text).iter().filter(|e| e.contains("\"error\"")).count(),
            1,
            "{text}"
        );
    }
    assert!(migrations(&m).await.contains("outcome=\"excluded\"} 3"));
    // A continuable stream with no other worker: no_worker.
    let (_, text) = through(&r.url(), "/generate", &body, usize::MAX, || async {}).await;
    assert_eq!(read("/generate", &text, false).errors.len(), 1);
    assert!(migrations(&m).await.contains("outcome=\"no_worker\"} 1"));
    r.shutdown().await;
}

#[tokio::test]
async fn a_client_gone_is_not_continued() {
    let (victim, spare) = pair(|_| {}, |_| {}).await;
    let (r, m) = routed(config(vec![victim.url(), spare.url()], |_| {})).await;
    let body = json!({"text": "bye", "stream": true, "sampling_params": {"max_new_tokens": 200}});
    let resp = client().post(format!("{}/generate", r.url())).json(&body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    victim.crash().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_json(&format!("{}/sim/stats", spare.url())).await["requests"], 0);
    assert!(migrations(&m).await.is_empty());
    r.shutdown().await;
}

async fn sim_faults(w: &SimWorker, faults: Value) {
    let resp = client().post(format!("{}/sim/faults", w.url())).json(&faults).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_decision_record_and_access_log_show_the_continuation() {
    let (victim, spare) = pair(|_| {}, |a| a.faults.error_after_tokens = Some(3)).await;
    let r = router(config(vec![victim.url(), spare.url()], |_| {})).await;
    let body = json!({"text": "explain", "stream": true, "sampling_params": {"max_new_tokens": 8}});
    // A reader of the decision log makes routerd keep every decision.
    get_json(&format!("{}/admin/decisions", r.url())).await;
    let events = post_stream(format!("{}/generate", r.url()), &body).await;
    assert!(events.iter().all(|e| e.get("error").is_none()));
    let decisions = get_json(&format!("{}/admin/decisions", r.url())).await;
    let list = decisions["decisions"].as_array().expect("decisions");
    let cont = list.iter().find(|d| d["migration"] == 1).expect("a continuation's decision");
    assert_eq!(cont["worker"], spare.url());
    r.shutdown().await;
}

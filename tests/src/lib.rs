//! Helpers for the end-to-end tests: in-process simulated workers on 127.0.0.1:0, an HTTP
//! client, and polling with a deadline instead of sleeps.

pub mod fake_k8s;
pub mod pki;

use std::future::Future;
use std::time::Duration;

use routerctl::sim::{SimArgs, SimWorker};
use serde_json::Value;

/// A simulated worker on an ephemeral port, 20x faster than real time unless `tweak` says
/// otherwise.
///
/// A worker restarted on a fixed port is started again for up to 5 s while the port is taken:
/// the kernel may have handed it to another test's outgoing connection meanwhile.
pub async fn sim(tweak: impl FnOnce(&mut SimArgs)) -> SimWorker {
    let mut args = SimArgs::ephemeral();
    args.speed = 20.0;
    tweak(&mut args);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match SimWorker::start(args.clone()).await {
            Ok(w) => return w,
            Err(e) if args.port != 0 && tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("start sim worker: {e:#}"),
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("http client")
}

pub async fn get_json(url: &str) -> Value {
    client().get(url).send().await.expect("GET").json().await.expect("JSON body")
}

pub async fn post_json(url: impl Into<String>, body: &Value) -> (u16, Value) {
    let resp = client().post(url.into()).json(body).send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

/// POSTs `body` to `base` + `path` asking for the decision record (`x-routerd-explain`): the
/// worker that answered, the decision record and the answer (JSON, or the text of a stream).
pub async fn explained(base: &str, path: &str, body: &Value) -> (String, Value, Value) {
    let resp = client()
        .post(format!("{base}{path}"))
        .header("x-routerd-explain", "1")
        .json(body)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200);
    let worker = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
    let decision: Value =
        serde_json::from_str(resp.headers()["x-routerd-decision"].to_str().unwrap()).unwrap();
    let text = resp.text().await.expect("answer");
    let answer = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (worker, decision, answer)
}

/// `worker` as router `base` lists it on `GET /workers` (the objects `/admin/stats` has too).
pub async fn worker_view(base: &str, worker: &str) -> Option<Value> {
    let v = get_json(&format!("{base}/workers")).await;
    v["workers"].as_array()?.iter().find(|w| w["url"] == worker).cloned()
}

pub async fn stats(worker: &SimWorker) -> Value {
    get_json(&format!("{}/sim/stats", worker.url())).await
}

/// Polls `check` until it returns true or `within` passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

/// POSTs a streaming request and returns its events as JSON, checking that the stream ends with
/// `data: [DONE]` and nothing after it.
pub async fn post_stream(url: impl Into<String>, body: &Value) -> Vec<Value> {
    let resp = client().post(url.into()).json(body).send().await.expect("POST");
    let text = resp.text().await.expect("stream body");
    let mut events = sse_events(&text);
    assert_eq!(events.pop().as_deref(), Some("[DONE]"), "stream must end with [DONE]: {text}");
    events.iter().map(|e| serde_json::from_str(e).expect("event is JSON")).collect()
}

/// A router config with `policy` over `workers`, built through the same path as flags.
pub fn router_config(policy: &str, workers: &[&SimWorker]) -> routerd::config::Config {
    let flags = routerd::config::Flags {
        policy: Some(policy.into()),
        worker_urls: Some(workers.iter().map(|w| w.url()).collect()),
        ..Default::default()
    };
    routerd::config::Config::build(None, &flags).expect("valid test config")
}

/// A router on an ephemeral loopback port.
pub async fn router(config: routerd::config::Config) -> routerd::run::Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    routerd::run::start(listener, config).expect("start router")
}

/// Serves `r`'s Prometheus metrics on an ephemeral loopback port; returns their URL.
pub async fn serve_metrics(r: &routerd::run::Running) -> String {
    let ml = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
    let url = format!("http://{}/metrics", ml.local_addr().expect("bound"));
    r.serve_metrics(ml);
    url
}

/// `n` simulated workers with the same tweak.
pub async fn fleet(n: usize, tweak: impl Fn(&mut SimArgs)) -> Vec<SimWorker> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(sim(&tweak).await);
    }
    out
}

pub async fn shutdown_all(workers: Vec<SimWorker>) {
    for w in workers {
        w.shutdown().await;
    }
}

/// Starts a streaming request and returns once its response headers arrived.
pub async fn open_stream(url: impl Into<String>, body: &Value) -> reqwest::Response {
    client().post(url.into()).json(body).send().await.expect("POST stream")
}

/// Two clients give up on `url` (a `/generate` endpoint served by `worker`, directly or through
/// a router): one drops a stream after its first event, one times out a plain request. Waits
/// until the worker has aborted both and nothing runs on it.
pub async fn disconnect_twice(url: &str, worker: &SimWorker) {
    use futures_util::StreamExt;
    let before = stats(worker).await["aborted"].as_u64().unwrap();
    let long = |stream: bool| serde_json::json!({"text": "long", "stream": stream, "sampling_params": {"max_new_tokens": 1000}});
    let mut body = open_stream(url, &long(true)).await.bytes_stream();
    body.next().await.expect("a first event").expect("readable");
    drop(body);
    eventually(Duration::from_secs(5), "stream aborted", || async {
        stats(worker).await["aborted"].as_u64().unwrap() == before + 1
    })
    .await;
    let err = client()
        .post(url)
        .timeout(Duration::from_millis(150))
        .json(&long(false))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    eventually(Duration::from_secs(5), "plain request aborted", || async {
        let s = stats(worker).await;
        s["aborted"].as_u64().unwrap() == before + 2 && s["running"] == 0
    })
    .await;
}

/// A configuration file in its own temporary directory, removed on drop.
pub struct ConfigDir {
    pub dir: std::path::PathBuf,
    pub file: std::path::PathBuf,
}

impl ConfigDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("routerd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("routerd.toml");
        Self { dir, file }
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.file, text).expect("write config");
    }

    /// Starts routerd on `file` (set into `flags.config`), on an ephemeral port.
    pub async fn start(
        &self,
        file: &std::path::Path,
        mut flags: routerd::config::Flags,
    ) -> routerd::run::Running {
        flags.config = Some(file.to_owned());
        let config = routerd::config::Config::load(&flags).expect("valid initial config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        routerd::run::start_with_flags(listener, config, flags).expect("start router")
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config file with `policy` over `urls`.
pub fn workers_toml(policy: &str, urls: &[String]) -> String {
    let mut s = format!("[policy]\nname = \"{policy}\"\n");
    for u in urls {
        s.push_str(&format!("[[workers]]\nurl = \"{u}\"\n"));
    }
    s
}

/// A minimal `/generate` body: one output token.
pub fn small_generate() -> Value {
    serde_json::json!({"text": "x", "sampling_params": {"max_new_tokens": 1}})
}

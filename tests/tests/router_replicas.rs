//! Several routerd replicas over one fleet route like one: each subscribes to every worker's
//! KV events (what one replica routed, the others see in the caches) and load reports (what
//! one replica sent, the others count). A replica that starts late, or restarts, reads the
//! engines' replay buffers and routes like the others at once; a replica killed under load
//! costs a retrying client only the requests it held.

use std::time::Duration;

use routerctl::sim::{SimArgs, SimWorker};
use routerd_e2e::{
    client, eventually, fleet, get_json, router, router_config, shutdown_all, worker_view,
};
use serde_json::{json, Value};

fn publishing(a: &mut SimArgs) {
    a.page_size = 4;
    a.kv_events_config = Some(
        r#"{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0"}"#
            .into(),
    );
    a.load_publish_endpoint = Some("auto".into());
}

async fn replica(policy: &str, ws: &[SimWorker]) -> routerd::run::Running {
    let refs: Vec<&SimWorker> = ws.iter().collect();
    let mut config = router_config(policy, &refs);
    config.health.interval = Duration::from_millis(100);
    config.health.failure_threshold = 1;
    config.health.success_threshold = 1;
    router(config).await
}

/// Waits until `r` has every worker's events (when `events`) and a load report from each.
async fn subscribed(r: &routerd::run::Running, n: usize, events: bool) {
    let url = r.url();
    eventually(Duration::from_secs(10), "events and load reports from every worker", || async {
        let stats = get_json(&format!("{url}/admin/stats")).await;
        let reported = stats["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["load_report"]["source"] == "published")
            .count();
        let kv = get_json(&format!("{url}/admin/kv")).await;
        let flowing = kv["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["ranks"].as_array().unwrap().iter().all(|r| r["connected"] == true))
            .count();
        reported == n && (!events || flowing == n)
    })
    .await;
    // A SUB socket's subscription reaches the publisher just after the connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Sends `body` to `r`'s /generate: the worker chosen and the decision record.
async fn explained(r: &routerd::run::Running, body: Value) -> (String, Value) {
    let (worker, d, _) = routerd_e2e::explained(&r.url(), "/generate", &body).await;
    (worker, d)
}

/// Routes ids through `r`.
async fn route(r: &routerd::run::Running, ids: &[u32]) -> (String, Value) {
    explained(r, json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})).await
}

/// Routes text through `r`.
async fn route_text(r: &routerd::run::Running, text: &str) -> (String, Value) {
    explained(r, json!({"text": text, "sampling_params": {"max_new_tokens": 1}})).await
}

/// A prompt of 64 token ids of its own.
fn prompt(n: u32) -> Vec<u32> {
    (0..64).map(|i| 1000 * (n + 1) + i).collect()
}

/// Blocks `r`'s index holds for worker `url`.
async fn blocks(r: &routerd::run::Running, url: &str) -> u64 {
    let kv = get_json(&format!("{}/admin/kv", r.url())).await;
    kv["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["url"] == url)
        .map_or(0, |w| w["blocks"].as_u64().unwrap())
}

#[tokio::test]
async fn what_one_replica_routed_the_others_route_the_same_way() {
    let ws = fleet(3, |a| {
        a.zero_compute = true;
        publishing(a);
    })
    .await;
    let a = replica("cache_aware", &ws).await;
    subscribed(&a, 3, true).await;
    let mut homes = Vec::new();
    for n in 0..6 {
        homes.push(route(&a, &prompt(n)).await.0);
    }
    // A replica that starts now (or restarts) reads the engines' replay buffers: it routes
    // every prompt where the first replica sent it, as a hit, from its first request.
    let b = replica("cache_aware", &ws).await;
    subscribed(&b, 3, true).await;
    for (n, home) in homes.iter().enumerate() {
        let (to, d) = route(&b, &prompt(n as u32)).await;
        assert_eq!((&to, &d["branch"]), (home, &json!("hit")), "prompt {n}: {d}");
        assert_eq!(d["matched_tokens"], 64, "{d}");
    }
    // A worker restarts with an empty cache: neither replica sends its prompts there as hits,
    // and where one replica sends one of them next, the other follows.
    let gone = homes[0].clone();
    let i = ws.iter().position(|w| w.url() == gone).unwrap();
    let mut ws = ws;
    let port = ws[i].addr.port();
    ws.remove(i).shutdown().await;
    for r in [&a, &b] {
        eventually(Duration::from_secs(5), "the replica saw it down", || async {
            worker_view(&r.url(), &gone).await.is_some_and(|w| w["is_healthy"] == false)
        })
        .await;
    }
    ws.insert(
        i,
        routerd_e2e::sim(|x| {
            x.zero_compute = true;
            publishing(x);
            x.port = port;
        })
        .await,
    );
    for r in [&a, &b] {
        eventually(Duration::from_secs(10), "the restarted worker's new publisher", || async {
            let kv = get_json(&format!("{}/admin/kv", r.url())).await;
            let w = kv["workers"].as_array().unwrap().iter().find(|w| w["url"] == gone).cloned();
            w.is_some_and(|w| w["ranks"][0]["connected"] == true && w["blocks"] == 0)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (first, d) = route(&a, &prompt(0)).await;
    assert_ne!(d["branch"], "hit", "nobody holds it now: {d}");
    eventually(Duration::from_secs(5), "the other replica sees where it went", || async {
        blocks(&b, &first).await >= 16
    })
    .await;
    let (then, d) = route(&b, &prompt(0)).await;
    assert_eq!((&then, &d["branch"]), (&first, &json!("hit")), "{d}");
    a.shutdown().await;
    b.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn replicas_balance_on_what_the_workers_report() {
    // Slow decoding: a stream stays in flight for seconds.
    let ws = fleet(2, |a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
        publishing(a);
    })
    .await;
    let a = replica("power_of_two", &ws).await;
    subscribed(&a, 2, false).await;
    // Another router (or a client that bypasses routerd) keeps six streams on the first worker.
    let long =
        json!({"text": "elsewhere", "stream": true, "sampling_params": {"max_new_tokens": 2000}});
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(routerd_e2e::open_stream(format!("{}/generate", ws[0].url()), &long).await);
    }
    eventually(Duration::from_secs(5), "the first worker's report reached the replica", || async {
        let w = worker_view(&a.url(), &ws[0].url()).await;
        w.is_some_and(|w| w["load"].as_u64().unwrap() >= 6)
    })
    .await;
    // Four streams through the replica: all go to the second worker, though the replica
    // itself has sent nothing to the first (on its own count alone, they would alternate).
    let mine = json!({"text": "mine", "stream": true, "sampling_params": {"max_new_tokens": 2000}});
    for k in 0..4 {
        let resp = routerd_e2e::open_stream(format!("{}/generate", a.url()), &mine).await;
        let to = resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned();
        assert_eq!(to, ws[1].url(), "stream {k} went to the busy worker");
        held.push(resp);
    }
    drop(held);
    a.shutdown().await;
    shutdown_all(ws).await;
}

/// A replica on a runtime of its own thread, so that dropping the runtime kills it as a crash
/// would: its listener and every connection close at once, nothing drains.
struct Killable {
    url: String,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Killable {
    fn start(config: routerd::config::Config) -> Self {
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (kill, kill_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let running = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                routerd::run::start(listener, config).unwrap()
            });
            url_tx.send(running.url()).unwrap();
            let _ = kill_rx.recv();
            // No graceful shutdown: every task is dropped with the runtime.
            std::mem::forget(running);
            rt.shutdown_background();
        });
        Self { url: url_rx.recv().unwrap(), kill: Some(kill), thread: Some(thread) }
    }

    fn kill(&mut self) {
        drop(self.kill.take());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_costs_a_retrying_client_only_what_it_held() {
    let ws = fleet(2, |a| {
        a.speed = 4.0;
        publishing(a);
    })
    .await;
    let refs: Vec<&SimWorker> = ws.iter().collect();
    let mut doomed = Killable::start(router_config("cache_aware", &refs));
    let b = replica("cache_aware", &ws).await;
    let targets = [doomed.url.clone(), b.url()];
    // Eight clients, each sending to the replicas in turn, as a Service spreads connections;
    // a request that cannot reach a replica (refused: it is gone) goes to the next one.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..8usize {
        let targets = targets.clone();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let http = client();
            let (mut ok, mut lost, mut moved) = (0u32, 0u32, 0u32);
            for k in 0..60usize {
                let body = json!({"text": format!("client {c} turn {k} ") + &"x".repeat(200),
                    "sampling_params": {"max_new_tokens": 8}});
                let mut sent = false;
                for t in 0..targets.len() {
                    let url = &targets[(c + k + t) % targets.len()];
                    match http.post(format!("{url}/generate")).json(&body).send().await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(_) => {
                                ok += 1;
                                sent = true;
                                break;
                            }
                            // The answer was cut: the replica died holding it.
                            Err(_) => {
                                lost += 1;
                                sent = true;
                                break;
                            }
                        },
                        Ok(r) => panic!("status {} from {url}", r.status()),
                        // Not accepted at all (refused, reset before a response): next replica.
                        Err(e) if e.is_connect() || e.is_request() => {
                            moved += 1;
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                assert!(sent, "no replica took client {c}'s request {k}");
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (ok, lost, moved)
        }));
    }
    // Kill the first replica while the clients are busy: after a quarter of the requests.
    while done.load(std::sync::atomic::Ordering::Relaxed) < 120 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| doomed.kill());
    let mut totals = (0, 0, 0);
    for c in clients {
        let (ok, lost, moved) = c.await.unwrap();
        totals = (totals.0 + ok, totals.1 + lost, totals.2 + moved);
    }
    let (ok, lost, moved) = totals;
    eprintln!("answered {ok}, cut {lost}, resent to the other replica {moved}");
    // At most one request per client was in flight on the killed replica.
    assert!(lost <= 8, "lost {lost}");
    assert_eq!(ok + lost, 8 * 60, "every request answered or counted lost");
    assert!(moved > 0, "the clients went on to the other replica");
    assert!(ok >= 8 * 60 - 8);
    b.shutdown().await;
    shutdown_all(ws).await;
}

/// Two replicas that list each other as peers, over workers that publish no KV events.
async fn peered(ws: &[SimWorker], share: bool) -> (routerd::run::Running, routerd::run::Running) {
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let urls = [la.local_addr().unwrap(), lb.local_addr().unwrap()].map(|a| format!("http://{a}"));
    let refs: Vec<&SimWorker> = ws.iter().collect();
    let start = |l| {
        let mut config = router_config("cache_aware", &refs);
        if share {
            // The same list for both (a replica ignores its own batches).
            config.peers.urls = urls.to_vec();
        }
        routerd::run::start(l, config).unwrap()
    };
    (start(la), start(lb))
}

#[tokio::test]
async fn without_events_peers_tell_each_other_what_they_routed() {
    let ws = fleet(4, |a| a.zero_compute = true).await;
    let (a, b) = peered(&ws, true).await;
    // 16 prompts: two replicas that know nothing of each other place the first four of every
    // four alike with a chance of 1 in 24 (4 empty workers, then 3, 2, 1), all 16 with 1 in
    // 24^4.
    let texts: Vec<String> = (0..16)
        .map(|n| format!("conversation {n:02}: ") + &"a long system prompt. ".repeat(20))
        .collect();
    let mut homes = Vec::new();
    for t in &texts {
        homes.push(route_text(&a, t).await.0);
    }
    eventually(Duration::from_secs(5), "the peer heard of every decision", || async {
        get_json(&format!("{}/admin/peers", b.url())).await["received"].as_u64().unwrap() >= 16
    })
    .await;
    for (t, home) in texts.iter().zip(&homes) {
        let (to, d) = route_text(&b, t).await;
        assert_eq!((&to, &d["branch"]), (home, &json!("hit")), "{d}");
    }
    let status = get_json(&format!("{}/admin/peers", a.url())).await;
    assert!(status["peers"].as_object().unwrap().values().all(|p| p["failed"] == 0), "{status}");
    a.shutdown().await;
    b.shutdown().await;
    // Without peers, the second replica knows nothing of the first's decisions: most of the
    // same prompts land elsewhere.
    let (a, b) = peered(&ws, false).await;
    let mut same = 0;
    for t in &texts {
        let home = route_text(&a, t).await.0;
        let (to, d) = route_text(&b, t).await;
        assert_ne!(d["branch"], "hit", "{d}");
        same += usize::from(to == home);
    }
    assert!(same < texts.len(), "every prompt on the same worker by chance");
    a.shutdown().await;
    b.shutdown().await;
    shutdown_all(ws).await;
}

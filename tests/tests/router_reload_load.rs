//! 100 reloads under steady load (streaming and plain requests), alternating worker sets and
//! policies, one in ten an invalid file: no request fails and no stream is cut short.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routerd::config::Flags;
use routerd_e2e::{
    client, fleet, get_json, post_json, shutdown_all, sse_events, workers_toml, ConfigDir,
};
use serde_json::json;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    truncated: AtomicU64,
    latencies: Mutex<Vec<(bool, f64)>>,
}

/// One client: alternates a 6-token stream on /generate and a plain chat request until `stop`.
async fn client_loop(
    url: String,
    stop: Arc<AtomicBool>,
    reloading: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let c = client();
    let mut i = 0u64;
    while !stop.load(Relaxed) {
        i += 1;
        let t = Instant::now();
        let good = if i.is_multiple_of(2) {
            let body = json!({"text": format!("client prompt {}", i % 5), "stream": true,
                              "sampling_params": {"max_new_tokens": 6}});
            match c.post(format!("{url}/generate")).json(&body).send().await {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(text) => {
                        let events = sse_events(&text);
                        let complete = events.len() == 7 && events[6] == "[DONE]";
                        if !complete {
                            tally.truncated.fetch_add(1, Relaxed);
                        }
                        complete
                    }
                    Err(_) => false,
                },
                _ => false,
            }
        } else {
            let body = json!({"messages": [{"role": "user", "content": format!("question {}", i % 7)}], "max_tokens": 3});
            matches!(c.post(format!("{url}/v1/chat/completions")).json(&body).send().await, Ok(r) if r.status() == 200)
        };
        let counter = if good { &tally.ok } else { &tally.failed };
        counter.fetch_add(1, Relaxed);
        tally
            .latencies
            .lock()
            .unwrap()
            .push((reloading.load(Relaxed), t.elapsed().as_secs_f64() * 1000.0));
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p / 100.0).round() as usize).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_nothing() {
    let ws = fleet(3, |a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 1.0;
        a.prefill_us_per_token = 5.0;
    })
    .await;
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let d = ConfigDir::new("reload-load");
    d.write(&workers_toml("round_robin", &urls[..2]));
    let r = d.start(&d.file, Flags { no_watch_config: true, ..Default::default() }).await;
    let u = r.url();

    let stop = Arc::new(AtomicBool::new(false));
    let reloading = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(client_loop(u.clone(), stop.clone(), reloading.clone(), tally.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await; // baseline

    reloading.store(true, Relaxed);
    let policies = ["round_robin", "cache_aware", "power_of_two", "random"];
    let (mut applied, mut rejected) = (0, 0);
    for i in 0..100usize {
        if i % 10 == 9 {
            d.write("[policy]\nname = \"not-a-policy\"\n[[workers]]\nurl = \"nope\"\n");
        } else {
            let set = if i.is_multiple_of(2) { &urls[1..3] } else { &urls[0..2] };
            d.write(&workers_toml(policies[i % 4], set));
        }
        let (status, out) = post_json(format!("{u}/admin/reload"), &json!({})).await;
        match out["result"].as_str() {
            Some("applied") => applied += 1,
            Some("rejected") => rejected += 1,
            other => panic!("unexpected reload outcome {other:?}: {out}"),
        }
        assert_eq!(status == 200, out["result"] == "applied");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    reloading.store(false, Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let (ok, failed, truncated) =
        (tally.ok.load(Relaxed), tally.failed.load(Relaxed), tally.truncated.load(Relaxed));
    let lat = tally.latencies.lock().unwrap().clone();
    let base: Vec<f64> = lat.iter().filter(|(r, _)| !r).map(|(_, l)| *l).collect();
    let during: Vec<f64> = lat.iter().filter(|(r, _)| *r).map(|(_, l)| *l).collect();
    eprintln!(
        "reload under load: {applied} applied, {rejected} rejected; {ok} requests ok, {failed} failed, {truncated} truncated; \
         latency p50/p99 {:.1}/{:.1} ms without reloads ({} requests), {:.1}/{:.1} ms during reloads ({} requests)",
        pct(base.clone(), 50.0),
        pct(base.clone(), 99.0),
        base.len(),
        pct(during.clone(), 50.0),
        pct(during.clone(), 99.0),
        during.len()
    );
    assert_eq!((applied, rejected), (90, 10));
    assert_eq!((failed, truncated), (0, 0));
    assert!(ok > 200, "steady load: {ok} requests");
    let cfg = get_json(&format!("{u}/admin/config")).await;
    assert_eq!(cfg["generation"], 91);
    r.shutdown().await;
    shutdown_all(ws).await;
}

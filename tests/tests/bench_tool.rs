//! `routerctl bench` against a real router and simulated workers, and in perfect-affinity mode.

use clap::Parser;
use routerctl::bench::{execute, BenchArgs, CacheTally};
use routerd_e2e::{client, fleet, post_json, router, router_config, shutdown_all, sim};
use serde_json::json;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(extra: &[&str]) -> BenchArgs {
    let base = [
        "bench",
        "--system-chars",
        "400",
        "--question-chars",
        "20",
        "--max-tokens",
        "2",
        "--concurrency",
        "4",
    ];
    Wrap::parse_from(base.iter().chain(extra)).args
}

#[tokio::test]
async fn shared_prefix_through_the_router_and_direct() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let r = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let rep = execute(&args(&[
        "--url",
        &r.url(),
        "--groups",
        "4",
        "--questions",
        "5",
        "--check-answers",
    ]))
    .await
    .unwrap();
    assert_eq!((rep.requests, rep.ok, rep.failed), (20, 20, 0), "{:?}", rep.first_errors);
    assert_eq!(rep.wrong_answers, Some(0), "every answer is the model's own");
    assert_eq!(rep.per_worker.values().sum::<usize>(), 20);
    assert!(
        rep.per_worker.keys().all(|w| *w == ws[0].url() || *w == ws[1].url()),
        "{:?}",
        rep.per_worker
    );
    let hit = rep.cache_hit_rate.expect("sim workers report cache stats");
    assert!(hit > 0.5, "cache_aware hit rate {hit}");
    assert!(rep.ttft_p50_ms > 0.0 && rep.latency_p99_ms >= rep.latency_p50_ms);

    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let mut direct =
        vec!["--affinity", "--groups", "4", "--questions", "5", "--seed", "9", "--workers"];
    direct.extend(urls.iter().map(String::as_str));
    let rep = execute(&args(&direct)).await.unwrap();
    assert_eq!(rep.ok, 20);
    assert_eq!(rep.per_worker.len(), 2, "groups spread over both workers: {:?}", rep.per_worker);
    assert!(rep.target.contains("perfect affinity"));
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn multi_turn_at_a_fixed_rate() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let r = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let rep = execute(&args(&[
        "--url",
        &r.url(),
        "--workload",
        "multi-turn",
        "--conversations",
        "3",
        "--turns",
        "4",
        "--rate",
        "200",
        "--check-answers",
    ]))
    .await
    .unwrap();
    assert_eq!((rep.ok, rep.failed), (12, 0), "{:?}", rep.first_errors);
    assert_eq!(rep.wrong_answers, Some(0), "every turn's answer is the model's own");
    assert!(rep.cache_hit_rate.unwrap() > 0.5, "later turns hit: {:?}", rep.cache_hit_rate);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn answers_that_are_not_the_models_own_are_counted() {
    // The bench reads /generate streams as SGLang sends them by default (the whole text so
    // far in each event); from incremental events it keeps only the last piece, so every
    // answer of more than one token differs from the model's.
    let ws = fleet(1, |a| {
        a.zero_compute = true;
        a.incremental_streaming_output = true;
    })
    .await;
    let r = router(router_config("round_robin", &[&ws[0]])).await;
    let rep = execute(&args(&[
        "--url",
        &r.url(),
        "--groups",
        "2",
        "--questions",
        "3",
        "--check-answers",
    ]))
    .await
    .unwrap();
    assert_eq!((rep.ok, rep.wrong_answers), (6, Some(6)), "{:?}", rep.first_errors);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn unreachable_router_is_a_clear_error() {
    let err = execute(&args(&["--url", "http://127.0.0.1:9"])).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot reach the router at http://127.0.0.1:9"),
        "{err:#}"
    );
}

#[tokio::test]
async fn zipf_through_the_router_with_a_command_part_way() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let r = router(router_config("cost_aware", &[&ws[0], &ws[1]])).await;
    let mark = std::env::temp_dir().join(format!("routerd-bench-exec-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let cmd = format!("echo ran > {}", mark.display());
    let rep = execute(&args(&[
        "--url",
        &r.url(),
        "--workload",
        "zipf",
        "--groups",
        "6",
        "--questions",
        "5",
        "--at-fraction",
        "0.5",
        "--exec",
        &cmd,
    ]))
    .await
    .unwrap();
    assert_eq!((rep.ok, rep.failed), (30, 0), "{:?}", rep.first_errors);
    assert!(rep.workload.starts_with("zipf"), "{}", rep.workload);
    let event = rep.event.expect("the command ran");
    assert!(event.starts_with("after 15 answers ran") && event.contains("exited 0"), "{event}");
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), "ran\n");
    std::fs::remove_file(&mark).unwrap();
    // Hot groups repeat: most prompt tokens hit.
    assert!(rep.cache_hit_rate.unwrap() > 0.5, "{:?}", rep.cache_hit_rate);
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn a_warmup_is_sent_first_and_left_out_of_the_figures() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let r = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let zipf = ["--url", &r.url(), "--workload", "zipf", "--groups", "4", "--questions", "5"];
    let warm = [&zipf[..], &["--warmup", "8"]].concat();
    let rep = execute(&args(&warm)).await.unwrap();
    assert_eq!((rep.requests, rep.ok, rep.failed), (12, 12, 0), "{:?}", rep.first_errors);
    assert!(rep.workload.ends_with("the first 8 unmeasured"), "{}", rep.workload);
    // The fleet served all 20, the report counts the last 12.
    let served: u64 = {
        let mut n = 0;
        for w in &ws {
            let v = client().get(format!("{}/sim/stats", w.url())).send().await.unwrap();
            n += v.json::<serde_json::Value>().await.unwrap()["prompt_tokens"].as_u64().unwrap();
        }
        n
    };
    let measured = rep.prompt_tokens.expect("sim workers report cache stats");
    assert!(served > measured + measured / 2, "served {served} prompt tokens, measured {measured}");
    let err = execute(&args(&[&zipf[..], &["--warmup", "20"]].concat())).await.unwrap_err();
    assert!(format!("{err:#}").contains("--warmup 20 leaves no request to measure"), "{err:#}");
    let turns = ["--url", &r.url(), "--workload", "multi-turn", "--warmup", "2"];
    let err = execute(&args(&turns)).await.unwrap_err();
    assert!(format!("{err:#}").contains("shared-prefix and zipf"), "{err:#}");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[test]
fn exec_needs_a_fraction_and_a_fraction_is_between_0_and_1() {
    let e = Wrap::try_parse_from(["bench", "--exec", "true"]).err().unwrap().to_string();
    assert!(e.contains("--at-fraction"), "{e}");
    let e = Wrap::try_parse_from(["bench", "--at-fraction", "1.5", "--exec", "true"])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a fraction between 0 and 1"), "{e}");
}

/// A worker that restarts mid-run (its counters back at zero, under a new `instance`) counts
/// from zero again; one that was not there at the start counts whole.
#[tokio::test]
async fn the_cache_tally_follows_restarted_and_joining_workers() {
    let a = sim(|s| s.zero_compute = true).await;
    let port = a.addr.port();
    let url = a.url();
    let prompt = json!({"text": "a prompt long enough to be cached by the engine", "sampling_params": {"max_new_tokens": 1}});
    let http = client();
    // Traffic before the run: not counted.
    assert_eq!(post_json(format!("{url}/generate"), &prompt).await.0, 200);
    let mut tally = CacheTally::default();
    tally.sample(&http, std::slice::from_ref(&url), true).await;
    assert_eq!(tally.totals(), Some((0, 0)));
    for _ in 0..3 {
        assert_eq!(post_json(format!("{url}/generate"), &prompt).await.0, 200);
    }
    tally.sample(&http, std::slice::from_ref(&url), false).await;
    let (cached, prompt_tokens) = tally.totals().unwrap();
    assert!(prompt_tokens > 0 && cached > 0, "{cached} of {prompt_tokens}");
    // Restarted empty on the same port: its one request counts whole, nothing is lost or
    // taken away.
    a.crash().await;
    let b = sim(|s| {
        s.port = port;
        s.zero_compute = true;
    })
    .await;
    assert_eq!(post_json(format!("{url}/generate"), &prompt).await.0, 200);
    tally.sample(&http, std::slice::from_ref(&url), false).await;
    let (cached2, prompt2) = tally.totals().unwrap();
    assert_eq!(cached2, cached, "a fresh cache has nothing cached");
    assert_eq!(prompt2, prompt_tokens + prompt_tokens / 3, "the restarted worker's one request");
    // A worker that joins mid-run counts from its start.
    let c = sim(|s| s.zero_compute = true).await;
    assert_eq!(post_json(format!("{}/generate", c.url()), &prompt).await.0, 200);
    tally.sample(&http, &[url.clone(), c.url()], false).await;
    assert_eq!(tally.totals().unwrap().1, prompt2 + prompt_tokens / 3);
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn targets_spread_clients_over_replicas_and_skip_one_that_is_gone() {
    let ws = fleet(2, |a| a.zero_compute = true).await;
    let r1 = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let r2 = router(router_config("cache_aware", &[&ws[0], &ws[1]])).await;
    let served = |r: &routerd::run::Running| {
        let url = format!("{}/admin/stats", r.url());
        async move { routerd_e2e::get_json(&url).await["requests_total"].as_u64().unwrap() }
    };
    let targets = format!("{},{}", r1.url(), r2.url());
    let rep = execute(&args(&["--targets", &targets, "--groups", "4", "--questions", "6"]))
        .await
        .unwrap();
    assert_eq!((rep.ok, rep.failed), (24, 0), "{:?}", rep.first_errors);
    let (a, b) = (served(&r1).await, served(&r2).await);
    assert_eq!(a + b, 24);
    assert!(a >= 6 && b >= 6, "four clients, two on each replica: {a} and {b}");
    // A replica that is gone (nothing listens there): its clients' requests go to the other.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let targets = format!("{},{gone}", r2.url());
    let rep = execute(&args(&["--targets", &targets, "--groups", "4", "--questions", "6"]))
        .await
        .unwrap();
    assert_eq!((rep.ok, rep.failed), (24, 0), "{:?}", rep.first_errors);
    assert_eq!(served(&r2).await, b + 24);
    r1.shutdown().await;
    r2.shutdown().await;
    shutdown_all(ws).await;
}

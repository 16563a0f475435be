//! Kubernetes service discovery against a fake API server on loopback (tests/src/fake_k8s.rs):
//! pods coming, going, turning NotReady or changing labels; 410 Gone, dropped watches and
//! API server downtime; PD pools; reload; each case asserts the router's worker set.

use std::collections::BTreeSet;
use std::time::Duration;

use routerd_e2e::fake_k8s::{pod, FakeK8s};
use routerd_e2e::*;
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(20);

/// Worker URLs by source, from `GET /workers`.
async fn workers_of(router: &str, source: &str) -> BTreeSet<String> {
    let v = get_json(&format!("{router}/workers")).await;
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["source"] == source)
        .map(|w| w["url"].as_str().unwrap().to_owned())
        .collect()
}

async fn expect_discovered(router: &str, urls: &[String], what: &str) {
    let want: BTreeSet<String> = urls.iter().cloned().collect();
    eventually(WITHIN, what, || {
        let want = want.clone();
        async move { workers_of(router, "discovery").await == want }
    })
    .await;
}

async fn discovery(router: &str) -> Value {
    get_json(&format!("{router}/admin/discovery")).await["discovery"].clone()
}

/// Counts of `worker_added` / `worker_removed` events that name discovery.
async fn churn(router: &str) -> (usize, usize) {
    let v = get_json(&format!("{router}/admin/stats")).await;
    let events = v["events"].as_array().cloned().unwrap_or_default();
    let count = |kind: &str| {
        events
            .iter()
            .filter(|e| {
                e["kind"] == kind && e["message"].as_str().unwrap_or("").contains("(discovery)")
            })
            .count()
    };
    (count("worker_added"), count("worker_removed"))
}

fn toml(kubeconfig: &std::path::Path, port: u16, extra: &str) -> String {
    format!(
        "[policy]\nname = \"round_robin\"\n{extra}\n[discovery]\nkubeconfig = {:?}\nnamespace = \"llm\"\n\
         port = {port}\nselector = {{ app = \"sglang\" }}\n",
        kubeconfig.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_follow_pods_that_come_go_turn_not_ready_or_stop_matching() {
    let k8s = FakeK8s::start().await;
    // Two real workers on one port at two loopback addresses, as two pods would be.
    let a = sim(|s| s.host = "127.0.0.2".into()).await;
    let port: u16 = a.url().rsplit(':').next().unwrap().parse().unwrap();
    let b = sim(|s| {
        s.host = "127.0.0.3".into();
        s.port = port;
    })
    .await;
    let fixed = sim(|_| {}).await;
    let url = |ip: &str| format!("http://{ip}:{port}");
    k8s.apply(pod("llm", "a", &[("app", "sglang")], "127.0.0.2", true));
    k8s.apply(pod("llm", "b", &[("app", "sglang")], "127.0.0.3", true));
    k8s.apply(pod("llm", "c", &[("app", "sglang")], "127.0.0.4", false));
    k8s.apply(pod("llm", "other", &[("app", "vllm")], "127.0.0.5", true));
    k8s.apply(pod("staging", "d", &[("app", "sglang")], "127.0.0.6", true));
    let dir = ConfigDir::new("discovery");
    k8s.kubeconfig(&dir.dir.join("kubeconfig"));
    let static_worker = format!("[[workers]]\nurl = \"{}\"\n", fixed.url());
    dir.write(&toml(&dir.dir.join("kubeconfig"), port, &static_worker));
    let r = dir.start(&dir.file, Default::default()).await;
    let router = r.url();

    expect_discovered(&router, &[url("127.0.0.2"), url("127.0.0.3")], "the ready pods").await;
    assert_eq!(workers_of(&router, "config").await, BTreeSet::from([fixed.url()]));
    for _ in 0..6 {
        let (status, _) = post_json(format!("{router}/generate"), &small_generate()).await;
        assert_eq!(status, 200);
    }
    let d = discovery(&router).await;
    assert_eq!((d["state"].as_str(), d["workers"].as_u64()), (Some("watching"), Some(2)), "{d}");
    assert_eq!((d["pods"].as_u64(), d["ready_pods"].as_u64()), (Some(3), Some(2)), "{d}");
    assert_eq!(d["selectors"]["regular"], "app=sglang");

    k8s.edit("llm", "b", |p| p["status"]["conditions"][1]["status"] = json!("False"));
    expect_discovered(&router, &[url("127.0.0.2")], "b turned NotReady").await;
    k8s.edit("llm", "c", |p| p["status"]["conditions"][1]["status"] = json!("True"));
    expect_discovered(&router, &[url("127.0.0.2"), url("127.0.0.4")], "c turned Ready").await;
    k8s.edit("llm", "a", |p| p["metadata"]["labels"]["app"] = json!("retired"));
    expect_discovered(&router, &[url("127.0.0.4")], "a stopped matching").await;
    k8s.delete("llm", "c");
    k8s.apply(pod("llm", "e", &[("app", "sglang")], "127.0.0.3", true));
    expect_discovered(&router, &[url("127.0.0.3")], "c deleted, e added").await;
    let (status, _) = post_json(format!("{router}/generate"), &small_generate()).await;
    assert_eq!(status, 200);
    let metrics = r.app.metrics.render(&r.app);
    assert!(metrics.contains("sgl_router_discovery_up 1"), "{metrics}");
    assert!(metrics.contains("sgl_router_discovery_workers 1"), "{metrics}");

    // Discovery turned off on reload: its workers go, the static one stays.
    dir.write(&format!("[policy]\nname = \"round_robin\"\n{static_worker}"));
    let (status, body) = post_json(format!("{router}/admin/reload"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    expect_discovered(&router, &[], "discovery off").await;
    assert_eq!(workers_of(&router, "config").await, BTreeSet::from([fixed.url()]));
    assert_eq!(discovery(&router).await["state"], "off");
    r.shutdown().await;
    shutdown_all(vec![a, b, fixed]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_watches_relist_without_churn_and_downtime_keeps_the_last_known_set() {
    let k8s = FakeK8s::start().await;
    k8s.apply(pod("llm", "a", &[("app", "sglang")], "127.0.0.2", true));
    k8s.apply(pod("llm", "b", &[("app", "sglang")], "127.0.0.3", true));
    let dir = ConfigDir::new("discovery-faults");
    k8s.kubeconfig(&dir.dir.join("kubeconfig"));
    dir.write(&toml(&dir.dir.join("kubeconfig"), 8000, ""));
    let r = dir.start(&dir.file, Default::default()).await;
    let router = r.url();
    let both = ["http://127.0.0.2:8000".to_owned(), "http://127.0.0.3:8000".to_owned()];
    expect_discovered(&router, &both, "the first list").await;
    assert_eq!(churn(&router).await, (2, 0));

    // 410 Gone: the watcher relists; nothing still there is removed or added again.
    let lists = discovery(&router).await["lists_total"].as_u64().unwrap();
    k8s.expire();
    eventually(WITHIN, "a relist after 410 Gone", || async {
        discovery(&router).await["lists_total"].as_u64().unwrap() > lists
    })
    .await;
    assert_eq!(workers_of(&router, "discovery").await, both.iter().cloned().collect());
    assert_eq!(churn(&router).await, (2, 0), "a relist of the same pods changes nothing");

    // A dropped watch resumes from its resource version: a change made meanwhile arrives.
    let (_, watches) = k8s.requests();
    k8s.drop_watches();
    k8s.delete("llm", "b");
    eventually(WITHIN, "the watch resumed", || async { k8s.requests().1 > watches }).await;
    expect_discovered(&router, &both[..1], "b deleted while the watch was down").await;

    // Downtime: errors are reported, the last known set keeps serving; after it, the pods
    // that changed meanwhile are followed again.
    k8s.set_down(true);
    eventually(WITHIN, "discovery reports the outage", || async {
        let d = discovery(&router).await;
        d["state"] == "error" && d["errors_total"].as_u64().unwrap() > 0
    })
    .await;
    let d = discovery(&router).await;
    assert!(d["last_error"].as_str().unwrap().contains("503"), "{d}");
    assert_eq!(workers_of(&router, "discovery").await, both[..1].iter().cloned().collect());
    let metrics = r.app.metrics.render(&r.app);
    assert!(metrics.contains("sgl_router_discovery_up 0"), "{metrics}");
    k8s.apply(pod("llm", "c", &[("app", "sglang")], "127.0.0.4", true));
    k8s.set_down(false);
    let after = [both[0].clone(), "http://127.0.0.4:8000".to_owned()];
    expect_discovered(&router, &after, "c, added during the outage").await;
    eventually(WITHIN, "watching again", || async {
        discovery(&router).await["state"] == "watching"
    })
    .await;
    assert_eq!(churn(&router).await, (3, 1));
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_pods_are_classified_by_selector_with_bootstrap_ports_from_the_annotation() {
    let k8s = FakeK8s::start().await;
    let mut p = pod("llm", "p0", &[("app", "sglang"), ("role", "prefill")], "127.0.0.2", true);
    p["metadata"]["annotations"]["sglang.ai/bootstrap-port"] = json!("9100");
    k8s.apply(p);
    k8s.apply(pod("llm", "d0", &[("app", "sglang"), ("role", "decode")], "127.0.0.3", true));
    k8s.apply(pod("llm", "x", &[("app", "sglang")], "127.0.0.4", true));
    let dir = ConfigDir::new("discovery-pd");
    let kubeconfig = dir.dir.join("kubeconfig");
    k8s.kubeconfig(&kubeconfig);
    let flags = routerd::config::Flags {
        pd_disaggregation: true,
        service_discovery: true,
        prefill_selector: Some(vec!["app=sglang".into(), "role=prefill".into()]),
        decode_selector: Some(vec!["app=sglang".into(), "role=decode".into()]),
        service_discovery_port: Some(30000),
        service_discovery_namespace: Some("llm".into()),
        ..Default::default()
    };
    dir.write(&format!("[discovery]\nkubeconfig = {:?}\n", kubeconfig.display().to_string()));
    let r = dir.start(&dir.file, flags).await;
    let router = r.url();
    expect_discovered(
        &router,
        &["http://127.0.0.2:30000".into(), "http://127.0.0.3:30000".into()],
        "one prefill and one decode pod",
    )
    .await;
    let v = get_json(&format!("{router}/workers")).await;
    let by_url =
        |u: &str| v["workers"].as_array().unwrap().iter().find(|w| w["url"] == u).cloned().unwrap();
    let prefill = by_url("http://127.0.0.2:30000");
    assert_eq!(
        (prefill["role"].as_str(), prefill["bootstrap_port"].as_u64()),
        (Some("prefill"), Some(9100))
    );
    assert_eq!(by_url("http://127.0.0.3:30000")["role"], "decode");
    let d = discovery(&router).await;
    assert_eq!(
        d["selectors"],
        json!({"prefill": "app=sglang,role=prefill", "decode": "app=sglang,role=decode"})
    );
    r.shutdown().await;
}

#[test]
fn discovery_settings_are_validated_with_their_keys() {
    let flags = routerd::config::Flags {
        service_discovery: true,
        prefill_selector: Some(vec!["role=prefill".into()]),
        selector: Some(vec!["app".into()]),
        ..Default::default()
    };
    let errors = routerd::config::Config::build(None, &flags).unwrap_err().to_string();
    assert!(errors.contains("\"app\" is not key=value"), "{errors}");
    assert!(
        errors.contains("discovery.prefill_selector") && errors.contains("only applies in PD mode"),
        "{errors}"
    );
    let none = routerd::config::Flags { service_discovery: true, ..Default::default() };
    let errors = routerd::config::Config::build(None, &none).unwrap_err().to_string();
    assert!(errors.contains("service discovery needs a selector"), "{errors}");
}

#[test]
fn the_kubernetes_example_config_is_valid_and_selects_the_example_workers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/k8s");
    let router = std::fs::read_to_string(root.join("router.yaml")).unwrap();
    // The ConfigMap's routerd.toml: the block indented under `routerd.toml: |`.
    let toml: String = router
        .lines()
        .skip_while(|l| !l.contains("routerd.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let src = routerd::config::Source { name: "examples/k8s/router.yaml", text: &toml };
    let config = routerd::config::Config::build(Some(src), &Default::default()).unwrap();
    let d = config.discovery.expect("discovery on");
    assert_eq!(d.namespace.as_deref(), Some("llm"));
    let label = d.selector.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
    let workers = std::fs::read_to_string(root.join("workers.yaml")).unwrap();
    assert!(workers.contains(&format!("labels: {{ {label} }}")), "{label}");
    assert!(workers.contains(&format!("containerPort: {}", d.port)));
    // Three replicas behind one Service, a budget that keeps two, workers that publish what
    // the replicas share (docs/replicas.md).
    assert!(router.contains("replicas: 3") && router.contains("kind: PodDisruptionBudget"));
    assert!(router.contains("minAvailable: 2"));
    assert!(workers.contains("--kv-events-config") && workers.contains("--load-publish-endpoint"));
    // The autoscaler's adapter rules read series routerd exports; the queue they scale on is
    // filled by the router's admission limit.
    assert!(config.server.max_concurrent_requests.is_some());
    let hpa = std::fs::read_to_string(root.join("autoscaling.yaml")).unwrap();
    assert!(hpa.contains("kind: HorizontalPodAutoscaler") && hpa.contains("name: sglang-worker"));
    for series in ["sgl_router_queue_depth", "routerd_pool_requests_active"] {
        assert!(hpa.contains(&format!("^{series}$")), "{series}");
        assert!(routerd::metrics::DESCRIPTIONS.iter().any(|(n, _, _)| *n == series), "{series}");
    }
    for f in ["rbac-namespace.yaml", "rbac-cluster.yaml"] {
        let rbac = std::fs::read_to_string(root.join(f)).unwrap();
        assert!(rbac.contains(r#"verbs: ["get", "list", "watch"]"#), "{f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_at_refused_addresses_are_not_workers_and_discovered_workers_get_the_key() {
    let k8s = FakeK8s::start().await;
    let a = sim(|s| {
        s.host = "127.0.0.2".into();
        s.api_key = Some("pod-key".into());
    })
    .await;
    let port: u16 = a.url().rsplit(':').next().unwrap().parse().unwrap();
    k8s.apply(pod("llm", "a", &[("app", "sglang")], "127.0.0.2", true));
    k8s.apply(pod("llm", "imds", &[("app", "sglang")], "169.254.169.254", true));
    k8s.apply(pod("llm", "outside", &[("app", "sglang")], "10.9.9.9", true));
    let dir = ConfigDir::new("discovery-refused");
    k8s.kubeconfig(&dir.dir.join("kubeconfig"));
    let extra = "[security]\nallowed_worker_networks = [\"127.0.0.0/8\"]\n";
    let mut text = toml(&dir.dir.join("kubeconfig"), port, extra);
    text.push_str("api_key = \"pod-key\"\n");
    dir.write(&text);
    let r = dir.start(&dir.file, Default::default()).await;
    let router = r.url();
    expect_discovered(&router, &[format!("http://127.0.0.2:{port}")], "only the allowed pod").await;
    let d = discovery(&router).await;
    let refused = d["refused"].to_string();
    assert!(refused.contains("169.254.169.254") && refused.contains("link-local"), "{d}");
    assert!(refused.contains("10.9.9.9") && refused.contains("outside"), "{d}");
    let (status, body) = post_json(format!("{router}/generate"), &small_generate()).await;
    assert_eq!(status, 200, "the discovered worker got the key: {body}");
    eventually(WITHIN, "health checks with the key", || async {
        stats(&a).await["health_checks_with_key"].as_u64().unwrap() > 0
    })
    .await;
    assert_eq!(stats(&a).await["unauthorized"], 0);
    r.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_pods_are_reached_over_tls_when_the_scheme_says_so() {
    let pki = routerd_e2e::pki::Pki::new("discovery");
    let k8s = FakeK8s::start().await;
    // A TLS worker requiring client certificates, at a pod's address (its certificate names
    // 127.0.0.1 only, so the pod is at 127.0.0.1).
    let w = sim(|s| {
        s.tls_cert = Some(pki.server_cert.clone());
        s.tls_key = Some(pki.server_key.clone());
        s.tls_client_ca = Some(pki.ca.clone());
    })
    .await;
    let port: u16 = w.url().rsplit(':').next().unwrap().parse().unwrap();
    k8s.apply(pod("llm", "a", &[("app", "sglang")], "127.0.0.1", true));
    let dir = ConfigDir::new("discovery-tls");
    k8s.kubeconfig(&dir.dir.join("kubeconfig"));
    let tls = format!(
        "[tls]\nca_cert_paths = [{:?}]\nclient_cert_path = {:?}\nclient_key_path = {:?}\n",
        pki.ca.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string()
    );
    let text = toml(&dir.dir.join("kubeconfig"), port, &tls) + "scheme = \"https\"\n";
    dir.write(&text);
    let r = dir.start(&dir.file, Default::default()).await;
    let router = r.url();
    let url = format!("https://127.0.0.1:{port}");
    expect_discovered(&router, std::slice::from_ref(&url), "the pod, over https").await;
    let (status, body) = post_json(format!("{router}/generate"), &small_generate()).await;
    assert_eq!(status, 200, "{body}");
    eventually(WITHIN, "the discovered https worker passes its health check", || async {
        let v = get_json(&format!("{router}/workers")).await;
        let w = &v["workers"][0];
        w["healthy"] == true && w["health_checks_total"].as_u64() > Some(0)
    })
    .await;
    r.shutdown().await;
    w.shutdown().await;
}

//! TLS both ways: routerd serving HTTPS (and rotating its certificate under load), routerd
//! reaching `https://` workers with and without mTLS, PD over TLS, and each way a handshake can
//! fail, said by cause. Certificates are made at test time (`routerd_e2e::pki`).

use std::time::Duration;

use routerctl::sim::{Role, SimArgs, SimWorker};
use routerd::config::{Config, Flags};
use routerd_e2e::pki::Pki;
use routerd_e2e::{client, eventually, router, sim, ConfigDir};
use serde_json::{json, Value};

/// A simulated worker serving TLS with `cert`/`key`, requiring client certificates signed by
/// `client_ca` when given.
async fn tls_sim(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
    tweak: impl FnOnce(&mut SimArgs),
) -> SimWorker {
    sim(|a| {
        a.tls_cert = Some(cert.to_owned());
        a.tls_key = Some(key.to_owned());
        a.tls_client_ca = client_ca.map(ToOwned::to_owned);
        a.zero_compute = true;
        tweak(a);
    })
    .await
}

fn flags_for(urls: Vec<String>, pki: &Pki, client_cert: bool) -> Flags {
    Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(urls),
        ca_cert_paths: Some(vec![pki.ca.clone()]),
        client_cert_path: client_cert.then(|| pki.client_cert.clone()),
        client_key_path: client_cert.then(|| pki.client_key.clone()),
        ..Default::default()
    }
}

async fn workers(router: &str, c: &reqwest::Client) -> Vec<Value> {
    let v: Value = c.get(format!("{router}/workers")).send().await.unwrap().json().await.unwrap();
    v["workers"].as_array().unwrap().clone()
}

/// POSTs a small `/generate` (streamed when asked) to `router`.
async fn send_generate(router: &str, stream: bool) -> reqwest::Response {
    client().post(format!("{router}/generate")).json(&generate(stream)).send().await.unwrap()
}

fn generate(stream: bool) -> Value {
    json!({"text": "tell me", "stream": stream, "sampling_params": {"max_new_tokens": 3}})
}

#[tokio::test]
async fn https_workers_with_mtls_answer_plain_and_streamed_requests() {
    let pki = Pki::new("mtls");
    let mut ws = Vec::new();
    for _ in 0..2 {
        ws.push(tls_sim(&pki.server_cert, &pki.server_key, Some(&pki.ca), |_| {}).await);
    }
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    assert!(urls.iter().all(|u| u.starts_with("https://127.0.0.1:")), "{urls:?}");
    let r = router(Config::build(None, &flags_for(urls.clone(), &pki, true)).unwrap()).await;
    eventually(Duration::from_secs(5), "both https workers pass their health checks", || async {
        let ws = workers(&r.url(), &client()).await;
        ws.iter().all(|w| w["healthy"] == true && w["health_checks_total"].as_u64() > Some(0))
    })
    .await;
    let mut answered_by = std::collections::BTreeSet::new();
    for i in 0..6 {
        let resp = send_generate(&r.url(), i % 2 == 1).await;
        assert_eq!(resp.status(), 200);
        answered_by.insert(resp.headers()["x-routerd-worker"].to_str().unwrap().to_owned());
        let body = resp.text().await.unwrap();
        if i % 2 == 1 {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        } else {
            assert!(body.contains("\"text\""), "{body}");
        }
    }
    assert_eq!(answered_by.into_iter().collect::<Vec<_>>(), {
        let mut u = urls.clone();
        u.sort();
        u
    });
    // Connections are pooled: one handshake per connection, not per request (6 sequential
    // requests over 2 workers, plus the health checks on their own pooled connection).
    for _ in 0..10 {
        let resp = send_generate(&r.url(), false).await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let direct = pki.client(true);
    for w in &ws {
        let url = format!("{}/sim/stats", w.url());
        let s: Value = direct.get(url).send().await.unwrap().json().await.unwrap();
        assert!(s["requests"].as_u64().unwrap() >= 8, "{s}");
        // (This call's own handshake included.)
        assert!(s["tls_handshakes"].as_u64().unwrap() <= 4, "a handshake per request? {s}");
    }
    // The OpenAI route and the info passthrough (hyper's pooled client) go over TLS too.
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let resp =
        client().post(format!("{}/v1/chat/completions", r.url())).json(&chat).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let info = client().get(format!("{}/get_server_info", r.url())).send().await.unwrap();
    assert_eq!(info.status(), 200);
    // The workers API takes an https worker like any other.
    let added = tls_sim(&pki.server_cert, &pki.server_key, Some(&pki.ca), |_| {}).await;
    let resp = client()
        .post(format!("{}/workers", r.url()))
        .json(&json!({"url": added.url()}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    eventually(Duration::from_secs(5), "the added https worker is healthy", || async {
        let ws = workers(&r.url(), &client()).await;
        ws.iter().any(|w| {
            w["url"] == added.url().as_str()
                && w["health_checks_total"].as_u64() > Some(0)
                && w["healthy"] == true
        })
    })
    .await;
    r.shutdown().await;
    ws.push(added);
    routerd_e2e::shutdown_all(ws).await;
}

/// Each TLS failure marks the worker unhealthy with a `last_error` that says which, and a
/// request sent to it (health checks off) fails with the same cause: never plaintext.
#[tokio::test]
async fn tls_failures_are_reported_by_cause() {
    let pki = Pki::new("failures");
    let cases: Vec<(SimWorker, &str)> = vec![
        (tls_sim(&pki.other_cert, &pki.other_key, None, |_| {}).await, "unknown CA"),
        (
            tls_sim(&pki.wrong_name_cert, &pki.wrong_name_key, None, |_| {}).await,
            "does not name this host",
        ),
        (tls_sim(&pki.expired_cert, &pki.expired_key, None, |_| {}).await, "expired"),
        (
            tls_sim(&pki.server_cert, &pki.server_key, Some(&pki.ca), |_| {}).await,
            "requires a client certificate",
        ),
        (
            tls_sim(&pki.server_cert, &pki.server_key, Some(&pki.other_ca), |_| {}).await,
            "refused routerd's client certificate",
        ),
        // A plain worker named https://: the handshake gets HTTP back.
        (sim(|a| a.zero_compute = true).await, "did not answer with TLS"),
    ];
    let urls: Vec<String> =
        cases.iter().map(|(w, _)| w.url().replacen("http://", "https://", 1)).collect();
    // Client certificate only for the worker that checks it against the other CA.
    for (k, (_, cause)) in cases.iter().enumerate() {
        let client_cert = k == 4;
        let url = urls[k].clone();
        let mut config =
            Config::build(None, &flags_for(vec![url.clone()], &pki, client_cert)).unwrap();
        config.health.interval = Duration::from_millis(100);
        let r = router(config).await;
        eventually(Duration::from_secs(5), &format!("{url} unhealthy: {cause}"), || async {
            let w = &workers(&r.url(), &client()).await[0];
            w["healthy"] == false && w["last_error"].as_str().is_some_and(|e| e.contains(cause))
        })
        .await;
        r.shutdown().await;
        // The inference path says the same, with health checks off.
        let mut config =
            Config::build(None, &flags_for(vec![url.clone()], &pki, client_cert)).unwrap();
        config.health.enabled = false;
        config.retry.enabled = false;
        let r = router(config).await;
        let resp = send_generate(&r.url(), false).await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 502, "{url}: {body}");
        assert!(body.contains(cause), "{url}: {cause}: {body}");
        r.shutdown().await;
    }
    routerd_e2e::shutdown_all(cases.into_iter().map(|(w, _)| w).collect()).await;
}

#[tokio::test]
async fn routerd_serves_https_and_tells_plain_http_clients() {
    let pki = Pki::new("serve");
    let w = sim(|a| a.zero_compute = true).await;
    let flags = Flags {
        worker_urls: Some(vec![w.url()]),
        tls_cert_path: Some(pki.server_cert.clone()),
        tls_key_path: Some(pki.server_key.clone()),
        ..Default::default()
    };
    let r = router(Config::build(None, &flags).unwrap()).await;
    let url = r.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let c = pki.client(false);
    let resp = c.post(format!("{url}/generate")).json(&generate(false)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = c.post(format!("{url}/generate")).json(&generate(true)).send().await.unwrap();
    assert!(events.text().await.unwrap().trim_end().ends_with("data: [DONE]"));
    // The admin API and the info routes are on the TLS listener too; the key's content is
    // nowhere in the configuration shown.
    let cfg = c.get(format!("{url}/admin/config")).send().await.unwrap();
    assert_eq!(cfg.status(), 200);
    let cfg = cfg.text().await.unwrap();
    assert!(cfg.contains("server.pem") && cfg.contains("server.key"), "{cfg}");
    assert!(!cfg.contains("PRIVATE KEY"), "{cfg}");
    assert_eq!(c.get(format!("{url}/health")).send().await.unwrap().status(), 200);
    // A client that does not trust the CA fails its handshake.
    let untrusting = reqwest::Client::builder().no_proxy().use_rustls_tls().build().unwrap();
    assert!(untrusting.get(format!("{url}/health")).send().await.is_err());
    // Plain HTTP to the HTTPS port: a 400 that says so.
    let plain = url.replacen("https://", "http://", 1);
    let resp = client().get(format!("{plain}/health")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("serves HTTPS"), "{body}");
    // curl, as an operator would.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&pki.ca)
        .args(["-H", "content-type: application/json", "-d"])
        .arg(generate(false).to_string())
        .arg(format!("{url}/generate"))
        .output()
        .await
        .expect("curl (CI installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"text\""),
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn the_serving_certificate_rotates_under_load_without_a_failed_request() {
    let pki = Pki::new("rotate");
    let w = sim(|a| a.zero_compute = true).await;
    let dir = ConfigDir::new("tls-rotate");
    let (cert, key) = (dir.dir.join("tls.pem"), dir.dir.join("tls.key"));
    std::fs::copy(&pki.server_cert, &cert).unwrap();
    std::fs::copy(&pki.server_key, &key).unwrap();
    dir.write(&format!(
        "[server]\ntls_cert_path = {cert:?}\ntls_key_path = {key:?}\n[[workers]]\nurl = \"{}\"\n",
        w.url()
    ));
    let r = dir.start(&dir.file, Flags::default()).await;
    let url = r.url();
    // A certificate file's base64, and a served certificate's (to compare them).
    let file_b64 = |path: &std::path::Path| {
        let pem = std::fs::read_to_string(path).unwrap();
        pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>()
    };
    let served = |c: reqwest::Client, url: String| async move {
        let resp = c.get(format!("{url}/health")).send().await.expect("no failed request");
        assert_eq!(resp.status(), 200);
        let info = resp.extensions().get::<reqwest::tls::TlsInfo>().expect("TLS info").clone();
        base64(info.peer_certificate().unwrap())
    };
    let ca = std::fs::read(&pki.ca).unwrap();
    // A new client per call: a new connection, a new handshake.
    let fresh = move || {
        reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .tls_info(true)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
    };
    assert_eq!(served(fresh(), url.clone()).await, file_b64(&pki.server_cert));
    // Load: 4 clients on kept-alive connections plus a new connection per request, while the
    // files are replaced (key first, then certificate, as a careless rotation does) and the
    // watcher reloads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for k in 0..6 {
        let (stop, url, keep) = (stop.clone(), url.clone(), fresh());
        let fresh = fresh.clone();
        load.spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = if k < 4 { keep.clone() } else { fresh() };
                let resp = c
                    .post(format!("{url}/generate"))
                    .json(&json!({"text": "x", "sampling_params": {"max_new_tokens": 1}}))
                    .send()
                    .await
                    .expect("no failed request during the rotation");
                assert_eq!(resp.status(), 200);
                resp.bytes().await.expect("whole answer");
                n += 1;
            }
            n
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::copy(&pki.server2_key, &key).unwrap();
    std::fs::copy(&pki.server2_cert, &cert).unwrap();
    eventually(Duration::from_secs(10), "new handshakes get the new certificate", || async {
        served(fresh(), url.clone()).await == file_b64(&pki.server2_cert)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    while let Some(n) = load.join_next().await {
        total += n.expect("no load task failed");
    }
    assert!(total > 20, "the load ran: {total} requests");
    // A broken certificate is rejected like a bad configuration; the current one stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        .unwrap();
    let c = pki.client(false);
    let resp = c.post(format!("{url}/admin/reload")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["errors"][0].as_str().unwrap().contains("tls.pem"), "{body}");
    assert_eq!(served(fresh(), url.clone()).await, file_b64(&pki.server2_cert));
    r.shutdown().await;
    w.shutdown().await;
}

/// Standard base64 with padding (a PEM body without its line breaks).
fn base64(der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn pd_pairs_over_tls() {
    let pki = Pki::new("pd");
    let p = tls_sim(&pki.server_cert, &pki.server_key, Some(&pki.ca), |a| {
        a.role = Role::Prefill;
        a.bootstrap_timeout_secs = 10.0;
    })
    .await;
    let d = tls_sim(&pki.server_cert, &pki.server_key, Some(&pki.ca), |a| {
        a.role = Role::Decode;
        a.bootstrap_timeout_secs = 10.0;
    })
    .await;
    let flags = Flags {
        pd_disaggregation: true,
        prefill: vec![p.url(), p.bootstrap_addr.unwrap().port().to_string()],
        decode: vec![d.url()],
        ca_cert_paths: Some(vec![pki.ca.clone()]),
        client_cert_path: Some(pki.client_cert.clone()),
        client_key_path: Some(pki.client_key.clone()),
        ..Default::default()
    };
    let r = router(Config::build(None, &flags).unwrap()).await;
    for stream in [false, true] {
        let resp = send_generate(&r.url(), stream).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-routerd-prefill-worker"], p.url().as_str());
        let body = resp.text().await.unwrap();
        assert!(body.contains("text"), "{body}");
    }
    r.shutdown().await;
    p.shutdown().await;
    d.shutdown().await;
}

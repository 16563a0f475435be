//! Security and bad input (docs/security.md): client and admin keys, loopback-only changes,
//! worker keys on every call, worker URL rules, redirects, request limits, redaction.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use routerd::config::{Config, Flags, Secret};
use routerd_e2e::{client, eventually, small_generate, stats, ConfigDir};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start(config: Config, host: &str) -> routerd::run::Running {
    let listener = TcpListener::bind((host, 0)).await.unwrap();
    routerd::run::start(listener, config).unwrap()
}

fn flags(tweak: impl FnOnce(&mut Flags)) -> Config {
    let mut f = Flags { policy: Some("round_robin".into()), ..Default::default() };
    tweak(&mut f);
    Config::build(None, &f).expect("valid config")
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
}

#[tokio::test]
async fn the_api_key_guards_inference_and_model_routes_but_not_health() {
    // As in sgl-router: --api-key is asked of clients and sent to the --worker-urls workers.
    let w = routerd_e2e::sim(|a| a.api_key = Some("fleet-key".into())).await;
    let r = start(
        flags(|f| {
            f.worker_urls = Some(vec![w.url()]);
            f.api_key = Some(Secret::new("fleet-key"));
        }),
        "127.0.0.1",
    )
    .await;
    let url = r.url();
    let c = client();
    let gen = || c.post(format!("{url}/generate")).json(&small_generate());
    let (status, body, headers) = send(gen()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["type"], "unauthorized");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, body, _) = send(gen().bearer_auth("wrong-key")).await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains("wrong-key"), "the key sent is not echoed: {body}");
    assert_eq!(send(gen().header("authorization", "fleet-key")).await.0, 401, "no scheme");
    let (status, body, _) = send(gen().bearer_auth("fleet-key")).await;
    assert_eq!(status, 200, "{body}");
    for path in ["/v1/models", "/get_model_info", "/get_server_info"] {
        assert_eq!(send(c.get(format!("{url}{path}"))).await.0, 401, "{path}");
        let (status, body, _) = send(c.get(format!("{url}{path}")).bearer_auth("fleet-key")).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in ["/health", "/liveness", "/readiness"] {
        assert_eq!(send(c.get(format!("{url}{path}"))).await.0, 200, "{path} stays open");
    }
    // The client's key is the router's; the worker got the router's key on each call and
    // never refused one.
    let s = stats(&w).await;
    assert_eq!(s["unauthorized"], 0, "{s}");
    r.shutdown().await;

    // A worker added without a key of its own does not get the client's key passed on.
    let r = start(flags(|f| f.api_key = Some(Secret::new("fleet-key"))), "127.0.0.1").await;
    let url = r.url();
    let add = || c.post(format!("{url}/workers")).json(&json!({"url": w.url()}));
    assert_eq!(send(add()).await.0, 401, "without an admin key, the API key guards management");
    assert_eq!(send(add().bearer_auth("fleet-key")).await.0, 202);
    let (status, body, _) =
        send(c.post(format!("{url}/generate")).bearer_auth("fleet-key").json(&small_generate()))
            .await;
    assert_eq!(status, 401, "the worker refused: no key was passed on: {body}");
    assert_eq!(stats(&w).await["unauthorized"], 1);
    for bad in ["", "  ", "tab\tkey", "n\u{e9}"] {
        let (status, body, _) = send(
            c.post(format!("{url}/workers"))
                .bearer_auth("fleet-key")
                .json(&json!({"url": "http://127.0.0.1:9", "api_key": bad})),
        )
        .await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn worker_keys_go_on_every_call_to_their_worker_including_runtime_ones() {
    let ws = [
        routerd_e2e::sim(|a| a.api_key = Some("key-one".into())).await,
        routerd_e2e::sim(|a| a.api_key = Some("key-two".into())).await,
        routerd_e2e::sim(|a| a.api_key = Some("key-three".into())).await,
    ];
    let dir = ConfigDir::new("worker-keys");
    std::fs::write(dir.dir.join("two.key"), "key-two\n").unwrap();
    dir.write(&format!(
        "[policy]\nname = \"round_robin\"\nload_poll_interval = \"50ms\"\n\
         [health]\ninterval = \"50ms\"\n\
         [[workers]]\nurl = \"{}\"\napi_key = \"key-one\"\n\
         [[workers]]\nurl = \"{}\"\napi_key_file = \"two.key\"\n",
        ws[0].url(),
        ws[1].url()
    ));
    let r = dir.start(&dir.file.clone(), Flags::default()).await;
    let url = r.url();
    let c = client();
    let (status, body, _) = send(
        c.post(format!("{url}/workers")).json(&json!({"url": ws[2].url(), "api_key": "key-three"})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body.get("api_key"), None, "keys are not shown: {body}");
    assert_eq!(body["worker"].get("api_key"), None, "keys are not shown: {body}");
    for _ in 0..6 {
        let (status, body, _) =
            send(c.post(format!("{url}/generate")).json(&small_generate())).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(send(c.post(format!("{url}/flush_cache"))).await.0, 200);
    for w in &ws {
        eventually(Duration::from_secs(5), "health checks and load polls with the key", || async {
            let s = stats(w).await;
            s["health_checks_with_key"].as_u64().unwrap() > 0 && s["unauthorized"] == 0
        })
        .await;
        let s = stats(w).await;
        assert_eq!((s["requests"].as_u64(), s["flushes"].as_u64()), (Some(2), Some(1)), "{s}");
        assert_eq!(s["unauthorized"], 0, "every call carried the key: {s}");
    }
    let workers = routerd_e2e::get_json(&format!("{url}/workers")).await;
    assert!(workers["workers"].as_array().unwrap().iter().all(|w| w["healthy"] == true));
    r.shutdown().await;
    routerd_e2e::shutdown_all(ws.into()).await;
}

#[tokio::test]
async fn the_admin_key_guards_management_and_admin_routes() {
    let w = routerd_e2e::sim(|_| {}).await;
    let r = start(flags(|f| f.admin_api_key = Some(Secret::new("admin-key-1"))), "127.0.0.1").await;
    let url = r.url();
    let c = client();
    let add = || c.post(format!("{url}/workers")).json(&json!({"url": w.url()}));
    for (what, req) in [
        ("add", add()),
        ("list", c.get(format!("{url}/workers"))),
        ("config", c.get(format!("{url}/admin/config"))),
        ("reload", c.post(format!("{url}/admin/reload"))),
        ("add_worker", c.post(format!("{url}/add_worker?url={}", w.url()))),
        ("list_workers", c.get(format!("{url}/list_workers"))),
        ("flush", c.post(format!("{url}/flush_cache"))),
    ] {
        let (status, body, _) = send(req).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("admin"), "{body}");
    }
    assert_eq!(send(add().bearer_auth("not-it")).await.0, 401);
    assert_eq!(send(add().bearer_auth("admin-key-1")).await.0, 202);
    let (status, cfg, _) =
        send(c.get(format!("{url}/admin/config")).bearer_auth("admin-key-1")).await;
    assert_eq!(status, 200);
    assert_eq!(cfg["config"]["security"]["admin_api_key"], "<redacted>");
    assert!(!cfg.to_string().contains("admin-key-1"));
    // Inference needs no key here (no --api-key), and the admin key is not asked of it.
    assert_eq!(send(c.post(format!("{url}/generate")).json(&small_generate())).await.0, 200);
    let del = c.delete(format!("{url}/workers/{}", urlencode(&w.url())));
    assert_eq!(send(del.bearer_auth("admin-key-1")).await.0, 202);
    r.shutdown().await;
    w.shutdown().await;
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('/', "%2F")
}

/// This machine's address on its default route (no packet is sent), if it has one.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn without_an_admin_key_changes_come_only_from_loopback() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("SKIPPED: this machine has no non-loopback address to call from");
        return;
    };
    let w = routerd_e2e::sim(|_| {}).await;
    let r = start(flags(|_| {}), "0.0.0.0").await;
    let port = r.addr.port();
    let remote = format!("http://{}", SocketAddr::new(ip, port));
    let local = format!("http://127.0.0.1:{port}");
    let c = client();
    let body = json!({"url": w.url()});
    let (status, err, _) = send(c.post(format!("{remote}/workers")).json(&body)).await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["error"]["type"], "forbidden");
    assert!(err["error"]["message"].as_str().unwrap().contains("loopback"), "{err}");
    assert_eq!(send(c.post(format!("{remote}/admin/reload"))).await.0, 403);
    assert_eq!(send(c.post(format!("{remote}/remove_worker?url=http://x:1"))).await.0, 403);
    let (status, list, _) = send(c.get(format!("{remote}/workers"))).await;
    assert_eq!((status, list["workers"].as_array().unwrap().len()), (200, 0), "reads are open");
    assert_eq!(send(c.post(format!("{local}/workers")).json(&body)).await.0, 202);
    // Inference is not a change: remote clients are served.
    assert_eq!(send(c.post(format!("{remote}/generate")).json(&small_generate())).await.0, 200);
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn worker_urls_from_the_api_are_checked() {
    let w = routerd_e2e::sim(|_| {}).await;
    let r = start(flags(|_| {}), "127.0.0.1").await;
    let url = r.url();
    let c = client();
    for (bad, says) in [
        ("http://169.254.169.254", "link-local"),
        ("http://169.254.169.254:80/latest/meta-data", "path"),
        ("http://[fe80::1]:8000", "link-local"),
        ("http://[::ffff:169.254.169.254]:80", "link-local"),
        ("http://metadata.google.internal", "metadata"),
        ("http://100.100.100.200:80", "metadata"),
        ("http://0.0.0.0:8000", "unspecified"),
        ("http://user:secret@127.0.0.1:8000", "credentials"),
        ("ftp://127.0.0.1:21", "http://"),
        ("file:///etc/passwd", "not a valid URL"),
        ("https://169.254.169.254:8443", "link-local"),
        ("http://no-such-host.invalid:8000", "cannot resolve"),
        ("not a url", "not a valid URL"),
    ] {
        let (status, body, _) =
            send(c.post(format!("{url}/workers")).json(&json!({"url": bad}))).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{bad}: {msg}");
        assert!(!msg.contains("secret"), "credentials are not echoed: {msg}");
    }
    let (status, _, _) = send(c.post(format!("{url}/add_worker?url=http://169.254.169.254"))).await;
    assert_eq!(status, 400, "sgl-router's route checks too");
    assert_eq!(send(c.get(format!("{url}/list_workers"))).await.1["urls"], json!([]));
    assert_eq!(send(c.post(format!("{url}/workers")).json(&json!({"url": w.url()}))).await.0, 202);
    r.shutdown().await;

    // With an allowlist, only its networks.
    let r = start(
        flags(|f| f.allowed_worker_networks = Some(vec!["10.0.0.0/8".into(), "::1".into()])),
        "127.0.0.1",
    )
    .await;
    let (status, body, _) =
        send(c.post(format!("{}/workers", r.url())).json(&json!({"url": w.url()}))).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("outside the allowed"), "{body}");
    r.shutdown().await;
    w.shutdown().await;
}

/// A worker that answers every request with a redirect to `target`, counting nothing itself.
async fn redirecting_worker(target: String) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let target = target.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let path =
                    String::from_utf8_lossy(&got).split(' ').nth(1).unwrap_or("/").to_owned();
                let resp = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}{path}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn redirects_from_workers_are_not_followed() {
    let target = routerd_e2e::sim(|_| {}).await;
    let (addr, task) = redirecting_worker(target.url()).await;
    let dir = ConfigDir::new("redirects");
    dir.write(&format!(
        "[policy]\nname = \"round_robin\"\n[health]\ninterval = \"50ms\"\n\
         [retry]\nenabled = false\n[[workers]]\nurl = \"http://{addr}\"\n"
    ));
    let r = dir.start(&dir.file.clone(), Flags::default()).await;
    let url = r.url();
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = c.post(format!("{url}/generate")).json(&small_generate()).send().await.unwrap();
    assert_eq!(resp.status(), 307, "the worker's answer is relayed, not followed");
    assert_eq!(resp.headers()["location"].to_str().unwrap(), format!("{}/generate", target.url()));
    eventually(Duration::from_secs(5), "a redirecting /health fails the check", || async {
        let v = routerd_e2e::get_json(&format!("{url}/workers")).await;
        v["workers"][0]["healthy"] == false
            && v["workers"][0]["last_error"].as_str().unwrap_or("").contains("307")
    })
    .await;
    let s = stats(&target).await;
    assert_eq!((s["requests"].as_u64(), s["health_checks"].as_u64()), (Some(0), Some(0)), "{s}");
    r.shutdown().await;
    task.abort();
    target.shutdown().await;
}

/// Writes `raw` on a new connection and reads until the router closes it.
async fn exchange(addr: SocketAddr, raw: &[u8], pause: Option<Duration>) -> (String, Duration) {
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    if let Some(p) = pause {
        tokio::time::sleep(p).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the router closes the connection")
        .unwrap();
    (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let w = routerd_e2e::sim(|_| {}).await;
    let dir = ConfigDir::new("bad-input");
    dir.write(&format!(
        "[server]\nheader_read_timeout = \"300ms\"\nmax_payload_size = 1000\n\
         [[workers]]\nurl = \"{}\"\n",
        w.url()
    ));
    let r = dir.start(&dir.file.clone(), Flags::default()).await;
    let addr = r.addr;
    let post = |ct: &str, body: &str| {
        format!(
            "POST /generate HTTP/1.1\r\nHost: r\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let ok = r#"{"text": "hi", "sampling_params": {"max_new_tokens": 1}}"#;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("text/plain", post("Content-Type: text/plain\r\n", ok), 415, "unsupported_media_type"),
        (
            "form",
            post("Content-Type: application/x-www-form-urlencoded\r\n", ok),
            415,
            "unsupported_media_type",
        ),
        (
            "truncated JSON",
            post("Content-Type: application/json\r\n", r#"{"text": "h"#),
            400,
            "invalid_request_error",
        ),
        ("not an object", post("", "[1, 2]"), 400, "invalid_request_error"),
        (
            "too large",
            post("", &format!("{{\"text\": \"{}\"}}", "a".repeat(2000))),
            413,
            "payload_too_large",
        ),
        (
            "header too large",
            format!("GET /health HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70_000)),
            431,
            "invalid_http_request",
        ),
        (
            "too many headers",
            format!("GET /health HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(101)),
            431,
            "invalid_http_request",
        ),
        ("charset", post("Content-Type: application/json; charset=utf-8\r\n", ok), 200, ""),
        ("no type", post("", ok), 200, ""),
    ];
    for (what, raw, want, kind) in cases {
        let (resp, _) = exchange(addr, raw.as_bytes(), None).await;
        assert_eq!(status_of(&resp), want, "{what}: {resp}");
        if !kind.is_empty() {
            let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
            let v: Value =
                serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {resp}"));
            assert_eq!(v["error"]["type"], kind, "{what}: {v}");
        }
    }
    // Bytes that are not UTF-8 inside a JSON string.
    let mut raw = post("", "{\"text\": \"?\"}").into_bytes();
    let q = raw.iter().rposition(|b| *b == b'?').unwrap();
    raw[q] = 0xff;
    let (resp, _) = exchange(addr, &raw, None).await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    // A client that stops halfway through its head gets 408 once the timeout passes...
    let (resp, took) =
        exchange(addr, b"POST /generate HTTP/1.1\r\nHost: r\r\nContent-Le", None).await;
    assert_eq!(status_of(&resp), 408, "{resp}");
    assert!(resp.contains("request_timeout") || resp.contains("did not arrive"), "{resp}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // ...and one that connects and says nothing is closed.
    let (resp, took) = exchange(addr, b"", None).await;
    assert_eq!(resp, "");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A refused request with a small body leaves the connection usable.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let first = post("Content-Type: text/plain\r\n", ok).replace("Connection: close\r\n", "");
    s.write_all(format!("{first}{}", post("", ok)).as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 415"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 1, "the pipelined request is served: {out}");
    assert_eq!(stats(&w).await["requests"], 3, "only valid requests reached the worker");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn secrets_never_show_in_admin_config_or_errors() {
    let var = format!("ROUTERD_TEST_ADMIN_KEY_{}", std::process::id());
    // Safety: set once, before any thread of this test reads the environment.
    unsafe { std::env::set_var(&var, "env-admin-secret") };
    let dir = ConfigDir::new("redaction");
    std::fs::write(dir.dir.join("client.key"), "file-client-secret\n").unwrap();
    dir.write(&format!(
        "[security]\napi_key_file = \"client.key\"\nadmin_api_key_env = \"{var}\"\n\
         [[workers]]\nurl = \"http://127.0.0.1:9\"\napi_key = \"inline-worker-secret\"\n"
    ));
    let r = dir.start(&dir.file.clone(), Flags::default()).await;
    let url = r.url();
    let c = client();
    let (status, cfg, _) =
        send(c.get(format!("{url}/admin/config")).bearer_auth("env-admin-secret")).await;
    assert_eq!(status, 200, "{cfg}");
    let text = cfg.to_string();
    for secret in ["env-admin-secret", "file-client-secret", "inline-worker-secret"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    assert_eq!(cfg["config"]["security"]["api_key"], "<redacted>");
    assert_eq!(cfg["config"]["workers"][0]["api_key"], "<redacted>");
    // The worker is down: the 502/503 names it but not its key.
    let (status, err, _) = send(
        c.post(format!("{url}/generate")).bearer_auth("file-client-secret").json(&small_generate()),
    )
    .await;
    assert!(status >= 500, "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    let (_, list, _) = send(c.get(format!("{url}/workers")).bearer_auth("env-admin-secret")).await;
    assert!(!list.to_string().contains("secret"), "{list}");
    r.shutdown().await;

    // Bad secret settings are configuration errors that name the key, not the value.
    dir.write("[security]\napi_key_env = \"ROUTERD_TEST_SURELY_UNSET\"\n");
    let e = Config::load(&Flags { config: Some(dir.file.clone()), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("security.api_key_env") && e.contains("is not set"), "{e}");
    dir.write("[security]\napi_key = \"a\"\napi_key_file = \"b\"\n");
    let e = Config::load(&Flags { config: Some(dir.file.clone()), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("give only one of security.api_key"), "{e}");
    assert!(e.contains("routerd.toml:3:"), "file and line: {e}");
    dir.write("[[workers]]\nurl = \"http://127.0.0.1:9\"\napi_key_file = \"missing.key\"\n");
    let e = Config::load(&Flags { config: Some(dir.file.clone()), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("workers[0].api_key_file") && e.contains("cannot read"), "{e}");
    let e = Config::build(
        None,
        &Flags { allowed_worker_networks: Some(vec!["10.0.0.0/33".into()]), ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("security.allowed_worker_networks[0]"), "{e}");
}

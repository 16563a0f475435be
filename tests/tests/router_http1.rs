//! routerd's HTTP/1 handling as raw clients and odd workers exercise it: chunked request
//! bodies, `Expect: 100-continue`, pipelining, HTTP/1.0 clients, protocol errors, and workers
//! that close pooled connections or delimit bodies by closing.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use routerd_e2e::{client, router, router_config, sim, stats};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BODY: &str = r#"{"text": "hello there", "sampling_params": {"max_new_tokens": 2}}"#;

/// Writes `raw` and reads until the router closes the connection.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the router closes the connection")
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn post(path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn error_code(resp: &str) -> u64 {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
    v["error"]["code"].as_u64().unwrap()
}

#[tokio::test]
async fn chunked_bodies_expect_continue_and_pipelining() {
    let w = sim(|_| {}).await;
    let r = router(router_config("round_robin", &[&w])).await;

    let (a, b) = BODY.split_at(10);
    let chunked = format!(
        "POST /generate HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x};ext\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let resp = exchange(r.addr, chunked.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("output_ids") || resp.contains("\"text\""), "{resp}");

    let mut s = TcpStream::connect(r.addr).await.unwrap();
    let head = post("/generate", "Expect: 100-continue\r\nConnection: close\r\n", "");
    let head = head.replace("Content-Length: 0", &format!("Content-Length: {}", BODY.len()));
    s.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(BODY.as_bytes()).await.unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).await.unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");

    let two = post("/generate", "X-Request-Id: first\r\n", BODY)
        + &post("/generate", "X-Request-Id: second\r\nConnection: close\r\n", BODY);
    let resp = exchange(r.addr, two.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    let first = resp.find("x-request-id: first").expect("first id");
    let second = resp.find("x-request-id: second").expect("second id");
    assert!(first < second, "answers come in request order");
    assert_eq!(stats(&w).await["requests"], 4);
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn http10_client_gets_a_stream_delimited_by_close() {
    let w = sim(|a| a.decode_ms_per_step = 5.0).await;
    let r = router(router_config("round_robin", &[&w])).await;
    let body = r#"{"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 3}}"#;
    let req = post("/generate", "", body).replace("HTTP/1.1", "HTTP/1.0");
    let resp = exchange(r.addr, req.as_bytes()).await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body.matches("data: ").count(), 4, "3 tokens and [DONE], unchunked: {body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_are_json_with_the_right_status() {
    let w = sim(|_| {}).await;
    let mut config = router_config("round_robin", &[&w]);
    config.server.max_payload_size = 1000;
    let r = router(config).await;
    let cases: Vec<(String, u64)> = vec![
        ("GET /generate HTTP/1.1\r\nHost: r\r\n\r\n".into(), 405),
        (format!("GET /health HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(101)), 431),
        ("HELLO\r\n\r\n".into(), 400),
        (post("/generate", "Transfer-Encoding: chunked\r\n", "0\r\n\r\n"), 400),
        (post("/generate", "", "").replace("Content-Length: 0", "Content-Length: 5000"), 413),
        (post("/generate", "Expect: coffee\r\n", BODY), 417),
        (
            post("/generate", "Transfer-Encoding: gzip\r\n", "")
                .replace("Content-Length: 0\r\n", ""),
            501,
        ),
        (post("/generate", "", "[1, 2]"), 400),
        (post("/nowhere", "", BODY), 404),
    ];
    for (raw, want) in cases {
        let raw = if raw.contains("Connection:") {
            raw
        } else {
            raw.replacen("\r\n", "\r\nConnection: close\r\n", 1)
        };
        let resp = exchange(r.addr, raw.as_bytes()).await;
        assert!(resp.starts_with(&format!("HTTP/1.1 {want} ")), "{raw:?} -> {resp}");
        assert_eq!(error_code(&resp), want, "{resp}");
    }
    assert_eq!(stats(&w).await["requests"], 0, "no bad request reached the worker");
    r.shutdown().await;
    w.shutdown().await;
}

/// A worker that answers one request per connection. `delimit_by_close` sends the body
/// without a length and closes to end it; otherwise it claims keep-alive, but closes the
/// connection without answering when a second request arrives on it (the race of a worker's
/// keep-alive timeout against a proxy reusing the connection).
async fn one_shot_worker(delimit_by_close: bool) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in [false, true] {
                    buf.clear();
                    while !String::from_utf8_lossy(&buf).contains(BODY) {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if answered {
                        return;
                    }
                    let body = r#"{"text":"ok","meta_info":{"prompt_tokens":3,"cached_tokens":1}}"#;
                    let resp = if delimit_by_close {
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{body}")
                    } else {
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                    if delimit_by_close {
                        return;
                    }
                }
            });
        }
    });
    (url, conns)
}

fn config_for(url: &str) -> routerd::config::Config {
    let flags = routerd::config::Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(vec![url.to_owned()]),
        ..Default::default()
    };
    let mut config = routerd::config::Config::build(None, &flags).unwrap();
    // These workers count connections: no health checks.
    config.health.enabled = false;
    config
}

#[tokio::test]
async fn pooled_connections_the_worker_closed_are_replaced() {
    let (url, conns) = one_shot_worker(false).await;
    let r = router(config_for(&url)).await;
    for i in 0..5 {
        let resp = client()
            .post(format!("{}/generate", r.url()))
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert!(resp.text().await.unwrap().contains("\"ok\""));
    }
    // Every request after the first went to a pooled connection that the worker then closed,
    // and was sent again on a new one.
    assert_eq!(conns.load(SeqCst), 5, "one answered request per connection");
    r.shutdown().await;
}

#[tokio::test]
async fn bodies_delimited_by_close_are_rechunked() {
    let (url, conns) = one_shot_worker(true).await;
    let r = router(config_for(&url)).await;
    let raw = post("/generate", "", BODY) + &post("/generate", "Connection: close\r\n", BODY);
    let resp = exchange(r.addr, raw.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    assert_eq!(resp.matches("transfer-encoding: chunked").count(), 2, "{resp}");
    assert_eq!(resp.matches("\"ok\"").count(), 2, "{resp}");
    assert_eq!(conns.load(SeqCst), 2);
    let worker = &r.app.registry.snapshot().workers[0];
    assert_eq!(worker.prompt_tokens.load(SeqCst), 6, "usage read from unframed bodies too");
    r.shutdown().await;
}

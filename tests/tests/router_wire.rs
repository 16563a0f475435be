//! The hand-written wire under stress: every way a stream can end early ends it well-formed
//! (one error event, `data: [DONE]`, the chunked terminator, the worker's request cancelled);
//! malformed worker answers become 502 and their connections are never reused; request
//! smuggling shapes are refused with 400 and the connection closed.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use routerd_e2e::{eventually, router, router_config, sim, stats};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn post(path: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One response read off a raw connection: its head, the de-chunked body, and whether the
/// chunked body ended with its terminator (false: the connection closed mid-body).
struct Raw {
    head: String,
    body: String,
    terminated: bool,
}

/// Sends `raw` and reads one response, strictly: a chunked body must be well-formed up to
/// where it stops.
async fn one_response(addr: std::net::SocketAddr, raw: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if complete(&buf) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("the response ends");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Raw { head: head.into(), body: rest.into(), terminated: false };
    }
    let (body, terminated) = dechunk(rest);
    Raw { head: head.into(), body, terminated }
}

fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else { return false };
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return dechunk(rest).1;
    }
    match head.to_ascii_lowercase().split("content-length: ").nth(1) {
        Some(v) => rest.len() >= v.split("\r\n").next().unwrap().trim().parse().unwrap(),
        None => false,
    }
}

/// The payload of a chunked body and whether it ended with `0\r\n\r\n`. Panics on bad framing.
fn dechunk(mut rest: &str) -> (String, bool) {
    let mut body = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else { return (body, false) };
        let n =
            usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if n == 0 {
            return (body, after.starts_with("\r\n"));
        }
        if after.len() < n + 2 {
            return (body, false);
        }
        body.push_str(&after[..n]);
        assert_eq!(&after[n..n + 2], "\r\n", "chunk data ends with CRLF");
        rest = &after[n + 2..];
    }
}

/// A stream that ended early, checked: whole events, exactly one error event with `code`, then
/// `[DONE]` last, and the chunked terminator.
fn assert_ended_well(r: &Raw, code: u64) {
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    assert!(r.terminated, "the chunked body ends with its terminator: {:?}", r.body);
    assert!(r.body.ends_with("\n\n"), "whole events only: {:?}", r.body);
    let events: Vec<&str> = r
        .body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{:?}", r.body);
    let errors: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "one error event: {:?}", r.body);
    assert_eq!(errors[0]["error"]["code"], code, "{:?}", r.body);
    for e in &events[..events.len() - 1] {
        serde_json::from_str::<Value>(e).unwrap_or_else(|_| panic!("every event is JSON: {e:?}"));
    }
}

fn stream_bodies() -> [(&'static str, Value); 3] {
    [
        (
            "/generate",
            json!({"text": "a stalled stream", "stream": true, "sampling_params": {"max_new_tokens": 2000}}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "stall"}], "stream": true, "max_tokens": 2000}),
        ),
        ("/v1/completions", json!({"prompt": "stall here", "stream": true, "max_tokens": 2000})),
    ]
}

#[tokio::test]
async fn a_stream_cut_by_the_request_timeout_ends_well_formed_and_cancels_the_worker() {
    // Real-time speed and long answers: each request is still generating when it is cut.
    let w = sim(|a| {
        a.faults.stall_after_tokens = Some(2);
        a.speed = 1.0;
    })
    .await;
    let mut c = router_config("round_robin", &[&w]);
    c.server.request_timeout = Duration::from_millis(1500);
    c.server.stream_idle_timeout = Duration::from_secs(60);
    let r = router(c).await;
    for (i, (path, body)) in stream_bodies().into_iter().enumerate() {
        let resp = one_response(r.addr, &post(path, &body)).await;
        assert_ended_well(&resp, 504);
        assert!(resp.body.contains("request timeout"), "{}", resp.body);
        let want = i as u64 + 1;
        eventually(Duration::from_secs(5), "the worker's request is aborted", || async {
            stats(&w).await["aborted"].as_u64() == Some(want)
        })
        .await;
    }
    let v = &r.app.registry.snapshot().workers[0];
    assert_eq!(v.errors_total.load(SeqCst), 0, "a deadline is not the worker's failure");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_falls_silent_ends_with_a_worker_error_event() {
    let w = sim(|a| a.faults.stall_after_tokens = Some(3)).await;
    let mut c = router_config("round_robin", &[&w]);
    c.server.stream_idle_timeout = Duration::from_millis(500);
    let r = router(c).await;
    for (path, body) in stream_bodies() {
        let resp = one_response(r.addr, &post(path, &body)).await;
        assert_ended_well(&resp, 502);
        assert!(resp.body.contains("sent nothing for"), "{}", resp.body);
    }
    r.shutdown().await;
    w.shutdown().await;
}

/// A worker that answers every request with `pieces` (raw bytes, written 50 ms apart), then
/// closes (or, with `linger`, keeps the connection open); counts connections.
async fn raw_worker(pieces: &'static [&'static str], linger: bool) -> (String, Arc<AtomicUsize>) {
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
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    for (i, piece) in pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if s.write_all(piece.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    if !linger {
                        return;
                    }
                }
            });
        }
    });
    (url, conns)
}

fn raw_config(url: &str) -> routerd::config::Config {
    let flags = routerd::config::Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(vec![url.to_owned()]),
        disable_retries: true,
        ..Default::default()
    };
    let mut config = routerd::config::Config::build(None, &flags).unwrap();
    config.health.enabled = false;
    config.server.stream_idle_timeout = Duration::from_millis(500);
    config
}

const SSE: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nf\r\ndata: {\"a\":1}\n\n\r\n";

#[tokio::test]
async fn a_stream_broken_by_the_worker_ends_with_whole_events_and_an_error() {
    // Closed inside a chunk, after a partial event; a garbage chunk size; a partial event
    // followed by silence; a length-delimited stream closed inside an event.
    let cases: [(&'static [&'static str], bool); 4] = [
        (&[SSE, "20\r\ndata: {\"b\":"], false),
        (&[SSE, "zz\r\nnonsense"], true),
        (&[SSE, "6\r\ndata: \r\n"], true),
        (
            &["HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100\r\n\r\ndata: {\"a\":1}\n\n", "data: {\"b\""],
            false,
        ),
    ];
    for (i, (pieces, linger)) in cases.into_iter().enumerate() {
        let (url, _) = raw_worker(pieces, linger).await;
        let r = router(raw_config(&url)).await;
        let body = json!({"text": "x", "stream": true});
        let resp = one_response(r.addr, &post("/generate", &body)).await;
        assert_ended_well(&resp, 502);
        assert!(resp.body.starts_with("data: {\"a\":1}\n\n"), "case {i}: {}", resp.body);
        assert!(!resp.body.contains("\"b\""), "case {i}: the partial event is not relayed");
        r.shutdown().await;
    }
}

#[tokio::test]
async fn malformed_worker_answers_are_502_and_their_connections_are_not_reused() {
    let cases: [(&'static [&'static str], bool); 4] = [
        (&["HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n{}"], true),
        (&["HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}"], true),
        (&["HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-unterminated: head"], false),
        (
            &["HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n{}\r\n0\r\n\r\n"],
            true,
        ),
    ];
    for (i, (pieces, linger)) in cases.into_iter().enumerate() {
        let (url, conns) = raw_worker(pieces, linger).await;
        let r = router(raw_config(&url)).await;
        for n in 1..=2 {
            let resp = one_response(r.addr, &post("/generate", &json!({"text": "x"}))).await;
            assert!(resp.head.starts_with("HTTP/1.1 502"), "case {i}: {}", resp.head);
            let v: Value =
                serde_json::from_str(&resp.body).unwrap_or_else(|e| panic!("{e}: {}", resp.body));
            assert_eq!(v["error"]["code"], 502, "case {i}");
            assert_eq!(conns.load(SeqCst), n, "case {i}: a connection per request, none reused");
        }
        r.shutdown().await;
    }
}

#[tokio::test]
async fn a_plain_body_cut_short_is_cut_for_the_client_too() {
    const ANSWER: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"text\":";
    let (url, _) = raw_worker(&[ANSWER], false).await;
    let r = router(raw_config(&url)).await;
    let resp = one_response(r.addr, &post("/generate", &json!({"text": "x"}))).await;
    assert!(resp.head.starts_with("HTTP/1.1 200"), "{}", resp.head);
    assert!(resp.head.contains("content-length: 100"), "{}", resp.head);
    assert_eq!(resp.body, "{\"text\":", "the client sees the body end short of its length");
    r.shutdown().await;
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused_and_the_connection_closed() {
    let w = sim(|_| {}).await;
    let r = router(router_config("round_robin", &[&w])).await;
    let ok = String::from_utf8(post("/generate", &json!({"text": "x"}))).unwrap();
    let head = "POST /generate HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n";
    let cases: Vec<(String, u16)> = vec![
        (format!("{head}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
        (format!("{head}Content-Length: 4\r\nContent-Length: 5\r\n\r\n{{}}{{}}"), 400),
        (format!("{head}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"), 400),
        (format!("{head}X-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{{}}"), 400),
        (format!("{head}X-Nul: a\0b\r\nContent-Length: 2\r\n\r\n{{}}"), 400),
        (format!("{head}X-Cr: a\rb\r\nContent-Length: 2\r\n\r\n{{}}"), 400),
        (format!("{head}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"), 501),
        (
            format!(
                "{head}{}Content-Length: 2\r\n\r\n{{}}",
                format!("X-Big: {}\r\n", "a".repeat(2000)).repeat(50)
            ),
            431,
        ),
    ];
    for (raw, want) in cases {
        // A valid request pipelined behind the bad one must not be served.
        let mut s = TcpStream::connect(r.addr).await.unwrap();
        s.write_all(format!("{raw}{ok}").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the router closes the connection")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with(&format!("HTTP/1.1 {want} ")), "{raw:?} -> {out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "nothing more is served: {out}");
        assert!(out.contains("connection: close"), "{out}");
    }
    assert_eq!(stats(&w).await["requests"], 0, "no smuggled request reached the worker");
    r.shutdown().await;
    w.shutdown().await;
}

#[tokio::test]
async fn absolute_form_targets_are_served() {
    let w = sim(|_| {}).await;
    let r = router(router_config("round_robin", &[&w])).await;
    let raw = String::from_utf8(post("/generate", &json!({"text": "x"}))).unwrap().replacen(
        "POST /generate",
        &format!("POST http://{}/generate", r.addr),
        1,
    );
    let resp = one_response(r.addr, raw.as_bytes()).await;
    assert!(resp.head.starts_with("HTTP/1.1 200"), "{}", resp.head);
    assert!(resp.body.contains("meta_info"), "{}", resp.body);
    r.shutdown().await;
    w.shutdown().await;
}

//! OpenTelemetry traces end to end, into a small in-process OTLP collector (gRPC, as
//! sglang-router exports, and HTTP/protobuf): the span tree of a request (the client's
//! `traceparent` continued, a routing span and one span per worker attempt, retries and
//! mid-stream continuations included), the `traceparent` the worker gets, and a dead or stalled
//! collector costing requests nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message;
use routerd::config::{Config, Flags, TraceConfig, TraceProtocol};
use routerd_e2e::{client, eventually, post_stream, router, sim};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The spans a collector received, with their service names.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                all.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }

    fn of_trace(&self, trace_id: &[u8]) -> Vec<Span> {
        let all = self.0.lock().unwrap();
        all.iter().filter(|(_, s)| s.trace_id == trace_id).map(|(_, s)| s.clone()).collect()
    }

    fn all(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until what the collector received is `enough`.
    async fn wait(&self, what: &str, enough: impl Fn(&Self) -> bool) {
        eventually(Duration::from_secs(10), what, || {
            let done = enough(self);
            async move { done }
        })
        .await;
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on a loopback port: its `HOST:PORT` (sglang-router's form).
async fn grpc_collector(received: Received) -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let serving = tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(l);
        let _ = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received))
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, serving)
}

/// An OTLP/HTTP (protobuf) collector: its base URL (routerd adds `/v1/traces`).
async fn http_collector(received: Received) -> (String, tokio::task::JoinHandle<()>) {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                received.take(request);
                let answer = ExportTraceServiceResponse::default().encode_to_vec();
                ([("content-type", "application/x-protobuf")], answer)
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let serving = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (url, serving)
}

fn traced(urls: Vec<String>, endpoint: &str, protocol: &str) -> Config {
    let flags = Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(urls),
        enable_trace: true,
        otlp_traces_endpoint: Some(endpoint.to_owned()),
        otlp_traces_protocol: Some(protocol.to_owned()),
        ..Default::default()
    };
    let mut c = Config::build(None, &flags).expect("valid config");
    c.health.enabled = false;
    c.retry.initial_backoff = Duration::from_millis(5);
    let t = c.trace.as_mut().expect("traces on");
    t.schedule_delay = Duration::from_millis(50);
    c
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Any> {
    s.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()
}

fn int(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key)? {
        Any::IntValue(v) => Some(*v),
        _ => None,
    }
}

fn text<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
    match attr(s, key)? {
        Any::StringValue(v) => Some(v),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn errored(s: &Span) -> bool {
    s.status.as_ref().is_some_and(|st| st.code == StatusCode::Error as i32)
}

/// A worker that answers every request `{"text":"ok"}` and reports each request's head.
async fn recording_worker() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut n = 0;
                while let Ok(m) = s.read(&mut buf[n..]).await {
                    if m == 0 {
                        return;
                    }
                    n += m;
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let Some(end) = text.find("\r\n\r\n") else { continue };
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if n < end + 4 + len {
                        continue;
                    }
                    let _ = tx.send(text[..end].to_ascii_lowercase());
                    let body =
                        r#"{"text":"ok","meta_info":{"prompt_tokens":1,"completion_tokens":1}}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    n = 0;
                }
            });
        }
    });
    (url, rx)
}

/// A loopback address nothing listens on.
async fn dead_address() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[tokio::test]
async fn request_span_tree_over_grpc_with_a_retry_and_the_clients_trace() {
    let received = Received::default();
    let (collector, serving) = grpc_collector(received.clone()).await;
    let (good, mut heads) = recording_worker().await;
    // Round robin tries the dead worker first: the request is retried on the good one.
    let dead = format!("http://{}", dead_address().await);
    let r = router(traced(vec![dead.clone(), good.clone()], &collector, "grpc")).await;
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let resp = client()
        .post(format!("{}/generate", r.url()))
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .header("tracestate", "vendor=1")
        .json(&json!({"text": "hello", "sampling_params": {"max_new_tokens": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let head = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await.unwrap().unwrap();

    let trace_id = unhex(client_trace);
    received.wait("the request's spans exported", |r| r.of_trace(&trace_id).len() >= 5).await;
    let spans = received.of_trace(&trace_id);
    let root = spans.iter().find(|s| s.name == "POST /generate").expect("the request's span");
    assert_eq!(hex(&root.parent_span_id), client_span, "the client's span is the parent");
    assert_eq!(int(root, "http.response.status_code"), Some(200));
    assert_eq!(text(root, "routerd.worker"), Some(good.as_str()));
    assert!(!errored(root));
    let children: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == root.span_id).collect();
    let routes: Vec<&&Span> = children.iter().filter(|s| s.name == "route").collect();
    assert_eq!(routes.len(), 2, "one decision per attempt: {children:#?}");
    for r in &routes {
        assert_eq!(text(r, "routerd.policy"), Some("round_robin"));
        assert_eq!(text(r, "routerd.pool"), Some("regular"));
    }
    let mut attempts: Vec<&&Span> =
        children.iter().filter(|s| s.name == "regular attempt").collect();
    attempts.sort_by_key(|s| int(s, "routerd.attempt"));
    assert_eq!(attempts.len(), 2, "{children:#?}");
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(text(first, "routerd.worker"), Some(dead.as_str()));
    assert!(errored(first), "the refused connection is the first attempt's error");
    assert_eq!(attr(first, "routerd.retry"), Some(&Any::BoolValue(false)));
    assert_eq!(text(second, "routerd.worker"), Some(good.as_str()));
    assert_eq!(attr(second, "routerd.retry"), Some(&Any::BoolValue(true)));
    assert_eq!(int(second, "http.response.status_code"), Some(200));
    assert_eq!(text(second, "routerd.end"), Some("relayed"));
    assert!(second.events.iter().any(|e| e.name == "first_byte"));
    assert!(first.end_time_unix_nano <= second.start_time_unix_nano + 1_000_000);
    assert!(root.start_time_unix_nano <= first.start_time_unix_nano);
    assert!(root.end_time_unix_nano >= second.end_time_unix_nano);

    // The worker's parent is the attempt that reached it; the client's tracestate is passed.
    let expected = format!("traceparent: 00-{client_trace}-{}-01", hex(&second.span_id));
    assert!(head.contains(&expected), "{expected} in\n{head}");
    assert!(head.contains("tracestate: vendor=1"), "{head}");
    assert!(received.all().iter().all(|(svc, _)| svc == "routerd"));
    r.shutdown().await;
    serving.abort();
}

#[tokio::test]
async fn a_continued_stream_is_one_trace_over_http_protobuf() {
    let received = Received::default();
    let (collector, serving) = http_collector(received.clone()).await;
    let slow = |a: &mut routerctl::sim::SimArgs| {
        a.speed = 1.0;
        a.decode_ms_per_step = 5.0;
    };
    let victim = sim(|a| {
        slow(a);
        a.faults.error_after_tokens = Some(3);
    })
    .await;
    let spare = sim(slow).await;
    let r = router(traced(vec![victim.url(), spare.url()], &collector, "http/protobuf")).await;
    let body = json!({"text": "tell me", "stream": true, "sampling_params": {"max_new_tokens": 8}});
    let events = post_stream(format!("{}/generate", r.url()), &body).await;
    assert!(events.iter().all(|e| e.get("error").is_none()), "continued: {events:?}");

    let legs = |r: &Received| r.all().iter().filter(|(_, s)| s.name == "regular attempt").count();
    received.wait("a trace with both legs", |r| legs(r) >= 2).await;
    let all = received.all();
    let root = all.iter().map(|(_, s)| s).find(|s| s.name == "POST /generate").unwrap();
    assert!(root.parent_span_id.is_empty(), "no client trace: a new root");
    assert_eq!(int(root, "routerd.migrations"), Some(1));
    assert!(root.events.iter().any(|e| e.name == "first_event"), "a stream's first event");
    let spans = received.of_trace(&root.trace_id);
    let legs: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "regular attempt" && s.parent_span_id == root.span_id)
        .collect();
    assert_eq!(legs.len(), 2);
    let cut = legs.iter().find(|s| text(s, "routerd.worker") == Some(&victim.url())).unwrap();
    let went_on = legs.iter().find(|s| text(s, "routerd.worker") == Some(&spare.url())).unwrap();
    assert!(errored(cut), "the failed leg's span says so");
    assert_eq!(int(went_on, "routerd.migration"), Some(1));
    assert_eq!(text(went_on, "routerd.end"), Some("relayed"));
    let continued_route = spans
        .iter()
        .find(|s| s.name == "route" && int(s, "routerd.migration") == Some(1))
        .expect("the continuation's decision");
    assert_eq!(continued_route.parent_span_id, root.span_id);
    r.shutdown().await;
    serving.abort();
    victim.shutdown().await;
    spare.shutdown().await;
}

#[tokio::test]
async fn a_dead_or_stalled_collector_costs_requests_nothing() {
    let (good, _heads) = recording_worker().await;
    // Refused: every export fails at once, and is counted.
    let refused = dead_address().await;
    let mut config = traced(vec![good.clone()], &refused, "grpc");
    config.trace.as_mut().unwrap().max_queue_size = 64;
    let r = router(config).await;
    let metrics = routerd_e2e::serve_metrics(&r).await;
    for _ in 0..100 {
        let (s, _) =
            routerd_e2e::post_json(format!("{}/generate", r.url()), &json!({"text": "x"})).await;
        assert_eq!(s, 200);
    }
    eventually(Duration::from_secs(20), "failed exports counted", || {
        let url = metrics.clone();
        async move {
            let text = client().get(&url).send().await.unwrap().text().await.unwrap();
            text.lines().any(|l| l.starts_with(r#"routerd_trace_spans_total{outcome="failed"}"#))
        }
    })
    .await;
    r.shutdown().await;

    // Stalled: the collector accepts connections and never answers. Requests go on, and
    // shutdown still ends (the last export is given up after its timeout).
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled = stall.local_addr().unwrap().to_string();
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            held.push(s);
        }
    });
    for protocol in ["grpc", "http/protobuf"] {
        let mut config = traced(vec![good.clone()], &stalled, protocol);
        config.trace.as_mut().unwrap().max_queue_size = 16;
        let r = router(config).await;
        for _ in 0..100 {
            let (s, _) =
                routerd_e2e::post_json(format!("{}/generate", r.url()), &json!({"text": "x"}))
                    .await;
            assert_eq!(s, 200, "{protocol}");
        }
        tokio::time::timeout(Duration::from_secs(30), r.shutdown())
            .await
            .unwrap_or_else(|_| panic!("shutdown waits on a stalled {protocol} collector"));
    }
    holding.abort();
}

#[test]
fn trace_flags_map_into_the_config_and_bad_endpoints_are_named() {
    let flags = Flags {
        enable_trace: true,
        otlp_traces_endpoint: Some("otel-collector:4317".into()),
        ..Default::default()
    };
    let c = Config::build(None, &flags).unwrap();
    let t: &TraceConfig = c.trace.as_ref().unwrap();
    assert_eq!(t.endpoint, "http://otel-collector:4317");
    assert_eq!(t.protocol, TraceProtocol::Grpc);
    assert_eq!(t.service_name, "routerd");
    let off = Flags { otlp_traces_endpoint: Some("x:1".into()), ..Default::default() };
    assert!(Config::build(None, &off).unwrap().trace.is_none(), "off without --enable-trace");
    let bad = Flags {
        enable_trace: true,
        otlp_traces_endpoint: Some("collector".into()),
        ..Default::default()
    };
    let e = Config::build(None, &bad).unwrap_err().to_string();
    assert!(e.contains("--otlp-traces-endpoint") && e.contains("no port"), "{e}");
}

#[tokio::test]
async fn a_pd_request_has_a_span_per_leg() {
    use routerctl::sim::Role;
    let received = Received::default();
    let (collector, serving) = grpc_collector(received.clone()).await;
    let leg = |role| {
        move |a: &mut routerctl::sim::SimArgs| {
            a.role = role;
            a.bootstrap_timeout_secs = 10.0;
        }
    };
    let (p, d) = (sim(leg(Role::Prefill)).await, sim(leg(Role::Decode)).await);
    let flags = Flags {
        pd_disaggregation: true,
        policy: Some("round_robin".into()),
        prefill: vec![p.url(), p.bootstrap_addr.unwrap().port().to_string()],
        decode: vec![d.url()],
        enable_trace: true,
        otlp_traces_endpoint: Some(collector),
        ..Default::default()
    };
    let mut c = Config::build(None, &flags).unwrap();
    c.trace.as_mut().unwrap().schedule_delay = Duration::from_millis(50);
    let r = router(c).await;
    let (s, _) = routerd_e2e::post_json(
        format!("{}/generate", r.url()),
        &json!({"text": "pd", "sampling_params": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(s, 200);
    received.wait("the PD request's spans", |r| r.all().len() >= 5).await;
    let all: Vec<Span> = received.all().into_iter().map(|(_, s)| s).collect();
    let root = all.iter().find(|s| s.name == "POST /generate").unwrap();
    let child = |name: &str| {
        all.iter()
            .filter(|s| s.parent_span_id == root.span_id && s.name == name)
            .collect::<Vec<_>>()
    };
    let mut pools: Vec<_> = child("route").iter().filter_map(|s| text(s, "routerd.pool")).collect();
    pools.sort();
    assert_eq!(pools, ["decode", "prefill"]);
    let (pa, da) = (child("prefill attempt"), child("decode attempt"));
    assert_eq!((pa.len(), da.len()), (1, 1));
    assert_eq!(text(pa[0], "routerd.worker"), Some(p.url().as_str()));
    assert_eq!(text(da[0], "routerd.worker"), Some(d.url().as_str()));
    assert_eq!(int(pa[0], "http.response.status_code"), Some(200));
    assert_eq!(text(da[0], "routerd.end"), Some("relayed"));
    r.shutdown().await;
    serving.abort();
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn an_unsampled_client_trace_is_passed_on_and_not_recorded() {
    let received = Received::default();
    let (collector, serving) = grpc_collector(received.clone()).await;
    let (good, mut heads) = recording_worker().await;
    let r = router(traced(vec![good], &collector, "grpc")).await;
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let sampled = "1bf7651916cd43dd8448eb211c80319d";
    for (trace, flags) in [(unsampled, "00"), (sampled, "01")] {
        let resp = client()
            .post(format!("{}/generate", r.url()))
            .header("traceparent", format!("00-{trace}-b7ad6b7169203331-{flags}"))
            .json(&json!({"text": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let head = heads.recv().await.unwrap();
        let passed = head.lines().find_map(|l| l.strip_prefix("traceparent: ")).unwrap();
        assert!(passed.starts_with(&format!("00-{trace}-")), "{passed}");
        assert!(passed.ends_with(&format!("-{flags}")), "the decision is passed on: {passed}");
        assert!(!passed.contains("b7ad6b7169203331"), "the worker's parent is routerd's span");
    }
    received.wait("the sampled trace exported", |r| r.of_trace(&unhex(sampled)).len() >= 3).await;
    r.shutdown().await;
    assert!(received.of_trace(&unhex(unsampled)).is_empty(), "the client said not to record");
    serving.abort();
}

#[tokio::test]
async fn a_request_no_worker_can_take_is_one_error_span() {
    let received = Received::default();
    let (collector, serving) = grpc_collector(received.clone()).await;
    let r = router(traced(vec![], &collector, "grpc")).await;
    let (s, _) =
        routerd_e2e::post_json(format!("{}/v1/completions", r.url()), &json!({"prompt": "x"}))
            .await;
    assert_eq!(s, 503);
    received.wait("the refused request's span", |r| !r.all().is_empty()).await;
    r.shutdown().await;
    let all = received.all();
    assert_eq!(all.len(), 1, "no decision, no attempt: {all:#?}");
    let root = &all[0].1;
    assert_eq!(root.name, "POST /v1/completions");
    assert_eq!(int(root, "http.response.status_code"), Some(503));
    assert!(errored(root));
    serving.abort();
}

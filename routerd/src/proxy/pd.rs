//! The prefill-decode request path. Each request goes to a prefill worker (chosen by the
//! prefill pool's policy on the prompt: its placement decides the cache hits) and a decode
//! worker at once, with `bootstrap_host`, `bootstrap_port` and a fresh random `bootstrap_room`
//! (one per item of a batch) appended to the body, so both legs meet on the same room. The
//! client gets the decode leg's answer; with `return_logprob`, the prefill leg's input-token
//! logprobs are put in front of the decode leg's. If either leg fails, the other is cancelled
//! at once (its connection dropped) and, before any byte reached the client, the request is
//! tried again with a new pair and a new room.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::extract::{Probe, Route};
use super::migrate::{self, Failed, Leg};
use super::relay;
use super::{failed, pick, retry, send, upstream, usage, write_request, Ask, Served, Stop};
use crate::app::{App, Live, PoolPolicies};
use crate::decisions::DECISION_HEADER;
use crate::error::RouterError;
use crate::http1::head::Head;
use crate::http1::worker::WorkerResponse;
use crate::http1::{respond, ClientSession};
use crate::otel::Attempt;
use crate::registry::{Worker, WorkerRole};

/// Largest prefill answer read (it carries the prompt's logprobs at most).
const PREFILL_LIMIT: usize = 64 << 20;

/// One PD request, after admission. `text` is the routing text.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dispatch(
    app: &App,
    live: &Live,
    pools: &PoolPolicies,
    c: &mut ClientSession,
    head: &Head,
    body: &Bytes,
    probe: &Probe<'_>,
    ask: &Ask<'_>,
    rid: (&HeaderName, &HeaderValue),
    keep: bool,
    mut plan: migrate::Plan,
) -> Result<Served, Stop> {
    let route = ask.route;
    let cfg = &live.config;
    let retry = &cfg.retry;
    let attempts = if retry.enabled { retry.max_retries + 1 } else { 1 };
    app.retry_budget.deposit(retry);
    let deadline = Instant::now() + cfg.server.request_timeout;
    let timeouts = (cfg.server.connect_timeout, cfg.server.header_timeout);
    let batch = probe.batch_size(route);
    let merge = route == Route::Generate && probe.wants_logprob();
    let first_body = plan.first_body(body);
    let mut avoid: Vec<Arc<Worker>> = Vec::new();
    let mut attempt = 0;
    loop {
        let p = pick_in(app, WorkerRole::Prefill, &*pools.prefill, ask, &avoid)?;
        // The prefill worker's cache is the one the prompt hits (a batch is not accounted).
        let accounting = p.accounting.filter(|_| batch.is_none());
        let (prefill, p_why) = (p.worker, p.header);
        let d = pick_in(app, WorkerRole::Decode, &*pools.decode, ask, &avoid)?;
        let (decode, d_why) = (d.worker, d.header);
        let (pg, dg) = (prefill.start_request(), decode.start_request());
        let with_room = bootstrap(&first_body, &prefill, batch);
        let (mut req_p, mut req_d) = (Vec::new(), Vec::new());
        let (sp, sd) = spans(ask, &prefill, &decode, attempt);
        let (tp, td) = (sp.traceparent(), sd.traceparent());
        write_request(&mut req_p, &prefill, route.path(), &head.headers, rid, tp, &with_room);
        write_request(&mut req_d, &decode, route.path(), &head.headers, rid, td, &with_room);
        let legs = both(app, &prefill, &decode, &req_p, &req_d, c, timeouts, deadline).await;
        legs.trace(&sp, &sd);
        drop(sp);
        attempt += 1;
        let (failed_leg, failure, answered) = match legs {
            Legs::ClientGone => return Err(Stop::Closed),
            Legs::Ok(fetched, answer) => {
                prefill.breaker.record_success(&cfg.circuit_breaker);
                decode.breaker.record_success(&cfg.circuit_breaker);
                let why = explain(p_why.as_deref(), d_why.as_deref());
                let mut extra: Vec<(&[u8], &[u8])> = vec![
                    (rid.0.as_str().as_bytes(), rid.1.as_bytes()),
                    (upstream::WORKER_HEADER_NAME.as_bytes(), decode.url().as_bytes()),
                    (b"x-routerd-prefill-worker", prefill.url().as_bytes()),
                ];
                if let Some(why) = &why {
                    extra.push((DECISION_HEADER.as_bytes(), why.as_bytes()));
                }
                let status = answer.head().status();
                let limits = relay::BodyTimeouts { deadline, idle: cfg.server.stream_idle_timeout };
                let scan = usage::UsageScan::new(prefill.clone(), probe.stream.unwrap_or(false))
                    .with_accounting(accounting);
                let prefix = if merge { prefill_logprobs(&fetched.body) } else { None };
                let events = answer.head().is_event_stream();
                if let Some(resume) = plan.take_for(status, events) {
                    let r = migrate::Request { app, live, head, body, ask, rid, deadline, keep };
                    let guards = vec![pg, dg];
                    let worker = decode.clone();
                    let usage = Some(scan);
                    let leg = migrate::Leg { answer, worker, guards, usage, span: sd };
                    return Ok(migrate::relay(&r, c, leg, &extra, resume).await);
                }
                let v = head.version;
                let done = match prefix {
                    Some(prefix) => {
                        let edit = move |event: &mut Value| prepend_logprobs(event, &prefix);
                        relay::respond_edited(answer, &decode, c, v, keep, &extra, limits, edit)
                            .await
                    }
                    None => {
                        relay::respond(answer, &decode, c, v, keep, &extra, Some(scan), limits)
                            .await
                    }
                };
                sd.relayed(&done);
                if let Some(failure) = &done.worker_failure {
                    decode.errors_total.fetch_add(1, Relaxed);
                    failed(app, &decode, &cfg.circuit_breaker);
                    decode.set_last_error(failure);
                    if events {
                        app.metrics.migration(plan.why_not());
                    }
                }
                return Ok(Served::relayed(done, status, &decode));
            }
            Legs::PrefillAnswered(f) if !retry::retryable_status(f.status) => {
                // The prefill worker refused the request itself (400, 422...): the client's
                // answer, with the decode leg already cancelled.
                prefill.breaker.record_success(&cfg.circuit_breaker);
                return Ok(relay_fetched(c, f, head, rid, keep, &prefill).await);
            }
            Legs::DecodeAnswered(answer) if !retry::retryable_status(answer.head().status()) => {
                decode.breaker.record_success(&cfg.circuit_breaker);
                let extra: [(&[u8], &[u8]); 2] = [
                    (rid.0.as_str().as_bytes(), rid.1.as_bytes()),
                    (upstream::WORKER_HEADER_NAME.as_bytes(), decode.url().as_bytes()),
                ];
                let limits = relay::BodyTimeouts { deadline, idle: cfg.server.stream_idle_timeout };
                let v = head.version;
                let status = answer.head().status();
                let done = relay::respond(answer, &decode, c, v, keep, &extra, None, limits).await;
                return Ok(Served::relayed(done, status, &decode));
            }
            Legs::PrefillAnswered(f) => {
                let reason = format!("prefill leg answered {}: {}", f.status, excerpt(&f.body));
                let e = RouterError::WorkerFailed { worker: prefill.url().into(), reason };
                (prefill.clone(), e, Some(Answered::Prefill(f)))
            }
            Legs::DecodeAnswered(a) => {
                let reason = format!("decode leg answered {}", a.head().status());
                let e = RouterError::WorkerFailed { worker: decode.url().into(), reason };
                (decode.clone(), e, Some(Answered::Decode(a)))
            }
            Legs::PrefillFailed(e) => (prefill.clone(), e, None),
            Legs::DecodeFailed(e) => (decode.clone(), e, None),
        };
        failed_leg.errors_total.fetch_add(1, Relaxed);
        app.metrics.pd_leg_failed(failed_leg.spec.role);
        failed(app, &failed_leg, &cfg.circuit_breaker);
        failed_leg.set_last_error(&failure);
        let may_retry = failure.retryable()
            && attempt < attempts
            && Instant::now() < deadline
            && app.retry_budget.withdraw(retry);
        if !may_retry {
            // The worker's own answer when it sent one (as on the regular path), else ours.
            return match answered {
                Some(Answered::Prefill(f)) => {
                    Ok(relay_fetched(c, f, head, rid, keep, &prefill).await)
                }
                Some(Answered::Decode(a)) => {
                    let extra: [(&[u8], &[u8]); 2] = [
                        (rid.0.as_str().as_bytes(), rid.1.as_bytes()),
                        (upstream::WORKER_HEADER_NAME.as_bytes(), decode.url().as_bytes()),
                    ];
                    let limits =
                        relay::BodyTimeouts { deadline, idle: cfg.server.stream_idle_timeout };
                    let v = head.version;
                    let status = a.head().status();
                    let done = relay::respond(a, &decode, c, v, keep, &extra, None, limits).await;
                    Ok(Served::relayed(done, status, &decode))
                }
                None => Err(Stop::Failed(failure)),
            };
        }
        tracing::debug!(worker = failed_leg.url(), error = %failure, attempt, "PD retry with a new pair");
        failed_leg.retries_total.fetch_add(1, Relaxed);
        app.metrics.retried();
        avoid.push(failed_leg);
        tokio::select! {
            _ = tokio::time::sleep(retry::backoff(retry, attempt)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// One attempt at a PD stream's continuation: a new prefill + decode pair (the decode worker
/// that failed and any worker tried meanwhile avoided), with a new room.
pub(super) async fn continuation(
    r: &migrate::Request<'_>,
    pools: &PoolPolicies,
    c: &mut ClientSession,
    ask: &Ask<'_>,
    body: &[u8],
    avoid: &mut Vec<Arc<Worker>>,
    attempt: u32,
) -> Result<Leg, Failed> {
    let cfg = &r.live.config;
    let no_worker = |_| Failed::Outcome("no_worker", "no PD pair is routable".into());
    let prefill =
        pick_in(r.app, WorkerRole::Prefill, &*pools.prefill, ask, avoid).map_err(no_worker)?.worker;
    let decode =
        pick_in(r.app, WorkerRole::Decode, &*pools.decode, ask, avoid).map_err(no_worker)?.worker;
    let guards = vec![prefill.start_request(), decode.start_request()];
    let with_room = bootstrap(body, &prefill, None);
    let (mut req_p, mut req_d) = (Vec::new(), Vec::new());
    let path = ask.route.path();
    let (sp, sd) = spans(ask, &prefill, &decode, attempt);
    let (tp, td) = (sp.traceparent(), sd.traceparent());
    write_request(&mut req_p, &prefill, path, &r.head.headers, r.rid, tp, &with_room);
    write_request(&mut req_d, &decode, path, &r.head.headers, r.rid, td, &with_room);
    let timeouts = (cfg.server.connect_timeout, cfg.server.header_timeout);
    let legs = both(r.app, &prefill, &decode, &req_p, &req_d, c, timeouts, r.deadline).await;
    legs.trace(&sp, &sd);
    drop(sp);
    let (leg, why) = match legs {
        Legs::Ok(_, answer) => {
            prefill.breaker.record_success(&cfg.circuit_breaker);
            let (usage, breaker) = (prefill.clone(), &cfg.circuit_breaker);
            return migrate::accept(r.app, answer, decode, guards, usage, sd, breaker);
        }
        Legs::ClientGone => return Err(Failed::ClientGone),
        Legs::PrefillFailed(e) => (prefill, e.to_string()),
        Legs::DecodeFailed(e) => (decode, e.to_string()),
        Legs::PrefillAnswered(f) => (prefill, format!("prefill leg answered {}", f.status)),
        Legs::DecodeAnswered(a) => (decode, format!("decode leg answered {}", a.head().status())),
    };
    leg.errors_total.fetch_add(1, Relaxed);
    r.app.metrics.pd_leg_failed(leg.spec.role);
    failed(r.app, &leg, &cfg.circuit_breaker);
    leg.set_last_error(&why);
    avoid.push(leg);
    Err(Failed::Outcome("failed", why))
}

enum Answered {
    Prefill(relay::Fetched),
    Decode(WorkerResponse),
}

/// A prefill leg's answer (read whole) as the client's response.
async fn relay_fetched(
    c: &mut ClientSession,
    f: relay::Fetched,
    head: &Head,
    rid: (&HeaderName, &HeaderValue),
    keep: bool,
    prefill: &Arc<Worker>,
) -> Served {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, f.body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(rid.0.clone(), rid.1.clone());
    let keep = respond::write(c, resp, head.version, keep, false).await;
    let worker = Some(prefill.clone());
    Served { keep, status: status.as_u16(), worker, first_event: None, migrations: 0, seam: None }
}

/// Both legs' decision records in one header value.
fn explain(prefill: Option<&str>, decode: Option<&str>) -> Option<String> {
    Some(format!(r#"{{"prefill":{},"decode":{}}}"#, prefill?, decode?))
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// The pool policy's choice among the workers of `role` not to avoid (all of them again when
/// every one was tried); 503 naming the pool when it is empty.
fn pick_in(
    app: &App,
    role: WorkerRole,
    policy: &dyn crate::policy::Policy,
    ask: &Ask<'_>,
    avoid: &[Arc<Worker>],
) -> Result<super::Picked, Stop> {
    let name = if role == WorkerRole::Prefill { "prefill" } else { "decode" };
    // The decode pool's decision is made on the prompt as its own tokenizer makes it.
    let decode = Ask { tokens: ask.decode_tokens, ..*ask };
    let ask = if role == WorkerRole::Decode { &decode } else { ask };
    let pool = app.registry.load().pool(role);
    pick(app, name, &pool, policy, ask, avoid)
        .or_else(|| pick(app, name, &pool, policy, ask, &[]))
        .ok_or(Stop::Failed(RouterError::NoPoolWorkers(name)))
}

enum Legs {
    Ok(relay::Fetched, WorkerResponse),
    PrefillFailed(RouterError),
    DecodeFailed(RouterError),
    PrefillAnswered(relay::Fetched),
    DecodeAnswered(WorkerResponse),
    ClientGone,
}

impl Legs {
    /// What each leg's trace span records of how the pair's attempt went.
    fn trace(&self, prefill: &Attempt, decode: &Attempt) {
        match self {
            Legs::Ok(f, a) => {
                prefill.answered(f.status);
                decode.answered(a.head().status());
            }
            Legs::PrefillFailed(e) => prefill.failed(e),
            Legs::DecodeFailed(e) => decode.failed(e),
            Legs::PrefillAnswered(f) => prefill.answered(f.status),
            Legs::DecodeAnswered(a) => decode.answered(a.head().status()),
            Legs::ClientGone => decode.ended("client_gone"),
        }
    }
}

/// The trace spans of a pair's attempt: one per leg.
fn spans(ask: &Ask<'_>, prefill: &Worker, decode: &Worker, attempt: u32) -> (Attempt, Attempt) {
    (
        ask.trace.attempt(prefill, attempt, ask.migration),
        ask.trace.attempt(decode, attempt, ask.migration),
    )
}

/// Runs both legs at once. The first failure wins and drops the other leg (which cancels it on
/// its worker); success needs the prefill leg's whole answer and the decode leg's head.
#[allow(clippy::too_many_arguments)]
async fn both(
    _app: &App,
    prefill: &Worker,
    decode: &Worker,
    req_p: &[u8],
    req_d: &[u8],
    c: &mut ClientSession,
    timeouts: (std::time::Duration, std::time::Duration),
    deadline: Instant,
) -> Legs {
    let p = relay::fetch(prefill, req_p, timeouts, deadline, PREFILL_LIMIT);
    let d = send(decode, req_d, Some(c), timeouts, deadline);
    tokio::pin!(p, d);
    let (mut p_done, mut d_done) = (None, None);
    loop {
        tokio::select! {
            r = &mut p, if p_done.is_none() => match r {
                Ok(f) if f.status < 400 => p_done = Some(f),
                Ok(f) => return Legs::PrefillAnswered(f),
                Err(e) => return Legs::PrefillFailed(e),
            },
            r = &mut d, if d_done.is_none() => match r {
                Ok(a) if a.head().status() < 400 => d_done = Some(a),
                Ok(a) => return Legs::DecodeAnswered(a),
                Err(Stop::Closed) => return Legs::ClientGone,
                Err(Stop::Failed(e)) => return Legs::DecodeFailed(e),
            },
        }
        if p_done.is_some() && d_done.is_some() {
            let (Some(f), Some(a)) = (p_done.take(), d_done.take()) else { unreachable!() };
            return Legs::Ok(f, a);
        }
    }
}

/// The body with the bootstrap fields appended (last keys win in JSON decoders, so a client's
/// own bootstrap fields cannot override them). One fresh room per item of a batch.
fn bootstrap(body: &[u8], prefill: &Worker, batch: Option<usize>) -> Vec<u8> {
    let host = prefill.authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = prefill.spec.bootstrap_port;
    let room = || rand::random::<u64>() & (i64::MAX as u64);
    let (h, p, r) = match batch {
        None => (Value::from(host), Value::from(port), Value::from(room())),
        Some(n) => (
            Value::from(vec![host; n]),
            Value::from(vec![port; n]),
            Value::from((0..n).map(|_| room()).collect::<Vec<_>>()),
        ),
    };
    let fields = format!(r#""bootstrap_host":{h},"bootstrap_port":{p},"bootstrap_room":{r}"#);
    super::extract::append_fields(body, &fields)
}

/// A prefill answer's input-token logprobs: one list, or one per item of a batch.
#[derive(Debug, Clone, PartialEq)]
enum Prefix {
    One(Vec<Value>),
    Batch(Vec<Option<Vec<Value>>>),
}

fn logprobs_of(v: &Value) -> Option<Vec<Value>> {
    v.pointer("/meta_info/input_token_logprobs").and_then(Value::as_array).cloned()
}

/// The prefill answer's `meta_info.input_token_logprobs`, from a JSON answer or the last
/// event of a stream that carries them.
fn prefill_logprobs(body: &[u8]) -> Option<Prefix> {
    let of = |v: &Value| match v {
        Value::Array(items) => Some(Prefix::Batch(items.iter().map(logprobs_of).collect())),
        v => logprobs_of(v).map(Prefix::One),
    };
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return of(&v);
    }
    let text = std::str::from_utf8(body).ok()?;
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .filter_map(|v| of(&v))
        .last()
}

/// Puts the prefill leg's input-token logprobs in front of the decode leg's, in one answer or
/// one stream event (a batch item by item: by position in answers, by `index` in events).
fn prepend_logprobs(event: &mut Value, prefix: &Prefix) {
    fn one(item: &mut Value, pre: &[Value]) {
        let Some(meta) = item.get_mut("meta_info").and_then(Value::as_object_mut) else { return };
        let mut merged = pre.to_vec();
        if let Some(Value::Array(own)) = meta.get("input_token_logprobs") {
            merged.extend(own.iter().cloned());
        }
        meta.insert("input_token_logprobs".into(), Value::Array(merged));
    }
    match (event, prefix) {
        (event, Prefix::One(pre)) => one(event, pre),
        (Value::Array(items), Prefix::Batch(pre)) => {
            for (item, p) in items.iter_mut().zip(pre) {
                if let Some(p) = p {
                    one(item, p);
                }
            }
        }
        (event, Prefix::Batch(pre)) => {
            let i = event.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if let Some(Some(p)) = pre.get(i) {
                one(event, p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{WorkerSource, WorkerSpec};
    use serde_json::json;

    fn prefill(port: Option<u16>) -> Worker {
        Worker::new(WorkerSpec {
            url: "http://10.0.0.9:30000".into(),
            role: WorkerRole::Prefill,
            bootstrap_port: port,
            api_key: None,
            source: WorkerSource::Config,
            tls: Default::default(),
        })
    }

    #[test]
    fn bootstrap_fields_are_appended_single_and_batched() {
        let one: Value =
            serde_json::from_slice(&bootstrap(br#"{"text": "hi"} "#, &prefill(Some(8998)), None))
                .unwrap();
        assert_eq!(
            (one["bootstrap_host"].as_str(), one["bootstrap_port"].as_u64()),
            (Some("10.0.0.9"), Some(8998))
        );
        assert!(one["bootstrap_room"].as_u64().unwrap() <= i64::MAX as u64);
        assert_eq!(one["text"], "hi");
        let many: Value =
            serde_json::from_slice(&bootstrap(br#"{"text": ["a", "b"]}"#, &prefill(None), Some(2)))
                .unwrap();
        assert_eq!(many["bootstrap_port"], json!([null, null]));
        let rooms = many["bootstrap_room"].as_array().unwrap();
        assert_eq!(rooms.len(), 2);
        assert_ne!(rooms[0], rooms[1], "one room per item");
        let empty: Value =
            serde_json::from_slice(&bootstrap(b"{ }", &prefill(None), None)).unwrap();
        assert!(empty["bootstrap_room"].is_u64());
        let theirs = br#"{"text": "x", "bootstrap_room": 1}"#;
        let v: Value = serde_json::from_slice(&bootstrap(theirs, &prefill(None), None)).unwrap();
        assert_ne!(v["bootstrap_room"], 1, "ours come last and win");
    }

    #[test]
    fn logprobs_merge_in_answers_batches_and_streams() {
        let p = br#"{"meta_info": {"input_token_logprobs": [[-1.0, 1, null], [-2.0, 2, null]]}}"#;
        let prefix = prefill_logprobs(p).unwrap();
        let mut d = json!({"meta_info": {"input_token_logprobs": [], "completion_tokens": 3}});
        prepend_logprobs(&mut d, &prefix);
        assert_eq!(d["meta_info"]["input_token_logprobs"].as_array().unwrap().len(), 2);

        let pb = br#"[{"meta_info": {"input_token_logprobs": [[-1.0, 1, null]]}}, {"meta_info": {"input_token_logprobs": [[-3.0, 3, null], [-4.0, 4, null]]}}]"#;
        let prefix = prefill_logprobs(pb).unwrap();
        let mut db = json!([{"meta_info": {}}, {"meta_info": {"input_token_logprobs": []}}]);
        prepend_logprobs(&mut db, &prefix);
        assert_eq!(db[0]["meta_info"]["input_token_logprobs"].as_array().unwrap().len(), 1);
        assert_eq!(db[1]["meta_info"]["input_token_logprobs"].as_array().unwrap().len(), 2);
        let mut event = json!({"index": 1, "meta_info": {"input_token_logprobs": []}});
        prepend_logprobs(&mut event, &prefix);
        assert_eq!(event["meta_info"]["input_token_logprobs"].as_array().unwrap().len(), 2);

        let stream = b"data: {\"meta_info\": {\"input_token_logprobs\": [[-5.0, 5, null]]}}\n\ndata: [DONE]\n\n";
        assert_eq!(prefill_logprobs(stream), Some(Prefix::One(vec![json!([-5.0, 5, null])])));
    }
}

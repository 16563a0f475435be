//! The inference request path: admission, routing text, policy choice, in-flight accounting
//! and the upstream call, for `/generate`, `/v1/completions`, `/v1/chat/completions` and
//! `/v1/embeddings`.

pub mod extract;
pub mod migrate;
pub mod pd;
pub mod relay;

pub mod retry;
pub mod upstream;
pub mod usage;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use bytes::Bytes;
use tokio::time::Instant;

use crate::app::{App, Live};
use crate::config::Config;
use crate::decisions::{Record, DECISION_HEADER, EXPLAIN_HEADER};
use crate::error::RouterError;
use crate::http1::head::Head;
use crate::http1::worker::{exchange, RequestWriter, WireError, WorkerResponse};
use crate::http1::{respond, ClientSession};
use crate::otel::RequestSpan;
use crate::policy::{Policy, RequestInfo};
use crate::registry::{Worker, WorkerRole};
pub use extract::Route;

/// The client's sticky-routing key for the `manual` policy, as sgl-router 0.3 names it.
pub const ROUTING_KEY_HEADER: &str = "x-smg-routing-key";

/// Why a request ended without a relayed answer.
#[derive(Debug)]
pub enum Stop {
    /// Nothing was sent to the client yet: answer with this error.
    Failed(RouterError),
    /// The client went away.
    Closed,
}

/// Sends `request` to `worker` and waits for its answer's head (the client watched, if given).
pub(crate) async fn send(
    worker: &Worker,
    request: &[u8],
    client: Option<&mut ClientSession>,
    (connect, header): (std::time::Duration, std::time::Duration),
    deadline: Instant,
) -> Result<WorkerResponse, Stop> {
    let head_deadline = deadline.min(Instant::now() + header);
    exchange(worker.target(), request, client, connect, head_deadline).await.map_err(|e| match e {
        WireError::ClientGone => Stop::Closed,
        e => Stop::Failed(worker.wire_error(e, header)),
    })
}

/// The request id: the first configured header the client sent, else a new one under the first
/// configured name.
pub fn request_id(config: &Config, headers: &HeaderMap) -> (HeaderName, HeaderValue) {
    let names = &config.server.request_id_headers;
    for name in names {
        if let Some(v) = headers.get(name) {
            return (name.clone(), v.clone());
        }
    }
    let name = names.first().cloned().unwrap_or(HeaderName::from_static("x-request-id"));
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    (name, HeaderValue::from_bytes(&id).expect("hex is a valid header value"))
}

/// How a request was served, for the access log and metrics.
pub struct Served {
    /// Whether the client connection can serve another request.
    pub keep: bool,
    /// The status sent (499: the client went away before an answer).
    pub status: u16,
    pub worker: Option<Arc<Worker>>,
    /// For event streams: when the first event reached the client.
    pub first_event: Option<Instant>,
    /// Times the stream went on with another worker after its worker failed mid-way.
    pub migrations: u32,
    /// The last such seam: from the failure noticed to the continuation's first event sent.
    pub seam: Option<std::time::Duration>,
}

impl Served {
    fn relayed(r: relay::Relayed, status: u16, worker: &Arc<Worker>) -> Self {
        let status = r.replaced_status.unwrap_or(status);
        let (keep, first_event) = (r.keep, r.first_event);
        let worker = Some(worker.clone());
        Self { keep, status, worker, first_event, migrations: 0, seam: None }
    }

    fn unanswered(keep: bool, status: u16) -> Self {
        Self { keep, status, worker: None, first_event: None, migrations: 0, seam: None }
    }
}

/// Serves one inference request read from `c`; returns whether the connection stays open.
pub async fn forward(
    app: &App,
    live: &Live,
    c: &mut ClientSession,
    route: Route,
    head: &Head,
    body: Bytes,
    keep: bool,
) -> bool {
    let started = Instant::now();
    let (rid_name, rid) = request_id(&live.config, &head.headers);
    let trace = match &app.otel {
        Some(o) => o.request(route, &head.headers),
        None => RequestSpan::default(),
    };
    let rid_pair = (&rid_name, &rid);
    let served = match dispatch(app, live, c, route, head, body, rid_pair, keep, &trace).await {
        Ok(served) => served,
        Err(Stop::Closed) => Served::unanswered(false, 499),
        Err(Stop::Failed(e)) => {
            let status = e.status().as_u16();
            tracing::debug!(route = route.path(), error = %e, "request failed");
            let retry_after = no_workers_retry_after(app, &live.config, &e);
            let mut resp = e.into_response();
            resp.headers_mut().insert(rid_name.clone(), rid.clone());
            if let Some(secs) = retry_after {
                resp.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
            }
            let keep = respond::write(c, resp, head.version, keep, false).await;
            Served::unanswered(keep, status)
        }
    };
    let took = started.elapsed();
    let worker = served.worker.as_ref().map(|w| w.url());
    trace.end(served.status, worker, served.migrations, served.first_event);
    app.metrics.request(route, served.status, took);
    app.totals.record(served.status, took);
    if let Some(t) = served.first_event {
        app.metrics.first_token(route, t.duration_since(started));
    }
    tracing::info!(
        target: "routerd::access",
        request_id = %String::from_utf8_lossy(rid.as_bytes()),
        route = route.path(),
        worker = served.worker.as_ref().map_or("-", |w| w.url()),
        status = served.status,
        migrations = served.migrations,
        seam_ms = served.seam.map(|s| (s.as_secs_f64() * 1e6).round() / 1e3),
        latency_ms = (took.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
    );
    served.keep
}

/// For a `no_available_workers` answer: seconds until a worker of the pool may be routable
/// again (the soonest circuit timeout or `Retry-After` backoff; for an unhealthy worker, the
/// health check interval), at least 1.
fn no_workers_retry_after(app: &App, config: &Config, e: &RouterError) -> Option<u64> {
    let role = match e {
        RouterError::NoWorkers => crate::registry::WorkerRole::Regular,
        RouterError::NoPoolWorkers("prefill") => crate::registry::WorkerRole::Prefill,
        RouterError::NoPoolWorkers(_) => crate::registry::WorkerRole::Decode,
        _ => return None,
    };
    let soonest = app
        .registry
        .load()
        .workers
        .iter()
        .filter(|w| w.spec.role == role)
        .map(|w| w.unroutable_for().unwrap_or(config.health.interval))
        .min()
        .unwrap_or(config.health.interval);
    Some(soonest.as_secs_f64().ceil().max(1.0) as u64)
}

/// Counts a failure against `worker`'s circuit; an opening is an event for the dashboard.
pub(crate) fn failed(app: &App, worker: &Worker, cfg: &crate::config::BreakerConfig) {
    if worker.breaker.record_failure(cfg) {
        tracing::warn!(worker = worker.url(), "circuit opened");
        app.events.push("circuit_opened", worker.url());
    }
}

/// One request's routing context: what decision records and metrics say about it.
pub(crate) struct Ask<'a> {
    pub text: &'a str,
    pub request_id: &'a HeaderValue,
    pub route: Route,
    /// The client asked for the decision record (`x-routerd-explain`).
    pub explain: bool,
    /// `policy.panic_routing`: when none is routable, choose among the unroutable anyway.
    pub panic: bool,
    /// `X-SMG-Routing-Key` (the `manual` policy).
    pub routing_key: Option<&'a str>,
    /// The prompt's token ids, when workers publish KV events and they are known: as the
    /// regular (or PD prefill) pool's tokenizer makes them.
    pub tokens: Option<&'a [u32]>,
    /// PD: as the decode pool's tokenizer makes them, when it is not the prefill pool's.
    pub decode_tokens: Option<&'a [u32]>,
    /// 0 for the request as the client sent it, n for its n-th continuation after a worker
    /// failed mid-stream.
    pub migration: u32,
    /// The request's trace (empty when traces are off).
    pub trace: &'a RequestSpan<'a>,
}

/// A policy's choice.
pub(crate) struct Picked {
    pub worker: Arc<Worker>,
    /// The decision record, rendered for the response header when the client asked for it.
    pub header: Option<String>,
    /// Characters of the routing text the policy predicted the worker holds.
    pub matched_chars: usize,
    /// The cache accounting to settle when the answer ends (prefix policies).
    pub accounting: Option<usage::Accounting>,
}

/// `policy`'s choice among the routable workers of `pool` minus `avoid` (with panic routing,
/// among the unroutable ones when none is routable). `None` when nothing is left. The
/// decision is counted, logged for `/admin/decisions`, and rendered for the response header
/// when the client asked for it.
pub(crate) fn pick(
    app: &App,
    pool_name: &'static str,
    pool: &[Arc<Worker>],
    policy: &dyn Policy,
    ask: &Ask,
    avoid: &[Arc<Worker>],
) -> Option<Picked> {
    let fresh: Vec<Arc<Worker>>;
    let candidates: &[Arc<Worker>] = if avoid.is_empty() {
        pool
    } else {
        fresh = pool.iter().filter(|w| !avoid.iter().any(|t| Arc::ptr_eq(t, w))).cloned().collect();
        &fresh
    };
    let strict = RequestInfo {
        text: ask.text,
        ignore_health: false,
        routing_key: ask.routing_key,
        tokens: ask.tokens,
        kv: ask.tokens.map(|_| &*app.kv),
        peers: app.peers.active().then_some(&*app.peers),
    };
    let started = ask.trace.is_recorded().then(std::time::SystemTime::now);
    let d = policy.decide(candidates, &strict).or_else(|| {
        let any = RequestInfo { ignore_health: true, ..strict };
        ask.panic.then(|| policy.decide(candidates, &any)).flatten()
    })?;
    app.metrics.decision(pool_name, policy.name(), &d);
    if let Some(m) = d.matched_tokens {
        candidates[d.index].predicted_tokens.fetch_add(m as u64, Relaxed);
    }
    let mut header = None;
    let mut accounting = d.predicted.map(|predicted| usage::Accounting { predicted, record: None });
    if ask.explain || app.decisions.wanted() {
        let route = crate::metrics::route_label(ask.route);
        let mut record =
            Record::new(ask.request_id, route, pool_name, policy.name(), &d, candidates)
                .migration(ask.migration);
        if let Some(a) = accounting.as_mut() {
            a.record = Some(record.actual_slot());
        }
        header = ask.explain.then(|| record.header_value());
        app.decisions.push(record);
    }
    let worker = candidates[d.index].clone();
    if let Some(started) = started {
        ask.trace.decision(started, pool_name, policy.name(), &d, &worker, ask.migration);
    }
    Some(Picked { worker, header, matched_chars: d.matched_chars, accounting })
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    app: &App,
    live: &Live,
    c: &mut ClientSession,
    route: Route,
    head: &Head,
    body: Bytes,
    rid: (&HeaderName, &HeaderValue),
    keep: bool,
    trace: &RequestSpan<'_>,
) -> Result<Served, Stop> {
    let probe = extract::probe(&body).map_err(Stop::Failed)?;
    let streaming = probe.stream.unwrap_or(false);
    let _slot = match &live.limiter {
        Some(l) => {
            let asked = Instant::now();
            let slot = l.acquire().await;
            app.metrics.queue_wait(asked.elapsed());
            Some(slot.map_err(Stop::Failed)?)
        }
        None => None,
    };
    let needs_text = match &live.pools {
        Some(p) => p.prefill.needs_text() || p.decode.needs_text(),
        None => live.policy.needs_text(),
    };
    let text = if needs_text { probe.routing_text(route) } else { Default::default() };
    let on_events = needs_text && app.kv.active();
    let first = if live.pools.is_some() { WorkerRole::Prefill } else { WorkerRole::Regular };
    let tokens = if on_events { app.kv.tokens(&probe, route, first) } else { None };
    // A decode pool with its own tokenizer hashes the prompt its own way.
    let own_decode = on_events
        && live.pools.is_some()
        && !app.kv.same_tokenizer(WorkerRole::Prefill, WorkerRole::Decode);
    let decode_own =
        if own_decode { app.kv.tokens(&probe, route, WorkerRole::Decode) } else { None };
    let explain = head.headers.contains_key(EXPLAIN_HEADER);
    let panic = live.config.policy.panic_routing;
    let routing_key = head.headers.get(ROUTING_KEY_HEADER).and_then(|v| v.to_str().ok());
    let ask = Ask {
        text: &text,
        request_id: rid.1,
        route,
        explain,
        panic,
        routing_key,
        tokens: tokens.as_deref(),
        decode_tokens: if own_decode { decode_own.as_deref() } else { tokens.as_deref() },
        migration: 0,
        trace,
    };
    let limit = live.config.retry.migration_limit;
    let mut plan = migrate::Plan::new(streaming, route, &probe, limit);
    if let Some(pools) = &live.pools {
        return pd::dispatch(app, live, pools, c, head, &body, &probe, &ask, rid, keep, plan).await;
    }
    let cfg = &live.config;
    let first_body = plan.first_body(&body);
    let retry = &cfg.retry;
    let attempts = if retry.enabled { retry.max_retries + 1 } else { 1 };
    app.retry_budget.deposit(retry);
    let deadline = Instant::now() + cfg.server.request_timeout;
    let mut tried: Vec<Arc<Worker>> = Vec::new();
    let mut request = Vec::with_capacity(body.len() + 256);
    let mut attempt = 0;
    loop {
        let snap = app.registry.load();
        let picked = pick(app, "regular", &snap.workers, &*live.policy, &ask, &tried)
            .ok_or(Stop::Failed(RouterError::NoWorkers))?;
        drop(snap);
        let (worker, decision) = (picked.worker, picked.header);
        // A batch's routing text is its whole list: no one prompt to account for.
        let accounting = picked.accounting.filter(|_| probe.batch_size(route).is_none());
        let feedback = live.policy.learns().then(|| {
            let text_chars = ask.text.chars().count();
            usage::Feedback::sent(
                live.policy.clone(),
                worker.clone(),
                text_chars,
                picked.matched_chars,
            )
        });
        let guard = worker.start_request();
        let span = trace.attempt(&worker, attempt, 0);
        let tp = span.traceparent();
        write_request(&mut request, &worker, route.path(), &head.headers, rid, tp, &first_body);
        let timeouts = (cfg.server.connect_timeout, cfg.server.header_timeout);
        let outcome = send(&worker, &request, Some(&mut *c), timeouts, deadline).await;
        attempt += 1;
        let may_retry = |tried: &[Arc<Worker>]| {
            attempt < attempts
                && Instant::now() < deadline
                && untried_left(app, tried, &worker)
                && app.retry_budget.withdraw(retry)
        };
        let answer = match outcome {
            Err(Stop::Closed) => return Err(Stop::Closed),
            Err(Stop::Failed(e)) => {
                span.failed(&e);
                worker.errors_total.fetch_add(1, Relaxed);
                failed(app, &worker, &cfg.circuit_breaker);
                worker.set_last_error(&e);
                if !(e.retryable() && may_retry(&tried)) {
                    return Err(Stop::Failed(e));
                }
                tracing::debug!(worker = worker.url(), error = %e, attempt, "retrying on another worker");
                None
            }
            Ok(answer) => {
                let status = answer.head().status();
                span.answered(status);
                if status >= 500 {
                    worker.errors_total.fetch_add(1, Relaxed);
                    failed(app, &worker, &cfg.circuit_breaker);
                    worker.set_last_error(format!("answered {status}"));
                } else {
                    worker.breaker.record_success(&cfg.circuit_breaker);
                }
                if let (429, Some(after)) = (status, answer.head().retry_after()) {
                    worker.throttle(after);
                }
                if retry::retryable_status(status) && may_retry(&tried) {
                    tracing::debug!(
                        worker = worker.url(),
                        status,
                        attempt,
                        "retrying on another worker"
                    );
                    None
                } else {
                    Some(answer)
                }
            }
        };
        let Some(answer) = answer else {
            drop((guard, span));
            app.metrics.retried();
            worker.retries_total.fetch_add(1, Relaxed);
            tried.push(worker);
            tokio::select! {
                _ = tokio::time::sleep(retry::backoff(retry, attempt)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            continue;
        };
        let status = answer.head().status();
        let scan = usage::UsageScan::new(worker.clone(), streaming)
            .with_feedback(feedback)
            .with_accounting(accounting);
        let mut extra: Vec<(&[u8], &[u8])> = vec![
            (rid.0.as_str().as_bytes(), rid.1.as_bytes()),
            (upstream::WORKER_HEADER_NAME.as_bytes(), worker.url().as_bytes()),
        ];
        if let Some(d) = &decision {
            extra.push((DECISION_HEADER.as_bytes(), d.as_bytes()));
        }
        let events = answer.head().is_event_stream();
        if let Some(resume) = plan.take_for(status, events) {
            let r =
                migrate::Request { app, live, head, body: &body, ask: &ask, rid, deadline, keep };
            let worker = worker.clone();
            let guards = vec![guard];
            let leg = migrate::Leg { answer, worker, guards, usage: Some(scan), span };
            return Ok(migrate::relay(&r, c, leg, &extra, resume).await);
        }
        let limits = relay::BodyTimeouts { deadline, idle: cfg.server.stream_idle_timeout };
        let v = head.version;
        let done = relay::respond(answer, &worker, c, v, keep, &extra, Some(scan), limits).await;
        span.relayed(&done);
        if let Some(failure) = &done.worker_failure {
            worker.errors_total.fetch_add(1, Relaxed);
            failed(app, &worker, &cfg.circuit_breaker);
            worker.set_last_error(failure);
            if events {
                app.metrics.migration(plan.why_not());
            }
        }
        drop(guard);
        return Ok(Served::relayed(done, status, &worker));
    }
}

/// Whether a worker other than `current` and those already tried is registered.
fn untried_left(app: &App, tried: &[Arc<Worker>], current: &Arc<Worker>) -> bool {
    app.registry
        .load()
        .workers
        .iter()
        .any(|w| !Arc::ptr_eq(w, current) && !tried.iter().any(|t| Arc::ptr_eq(t, w)))
}

/// The request as the worker gets it: the client's body unchanged (with the dp rank added for a
/// rank target), headers chosen for it.
fn write_request(
    out: &mut Vec<u8>,
    worker: &Worker,
    path: &str,
    client: &HeaderMap,
    rid: (&HeaderName, &HeaderValue),
    traceparent: Option<&HeaderValue>,
    body: &[u8],
) {
    let mut req = RequestWriter::post(out, path, worker.authority.as_str());
    upstream::each_worker_header(worker, client, Some(rid), |name, value| {
        // With traces on, the worker's parent is routerd's attempt, not the client's span.
        if traceparent.is_none() || name != upstream::TRACEPARENT {
            req.header(name.as_str().as_bytes(), value.as_bytes())
        }
    });
    if let Some(tp) = traceparent {
        req.header(upstream::TRACEPARENT.as_str().as_bytes(), tp.as_bytes());
    }
    match worker.dp_rank {
        Some(rank) => req.body(&crate::dp::with_rank(body, rank)),
        None => req.body(body),
    }
}

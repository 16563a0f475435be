//! OpenTelemetry traces (docs/tracing.md): with `--enable-trace`, each inference request is a
//! span (continuing the client's W3C `traceparent`), with a child span for each routing decision
//! and one for each worker attempt, whose context the worker gets as its `traceparent` so the
//! engine's spans join the same trace. Spans are exported over OTLP (gRPC, as sglang-router
//! does, or HTTP/protobuf) by the SDK's batch processor on its own thread: a bounded queue
//! (`max_queue_size`, spans beyond it dropped and counted) and a timeout on each export, so a
//! slow or dead collector never slows a request or grows memory.
//!
//! Off (the default), a request's `RequestSpan` is empty and each call below is one branch.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use opentelemetry_sdk::Resource;
use tokio::time::Instant;

use crate::config::{TraceConfig, TraceProtocol};
use crate::policy::Decision;
use crate::proxy::Route;
use crate::registry::{Worker, WorkerRole};

/// How long one export may take before it counts as failed (the spans it carried are lost).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The exporter's record: spans the collector took, and spans lost to failed exports.
#[derive(Debug, Default)]
pub struct ExportCounts {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
}

/// The tracer, when traces are on.
pub struct Otel {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Otel {
    /// Starts the exporter and its batch thread. Must be called within the Tokio runtime (the
    /// exporter's connections run on it).
    pub fn start(cfg: &TraceConfig, counts: Arc<ExportCounts>) -> Result<Self, String> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "traces need the async runtime".to_owned())?;
        let _entered = handle.enter();
        use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
        let built = match cfg.protocol {
            TraceProtocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(&cfg.endpoint)
                    .with_timeout(EXPORT_TIMEOUT);
                if cfg.endpoint.starts_with("https://") {
                    use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
                    b = b.with_tls_config(ClientTlsConfig::new().with_native_roots());
                }
                b.build()
            }
            TraceProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(&cfg.endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build(),
        };
        let inner = built.map_err(|e| format!("the OTLP exporter for {}: {e}", cfg.endpoint))?;
        let exporter = Exporter {
            inner,
            handle: handle.clone(),
            counts,
            endpoint: cfg.endpoint.clone(),
            failing: AtomicU64::new(0),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queue_size)
            .with_max_export_batch_size(cfg.max_export_batch_size.min(cfg.max_queue_size))
            .with_scheduled_delay(cfg.schedule_delay)
            .build();
        let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
        let resource = Resource::builder().with_service_name(cfg.service_name.clone()).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("routerd");
        Ok(Self { provider, tracer, propagator: TraceContextPropagator::new() })
    }

    /// The root span of one inference request, a child of the client's `traceparent` when it
    /// sent one.
    pub fn request(&self, route: Route, headers: &HeaderMap) -> RequestSpan<'_> {
        let parent = self.propagator.extract(&Headers(headers));
        let name = match route {
            Route::Generate => "POST /generate",
            Route::Completions => "POST /v1/completions",
            Route::Chat => "POST /v1/chat/completions",
            Route::Embeddings => "POST /v1/embeddings",
        };
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        // Attributes only for a recorded span: an unsampled request costs as little as can be.
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("http.route", route.path()),
                KeyValue::new("url.path", route.path()),
            ]);
        }
        RequestSpan { on: Some((parent.with_span(span), self)) }
    }

    /// Exports what is queued (waiting at most a few seconds) and stops the batch thread.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::debug!(error = %e, "trace exporter shutdown");
        }
    }
}

/// One request's trace: empty when traces are off; a span that records nothing (but still
/// gives workers a `traceparent`) when the request is not sampled.
#[derive(Default)]
pub struct RequestSpan<'a> {
    on: Option<(Context, &'a Otel)>,
}

impl RequestSpan<'_> {
    /// Whether this request is recorded (sampled): whether its decisions make spans.
    pub fn is_recorded(&self) -> bool {
        self.on.as_ref().is_some_and(|(cx, _)| cx.span().is_recording())
    }

    /// A routing decision, made between `started` and now: a child span of the request.
    pub fn decision(
        &self,
        started: SystemTime,
        pool: &'static str,
        policy: &'static str,
        d: &Decision,
        worker: &Worker,
        migration: u32,
    ) {
        let Some((cx, otel)) = self.on.as_ref().filter(|_| self.is_recorded()) else { return };
        let mut attrs = vec![
            KeyValue::new("routerd.pool", pool),
            KeyValue::new("routerd.policy", policy),
            KeyValue::new("routerd.branch", d.branch),
            KeyValue::new("routerd.worker", worker.url().to_owned()),
        ];
        if let Some(p) = d.predicted {
            let unit = p.unit.as_str();
            attrs.push(KeyValue::new("routerd.cache.unit", unit));
            attrs.push(KeyValue::new("routerd.cache.prompt", p.prompt as i64));
            attrs.push(KeyValue::new("routerd.cache.best", p.best as i64));
            attrs.push(KeyValue::new("routerd.cache.matched", p.chosen as i64));
        }
        if let Some(m) = d.matched_tokens {
            attrs.push(KeyValue::new("routerd.matched_tokens", m as i64));
        }
        if d.matched_chars > 0 {
            attrs.push(KeyValue::new("routerd.matched_chars", d.matched_chars as i64));
        }
        if migration > 0 {
            attrs.push(KeyValue::new("routerd.migration", i64::from(migration)));
        }
        let mut span = otel
            .tracer
            .span_builder("route")
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .with_attributes(attrs)
            .start_with_context(&otel.tracer, cx);
        span.end();
    }

    /// One attempt on `worker` (named after its role), number `attempt` from 0; `migration` > 0
    /// for a stream's continuation after its worker failed. Ends when dropped.
    pub fn attempt(&self, worker: &Worker, attempt: u32, migration: u32) -> Attempt {
        let Some((cx, otel)) = &self.on else { return Attempt::default() };
        let role = worker.spec.role;
        let name = match role {
            WorkerRole::Regular => "regular attempt",
            WorkerRole::Prefill => "prefill attempt",
            WorkerRole::Decode => "decode attempt",
        };
        let mut span = otel
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .start_with_context(&otel.tracer, cx);
        if !span.is_recording() {
            return Attempt::propagating(otel, cx.with_span(span));
        }
        let mut attrs = vec![
            KeyValue::new("routerd.worker", worker.url().to_owned()),
            KeyValue::new("server.address", worker.authority.host().to_owned()),
            KeyValue::new("routerd.role", role.as_str()),
            KeyValue::new("routerd.attempt", i64::from(attempt)),
            KeyValue::new("routerd.retry", attempt > 0),
        ];
        if let Some(port) = worker.authority.port_u16() {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        if migration > 0 {
            attrs.push(KeyValue::new("routerd.migration", i64::from(migration)));
        }
        span.set_attributes(attrs);
        Attempt::propagating(otel, cx.with_span(span))
    }

    /// Ends the request's span: the status the client got, the worker that answered, how many
    /// times the stream was continued, and when its first event went out.
    pub fn end(
        &self,
        status: u16,
        worker: Option<&str>,
        migrations: u32,
        first_event: Option<Instant>,
    ) {
        let Some((cx, _)) = &self.on else { return };
        let span = cx.span();
        if !span.is_recording() {
            return span.end();
        }
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if let Some(w) = worker {
            span.set_attribute(KeyValue::new("routerd.worker", w.to_owned()));
        }
        if migrations > 0 {
            span.set_attribute(KeyValue::new("routerd.migrations", i64::from(migrations)));
        }
        if let Some(at) = first_event {
            span.add_event_with_timestamp("first_event", wall_clock(at), vec![]);
        }
        if status >= 500 || status == 499 {
            let why = if status == 499 { "the client went away" } else { "server error" };
            span.set_status(Status::error(why));
        }
        span.end();
    }
}

/// One worker attempt's span (ended when dropped), and the `traceparent` the worker gets.
#[derive(Default)]
pub struct Attempt {
    cx: Option<Context>,
    recording: bool,
    traceparent: Option<HeaderValue>,
}

impl Attempt {
    /// The attempt in `cx`, with the `traceparent` that names it.
    fn propagating(otel: &Otel, cx: Context) -> Self {
        let mut headers = Carrier::default();
        otel.propagator.inject_context(&cx, &mut headers);
        let recording = cx.span().is_recording();
        Attempt { cx: Some(cx), recording, traceparent: headers.traceparent }
    }

    /// The span, when it is recorded.
    fn recorded(&self) -> Option<opentelemetry::trace::SpanRef<'_>> {
        self.cx.as_ref().filter(|_| self.recording).map(|cx| cx.span())
    }

    /// The `traceparent` for the worker's request: this attempt as the engine's parent.
    pub fn traceparent(&self) -> Option<&HeaderValue> {
        self.traceparent.as_ref()
    }

    /// The worker's answer began (its head arrived) with `status`.
    pub fn answered(&self, status: u16) {
        let Some(span) = self.recorded() else { return };
        span.add_event("first_byte", vec![]);
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 {
            span.set_status(Status::error(format!("answered {status}")));
        }
    }

    /// The attempt failed: before an answer (`error`), or the worker's stream was cut.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let Some(span) = self.recorded() else { return };
        let message = error.to_string();
        span.add_event("failed", vec![KeyValue::new("exception.message", message.clone())]);
        span.set_status(Status::error(message));
    }

    /// The worker's answer was relayed to its end, or cut (`worker_failure`).
    pub fn relayed(&self, done: &crate::proxy::relay::Relayed) {
        match &done.worker_failure {
            Some(reason) => self.failed(reason),
            None => self.ended("relayed"),
        }
    }

    /// How the worker's answer ended when the worker did not fail: `relayed` (whole),
    /// `client_gone`, `deadline`.
    pub fn ended(&self, how: &'static str) {
        let Some(span) = self.recorded() else { return };
        span.set_attribute(KeyValue::new("routerd.end", how));
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }
}

/// A tokio `Instant` on the wall clock (spans carry wall-clock times).
fn wall_clock(at: Instant) -> SystemTime {
    let ago = Instant::now().saturating_duration_since(at);
    SystemTime::now() - ago
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// What the propagator writes for a worker: `traceparent` (`tracestate` is the client's, passed
/// as it came).
#[derive(Default)]
struct Carrier {
    traceparent: Option<HeaderValue>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.traceparent = HeaderValue::from_str(&value).ok();
        }
    }
}

/// The OTLP exporter, entered into the Tokio runtime while the batch thread polls an export
/// (its connections are driven there), with the spans it delivered and lost counted. A failing
/// collector is logged once when exports start failing and once when they work again, not
/// once a batch.
struct Exporter<E> {
    inner: E,
    handle: tokio::runtime::Handle,
    counts: Arc<ExportCounts>,
    endpoint: String,
    /// Batches failed in a row.
    failing: AtomicU64,
}

impl<E> std::fmt::Debug for Exporter<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("routerd OTLP exporter")
    }
}

impl<E: SpanExporter> SpanExporter for Exporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result =
            Entered { handle: &self.handle, inner: Box::pin(self.inner.export(batch)) }.await;
        match result {
            Ok(()) => {
                self.counts.exported.fetch_add(n, Relaxed);
                let failed = self.failing.swap(0, Relaxed);
                if failed > 0 {
                    tracing::info!(collector = %self.endpoint, failed_batches = failed,
                                   "trace export works again");
                }
            }
            Err(e) => {
                self.counts.failed.fetch_add(n, Relaxed);
                if self.failing.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!(collector = %self.endpoint, error = %e,
                                   "trace export failing: spans are lost until it works again");
                }
            }
        }
        // Said above, once per stretch (the batch processor would log every failed batch).
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.handle.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A future polled inside the runtime's context (boxed: one allocation per exported batch).
struct Entered<'a, F> {
    handle: &'a tokio::runtime::Handle,
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for Entered<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let _entered = self.handle.enter();
        self.inner.as_mut().poll(cx)
    }
}

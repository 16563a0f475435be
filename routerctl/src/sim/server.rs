//! The simulated worker's HTTP server: SGLang's routes, the `/sim/*` routes for tests
//! (stats, runtime faults, PD bootstrap), API-key checks, and the fault gate every inference
//! request passes first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use routerd::serve::{serve, serve_tls, Ended, Stop};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::args::{Faults, Role, SimArgs};
use super::engine::{Engine, Event, Job};
use super::error::SimError;
use super::pd::{bootstrap_route, Rooms};
use super::request::{Ctx, Parsed};
use super::tokenizer::Tokenizer;
use super::{native, openai};

/// Counters of the HTTP layer (the engine keeps its own).
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub requests: AtomicU64,
    pub injected_errors: AtomicU64,
    pub hung: AtomicU64,
    pub unauthorized: AtomicU64,
    pub health_checks: AtomicU64,
    pub health_checks_with_key: AtomicU64,
    pub bootstrap_timeouts: AtomicU64,
    /// PD legs waiting for their other leg right now (a gauge).
    pub bootstrap_waiting: AtomicU64,
    pub flushes: AtomicU64,
    pub by_route: [AtomicU64; 4],
}

const ROUTES: [&str; 4] = ["generate", "completions", "chat", "embeddings"];

pub struct SimState {
    pub args: SimArgs,
    pub tokenizer: Tokenizer,
    pub engine: Engine,
    pub rooms: Rooms,
    pub http: reqwest::Client,
    pub counters: ServerCounters,
    pub dp_rank_requests: Vec<AtomicU64>,
    /// Random per start: a client that sees it change knows the counters restarted from zero.
    pub instance: u64,
    faults: RwLock<Faults>,
    crash: CancellationToken,
    /// Serving TLS: the acceptor (and its handshake count).
    tls: Option<Arc<routerd::tls::ServerTls>>,
    /// Publishing KV events (`--kv-events-config`).
    pub kv: Option<Arc<super::kv_events::Publisher>>,
    /// Publishing its load (`--load-publish-endpoint`).
    pub load_pub: Option<Arc<super::kv_events::LoadPublisher>>,
}

/// Something an inference route admitted, that may name a DP rank.
pub trait Admitted {
    fn dp_rank(&self) -> Option<u32> {
        None
    }
}

impl Admitted for Parsed {
    fn dp_rank(&self) -> Option<u32> {
        self.dp_rank
    }
}

impl<A, B> Admitted for (A, B) {}

impl SimState {
    pub fn faults(&self) -> Faults {
        self.faults.read().expect("faults lock").clone()
    }

    pub fn bootstrap_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.args.bootstrap_timeout_secs)
    }

    pub fn new_id(&self) -> String {
        format!("{:032x}", rand::rng().random::<u128>())
    }

    pub fn now_secs(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    /// The gate every inference request passes: injected faults first (as the infrastructure
    /// would show them), then JSON and request validation. `Err` is the response to send.
    pub async fn admit<T: Admitted>(
        &self,
        route: &str,
        body: &Bytes,
        parse: fn(&Value, &Ctx) -> Result<T, String>,
    ) -> Result<T, Response> {
        let n = self.counters.requests.fetch_add(1, Relaxed) + 1;
        if let Some(i) = ROUTES.iter().position(|r| *r == route) {
            self.counters.by_route[i].fetch_add(1, Relaxed);
        }
        let faults = self.faults();
        if faults.crash_after.is_some_and(|k| n > k) {
            tracing::warn!(request = n, "injected crash");
            self.crash.cancel();
            std::future::pending::<()>().await;
        }
        if faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
        }
        if faults.hang {
            self.counters.hung.fetch_add(1, Relaxed);
            std::future::pending::<()>().await;
        }
        let inject = n <= faults.error_first
            || (faults.error_rate > 0.0 && rand::rng().random_bool(faults.error_rate));
        if inject {
            self.counters.injected_errors.fetch_add(1, Relaxed);
            let status = StatusCode::from_u16(faults.error_status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp =
                SimError::new(status, format!("injected fault: status {}", status.as_u16()))
                    .into_response();
            if let Some(secs) = faults.retry_after_secs {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return Err(resp);
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            SimError::bad_request(format!("JSON decode error: {e}")).into_response()
        })?;
        let ctx = Ctx {
            tokenizer: &self.tokenizer,
            body,
            default_max_new_tokens: self.args.default_max_new_tokens,
            context_length: self.args.context_length,
            dp_size: self.args.dp_size,
        };
        let parsed = parse(&value, &ctx).map_err(|m| SimError::bad_request(m).into_response())?;
        if let Some(rank) = parsed.dp_rank() {
            self.dp_rank_requests[rank as usize].fetch_add(1, Relaxed);
        }
        Ok(parsed)
    }

    fn stats(&self) -> Value {
        let e = &self.engine.counters;
        let c = &self.counters;
        let cache = self.engine.cache_stats();
        let by_route: BTreeMap<&str, u64> =
            ROUTES.iter().zip(&c.by_route).map(|(r, n)| (*r, n.load(Relaxed))).collect();
        json!({
            "role": self.args.role,
            "instance": self.instance.to_string(),
            "requests": c.requests.load(Relaxed),
            "tls_handshakes": self.tls.as_ref().map(|t| t.handshakes()),
            "requests_by_route": by_route,
            "sequences": e.admitted.load(Relaxed),
            "completed": e.completed.load(Relaxed),
            "aborted": e.aborted.load(Relaxed),
            "prompt_tokens": e.prompt_tokens.load(Relaxed),
            "cached_tokens": e.cached_tokens.load(Relaxed),
            "generated_tokens": e.generated_tokens.load(Relaxed),
            "running": e.running.load(Relaxed),
            "waiting": e.waiting.load(Relaxed),
            "cache": {"tokens": cache.tokens, "capacity": cache.capacity, "nodes": cache.nodes,
                      "evicted_tokens": cache.evicted_tokens},
            "injected_errors": c.injected_errors.load(Relaxed),
            "hung": c.hung.load(Relaxed),
            "unauthorized": c.unauthorized.load(Relaxed),
            "health_checks": c.health_checks.load(Relaxed),
            "health_checks_with_key": c.health_checks_with_key.load(Relaxed),
                        "bootstrap_timeouts": c.bootstrap_timeouts.load(Relaxed),
            "bootstrap_waiting": c.bootstrap_waiting.load(Relaxed),
            "open_rooms": self.rooms.open(),
            "flushes": c.flushes.load(Relaxed),
            "dp_rank_requests": self.dp_rank_requests.iter().map(|n| n.load(Relaxed)).collect::<Vec<_>>(),
        })
    }

    fn has_key(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.args.api_key else { return true };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k == key)
    }
}

async fn require_key(State(state): State<Arc<SimState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let exempt = path == "/health" || path.starts_with("/sim/");
    if exempt || state.has_key(req.headers()) {
        return next.run(req).await;
    }
    state.counters.unauthorized.fetch_add(1, Relaxed);
    SimError::new(StatusCode::UNAUTHORIZED, "Unauthorized").into_response()
}

async fn health(State(state): State<Arc<SimState>>, headers: HeaderMap) -> StatusCode {
    state.counters.health_checks.fetch_add(1, Relaxed);
    if state.args.api_key.is_some() && state.has_key(&headers) {
        state.counters.health_checks_with_key.fetch_add(1, Relaxed);
    }
    if state.faults().unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// SGLang's `/health_generate`: a one-token generation through the scheduler.
async fn health_generate(State(state): State<Arc<SimState>>) -> StatusCode {
    if state.faults().unhealthy {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let job = Job {
        tokens: vec![0],
        max_new_tokens: 1,
        prompt_text: None,
        plain_text: false,
        skip_prefill: true,
    };
    let mut events = state.engine.submit(job);
    while let Some(ev) = events.recv().await {
        if ev == Event::Done {
            return StatusCode::OK;
        }
    }
    StatusCode::SERVICE_UNAVAILABLE
}

fn load(state: &SimState) -> (u64, u64, u64) {
    let e = &state.engine.counters;
    (e.running_tokens.load(Relaxed), e.running.load(Relaxed), e.waiting.load(Relaxed))
}

async fn server_info(State(state): State<Arc<SimState>>) -> Json<Value> {
    let a = &state.args;
    let (tokens, running, waiting) = load(&state);
    let internal =
        json!({"load": tokens, "num_running_reqs": running, "num_waiting_reqs": waiting});
    Json(json!({
        "model_path": a.model_path,
        "tokenizer_path": a.model_path,
        "served_model_name": a.served_model(),
        "host": a.host,
        "port": a.port,
        "tp_size": 1,
        "dp_size": a.dp_size,
        "disaggregation_mode": a.role.disaggregation_mode(),
        "disaggregation_bootstrap_port": a.bootstrap_port,
        "max_running_requests": a.max_running_requests,
        "max_total_num_tokens": a.cache_capacity_tokens,
        "chunked_prefill_size": a.max_prefill_tokens,
        "context_len": a.context_length,
        "is_embedding": false,
        "internal_states": vec![internal; a.dp_size as usize],
        "version": concat!("routerd-sim-", env!("CARGO_PKG_VERSION")),
        "page_size": a.page_size,
        "kv_events": state.kv.as_ref().map(|p| json!({
            "publisher": "zmq",
            "endpoint_host": "*",
            "endpoint_port_base": p.port,
            "topic": p.topic,
            "block_size": p.block_size,
            "dp_size": 1,
            "replay_endpoint_port_base": p.replay_port,
        })).map(|mut kv| {
            if let Some(l) = &state.load_pub {
                kv["load_endpoint_port_base"] = json!(l.port);
                kv["load_topic"] = json!("load");
            }
            kv
        }),
    }))
}

/// `POST /sim/kv_events/drop?n=N`: the next N event batches are not sent live (they stay in
/// the replay buffer), as if the network lost them.
async fn kv_drop(State(state): State<Arc<SimState>>, Query(q): Query<DropQuery>) -> Response {
    match &state.kv {
        Some(p) => {
            p.drop_next.store(q.n, Relaxed);
            Json(json!({"drop_next": q.n, "published": p.batches.load(Relaxed)})).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"message": "this worker publishes no KV events (--kv-events-config)"}})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct DropQuery {
    n: u64,
}

async fn model_info(State(state): State<Arc<SimState>>) -> Json<Value> {
    Json(json!({
        "model_path": state.args.model_path,
        "tokenizer_path": state.args.model_path,
        "is_generation": true,
        "preferred_sampling_params": null,
        "weight_version": "default",
    }))
}

async fn models(State(state): State<Arc<SimState>>) -> Json<Value> {
    let id = state.args.served_model();
    Json(json!({"object": "list", "data": [{
        "id": id, "object": "model", "created": state.now_secs(), "owned_by": "sglang",
        "root": state.args.model_path, "max_model_len": state.args.context_length,
    }]}))
}

/// `/get_load` in the shape sgl-router reads (`load`), with the request counts beside it.
async fn get_load(State(state): State<Arc<SimState>>) -> Json<Value> {
    let (tokens, running, waiting) = load(&state);
    Json(json!({"load": tokens, "num_reqs": running, "num_waiting_reqs": waiting}))
}

async fn flush_cache(State(state): State<Arc<SimState>>) -> (StatusCode, &'static str) {
    let status = if state.engine.flush_cache() {
        state.counters.flushes.fetch_add(1, Relaxed);
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (
        status,
        "Cache flushed.\nPlease check backend logs for more details. (When there are running or \
         waiting requests, the operation will not be performed.)\n",
    )
}

/// `POST /sim/cache/flush`: empties the cache even while requests run (SGLang's own
/// `/flush_cache` refuses then): a cache lost behind the router's back, for benchmarks.
async fn force_flush(State(state): State<Arc<SimState>>) -> Json<Value> {
    state.engine.force_flush();
    state.counters.flushes.fetch_add(1, Relaxed);
    Json(json!({"flushed": true}))
}

async fn stats(State(state): State<Arc<SimState>>) -> Json<Value> {
    Json(state.stats())
}

async fn get_faults(State(state): State<Arc<SimState>>) -> Json<Faults> {
    Json(state.faults())
}

/// `POST /sim/faults`: a partial object; fields given replace the current ones.
async fn set_faults(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(p)) => Value::Object(p),
        Ok(_) => return SimError::bad_request("faults must be a JSON object").into_response(),
        Err(e) => return SimError::bad_request(format!("JSON decode error: {e}")).into_response(),
    };
    let mut merged = serde_json::to_value(state.faults()).expect("faults serialise");
    for (k, v) in patch.as_object().expect("checked above") {
        merged[k] = v.clone();
    }
    let faults: Faults = match serde_json::from_value(merged) {
        Ok(f) => f,
        Err(e) => return SimError::bad_request(format!("invalid faults: {e}")).into_response(),
    };
    if let Err(e) = faults.validate() {
        return SimError::bad_request(e).into_response();
    }
    *state.faults.write().expect("faults lock") = faults.clone();
    Json(faults).into_response()
}

async fn not_found() -> (StatusCode, Json<Value>) {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"})))
}

fn app(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health_generate", get(health_generate))
        .route("/get_server_info", get(server_info))
        .route("/server_info", get(server_info))
        .route("/get_model_info", get(model_info))
        .route("/v1/models", get(models))
        .route("/get_load", get(get_load))
        .route("/flush_cache", get(flush_cache).post(flush_cache))
        .route("/generate", post(native::generate))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/sim/stats", get(stats))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/kv_events/drop", post(kv_drop))
        .route("/sim/cache/flush", post(force_flush))
        .route("/sim/bootstrap/{room}", post(bootstrap_route))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .with_state(state)
}

async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))
}

/// A running simulated worker.
pub struct SimWorker {
    pub addr: SocketAddr,
    /// The bootstrap server's address (prefill role only).
    pub bootstrap_addr: Option<SocketAddr>,
    pub state: Arc<SimState>,
    stop: Stop,
    task: JoinHandle<Ended>,
}

impl SimWorker {
    /// Binds the listeners (port 0 picks free ones) and starts serving.
    pub async fn start(args: SimArgs) -> anyhow::Result<Self> {
        args.validate().map_err(anyhow::Error::msg)?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let spec =
                    routerd::tls::ServeSpec { cert_path: cert.clone(), key_path: key.clone() };
                let tls = match &args.tls_client_ca {
                    Some(ca) => routerd::tls::ServerTls::requiring_client_certs(
                        &spec,
                        std::slice::from_ref(ca),
                    ),
                    None => routerd::tls::ServerTls::new(&spec),
                };
                Some(Arc::new(tls.map_err(anyhow::Error::msg)?))
            }
            (None, None) if args.tls_client_ca.is_some() => {
                anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key")
            }
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let listener = bind(&args.host, args.port).await?;
        let addr = listener.local_addr()?;
        let boot_listener = match args.role {
            Role::Prefill => Some(bind(&args.host, args.bootstrap_port).await?),
            _ => None,
        };
        let bootstrap_addr = boot_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let mut args = args;
        args.port = addr.port();
        if let Some(b) = bootstrap_addr {
            args.bootstrap_port = b.port();
        }
        let stop = Stop::new(Duration::from_secs(5));
        let engine_stop = CancellationToken::new();
        let tokenizer = match &args.tokenizer_path {
            Some(path) => Tokenizer::from_file(path).map_err(anyhow::Error::msg)?,
            None => Tokenizer::new(args.chars_per_token),
        };
        let engine = Engine::start(args.engine_config(), tokenizer.clone(), engine_stop.clone());
        let kv = match &args.kv_events_config {
            Some(json) => {
                let cfg =
                    super::kv_events::KvEventsConfig::parse(json).map_err(anyhow::Error::msg)?;
                Some(super::kv_events::start(&cfg, engine.cache(), engine_stop.clone()).await?)
            }
            None => None,
        };
        let load_pub = match args
            .load_publish_endpoint
            .as_deref()
            .map(|l| super::kv_events::load_endpoint(l, args.kv_events_config.as_deref()))
            .transpose()
            .map_err(anyhow::Error::msg)?
            .flatten()
        {
            Some(ep) => {
                let c = engine.counters.clone();
                let (capacity, dp) = (args.cache_capacity_tokens as u64, args.dp_size);
                let now: super::kv_events::LoadNow =
                    Box::new(move || routerd::kv::wire::LoadStat {
                        running: c.running.load(Relaxed),
                        waiting: c.waiting.load(Relaxed),
                        tokens: c.running_tokens.load(Relaxed),
                        max_tokens: capacity,
                        dp_rank: (dp == 1).then_some(0),
                    });
                Some(super::kv_events::start_load(&ep, now, engine_stop.clone()).await?)
            }
            None => None,
        };
        let state = Arc::new(SimState {
            faults: RwLock::new(args.faults.clone()),
            dp_rank_requests: (0..args.dp_size).map(|_| AtomicU64::new(0)).collect(),
            instance: rand::random(),
            http: reqwest::Client::builder().no_proxy().build()?,
            args,
            tokenizer,
            engine,
            rooms: Rooms::default(),
            counters: ServerCounters::default(),
            crash: stop.abort.clone(),
            tls: tls.clone(),
            kv,
            load_pub,
        });
        let (routes, main_stop) = (app(state.clone()), stop.clone());
        let main = async move {
            match tls {
                Some(tls) => serve_tls(listener, routes, main_stop, tls).await,
                None => serve(listener, routes, main_stop).await,
            }
        };
        let boot = boot_listener.map(|l| {
            let app = Router::new()
                .route("/sim/bootstrap/{room}", post(bootstrap_route))
                .fallback(not_found)
                .with_state(state.clone());
            tokio::spawn(serve(l, app, stop.clone()))
        });
        let task = tokio::spawn(async move {
            let ended = main.await;
            if let Some(b) = boot {
                let _ = b.await;
            }
            engine_stop.cancel();
            ended
        });
        Ok(Self { addr, bootstrap_addr, state, stop, task })
    }

    pub fn url(&self) -> String {
        let scheme = if self.state.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting, lets open requests finish (up to the grace period), stops the engine.
    pub async fn shutdown(self) -> Ended {
        self.stop.drain.cancel();
        self.wait().await
    }

    /// Drops every connection at once, as a crashed process would.
    pub async fn crash(self) -> Ended {
        self.stop.abort.cancel();
        self.wait().await
    }

    /// Waits until the worker stops (a shutdown, or an injected crash).
    pub async fn wait(self) -> Ended {
        self.task.await.unwrap_or(Ended::Aborted)
    }

    /// A handle that can stop the worker from elsewhere (a signal handler).
    pub fn stopper(&self) -> Stop {
        self.stop.clone()
    }
}

//! The router as a whole: shared state, the HTTP routes, and its lifecycle (start on a bound
//! listener, drain on shutdown, background tasks tracked and cancelled).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::config::{Config, Flags};
use crate::error::RouterError;
use crate::limits::Limiter;
use crate::policy::{self, Policy};
use crate::registry::{Registry, WorkerRole, WorkerSource, WorkerSpec};
use crate::reload::Reloader;
use crate::serve::{serve_router, Ended, Stop};
use crate::{admin, info, poll};

/// What a reload may change, swapped whole: requests load it once and use one consistent view.
pub struct Live {
    pub config: Config,
    /// The regular workers' policy.
    pub policy: Arc<dyn Policy>,
    /// PD mode: each pool's policy (`None` in regular mode).
    pub pools: Option<PoolPolicies>,
    pub limiter: Option<Arc<Limiter>>,
    /// The configuration's generation (`GET /admin/config`): worker sets computed from it are
    /// tagged with it, so the registry can drop a set computed from an older one.
    pub generation: u64,
}

pub struct PoolPolicies {
    pub prefill: Arc<dyn Policy>,
    pub decode: Arc<dyn Policy>,
}

impl PoolPolicies {
    pub fn build(config: &Config) -> Option<Self> {
        config.pd.as_ref().map(|pd| Self {
            prefill: policy::build(&config.policy.named(pd.prefill_policy)),
            decode: policy::build(&config.policy.named(pd.decode_policy)),
        })
    }
}

impl Live {
    fn new(config: Config) -> Self {
        let policy = policy::build(&config.policy);
        let pools = PoolPolicies::build(&config);
        let limiter = limiter_for(&config);
        Self { config, policy, pools, limiter, generation: 1 }
    }

    /// The policy that routes to workers of `role`.
    pub fn policy_for(&self, role: WorkerRole) -> &Arc<dyn Policy> {
        match (role, &self.pools) {
            (WorkerRole::Prefill, Some(p)) => &p.prefill,
            (WorkerRole::Decode, Some(p)) => &p.decode,
            _ => &self.policy,
        }
    }
}

pub(crate) fn limiter_for(config: &Config) -> Option<Arc<Limiter>> {
    let s = &config.server;
    s.max_concurrent_requests
        .map(|n| Arc::new(Limiter::new(n.get(), s.queue_size, s.queue_timeout)))
}

/// The configuration's workers (regular, or both PD pools) as registry entries.
pub fn config_workers(config: &Config) -> Vec<WorkerSpec> {
    let spec =
        |url: &str, role, bootstrap_port, api_key: &Option<crate::secret::Secret>| WorkerSpec {
            url: url.to_owned(),
            role,
            bootstrap_port,
            api_key: api_key.clone(),
            source: WorkerSource::Config,
        };
    let mut out: Vec<WorkerSpec> = config
        .workers
        .iter()
        .map(|w| spec(&w.url, WorkerRole::Regular, None, &w.api_key))
        .collect();
    if let Some(pd) = &config.pd {
        out.extend(
            pd.prefill
                .iter()
                .map(|p| spec(&p.url, WorkerRole::Prefill, p.bootstrap_port, &p.api_key)),
        );
        out.extend(pd.decode.iter().map(|d| spec(&d.url, WorkerRole::Decode, None, &d.api_key)));
    }
    out
}

pub struct App {
    live: ArcSwap<Live>,
    pub registry: Registry,
    pub http: crate::proxy::upstream::Upstream,
    /// Set when shutdown begins: readiness fails first.
    pub draining: AtomicBool,
    pub reloader: Reloader,
    /// Spreads informational requests (`/get_model_info` and the like) over the workers.
    pub info_spread: policy::RoundRobin,
    pub retry_budget: crate::proxy::retry::Budget,
    pub metrics: crate::metrics::Metrics,
    pub decisions: crate::decisions::DecisionLog,
    pub totals: crate::stats::Totals,
    pub events: crate::stats::EventLog,
    pub started: std::time::Instant,
    pub discovery: crate::discovery::Status,
    pub dp: crate::dp::DpState,
}

impl App {
    /// `flags` are what the configuration was built from; a reload rebuilds from them, so flags
    /// keep overriding the file's keys.
    pub fn new(config: Config, flags: Flags) -> Self {
        // DP-aware: no size is known yet, so ranks are registered as `dp::run` learns them.
        let dp = crate::dp::DpState::default();
        Self {
            registry: Registry::new(crate::dp::config_specs(&dp, &config)),
            live: ArcSwap::from_pointee(Live::new(config)),
            http: Default::default(),
            draining: AtomicBool::new(false),
            reloader: Reloader::new(flags),
            info_spread: Default::default(),
            retry_budget: Default::default(),
            metrics: Default::default(),
            decisions: Default::default(),
            totals: Default::default(),
            events: Default::default(),
            started: std::time::Instant::now(),
            discovery: Default::default(),
            dp,
        }
    }

    /// The current configuration, policy and limiter.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    pub(crate) fn swap_live(&self, live: Live) {
        self.live.store(Arc::new(live));
    }

    pub fn policy(&self) -> Arc<dyn Policy> {
        self.live.load().policy.clone()
    }

    /// The policy that routes to workers of `role` (a PD pool's, or the regular one).
    pub fn policy_for(&self, role: WorkerRole) -> Arc<dyn Policy> {
        self.live.load().policy_for(role).clone()
    }
}

pub fn router(app: Arc<App>) -> Router {
    let limit = app.live().config.server.max_payload_size;
    Router::new()
        .route("/health", get(info::health))
        .route("/liveness", get(info::health))
        .route("/readiness", get(info::readiness))
        .route("/health_generate", get(info::passthrough))
        .route("/get_server_info", get(info::passthrough))
        .route("/get_model_info", get(info::passthrough))
        .route("/v1/models", get(info::passthrough))
        .route("/get_loads", get(info::get_loads))
        .route("/flush_cache", post(info::flush_cache))
        .route("/add_worker", post(admin::add_worker))
        .route("/remove_worker", post(admin::remove_worker))
        .route("/list_workers", get(admin::list_workers))
        .route("/workers", get(admin::workers).post(admin::create_worker))
        .route("/workers/{url}", delete(admin::delete_worker))
        .route("/admin/config", get(crate::reload::admin_config))
        .route("/admin/reload", post(crate::reload::admin_reload))
        .route("/admin/decisions", get(crate::decisions::admin_decisions))
        .route("/admin/stats", get(crate::stats::admin_stats))
        .route("/admin/discovery", get(crate::discovery::admin_discovery))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn not_found(uri: Uri) -> Response {
    RouterError::NotFound(uri.path().to_owned()).into_response()
}

async fn method_not_allowed(uri: Uri) -> Response {
    RouterError::MethodNotAllowed(uri.path().to_owned()).into_response()
}

/// A started router.
pub struct Running {
    pub app: Arc<App>,
    pub addr: std::net::SocketAddr,
    stop: Stop,
    serving: JoinHandle<Ended>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// Serves `config` on `listener` (already bound, so tests can pass `127.0.0.1:0`). Without
/// the flags it was built from there is nothing to reload; see `start_with_flags`.
pub fn start(listener: TcpListener, config: Config) -> std::io::Result<Running> {
    start_with_flags(listener, config, Flags::default())
}

/// Serves `config`, built from `flags`: SIGHUP or `POST /admin/reload` rebuild it from them.
pub fn start_with_flags(
    listener: TcpListener,
    config: Config,
    flags: Flags,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let grace = config.server.shutdown_grace;
    let app = Arc::new(App::new(config, flags));
    // A worker that leaves, whoever removed it, is forgotten by its pool's policy.
    let weak = Arc::downgrade(&app);
    app.registry.set_on_removed(Box::new(move |w| {
        if let Some(app) = weak.upgrade() {
            app.policy_for(w.spec.role).worker_removed(w.url());
        }
    }));
    let stop = Stop::new(grace);
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    tasks.spawn(poll::poll_loads(app.clone(), cancel.clone()));
    tasks.spawn(crate::health::run(app.clone(), cancel.clone()));
    tasks.spawn(crate::metrics::upkeep(app.clone(), cancel.clone()));
    tasks.spawn(crate::discovery::run(app.clone(), cancel.clone()));
    tasks.spawn(crate::dp::run(app.clone(), cancel.clone()));
    if let Some(path) = app.reloader.source().filter(|_| !app.reloader.watch_disabled()) {
        if let Some(watching) = crate::reload::watch_file(app.clone(), path, cancel.clone()) {
            tasks.spawn(watching);
        }
    }
    let serving =
        tokio::spawn(serve_router(listener, app.clone(), router(app.clone()), stop.clone()));
    Ok(Running { app, addr, stop, serving, tasks, cancel })
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: readiness fails, no new connections, in-flight requests and streams
    /// finish (up to `server.shutdown_grace`), background tasks stop.
    pub async fn shutdown(self) -> Ended {
        self.app.draining.store(true, Relaxed);
        self.stop.drain.cancel();
        let ended = self.serving.await.unwrap_or(Ended::Aborted);
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        ended
    }

    /// A token that starts `shutdown` when cancelled, for signal handlers.
    pub fn drain_token(&self) -> CancellationToken {
        self.stop.drain.clone()
    }

    /// Serves Prometheus metrics (`GET /metrics`) on `listener` until shutdown.
    pub fn serve_metrics(&self, listener: TcpListener) {
        let router = Router::new()
            .route("/metrics", get(crate::metrics::serve_metrics))
            .fallback(not_found)
            .with_state(self.app.clone());
        let stop = Stop::new(std::time::Duration::ZERO);
        let cancel = self.cancel.clone();
        let drain = stop.drain.clone();
        self.tasks.spawn(async move {
            let serving = crate::serve::serve(listener, router, stop);
            tokio::pin!(serving);
            tokio::select! {
                _ = &mut serving => {}
                _ = cancel.cancelled() => {
                    drain.cancel();
                    serving.await;
                }
            }
        });
    }

    pub async fn wait_drain_requested(&self) {
        self.stop.drain.cancelled().await
    }
}

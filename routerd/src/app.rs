//! The router's shared state: what a reload swaps whole (`Live`: configuration, policies,
//! admission limiter), the worker registry, and the counters and logs the admin API reads.
//! The routes are in `routes.rs`, the lifecycle (start, drain, stop) in `run.rs`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Flags};
use crate::limits::Limiter;
use crate::policy::{self, Policy};
use crate::registry::{Registry, WorkerRole, WorkerSource, WorkerSpec};
use crate::reload::Reloader;

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

    /// Whether a policy in use routes on KV events (cache_aware, in any pool): only then are
    /// workers asked where they publish, and subscribed to.
    pub fn uses_kv_events(&self) -> bool {
        let ca = |p: &Arc<dyn Policy>| p.name() == "cache_aware";
        match &self.pools {
            Some(p) => ca(&p.prefill) || ca(&p.decode),
            None => ca(&self.policy),
        }
    }

    /// Whether a policy in use balances on load (all but round_robin and random): then the
    /// workers' own load reports are worth subscribing to.
    pub fn uses_load(&self) -> bool {
        let load = |p: &Arc<dyn Policy>| !matches!(p.name(), "round_robin" | "random");
        match &self.pools {
            Some(p) => load(&p.prefill) || load(&p.decode),
            None => load(&self.policy),
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
    let spec = |url: &str,
                role,
                bootstrap_port,
                api_key: &Option<crate::secret::Secret>,
                tls: &crate::tls::TlsClientSpec| WorkerSpec {
        url: url.to_owned(),
        role,
        bootstrap_port,
        api_key: api_key.clone(),
        source: WorkerSource::Config,
        tls: config.tls.for_worker(role, tls),
    };
    let mut out: Vec<WorkerSpec> = config
        .workers
        .iter()
        .map(|w| spec(&w.url, WorkerRole::Regular, None, &w.api_key, &w.tls))
        .collect();
    if let Some(pd) = &config.pd {
        out.extend(
            pd.prefill
                .iter()
                .map(|p| spec(&p.url, WorkerRole::Prefill, p.bootstrap_port, &p.api_key, &p.tls)),
        );
        out.extend(
            pd.decode.iter().map(|d| spec(&d.url, WorkerRole::Decode, None, &d.api_key, &d.tls)),
        );
    }
    out
}

pub struct App {
    live: ArcSwap<Live>,
    pub registry: Registry,
    pub http: crate::proxy::upstream::Upstream,
    /// Serving HTTPS: the certificate in use, replaced on reload.
    pub server_tls: Option<Arc<crate::tls::ServerTls>>,
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
    /// The workers' KV-event feeds and the index of blocks they hold.
    pub kv: Arc<crate::kv::KvState>,
    /// What peer replicas routed (approximate mode across replicas: `[peers]`).
    pub peers: Arc<crate::peers::Peers>,
    /// The tracer, when OpenTelemetry traces are on (`[trace]`).
    pub otel: Option<crate::otel::Otel>,
}

impl App {
    /// `flags` are what the configuration was built from; a reload rebuilds from them, so flags
    /// keep overriding the file's keys.
    /// Fails only when the configuration's serving certificate no longer loads (it was
    /// checked when the configuration was built): routerd never serves plain HTTP instead.
    pub fn new(config: Config, flags: Flags) -> std::io::Result<Self> {
        // DP-aware: no size is known yet, so ranks are registered as `dp::run` learns them.
        let dp = crate::dp::DpState::default();
        let server_tls = match &config.server.tls {
            None => None,
            Some(spec) => {
                Some(Arc::new(crate::tls::ServerTls::new(spec).map_err(std::io::Error::other)?))
            }
        };
        let metrics = crate::metrics::Metrics::default();
        let otel = match &config.trace {
            Some(t) => Some(
                crate::otel::Otel::start(t, metrics.trace_spans.clone())
                    .map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        Ok(Self {
            otel,
            kv: Arc::new(crate::kv::KvState::new(&config.kv_events)),
            peers: Arc::new(crate::peers::Peers::new(&config.peers)),
            server_tls,
            registry: Registry::new(crate::dp::config_specs(&dp, &config)),
            live: ArcSwap::from_pointee(Live::new(config)),
            http: Default::default(),
            draining: AtomicBool::new(false),
            reloader: Reloader::new(flags),
            info_spread: Default::default(),
            retry_budget: Default::default(),
            metrics,
            decisions: Default::default(),
            totals: Default::default(),
            events: Default::default(),
            started: std::time::Instant::now(),
            discovery: Default::default(),
            dp,
        })
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

//! The worker registry: every worker source (config and its reloads, the admin API, Kubernetes
//! discovery, dp-size resolution, `routerctl launch`) hands its updates to one writer, which
//! turns them into a new immutable `Snapshot` that the request path loads without locking. A
//! source that computes a whole set (config, discovery) tags it with the generation of what it
//! was computed from; the writer drops a set older than the last one it applied for that source,
//! so a slow writer can never undo a newer one (a dp resolution that awaited the network across
//! a reload). A worker keeps its `Arc<Worker>` (and so its counters) across snapshots for as long
//! as it stays registered; when it leaves, the writer tells the policies (`on_removed`), so no
//! caller has to remember to.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::time::Instant;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::HeaderValue;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    #[default]
    Regular,
    Prefill,
    Decode,
}

impl WorkerRole {
    pub const ALL: [WorkerRole; 3] = [WorkerRole::Regular, WorkerRole::Prefill, WorkerRole::Decode];

    /// The name used in the API, metrics labels and events.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerRole::Regular => "regular",
            WorkerRole::Prefill => "prefill",
            WorkerRole::Decode => "decode",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerSource {
    Config,
    Api,
    Discovery,
    Launch,
}

impl WorkerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerSource::Config => "config",
            WorkerSource::Api => "api",
            WorkerSource::Discovery => "discovery",
            WorkerSource::Launch => "launch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Normalised (`config::normalize_worker_url`).
    pub url: String,
    pub role: WorkerRole,
    pub bootstrap_port: Option<u16>,
    pub api_key: Option<crate::secret::Secret>,
    pub source: WorkerSource,
    /// How an `https://` worker is verified and which client certificate it is shown
    /// (resolved: the worker's own settings over its pool's over the top level's).
    pub tls: crate::tls::TlsClientSpec,
}

/// A registered worker and its live counters.
#[derive(Debug)]
pub struct Worker {
    /// A random UUID (v4), given at registration: stable for the worker's life, never reused
    /// (the workers API's `worker_id`, as in sgl-router 0.3).
    pub id: String,
    pub spec: WorkerSpec,
    /// `host:port` of the URL, parsed once for building request URIs.
    pub authority: Authority,
    /// DP-aware mode: the data-parallel rank this target stands for (`URL@rank`).
    pub dp_rank: Option<u32>,
    /// `Authorization` value sent to this worker, precomputed.
    pub auth: Option<HeaderValue>,
    /// `https://` workers: the TLS client and the name their certificate must carry, or why
    /// there is none (every request to the worker then fails with that reason).
    pub tls: Option<Result<crate::tls::WorkerTls, String>>,
    pub in_flight: AtomicU64,
    pub requests_total: AtomicU64,
    pub errors_total: AtomicU64,
    /// Prompt and cached tokens as the worker itself reported them in its responses.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Event routing: prompt tokens routerd predicted the worker's cache held (compare with
    /// `cached_tokens`, what it reported).
    pub predicted_tokens: AtomicU64,
    /// What the worker itself last said of its load (its load socket, or `/get_load`).
    pub report: LoadReport,
    /// Cache-routing accounting of the prompts routed here, by unit (tokens, characters) and
    /// part (`ACCOUNTING_PARTS`): docs/metrics.md.
    pub accounting: [[AtomicU64; ACCOUNTING_PARTS.len()]; 2],
    /// The engine's `max_running_requests` from its `/get_server_info` (0: not known), for
    /// the saturation metrics; asked after its health checks pass (`health::learn_capacity`).
    pub max_running: AtomicU64,
    /// When it was last asked (`clock_ms`; 0: never).
    pub capacity_asked_ms: AtomicU64,
    /// Prompt characters sent to this worker that it has not yet cached by the policy's
    /// estimate and not yet answered (cost_aware's queue of prefill work).
    pub pending_prefill: AtomicU64,
    /// Requests sent to this worker by cost_aware that have not had their first bytes back
    /// (queued for a batch slot, or in prefill).
    pub pending_requests: AtomicU64,
    pub healthy: AtomicBool,
    /// Keep-alive connections to this worker, for the inference path.
    pub idle: crate::http1::pool::IdleConns,
    pub breaker: crate::breaker::Breaker,
    /// The active health checker's view (it alone writes it).
    pub health: Mutex<HealthTrack>,
    /// A 429 with `Retry-After` keeps the worker out of routing until then.
    pub throttled_until: Mutex<Option<std::time::Instant>>,
    pub throttled: AtomicBool,
    /// The last failure seen on this worker (request or health check), for operators.
    pub last_error: Mutex<Option<String>>,
    pub retries_total: AtomicU64,
}

/// What the health checker knows about one worker (it alone writes it; `health.rs`).
#[derive(Debug)]
pub struct HealthTrack {
    pub(crate) passed: u32,
    pub(crate) failed: u32,
    pub(crate) ever_passed: bool,
    pub(crate) added: Instant,
    pub(crate) next: Option<Instant>,
    pub(crate) probing: bool,
    pub(crate) warned: bool,
    pub checks_total: u64,
}

impl HealthTrack {
    pub fn new() -> Self {
        Self {
            passed: 0,
            failed: 0,
            ever_passed: false,
            added: Instant::now(),
            next: None,
            probing: false,
            warned: false,
            checks_total: 0,
        }
    }
}

impl Default for HealthTrack {
    fn default() -> Self {
        Self::new()
    }
}

/// A random version-4 UUID, `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`.
pub fn new_id() -> String {
    let n = (rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// `http://host:port@3` → (`http://host:port`, `Some(3)`): a DP rank target (`--dp-aware`,
/// docs/migrating-from-sgl-router.md); any other URL → (itself, `None`).
pub fn split_rank(url: &str) -> (&str, Option<u32>) {
    match url.rsplit_once('@') {
        Some((base, rank))
            if !rank.is_empty()
                && rank.bytes().all(|b| b.is_ascii_digit())
                && base.contains("://") =>
        {
            match rank.parse() {
                Ok(r) => (base, Some(r)),
                Err(_) => (url, None),
            }
        }
        _ => (url, None),
    }
}

impl Worker {
    pub fn new(spec: WorkerSpec) -> Self {
        let auth = spec
            .api_key
            .as_ref()
            .and_then(|k| HeaderValue::try_from(format!("Bearer {}", k.expose())).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        let (base, dp_rank) = split_rank(&spec.url);
        let (https, rest) = match base.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, base.strip_prefix("http://").unwrap_or(base)),
        };
        let authority: Authority =
            rest.parse().unwrap_or_else(|_| Authority::from_static("invalid.worker"));
        let tls = https.then(|| crate::tls::WorkerTls::new(&spec.tls, authority.host()));
        Self {
            id: new_id(),
            spec,
            authority,
            dp_rank,
            auth,
            tls,
            in_flight: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            pending_prefill: AtomicU64::new(0),
            pending_requests: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            predicted_tokens: AtomicU64::new(0),
            report: LoadReport::default(),
            accounting: Default::default(),
            max_running: AtomicU64::new(0),
            capacity_asked_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            idle: Default::default(),
            breaker: Default::default(),
            health: Mutex::new(HealthTrack::new()),
            throttled_until: Mutex::new(None),
            throttled: AtomicBool::new(false),
            last_error: Mutex::new(None),
            retries_total: AtomicU64::new(0),
        }
    }

    pub fn url(&self) -> &str {
        &self.spec.url
    }

    /// Where the wire sends this worker's requests.
    pub fn target(&self) -> crate::http1::worker::Target<'_> {
        crate::http1::worker::Target {
            authority: &self.authority,
            idle: &self.idle,
            tls: self.tls.as_ref(),
        }
    }

    /// A wire failure before the answer's head as the router's error: whose fault, retryable.
    /// `header_timeout` is what a timeout waited for.
    pub fn wire_error(
        &self,
        e: crate::http1::worker::WireError,
        header_timeout: std::time::Duration,
    ) -> crate::error::RouterError {
        use crate::http1::worker::WireError;
        let worker = self.url().to_owned();
        match e {
            WireError::Timeout => {
                crate::error::RouterError::WorkerTimeout { worker, after: header_timeout }
            }
            e => crate::error::RouterError::WorkerFailed { worker, reason: e.to_string() },
        }
    }

    /// Healthy, its circuit not open, and not asked to back off.
    pub fn is_routable(&self) -> bool {
        self.healthy.load(Relaxed) && self.breaker.allows() && !self.is_throttled()
    }

    fn is_throttled(&self) -> bool {
        self.throttled_for().is_some()
    }

    /// How long the worker still backs off after a 429 (an expired backoff is cleared).
    fn throttled_for(&self) -> Option<std::time::Duration> {
        if !self.throttled.load(Relaxed) {
            return None;
        }
        let mut until = self.throttled_until.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match *until {
            Some(t) if t > now => Some(t - now),
            _ => {
                *until = None;
                self.throttled.store(false, Relaxed);
                None
            }
        }
    }

    /// When the worker is not routable now: how long until it may be, if that is known (an open
    /// circuit's timeout, a 429's `Retry-After`); `None` for an unhealthy worker (its next
    /// passing health check decides).
    pub fn unroutable_for(&self) -> Option<std::time::Duration> {
        if !self.healthy.load(Relaxed) {
            return None;
        }
        let throttle = self.throttled_for();
        let open = self.breaker.open_for();
        match (throttle, open) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => Some(a.or(b).unwrap_or_default()),
        }
    }

    /// Keeps the worker out of routing for `d` (its `Retry-After`).
    pub fn throttle(&self, d: std::time::Duration) {
        *self.throttled_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + d);
        self.throttled.store(true, Relaxed);
    }

    pub fn set_last_error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The load policies compare: this router's in-flight requests, plus the requests the
    /// worker last reported beyond the ones this router had in flight when the report came
    /// (other routers' traffic: every replica sees the others' load this way). Without a
    /// fresh report, this router's own count.
    pub fn load(&self) -> u64 {
        let own = self.in_flight.load(Relaxed);
        own + self.report.others(own)
    }

    /// Counts a request in flight on this worker until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests_total.fetch_add(1, Relaxed);
        LoadGuard(self.clone())
    }
}

/// Where a worker's load report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportSource {
    /// SGLang's load socket (`--load-publish-endpoint`).
    Published,
    /// `/get_load`, polled (`[policy] load_poll_interval`).
    Polled,
}

/// A worker's own count of its running and waiting requests, as it last reported it, and this
/// router's in-flight count when the report came: the difference is other routers' traffic.
/// A report counts until its deadline (a few of the source's intervals), then load is this
/// router's own count again.
#[derive(Debug, Default)]
pub struct LoadReport {
    requests: AtomicU64,
    own_then: AtomicU64,
    /// Milliseconds on [`clock_ms`] until which the report counts; 0: none.
    until_ms: AtomicU64,
    /// 1: published, 2: polled.
    source: std::sync::atomic::AtomicU8,
    /// This router's share of the fleet's traffic when the report came ([`TrafficShare`]), in
    /// thousandths (0: none yet): how the others' count is carried forward between reports.
    fleet_milli: AtomicU64,
    /// This router's share of this worker's requests at its reports, smoothed (each report
    /// moves it a fifth of the way; 0: no report with requests yet). The others are carried
    /// forward no faster than this says either: where they never sent anything (a client that
    /// bypasses the routers, on one worker), they are not taken to send.
    share_milli: AtomicU64,
}

/// This router's share of the requests on the fleet's workers, from their load reports: its
/// own in-flight count against what each worker reported, summed over the workers' reports
/// and smoothed (each report weighs 1/64, a few hundred milliseconds of reports). Replicas
/// behind a Service get the same share of every kind of request and route alike, so this
/// router's share of any one worker's traffic is about its share of the fleet's; measured per
/// worker alone, it is noise where a worker holds few requests (one of ours or none flips
/// it), and a wrong share magnifies the noise. [`LoadReport::others`] carries the others
/// forward by whichever of the two shares moves them slower.
#[derive(Debug, Default)]
pub struct TrafficShare {
    /// Decayed sums of (own, reported) requests.
    sums: Mutex<(f64, f64)>,
}

impl TrafficShare {
    /// Learns from a report of `requests` while `own` were this router's; returns the share,
    /// in thousandths (0 while no report had requests).
    pub fn record(&self, own: u64, requests: u64) -> u64 {
        let mut s = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        if requests > 0 {
            const KEEP: f64 = 63.0 / 64.0;
            s.0 = s.0 * KEEP + own.min(requests) as f64;
            s.1 = s.1 * KEEP + requests as f64;
        }
        match *s {
            (_, all) if all <= 0.0 => 0,
            (own, all) => ((own / all * 1000.0).round() as u64).clamp(1, 1000),
        }
    }
}

/// Between two reports, other routers are taken to send (and finish) this many requests per
/// one of this router's at most: their share carried forward is capped at 7 times ours (eight
/// replicas spread evenly), so a router with a sliver of the traffic does not magnify noise.
const MAX_OTHERS_PER_OWN_MILLI: i64 = 7_000;

/// How a routed prompt splits (docs/metrics.md, "Why the hit rate is what it is"): `workload`
/// (no routable worker held it), `policy` (another worker held more: given up for balance),
/// `stale` (the chosen worker was believed to hold it and did not), `underpredicted` (it held
/// more than believed), `hit` (what the worker reported cached).
pub const ACCOUNTING_PARTS: [&str; 5] = ["workload", "policy", "stale", "underpredicted", "hit"];

/// The accounting of `workers` summed, by unit (tokens, characters) and part.
pub fn accounting_totals<'a>(
    workers: impl IntoIterator<Item = &'a Worker>,
) -> [[u64; ACCOUNTING_PARTS.len()]; 2] {
    let mut totals = [[0; ACCOUNTING_PARTS.len()]; 2];
    for w in workers {
        for (total, unit) in totals.iter_mut().zip(&w.accounting) {
            for (t, n) in total.iter_mut().zip(unit) {
                *t += n.load(Relaxed);
            }
        }
    }
    totals
}

/// A monotonic millisecond clock for report deadlines (from the first call, plus one so that
/// 0 can mean "none").
pub fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

impl LoadReport {
    /// Records a report of `requests` (running + waiting), `own` being this router's
    /// in-flight count on the worker now, valid for `valid`; `share` learns from it this
    /// router's share of the fleet's traffic, by which the others' count is carried forward.
    pub fn set(
        &self,
        requests: u64,
        own: u64,
        valid: std::time::Duration,
        source: ReportSource,
        share: &TrafficShare,
    ) {
        self.fleet_milli.store(share.record(own, requests), Relaxed);
        if let Some(mine) = (own * 1000).checked_div(requests) {
            let mine = mine.clamp(1, 1000);
            let prev = self.share_milli.load(Relaxed);
            let next = if prev == 0 { mine } else { (prev * 4 + mine) / 5 };
            self.share_milli.store(next, Relaxed);
        }
        self.requests.store(requests, Relaxed);
        self.own_then.store(own, Relaxed);
        self.source.store(if source == ReportSource::Published { 1 } else { 2 }, Relaxed);
        self.until_ms.store(clock_ms() + valid.as_millis() as u64, Relaxed);
    }

    /// The worker stopped reporting (its socket or poll failed).
    pub fn clear(&self) {
        self.until_ms.store(0, Relaxed);
    }

    /// The report, while it counts: (requests, own in-flight then, source).
    pub fn fresh(&self) -> Option<(u64, u64, ReportSource)> {
        let until = self.until_ms.load(Relaxed);
        if until == 0 || clock_ms() > until {
            return None;
        }
        let source = match self.source.load(Relaxed) {
            1 => ReportSource::Published,
            _ => ReportSource::Polled,
        };
        Some((self.requests.load(Relaxed), self.own_then.load(Relaxed), source))
    }

    /// Requests on the worker that are not this router's, `own` being this router's in-flight
    /// count now: those the worker reported beyond this router's own then, carried forward by
    /// what this router sent or finished there since, in proportion to the others' share of
    /// the worker's requests (router replicas that route alike move alike). A report comes
    /// every few scheduler steps, tens of milliseconds, in which the other replicas keep
    /// sending: without this, each replica sees a worker's queue late and they overshoot it
    /// together.
    pub fn others(&self, own: u64) -> u64 {
        let Some((reported, own_then, _)) = self.fresh() else { return 0 };
        let then = reported.saturating_sub(own_then) as i64;
        // No report with requests yet: nothing says the others move at all.
        let others_per_own = |share: &AtomicU64| match share.load(Relaxed) as i64 {
            0 => 0,
            share => (1_000_000 / share - 1000).clamp(0, MAX_OTHERS_PER_OWN_MILLI),
        };
        let per_own = others_per_own(&self.fleet_milli).min(others_per_own(&self.share_milli));
        let since = (own as i64 - own_then as i64) * per_own / 1000;
        (then + since).max(0) as u64
    }
}

/// In-flight accounting: +1 when dispatched, -1 when the response body ends or is dropped.
#[derive(Debug)]
pub struct LoadGuard(Arc<Worker>);

impl LoadGuard {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// An immutable view of the registered workers.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub workers: Vec<Arc<Worker>>,
}

impl Snapshot {
    pub fn get(&self, url: &str) -> Option<&Arc<Worker>> {
        self.workers.iter().find(|w| w.url() == url)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Worker>> {
        self.workers.iter().find(|w| w.id == id)
    }

    pub fn routable(&self) -> usize {
        self.workers.iter().filter(|w| w.is_routable()).count()
    }

    /// The workers of one role (a PD pool), in registration order.
    pub fn pool(&self, role: WorkerRole) -> Vec<Arc<Worker>> {
        self.workers.iter().filter(|w| w.spec.role == role).cloned().collect()
    }

    /// Routable workers of one role.
    pub fn routable_in(&self, role: WorkerRole) -> usize {
        self.workers.iter().filter(|w| w.spec.role == role && w.is_routable()).count()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("worker {0} is already registered")]
    Duplicate(String),
    #[error("worker {0} is not registered")]
    Unknown(String),
}

/// Told of every worker that leaves the registry (the policies forget it).
pub type OnRemoved = Box<dyn Fn(&Arc<Worker>) + Send + Sync>;

#[derive(Default)]
pub struct Registry {
    current: ArcSwap<Snapshot>,
    /// Serialises writers (readers never take it); holds the generation of the last set applied
    /// for each source that writes whole sets.
    writer: Mutex<Generations>,
    on_removed: OnceLock<OnRemoved>,
    /// This router's share of the fleet's traffic, from the workers' load reports.
    pub share: TrafficShare,
}

#[derive(Default)]
struct Generations {
    config: u64,
    discovery: u64,
}

impl Generations {
    fn of(&mut self, source: WorkerSource) -> Option<&mut u64> {
        match source {
            WorkerSource::Config => Some(&mut self.config),
            WorkerSource::Discovery => Some(&mut self.discovery),
            WorkerSource::Api | WorkerSource::Launch => None,
        }
    }
}

/// What a whole-set update did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The set was older than one applied before it: nothing was changed.
    pub stale: bool,
}

impl Registry {
    pub fn new(specs: Vec<WorkerSpec>) -> Self {
        let workers = specs.into_iter().map(|s| Arc::new(Worker::new(s))).collect();
        Self {
            current: ArcSwap::from_pointee(Snapshot { workers }),
            writer: Mutex::default(),
            on_removed: OnceLock::new(),
            share: TrafficShare::default(),
        }
    }

    /// Sets who is told when a worker leaves (once; later calls are ignored).
    pub fn set_on_removed(&self, f: OnRemoved) {
        let _ = self.on_removed.set(f);
    }

    fn removed(&self, w: &Arc<Worker>) {
        if let Some(f) = self.on_removed.get() {
            f(w);
        }
    }

    fn write(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The cheap read for the request path (no refcount traffic in the common case).
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn add(&self, spec: WorkerSpec) -> Result<Arc<Worker>, RegistryError> {
        Ok(self.add_all(vec![spec])?.remove(0))
    }

    /// Adds every one of `specs` in one snapshot (the ranks of a dp-aware worker), or none of
    /// them when one is registered already.
    pub fn add_all(&self, specs: Vec<WorkerSpec>) -> Result<Vec<Arc<Worker>>, RegistryError> {
        let _w = self.write();
        let cur = self.current.load_full();
        if let Some(dup) = specs.iter().find(|s| cur.get(&s.url).is_some()) {
            return Err(RegistryError::Duplicate(dup.url.clone()));
        }
        let added: Vec<Arc<Worker>> = specs.into_iter().map(|s| Arc::new(Worker::new(s))).collect();
        let mut workers = cur.workers.clone();
        workers.extend(added.iter().cloned());
        self.current.store(Arc::new(Snapshot { workers }));
        Ok(added)
    }

    /// Makes the workers of `source` exactly `specs`, computed from `generation` of that
    /// source (a set older than the last applied is dropped: `stale`). Workers that stay keep
    /// their state (a changed API key, role or bootstrap port counts as a new worker); the
    /// others are removed (requests already on them finish); new ones are added. A URL already
    /// registered by another source is left alone.
    pub fn sync_source(
        &self,
        source: WorkerSource,
        specs: Vec<WorkerSpec>,
        generation: u64,
    ) -> Synced {
        let mut gens = self.write();
        if let Some(last) = gens.of(source) {
            if generation < *last {
                tracing::debug!(
                    source = source.as_str(),
                    generation,
                    last = *last,
                    "stale worker set dropped"
                );
                return Synced { stale: true, ..Synced::default() };
            }
            *last = generation;
        }
        let cur = self.current.load_full();
        let mut out = Synced::default();
        let mut gone = Vec::new();
        let mut workers: Vec<Arc<Worker>> = Vec::with_capacity(specs.len());
        for w in &cur.workers {
            let keep = w.spec.source != source || specs.iter().any(|s| *s == w.spec);
            if keep {
                workers.push(w.clone());
            } else {
                out.removed.push(w.spec.url.clone());
                gone.push(w.clone());
            }
        }
        for spec in specs {
            if !workers.iter().any(|w| w.spec.url == spec.url) {
                out.added.push(spec.url.clone());
                workers.push(Arc::new(Worker::new(spec)));
            }
        }
        if !out.added.is_empty() || !out.removed.is_empty() {
            self.current.store(Arc::new(Snapshot { workers }));
        }
        drop(gens);
        for w in &gone {
            self.removed(w);
        }
        out
    }

    /// Removes a worker from new routing decisions; requests already on it finish.
    pub fn remove(&self, url: &str) -> Result<Arc<Worker>, RegistryError> {
        let w = self.write();
        let cur = self.current.load_full();
        let Some(pos) = cur.workers.iter().position(|w| w.url() == url) else {
            return Err(RegistryError::Unknown(url.to_owned()));
        };
        let mut workers = cur.workers.clone();
        let removed = workers.remove(pos);
        self.current.store(Arc::new(Snapshot { workers }));
        drop(w);
        self.removed(&removed);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_are_carried_forward_by_this_routers_moves_by_the_fleets_share_and_the_workers() {
        let valid = std::time::Duration::from_secs(3);
        let pub_ = ReportSource::Published;
        let share = TrafficShare::default();
        let r = LoadReport::default();
        assert_eq!(r.others(5), 0, "no report");
        r.set(0, 0, valid, pub_, &share);
        assert_eq!(r.others(3), 0, "no report with requests yet: nothing says the others move");
        r.set(10, 10, valid, pub_, &share);
        assert_eq!(r.others(14), 0, "alone in the fleet: no one else moves");
        // A third of the fleet's requests are this router's.
        let share = TrafficShare::default();
        let r = LoadReport::default();
        r.set(30, 10, valid, pub_, &share);
        assert_eq!(r.others(10), 20);
        assert_eq!(r.others(13), 26, "three more of ours: six more of theirs");
        assert_eq!(r.others(7), 14, "three of ours done: six of theirs");
        assert_eq!(r.others(0), 0);
        // The share is the fleet's: a worker where we hold none of few requests does not make
        // the others move faster there than anywhere.
        let quiet = LoadReport::default();
        quiet.set(2, 0, valid, pub_, &share);
        assert_eq!(quiet.others(1), 2 + 2, "share 10/32: 2.2 of theirs per one of ours");
        // A sliver of the traffic: the others move at most 7 per one of ours.
        let share = TrafficShare::default();
        let r = LoadReport::default();
        r.set(1000, 1, valid, pub_, &share);
        assert_eq!(r.others(2), 999 + 7);
        // Smoothed over reports: one report alone moves the fleet's share by 1/64 and the
        // worker's by a fifth; the others move no faster than either says.
        let share = TrafficShare::default();
        for _ in 0..200 {
            share.record(10, 30);
        }
        let r = LoadReport::default();
        r.set(30, 10, valid, pub_, &share);
        r.set(10, 10, valid, pub_, &share);
        assert_eq!(r.others(13), 3, "the worker's 466/1000 (the fleet's 337): 1.1 per one of ours");
        // Others that bypass the routers, all on one worker: this router is a sliver of the
        // fleet, but on a worker where the others never sent anything they do not move.
        let share = TrafficShare::default();
        let busy = LoadReport::default();
        let idle = LoadReport::default();
        busy.set(6, 0, valid, pub_, &share);
        idle.set(0, 0, valid, pub_, &share);
        assert_eq!(idle.others(3), 0, "three of ours on the idle worker: nobody else's");
        assert_eq!(busy.others(0), 6);
        r.clear();
        assert_eq!(r.others(15), 0, "no fresh report");
    }

    fn spec(url: &str) -> WorkerSpec {
        WorkerSpec {
            url: url.into(),
            role: WorkerRole::Regular,
            bootstrap_port: None,
            api_key: None,
            source: WorkerSource::Api,
            tls: Default::default(),
        }
    }

    #[test]
    fn add_remove_keep_state_of_others() {
        let r = Registry::new(vec![spec("http://a:1")]);
        let a = r.snapshot().workers[0].clone();
        let _g = a.start_request();
        r.add(spec("http://b:1")).unwrap();
        assert_eq!(
            r.add(spec("http://b:1")).unwrap_err(),
            RegistryError::Duplicate("http://b:1".into())
        );
        let snap = r.snapshot();
        assert!(Arc::ptr_eq(&snap.workers[0], &a), "a keeps its state");
        assert_eq!(snap.workers[0].in_flight.load(Relaxed), 1);
        r.remove("http://a:1").unwrap();
        assert_eq!(
            r.remove("http://a:1").unwrap_err(),
            RegistryError::Unknown("http://a:1".into())
        );
        assert_eq!(r.snapshot().workers.len(), 1);
        assert_eq!(snap.workers.len(), 2, "old snapshots are unchanged");
    }

    #[test]
    fn stale_sets_are_dropped_and_leavers_reported() {
        let r = Registry::new(vec![]);
        let left = Arc::new(Mutex::new(Vec::new()));
        let seen = left.clone();
        r.set_on_removed(Box::new(move |w| seen.lock().unwrap().push(w.url().to_owned())));
        let cfg = |url: &str| WorkerSpec { source: WorkerSource::Config, ..spec(url) };
        let s = r.sync_source(WorkerSource::Config, vec![cfg("http://a:1"), cfg("http://b:1")], 2);
        assert_eq!(s.added.len(), 2);
        let s = r.sync_source(WorkerSource::Config, vec![cfg("http://a:1")], 3);
        assert_eq!(s.removed, ["http://b:1"]);
        // Computed from generation 2 (before b was removed): dropped, b stays gone.
        let s = r.sync_source(WorkerSource::Config, vec![cfg("http://a:1"), cfg("http://b:1")], 2);
        assert!(s.stale);
        assert_eq!(r.snapshot().workers.len(), 1);
        // The same generation again is applied (a learner that read the newest config).
        assert!(!r.sync_source(WorkerSource::Config, vec![cfg("http://a:1")], 3).stale);
        r.add(spec("http://c:1")).unwrap();
        r.remove("http://c:1").unwrap();
        assert_eq!(*left.lock().unwrap(), ["http://b:1", "http://c:1"]);
    }

    #[test]
    fn ids_are_version_4_uuids_and_unique() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(20) {
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{id}");
            assert!(parts[2].starts_with('4'), "{id}");
            assert!("89ab".contains(&parts[3][..1]), "{id}");
        }
    }

    #[test]
    fn guard_counts_until_dropped_and_load_adds_what_others_sent() {
        let w = Arc::new(Worker::new(spec("http://a:1")));
        let share = TrafficShare::default();
        let g = w.start_request();
        assert_eq!(w.load(), 1);
        // The worker runs 5, one of them ours: 4 are other routers'.
        w.report.set(5, 1, std::time::Duration::from_secs(60), ReportSource::Published, &share);
        assert_eq!(w.load(), 5);
        let g2 = w.start_request();
        // One more of ours since the report; the others, four in five of the worker's
        // requests, are taken to have sent four more meanwhile.
        assert_eq!(w.load(), 2 + 4 + 4, "ours since the report, and the others' carried forward");
        // Ours not yet on the worker when it reported: nobody else's.
        w.report.set(1, 2, std::time::Duration::from_secs(60), ReportSource::Polled, &share);
        assert_eq!(w.load(), 2);
        w.report.set(9, 0, std::time::Duration::ZERO, ReportSource::Polled, &share);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(w.load(), 2, "a stale report does not count");
        w.report.set(9, 0, std::time::Duration::from_secs(60), ReportSource::Polled, &share);
        w.report.clear();
        assert_eq!(w.load(), 2);
        drop((g, g2));
        assert_eq!(w.in_flight.load(Relaxed), 0);
        assert_eq!(w.requests_total.load(Relaxed), 2);
    }
}

//! One typed configuration, built once from the TOML file and sgl-router's flags (a flag
//! overrides the file's key), with every error collected. See docs/configuration.md.

mod discovery;
mod error;
mod flags;
mod kv;
mod pd;
mod raw;
mod sections;
mod security;
mod tls;
mod trace;

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use http::HeaderName;
use serde::Serialize;
use toml::Spanned;

pub use crate::secret::Secret;
pub use discovery::label_selector;
pub use error::{ConfigError, ConfigErrors, Source};
pub use flags::{unsupported_flag, Cli, Command, Flags, UNSUPPORTED_SGL_ROUTER_FLAGS};
use raw::RawConfig;
pub use tls::TlsConfig;
pub use trace::{TraceConfig, TraceProtocol};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub policy: PolicyConfig,
    pub workers: Vec<WorkerConfig>,
    /// Prefill-decode mode: `Some` with its pools (possibly empty, filled at runtime).
    pub pd: Option<PdConfig>,
    pub health: HealthConfig,
    pub circuit_breaker: BreakerConfig,
    pub retry: RetryConfig,
    /// The Prometheus listener (`None`: off).
    pub metrics: Option<MetricsConfig>,
    pub log_level: String,
    pub log_format: LogFormat,
    pub log_dir: Option<std::path::PathBuf>,
    /// Kubernetes service discovery (`None`: off).
    pub discovery: Option<DiscoveryConfig>,
    pub security: SecurityConfig,
    /// How `https://` workers are verified, and the client certificate they are shown.
    pub tls: TlsConfig,
    /// Where workers publish KV events (docs/kv-events.md).
    pub kv_events: crate::kv::KvEventsConfig,
    /// The `tokenizer.json` prompts are tokenized with for event routing, and the chat
    /// template when one is named (`None`: only requests that carry `input_ids` route on
    /// events).
    pub tokenizer: Option<crate::kv::tokenize::TokenizerFiles>,
    /// `[tokenizer.prefill]`, `[tokenizer.decode]`: a PD pool's own tokenizer.
    pub pool_tokenizers: PoolTokenizers,
    /// Peer replicas told what this one routes on its approximate tree (docs/replicas.md).
    pub peers: PeersConfig,
    /// `[trace]`: OpenTelemetry traces, when on (a restart applies changes).
    pub trace: Option<TraceConfig>,
}

/// A PD pool's own tokenizer, each replacing `Config::tokenizer` for its pool.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct PoolTokenizers {
    pub prefill: Option<crate::kv::tokenize::TokenizerFiles>,
    pub decode: Option<crate::kv::tokenize::TokenizerFiles>,
}

impl Config {
    /// The tokenizer requests are hashed with for the workers of `role`.
    pub fn tokenizer_for(
        &self,
        role: crate::registry::WorkerRole,
    ) -> Option<&crate::kv::tokenize::TokenizerFiles> {
        use crate::registry::WorkerRole::*;
        let own = match role {
            Regular => None,
            Prefill => self.pool_tokenizers.prefill.as_ref(),
            Decode => self.pool_tokenizers.decode.as_ref(),
        };
        own.or(self.tokenizer.as_ref())
    }
}

/// `[peers]`: the other router replicas (approximate mode across replicas).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeersConfig {
    /// `http://HOST:PORT` of each peer (a name with several addresses: one peer each; this
    /// replica itself may be listed).
    pub urls: Vec<String>,
    /// Pages of peers' decisions kept at most (about 40 bytes each).
    pub max_pages: usize,
}

impl Default for PeersConfig {
    fn default() -> Self {
        Self { urls: Vec::new(), max_pages: 1 << 20 }
    }
}

/// Who may call the router, and where workers may be (docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct SecurityConfig {
    /// Required from clients on inference routes (`Authorization: Bearer KEY`); also sent to
    /// the workers given by flags and to discovered workers that have no key of their own.
    pub api_key: Option<Secret>,
    /// Required on management and admin routes; without it, only loopback peers may change
    /// anything.
    pub admin_api_key: Option<Secret>,
    /// Workers added through the API or discovery must be in one of these (empty: anywhere
    /// but link-local and metadata addresses).
    #[serde(serialize_with = "ser::networks")]
    pub allowed_worker_networks: Vec<ipnet::IpNet>,
}

/// Workers discovered as Kubernetes pods (docs/discovery.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiscoveryConfig {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub port: u16,
    /// Regular mode's pods; in PD mode the pools' selectors below.
    pub selector: std::collections::BTreeMap<String, String>,
    pub prefill_selector: std::collections::BTreeMap<String, String>,
    pub decode_selector: std::collections::BTreeMap<String, String>,
    pub bootstrap_port_annotation: String,
    /// `None`: in-cluster, else `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Discovered pods are reached over `https` (with `[tls]`) or plain `http`.
    pub https: bool,
    /// Sent to discovered workers (default: `security.api_key`).
    pub api_key: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsConfig {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Active health checks (see docs/fault-tolerance.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    pub enabled: bool,
    pub endpoint: String,
    #[serde(serialize_with = "ser::duration")]
    pub interval: Duration,
    #[serde(serialize_with = "ser::duration")]
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    #[serde(serialize_with = "ser::duration")]
    pub startup_timeout: Duration,
    #[serde(serialize_with = "ser::duration")]
    pub startup_check_interval: Duration,
}

/// Per-worker circuit breakers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerConfig {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    #[serde(serialize_with = "ser::duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
}

/// Retries on other workers, before the first response byte.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryConfig {
    pub enabled: bool,
    pub max_retries: u32,
    /// Continuations per request of a stream its worker failed mid-way (0: off). One covers
    /// a worker's death; a request that fails a second worker too is more likely the cause
    /// (a prompt that crashes engines) than its victim, and is not sent on to a third.
    pub migration_limit: u32,
    #[serde(serialize_with = "ser::duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "ser::duration")]
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
    pub jitter_factor: f64,
    /// Retries may add at most this fraction of the request rate...
    pub budget_ratio: f64,
    /// ...plus this many per second.
    pub budget_min_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_payload_size: usize,
    #[serde(serialize_with = "ser::duration")]
    pub request_timeout: Duration,
    pub max_concurrent_requests: Option<NonZeroUsize>,
    pub queue_size: usize,
    #[serde(serialize_with = "ser::duration")]
    pub queue_timeout: Duration,
    #[serde(serialize_with = "ser::headers")]
    pub request_id_headers: Vec<HeaderName>,
    #[serde(serialize_with = "ser::duration")]
    pub shutdown_grace: Duration,
    /// Async runtime threads (`None`: one per CPU; 1: a single-threaded runtime).
    pub worker_threads: Option<NonZeroUsize>,
    #[serde(serialize_with = "ser::duration")]
    pub connect_timeout: Duration,
    /// Longest wait for a worker's response head (at most `request_timeout`).
    #[serde(serialize_with = "ser::duration")]
    pub header_timeout: Duration,
    /// Longest silence between two chunks of a worker's response body.
    #[serde(serialize_with = "ser::duration")]
    pub stream_idle_timeout: Duration,
    /// Browser origins allowed by CORS (`*`: any).
    pub cors_allowed_origins: Vec<String>,
    /// Longest time a client may take to send a request head, or between two reads of its
    /// body; then it gets 408 and the connection is closed.
    #[serde(serialize_with = "ser::duration")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    #[serde(serialize_with = "ser::duration")]
    pub keep_alive_timeout: Duration,
    /// Serve HTTPS with this certificate and key (paths only; never the key's content).
    pub tls: Option<crate::tls::ServeSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyName {
    CacheAware,
    /// Estimated time to first token, learned per worker (routerd's own).
    CostAware,
    RoundRobin,
    Random,
    PowerOfTwo,
    Manual,
    /// Prefill pools only.
    Bucket,
}

impl PolicyName {
    pub const ALL: [(&'static str, PolicyName); 7] = [
        ("cache_aware", PolicyName::CacheAware),
        ("cost_aware", PolicyName::CostAware),
        ("round_robin", PolicyName::RoundRobin),
        ("random", PolicyName::Random),
        ("power_of_two", PolicyName::PowerOfTwo),
        ("manual", PolicyName::Manual),
        ("bucket", PolicyName::Bucket),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, p)| *p == self).map(|(n, _)| *n).expect("listed")
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyConfig {
    pub name: PolicyName,
    pub cache_threshold: f64,
    pub balance_abs_threshold: u64,
    pub balance_rel_threshold: f64,
    /// Kept for sgl-router compatibility; the tree is bounded on every insert.
    #[serde(serialize_with = "ser::duration")]
    pub eviction_interval: Duration,
    pub max_tree_size: usize,
    /// When set, workers' `/get_load` is polled at this interval and used by power_of_two.
    #[serde(serialize_with = "ser::opt_duration")]
    pub load_poll_interval: Option<Duration>,
    /// Each worker's data-parallel ranks are routing targets of their own (`URL@rank`).
    pub dp_aware: bool,
    /// When no worker of a pool is routable (unhealthy, circuit open, backing off after a 429),
    /// route among the unroutable ones anyway (Envoy's "panic" routing) instead of answering
    /// 503 `no_available_workers` at once, as sgl-router does. Off by default.
    pub panic_routing: bool,
    /// The `manual` policy's key table (`X-SMG-Routing-Key`).
    pub manual: crate::policy::ManualConfig,
    /// The `bucket` prefill policy: how often its length ranges are refitted.
    #[serde(serialize_with = "ser::duration")]
    pub bucket_adjust_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PdConfig {
    pub prefill: Vec<PrefillConfig>,
    pub decode: Vec<WorkerConfig>,
    /// Each pool's policy (the same parameters as `policy`, another algorithm if asked).
    pub prefill_policy: PolicyName,
    pub decode_policy: PolicyName,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillConfig {
    pub url: String,
    /// Where decode workers fetch the KV cache from; `None` sends `bootstrap_port: null`.
    pub bootstrap_port: Option<u16>,
    pub api_key: Option<Secret>,
    /// The worker's own TLS keys (over its pool's and the top level's).
    pub tls: crate::tls::TlsClientSpec,
}

impl PolicyConfig {
    /// The `bucket` policy's parameters.
    pub fn bucket(&self) -> crate::policy::BucketConfig {
        crate::policy::BucketConfig {
            adjust_interval: self.bucket_adjust_interval,
            balance_abs_threshold: self.balance_abs_threshold,
            balance_rel_threshold: self.balance_rel_threshold,
        }
    }

    /// The same parameters under another algorithm (a PD pool's policy).
    pub fn named(&self, name: PolicyName) -> PolicyConfig {
        PolicyConfig { name, ..self.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerConfig {
    pub url: String,
    pub api_key: Option<Secret>,
    /// The worker's own TLS keys (over its pool's and the top level's).
    pub tls: crate::tls::TlsClientSpec,
}

impl Serialize for PolicyName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How the running configuration is shown (`GET /admin/config`): durations as "30s", secrets
/// never.
pub(crate) mod ser {
    use std::time::Duration;

    use serde::Serializer;

    pub fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn headers<S: Serializer>(h: &[http::HeaderName], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(h.iter().map(|h| h.as_str()))
    }

    pub fn networks<S: Serializer>(n: &[ipnet::IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(n.iter().map(|n| n.to_string()))
    }
}

pub const DEFAULT_REQUEST_ID_HEADERS: [&str; 4] =
    ["x-request-id", "x-correlation-id", "x-trace-id", "request-id"];

impl Config {
    /// Reads `flags.config` (if any) and builds the configuration with the flags on top.
    pub fn load(flags: &Flags) -> Result<Config, ConfigErrors> {
        match &flags.config {
            None => Self::build(None, flags),
            Some(path) => {
                let text = read(path)?;
                let name = path.display().to_string();
                Self::build(Some(Source { name: &name, text: &text }), flags)
            }
        }
    }

    /// Builds from an optional file's text and the flags.
    pub fn build(file: Option<Source>, flags: &Flags) -> Result<Config, ConfigErrors> {
        let raw = match &file {
            None => RawConfig::default(),
            Some(src) => toml::from_str::<RawConfig>(src.text).map_err(|e| {
                let span = e.span().unwrap_or(0..0);
                ConfigErrors(vec![ConfigError {
                    origin: Some(src.locate(&span)),
                    key: src.key_at(span.start),
                    message: e.message().trim().to_owned(),
                }])
            })?,
        };
        let mut b = Builder { file: file.as_ref(), errors: Vec::new() };
        let config = b.config(raw, flags);
        if b.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(b.errors))
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            origin: Some(path.display().to_string()),
            key: "--config".into(),
            message: format!("cannot read the configuration file: {e}"),
        }])
    })
}

/// Where a value came from: a span in the file, or a flag.
#[derive(Debug, Clone, Default)]
struct At {
    span: Option<std::ops::Range<usize>>,
    flag: Option<&'static str>,
}

impl At {
    fn flag(flag: &'static str) -> Self {
        Self { span: None, flag: Some(flag) }
    }

    fn span<T>(v: &Spanned<T>) -> Self {
        Self { span: Some(v.span()), flag: None }
    }
}

/// The flag's value if given, else the file's (with where it stands), else the default.
fn layered<T: Clone>(
    flag: Option<T>,
    flag_name: &'static str,
    file: Option<&Spanned<T>>,
    default: T,
) -> (T, At) {
    match (flag, file) {
        (Some(v), _) => (v, At::flag(flag_name)),
        (None, Some(v)) => (v.get_ref().clone(), At::span(v)),
        (None, None) => (default, At::default()),
    }
}

/// Turns raw values into typed ones, recording an error (with its origin) for each bad value
/// and carrying on with a default so that every error is found in one pass.
struct Builder<'a> {
    file: Option<&'a Source<'a>>,
    errors: Vec<ConfigError>,
}

impl Builder<'_> {
    /// A path written in the configuration file: a relative one is relative to the file's
    /// directory, so the file means the same from any working directory. (Paths given by flags
    /// stay relative to the working directory.)
    fn in_file_dir(&self, path: &Path) -> std::path::PathBuf {
        match self.file.and_then(|f| Path::new(f.name).parent()) {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    fn error(&mut self, key: &str, at: &At, message: String) {
        let origin = match (at.flag, &at.span, self.file) {
            (Some(flag), _, _) => Some(format!("flag {flag}")),
            (None, Some(span), Some(src)) => Some(src.locate(span)),
            (None, _, Some(src)) => Some(src.name.to_owned()),
            _ => None,
        };
        self.errors.push(ConfigError { origin, key: key.to_owned(), message });
    }

    fn config(&mut self, raw: RawConfig, f: &Flags) -> Config {
        let security = self.security(raw.security, f);
        let tls = self.tls(raw.tls, f);
        let server = self.server(raw.server, f);
        let pools = (raw.policy.prefill_policy.clone(), raw.policy.decode_policy.clone());
        let policy = self.policy(raw.policy, f);
        let pd = self.pd(raw.prefill, raw.decode, pools, &policy, f, &security);
        if pd.is_some() && (f.worker_urls.is_some() || !raw.workers.is_empty()) {
            let at = match (&f.worker_urls, raw.workers.first()) {
                (Some(_), _) => At::flag("--worker-urls"),
                (None, Some(w)) => At::span(&w.url),
                (None, None) => At::default(),
            };
            self.error("workers", &at, "PD mode routes to prefill and decode pools; regular workers are not allowed with them".into());
        }
        let discovery = self.discovery(raw.discovery, pd.is_some(), f);
        let pool_tokenizers = self.pool_tokenizers(&raw.tokenizer, pd.is_some());
        Config {
            server,
            policy,
            workers: self.workers(raw.workers, f, &security),
            pd,
            health: self.health(raw.health, f),
            circuit_breaker: self.breaker(raw.circuit_breaker, f),
            retry: self.retry(raw.retry, f),
            metrics: self.metrics(raw.metrics, f),
            log_level: self.log_level(f),
            log_format: self.log_format(f),
            log_dir: f.log_dir.clone(),
            discovery,
            security,
            tls,
            kv_events: self.kv_events(raw.kv_events),
            pool_tokenizers,
            tokenizer: self.tokenizer(raw.tokenizer, f),
            peers: self.peers(raw.peers, f),
            trace: self.trace(raw.trace, f),
        }
    }

    fn server(&mut self, mut s: raw::RawServer, f: &Flags) -> ServerConfig {
        let tls = self.serve_tls(s.tls_cert_path.take(), s.tls_key_path.take(), f);
        let host = layered(f.host.clone(), "--host", s.host.as_ref(), "127.0.0.1".to_owned());
        if host.0.trim().is_empty() {
            self.error("server.host", &host.1, "must not be empty".into());
        }
        let payload = layered(
            f.max_payload_size,
            "--max-payload-size",
            s.max_payload_size.as_ref(),
            256 << 20,
        );
        if payload.0 == 0 {
            self.error("server.max_payload_size", &payload.1, "must be at least 1".into());
        }
        let request_timeout = self.duration(
            "server.request_timeout",
            secs(f.request_timeout_secs, "--request-timeout-secs"),
            s.request_timeout,
            Duration::from_secs(600),
        );
        let queue_timeout = self.duration(
            "server.queue_timeout",
            secs(f.queue_timeout_secs, "--queue-timeout-secs"),
            s.queue_timeout,
            Duration::from_secs(60),
        );
        let shutdown_grace = self.duration(
            "server.shutdown_grace",
            secs(f.shutdown_grace_period_secs, "--shutdown-grace-period-secs"),
            s.shutdown_grace,
            Duration::from_secs(30),
        );
        let max_concurrent = f.max_concurrent_requests.or(s.max_concurrent_requests).unwrap_or(0);
        let connect_timeout = self.duration(
            "server.connect_timeout",
            None,
            s.connect_timeout,
            Duration::from_secs(5),
        );
        let header_timeout =
            self.duration("server.header_timeout", None, s.header_timeout, request_timeout);
        let stream_idle_timeout = self.duration(
            "server.stream_idle_timeout",
            secs(f.stream_idle_timeout_secs, "--stream-idle-timeout-secs"),
            s.stream_idle_timeout,
            Duration::from_secs(120),
        );
        ServerConfig {
            host: host.0,
            port: f.port.or(s.port).unwrap_or(30000),
            max_payload_size: usize::try_from(payload.0.max(1)).unwrap_or(usize::MAX),
            request_timeout,
            max_concurrent_requests: NonZeroUsize::new(
                usize::try_from(max_concurrent).unwrap_or(usize::MAX),
            ),
            queue_size: usize::try_from(f.queue_size.or(s.queue_size).unwrap_or(100))
                .unwrap_or(usize::MAX),
            queue_timeout,
            request_id_headers: self.request_id_headers(s.request_id_headers, f),
            shutdown_grace,
            worker_threads: f.worker_threads.or(s.worker_threads).and_then(NonZeroUsize::new),
            connect_timeout,
            header_timeout: header_timeout.min(request_timeout),
            stream_idle_timeout,
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                None,
                s.header_read_timeout,
                Duration::from_secs(30),
            ),
            keep_alive_timeout: self.duration(
                "server.keep_alive_timeout",
                None,
                s.keep_alive_timeout,
                Duration::from_secs(300),
            ),
            cors_allowed_origins: f
                .cors_allowed_origins
                .clone()
                .or(s.cors_allowed_origins)
                .unwrap_or_default(),
            tls,
        }
    }

    /// A number in [0, 1] from a flag or the file.
    /// `value` if it is within [0, 1]; otherwise an error at `at` and the default.
    fn fraction(&mut self, key: &str, (value, at): (f64, At), default: f64) -> f64 {
        if !(0.0..=1.0).contains(&value) {
            self.error(key, &at, format!("must be between 0 and 1, got {value}"));
            return default;
        }
        value
    }

    /// A duration from a flag (see `secs`, `millis`) or a `"30s"` / `"500ms"` string in the file.
    fn duration(
        &mut self,
        key: &str,
        flag: Option<(Duration, &'static str)>,
        file: Option<Spanned<String>>,
        default: Duration,
    ) -> Duration {
        if let Some((d, flag)) = flag {
            if d.is_zero() {
                self.error(key, &At::flag(flag), "must be longer than zero".into());
                return default;
            }
            return d;
        }
        let Some(v) = file else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.error(key, &At::span(&v), "must be longer than zero".into());
                default
            }
            Err(e) => {
                let msg =
                    format!("{:?} is not a duration like \"30s\" or \"500ms\" ({e})", v.get_ref());
                self.error(key, &At::span(&v), msg);
                default
            }
        }
    }

    fn request_id_headers(
        &mut self,
        file: Option<Vec<Spanned<String>>>,
        f: &Flags,
    ) -> Vec<HeaderName> {
        let given: Vec<(String, At)> = match (&f.request_id_headers, file) {
            (Some(v), _) => {
                v.iter().map(|h| (h.clone(), At::flag("--request-id-headers"))).collect()
            }
            (None, Some(v)) => v.iter().map(|h| (h.get_ref().clone(), At::span(h))).collect(),
            (None, None) => {
                DEFAULT_REQUEST_ID_HEADERS.iter().map(|h| (h.to_string(), At::default())).collect()
            }
        };
        let mut out = Vec::new();
        for (i, (name, at)) in given.into_iter().enumerate() {
            match HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()) {
                Ok(h) => out.push(h),
                Err(_) => self.error(
                    &format!("server.request_id_headers[{i}]"),
                    &at,
                    format!("{name:?} is not a valid header name"),
                ),
            }
        }
        out
    }

    fn policy(&mut self, p: raw::RawPolicy, f: &Flags) -> PolicyConfig {
        let (name, at) =
            layered(f.policy.clone(), "--policy", p.name.as_ref(), "cache_aware".to_owned());
        let name = match PolicyName::parse(&name) {
            Some(p) => p,
            None => {
                let names: Vec<&str> = PolicyName::ALL.iter().map(|(n, _)| *n).collect();
                self.error(
                    "policy.name",
                    &at,
                    format!("unknown policy {name:?}; expected one of {}", names.join(", ")),
                );
                PolicyName::RoundRobin
            }
        };
        if name == PolicyName::Bucket {
            let msg = "bucket routes prefill pools only: use --prefill-policy bucket \
                       (policy.prefill_policy) in PD mode";
            self.error("policy.name", &at, msg.into());
        }
        let threshold =
            layered(f.cache_threshold, "--cache-threshold", p.cache_threshold.as_ref(), 0.5);
        let cache_threshold = self.fraction("policy.cache_threshold", threshold, 0.5);
        let rel = layered(
            f.balance_rel_threshold,
            "--balance-rel-threshold",
            p.balance_rel_threshold.as_ref(),
            1.0001,
        );
        if !(rel.0.is_finite() && rel.0 >= 1.0) {
            self.error(
                "policy.balance_rel_threshold",
                &rel.1,
                format!("must be a number >= 1.0, got {}", rel.0),
            );
        }
        let tree =
            layered(f.max_tree_size, "--max-tree-size", p.max_tree_size.as_ref(), 16_777_216);
        if tree.0 == 0 {
            self.error("policy.max_tree_size", &tree.1, "must be at least 1".into());
        }
        let manual = self.manual(&p, f);
        let bucket_adjust_interval = self.duration(
            "policy.bucket_adjust_interval",
            secs(f.bucket_adjust_interval_secs, "--bucket-adjust-interval-secs"),
            p.bucket_adjust_interval.clone(),
            Duration::from_secs(5),
        );
        let eviction_interval = self.duration(
            "policy.eviction_interval",
            secs(f.eviction_interval_secs, "--eviction-interval-secs"),
            p.eviction_interval,
            Duration::from_secs(60),
        );
        let load_poll_interval = p.load_poll_interval.map(|v| {
            self.duration("policy.load_poll_interval", None, Some(v), Duration::from_secs(1))
        });
        PolicyConfig {
            name,
            cache_threshold,
            balance_abs_threshold: f
                .balance_abs_threshold
                .or(p.balance_abs_threshold)
                .unwrap_or(32),
            balance_rel_threshold: rel.0,
            eviction_interval,
            max_tree_size: usize::try_from(tree.0.max(1)).unwrap_or(usize::MAX),
            load_poll_interval,
            dp_aware: f.dp_aware || p.dp_aware.unwrap_or(false),
            panic_routing: f.panic_routing || p.panic_routing.unwrap_or(false),
            manual,
            bucket_adjust_interval,
        }
    }

    /// `policy.assignment_mode`, `policy.max_idle`, `policy.max_routing_keys`.
    fn manual(&mut self, p: &raw::RawPolicy, f: &Flags) -> crate::policy::ManualConfig {
        use crate::policy::AssignmentMode;
        let (mode, at) = layered(
            f.assignment_mode.clone(),
            "--assignment-mode",
            p.assignment_mode.as_ref(),
            "random".to_owned(),
        );
        let assignment_mode = AssignmentMode::parse(&mode).unwrap_or_else(|| {
            let names: Vec<&str> = AssignmentMode::ALL.iter().map(|(n, _)| *n).collect();
            let msg =
                format!("unknown assignment mode {mode:?}; expected one of {}", names.join(", "));
            self.error("policy.assignment_mode", &at, msg);
            AssignmentMode::Random
        });
        let max_idle = self.duration(
            "policy.max_idle",
            secs(f.max_idle_secs, "--max-idle-secs"),
            p.max_idle.clone(),
            Duration::from_secs(14_400),
        );
        let keys = p.max_routing_keys.as_ref().map_or(1_000_000, |k| *k.get_ref());
        if let Some(k) = p.max_routing_keys.as_ref().filter(|k| *k.get_ref() == 0) {
            self.error("policy.max_routing_keys", &At::span(k), "must be at least 1".into());
        }
        crate::policy::ManualConfig {
            assignment_mode,
            max_idle,
            max_keys: usize::try_from(keys.max(1)).unwrap_or(usize::MAX),
        }
    }

    fn workers(
        &mut self,
        file: Vec<raw::RawWorker>,
        f: &Flags,
        sec: &SecurityConfig,
    ) -> Vec<WorkerConfig> {
        // sgl-router sends --api-key to the workers given on the command line.
        type Given = (String, Option<Secret>, crate::tls::TlsClientSpec, At);
        let given: Vec<Given> = match &f.worker_urls {
            Some(urls) => urls
                .iter()
                .map(|u| {
                    let at = At::flag("--worker-urls");
                    (u.clone(), sec.api_key.clone(), Default::default(), at)
                })
                .collect(),
            None => file
                .into_iter()
                .enumerate()
                .map(|(i, mut w)| {
                    let key = self.secret(&format!("workers[{i}].api_key"), w.secret_fields());
                    let tls = self.tls_client(&format!("workers[{i}]"), w.tls_fields());
                    (w.url.get_ref().clone(), key, tls, At::span(&w.url))
                })
                .collect(),
        };
        let mut out: Vec<WorkerConfig> = Vec::new();
        for (i, (url, api_key, tls, at)) in given.into_iter().enumerate() {
            let key = format!("workers[{i}].url");
            match normalize_worker_url(&url) {
                Ok(url) if out.iter().any(|w| w.url == url) => {
                    self.error(&key, &at, format!("duplicate worker {url}"))
                }
                Ok(url) => out.push(WorkerConfig { url, api_key, tls }),
                Err(e) => self.error(&key, &at, e),
            }
        }
        out
    }

    fn policy_name(&mut self, key: &str, (name, at): (String, At)) -> PolicyName {
        PolicyName::parse(&name).unwrap_or_else(|| {
            let names: Vec<&str> = PolicyName::ALL.iter().map(|(n, _)| *n).collect();
            let msg = format!("unknown policy {name:?}; expected one of {}", names.join(", "));
            self.error(key, &at, msg);
            PolicyName::RoundRobin
        })
    }

    /// A count that must be at least 1.
    fn count<T: Copy + PartialEq + Default>(
        &mut self,
        key: &str,
        (value, at): (T, At),
        default: T,
    ) -> T {
        if value == T::default() {
            self.error(key, &at, "must be at least 1".into());
            return default;
        }
        value
    }

    fn log_level(&mut self, f: &Flags) -> String {
        let level = f.log_level.clone().unwrap_or_else(|| "info".into()).to_ascii_lowercase();
        if !["trace", "debug", "info", "warn", "error"].contains(&level.as_str()) {
            self.error(
                "log_level",
                &At::flag("--log-level"),
                format!("unknown log level {level:?}"),
            );
        }
        level
    }
}

fn secs(v: Option<u64>, flag: &'static str) -> Option<(Duration, &'static str)> {
    v.map(|n| (Duration::from_secs(n), flag))
}

fn millis(v: Option<u64>, flag: &'static str) -> Option<(Duration, &'static str)> {
    v.map(|n| (Duration::from_millis(n), flag))
}

/// A worker URL as the registry keys it: `http(s)://host[:port]` with no path, query or
/// credentials; a trailing `/` is dropped.
pub fn normalize_worker_url(url: &str) -> Result<String, String> {
    // Errors show the URL with any credentials in it masked: they may be echoed to a client.
    let shown = redact_userinfo(url);
    let trimmed = url.trim().trim_end_matches('/');
    let uri: http::Uri = trimmed.parse().map_err(|_| format!("{shown:?} is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{shown:?} must start with http:// or https://")),
    }
    let Some(auth) = uri.authority() else { return Err(format!("{shown:?} has no host")) };
    if auth.as_str().contains('@') {
        return Err(format!("{shown:?} must not contain credentials"));
    }
    if auth.host().is_empty() {
        return Err(format!("{shown:?} has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{shown:?} must not have a path or query"));
    }
    Ok(format!("{}://{}", uri.scheme_str().unwrap_or("http"), auth.as_str()))
}

/// `url` with the `user:password@` part of its authority replaced by `***@`.
pub fn redact_userinfo(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;

//! routerd's command line: sgl-router's flags (as far as routerd implements them) and its own.
//! Every flag is optional here; a flag given overrides the file's key.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "routerd", version, about = "Cache-aware router for fleets of SGLang workers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

/// Every flag is global (declared once, in `Flags`): `routerd --port 1 check --config f` and
/// `routerd check --config f --port 1` mean the same.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file (and flags) and exit: 0 if valid, 1 with every error.
    Check,
}

#[derive(Debug, Default, Clone, Args)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(global = true, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(global = true, long)]
    pub host: Option<String>,
    /// Port to listen on [default: 30000].
    #[arg(global = true, long)]
    pub port: Option<u16>,
    /// Worker URLs (regular mode).
    #[arg(global = true, long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Option<Vec<String>>,
    /// Prefill-decode disaggregation: every request goes to a prefill and a decode worker.
    #[arg(global = true, long)]
    pub pd_disaggregation: bool,
    /// A prefill worker and its bootstrap port (or `none`); repeat for more.
    #[arg(global = true, long, num_args = 1..=2, value_names = ["URL", "BOOTSTRAP_PORT"], action = clap::ArgAction::Append)]
    pub prefill: Vec<String>,
    /// A decode worker; repeat for more.
    #[arg(global = true, long, num_args = 1.., value_name = "URL", action = clap::ArgAction::Append)]
    pub decode: Vec<String>,
    /// Policy for the prefill pool [default: --policy].
    #[arg(global = true, long)]
    pub prefill_policy: Option<String>,
    /// Policy for the decode pool [default: --policy].
    #[arg(global = true, long)]
    pub decode_policy: Option<String>,
    /// Load-balancing policy: cache_aware, round_robin, random or power_of_two
    /// [default: cache_aware].
    #[arg(global = true, long)]
    pub policy: Option<String>,
    /// cache_aware: route to the best prefix match when it covers more than this fraction of the
    /// prompt [default: 0.5].
    #[arg(global = true, long)]
    pub cache_threshold: Option<f64>,
    /// cache_aware: loads are imbalanced when max - min exceeds this... [default: 32].
    #[arg(global = true, long)]
    pub balance_abs_threshold: Option<u64>,
    /// ...and max exceeds min times this [default: 1.0001].
    #[arg(global = true, long)]
    pub balance_rel_threshold: Option<f64>,
    /// cache_aware: accepted for sgl-router compatibility; routerd bounds the tree on every
    /// insert, so no periodic eviction is needed [default: 60].
    #[arg(global = true, long, alias = "eviction-interval")]
    pub eviction_interval_secs: Option<u64>,
    /// cache_aware: the prefix tree's budget in characters, for all workers together
    /// [default: 16777216].
    #[arg(global = true, long)]
    pub max_tree_size: Option<u64>,
    /// Largest request body accepted, in bytes [default: 268435456].
    #[arg(global = true, long)]
    pub max_payload_size: Option<u64>,
    /// Longest time a request may take end to end, in seconds [default: 600].
    #[arg(global = true, long)]
    pub request_timeout_secs: Option<u64>,
    /// Requests proxied at once; more wait in a queue [default: unlimited].
    #[arg(global = true, long)]
    pub max_concurrent_requests: Option<u64>,
    /// Requests that may wait for a slot; beyond it they get 429 [default: 100].
    #[arg(global = true, long)]
    pub queue_size: Option<u64>,
    /// Longest wait for a slot before 503, in seconds [default: 60].
    #[arg(global = true, long)]
    pub queue_timeout_secs: Option<u64>,
    /// Headers carrying a request id, first present wins
    /// [default: x-request-id x-correlation-id x-trace-id request-id].
    #[arg(global = true, long, num_args = 1.., value_name = "HEADER")]
    pub request_id_headers: Option<Vec<String>>,
    /// Do not watch --config for changes (reload only on SIGHUP or POST /admin/reload).
    #[arg(global = true, long)]
    pub no_watch_config: bool,
    /// Async runtime threads; 1 runs everything on one thread [default: one per CPU].
    #[arg(global = true, long)]
    pub worker_threads: Option<usize>,
    /// Retries of a failed request on other workers [default: 3].
    #[arg(global = true, long)]
    pub retry_max_retries: Option<u32>,
    /// Times a stream its worker fails mid-way (killed, stalled, an error event) is continued
    /// on another worker, per request; 0 turns mid-stream failover off [default: 1].
    #[arg(global = true, long)]
    pub migration_limit: Option<u32>,
    /// Wait before the first retry, in milliseconds [default: 100].
    #[arg(global = true, long)]
    pub retry_initial_backoff_ms: Option<u64>,
    /// Longest wait between retries, in milliseconds [default: 10000].
    #[arg(global = true, long)]
    pub retry_max_backoff_ms: Option<u64>,
    /// Each wait is the previous times this [default: 2.0].
    #[arg(global = true, long)]
    pub retry_backoff_multiplier: Option<f64>,
    /// Waits vary randomly by up to this fraction [default: 0.1].
    #[arg(global = true, long)]
    pub retry_jitter_factor: Option<f64>,
    /// Never retry.
    #[arg(global = true, long)]
    pub disable_retries: bool,
    /// Consecutive failures that open a worker's circuit [default: 5].
    #[arg(global = true, long)]
    pub cb_failure_threshold: Option<u32>,
    /// Successes in half-open state that close it again [default: 2].
    #[arg(global = true, long)]
    pub cb_success_threshold: Option<u32>,
    /// How long a circuit stays open before trial requests, in seconds [default: 30].
    #[arg(global = true, long)]
    pub cb_timeout_duration_secs: Option<u64>,
    /// Failures count as consecutive only within this window, in seconds [default: 60].
    #[arg(global = true, long)]
    pub cb_window_duration_secs: Option<u64>,
    /// No circuit breakers.
    #[arg(global = true, long)]
    pub disable_circuit_breaker: bool,
    /// Seconds between active health checks of each worker [default: 10].
    #[arg(global = true, long)]
    pub health_check_interval_secs: Option<u64>,
    /// Seconds a health check may take [default: 5].
    #[arg(global = true, long)]
    pub health_check_timeout_secs: Option<u64>,
    /// Consecutive failed checks that mark a worker unhealthy [default: 3].
    #[arg(global = true, long)]
    pub health_failure_threshold: Option<u32>,
    /// Consecutive passed checks that mark it healthy again [default: 2].
    #[arg(global = true, long)]
    pub health_success_threshold: Option<u32>,
    /// Path checked on each worker [default: /health].
    #[arg(global = true, long)]
    pub health_check_endpoint: Option<String>,
    /// How long a worker that has not answered yet is checked at the startup interval, in
    /// seconds; routerd serves meanwhile with the workers that are up [default: 600].
    #[arg(global = true, long)]
    pub worker_startup_timeout_secs: Option<u64>,
    /// Seconds between checks of a worker that has not answered yet [default: 2].
    #[arg(global = true, long)]
    pub worker_startup_check_interval: Option<u64>,
    /// Longest silence between two chunks of a worker's response, in seconds; then the
    /// client's stream ends with an error event [default: 120].
    #[arg(global = true, long)]
    pub stream_idle_timeout_secs: Option<u64>,
    /// Prometheus metrics listener address [default: 127.0.0.1].
    #[arg(global = true, long)]
    pub prometheus_host: Option<String>,
    /// Prometheus metrics listener port [default: 29000].
    #[arg(global = true, long)]
    pub prometheus_port: Option<u16>,
    /// Origins allowed to call the router from a browser (`*` for any) [default: none].
    #[arg(global = true, long, num_args = 1.., value_name = "ORIGIN")]
    pub cors_allowed_origins: Option<Vec<String>>,
    /// Log format: text or json [default: text].
    #[arg(global = true, long)]
    pub log_format: Option<String>,
    /// Write logs to daily-rotated files in this directory instead of stderr.
    #[arg(global = true, long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Log level: trace, debug, info, warn or error [default: info].
    #[arg(global = true, long)]
    pub log_level: Option<String>,
    /// Discover workers as Kubernetes pods (in-cluster, or from the kubeconfig).
    #[arg(global = true, long)]
    pub service_discovery: bool,
    /// Labels a pod needs to be a worker (regular mode): `key=value` ...
    #[arg(global = true, long, num_args = 1.., value_name = "KEY=VALUE")]
    pub selector: Option<Vec<String>>,
    /// PD mode: labels of prefill pods.
    #[arg(global = true, long, num_args = 1.., value_name = "KEY=VALUE")]
    pub prefill_selector: Option<Vec<String>>,
    /// PD mode: labels of decode pods.
    #[arg(global = true, long, num_args = 1.., value_name = "KEY=VALUE")]
    pub decode_selector: Option<Vec<String>>,
    /// The port workers serve on in each pod [default: 80].
    #[arg(global = true, long)]
    pub service_discovery_port: Option<u16>,
    /// The namespace to watch [default: all namespaces].
    #[arg(global = true, long)]
    pub service_discovery_namespace: Option<String>,
    /// The model's tokenizer.json (or a directory with one): text prompts are tokenized with
    /// it so that they route on the workers' KV events.
    #[arg(global = true, long, value_name = "FILE|DIR")]
    pub tokenizer_path: Option<PathBuf>,
    /// The model's directory (sgl-router's name): its tokenizer.json, as --tokenizer-path.
    #[arg(global = true, long, value_name = "DIR")]
    pub model_path: Option<PathBuf>,
    /// A Jinja chat template file, instead of the one beside the tokenizer
    /// (`chat_template.jinja` or `tokenizer_config.json`): chat requests are rendered with it
    /// to route on KV events.
    #[arg(global = true, long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// The other router replicas (`http://HOST:PORT`; a name that resolves to several
    /// addresses, like a Kubernetes headless Service, is one peer per address): told what
    /// this one routes on its approximate tree, where workers publish no KV events.
    #[arg(global = true, long, num_args = 1.., value_name = "URL")]
    pub peer_urls: Option<Vec<String>>,
    /// Export OpenTelemetry traces: a span per request, with its routing decisions and worker
    /// attempts (docs/tracing.md).
    #[arg(global = true, long)]
    pub enable_trace: bool,
    /// The OpenTelemetry collector, with --enable-trace: HOST:PORT or a URL
    /// [default: localhost:4317].
    #[arg(global = true, long, value_name = "ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
    /// How spans reach the collector: grpc or http/protobuf
    /// [default: $OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else grpc].
    #[arg(global = true, long, value_name = "PROTOCOL")]
    pub otlp_traces_protocol: Option<String>,
    /// Route to each data-parallel rank of a worker (`--dp-size N` in SGLang) as its own
    /// target, with `data_parallel_rank` in the request body.
    #[arg(global = true, long)]
    pub dp_aware: bool,
    /// When no worker of a pool is routable, route among the unroutable ones anyway instead of
    /// answering 503 at once (routerd's own; off as in sgl-router).
    #[arg(global = true, long)]
    pub panic_routing: bool,
    /// manual policy: how a new routing key gets its worker: random, min_load (fewest requests
    /// in flight) or min_group (fewest keys) [default: random].
    #[arg(global = true, long)]
    pub assignment_mode: Option<String>,
    /// manual policy: a routing key idle this long is assigned anew, in seconds [default: 14400].
    #[arg(global = true, long)]
    pub max_idle_secs: Option<u64>,
    /// bucket prefill policy: seconds between refits of its length ranges [default: 5].
    #[arg(global = true, long)]
    pub bucket_adjust_interval_secs: Option<u64>,
    /// Turn the active health checks off (workers count as healthy).
    #[arg(global = true, long)]
    pub disable_health_check: bool,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish, in
    /// seconds [default: 30].
    #[arg(global = true, long)]
    pub shutdown_grace_period_secs: Option<u64>,
    /// Required from clients on inference routes as `Authorization: Bearer KEY`; also sent to
    /// the workers given by flags (as in sgl-router) and to discovered workers.
    #[arg(
        global = true,
        long,
        env = "ROUTERD_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<crate::secret::Secret>,
    /// Read --api-key from this file.
    #[arg(global = true, long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Required on management and admin routes as `Authorization: Bearer KEY`. Without it,
    /// --api-key guards them; with neither, only loopback peers may make changes.
    #[arg(
        global = true,
        long,
        env = "ROUTERD_ADMIN_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub admin_api_key: Option<crate::secret::Secret>,
    /// Read --admin-api-key from this file.
    #[arg(global = true, long, value_name = "FILE")]
    pub admin_api_key_file: Option<PathBuf>,
    /// Networks that workers added through the API or discovery must be in, e.g.
    /// `10.0.0.0/8` [default: any but link-local and metadata addresses].
    #[arg(global = true, long, num_args = 1.., value_name = "CIDR")]
    pub allowed_worker_networks: Option<Vec<String>>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key-path).
    #[arg(global = true, long, value_name = "FILE")]
    pub tls_cert_path: Option<PathBuf>,
    /// The PEM private key (PKCS#8, RSA or EC) of --tls-cert-path.
    #[arg(global = true, long, value_name = "FILE")]
    pub tls_key_path: Option<PathBuf>,
    /// PEM CA certificates (files or bundles) trusted for https:// workers, besides the
    /// system roots.
    #[arg(global = true, long, num_args = 1.., value_name = "FILE")]
    pub ca_cert_paths: Option<Vec<PathBuf>>,
    /// A PEM client certificate chain shown to https:// workers (mTLS; with --client-key-path).
    #[arg(global = true, long, value_name = "FILE")]
    pub client_cert_path: Option<PathBuf>,
    /// The PEM private key of --client-cert-path.
    #[arg(global = true, long, value_name = "FILE")]
    pub client_key_path: Option<PathBuf>,
    /// The pod annotation that holds a prefill pod's bootstrap port
    /// [default: sglang.ai/bootstrap-port].
    #[arg(global = true, long)]
    pub bootstrap_port_annotation: Option<String>,
}

/// sgl-router flags that routerd does not implement, and what they belong to. Given one,
/// routerd stops with a usage error rather than run without what the operator asked for.
pub const UNSUPPORTED_SGL_ROUTER_FLAGS: &[(&str, &str)] = &[
    ("--grpc-mode", "gRPC workers"),
    ("--tokenizer-cache-enable-l0", "gRPC routing (local tokenizer)"),
    ("--tokenizer-cache-l0-max-entries", "gRPC routing (local tokenizer)"),
    ("--reasoning-parser", "gRPC routing (reasoning parsers)"),
    ("--tool-call-parser", "gRPC routing (tool-call parsers)"),
    ("--mcp-config-path", "MCP tool integration"),
    ("--history-backend", "conversation history backends"),
    ("--oracle-wallet-path", "the Oracle history backend"),
    ("--oracle-tns-alias", "the Oracle history backend"),
    ("--oracle-connect-descriptor", "the Oracle history backend"),
    ("--oracle-username", "the Oracle history backend"),
    ("--oracle-password", "the Oracle history backend"),
    ("--oracle-pool-min", "the Oracle history backend"),
    ("--oracle-pool-max", "the Oracle history backend"),
    ("--oracle-pool-timeout-secs", "the Oracle history backend"),
    ("--enable-igw", "the multi-model inference gateway"),
    ("--backend", "OpenAI backend proxying"),
    ("--mini-lb", "the debug mini load balancer"),
    ("--rate-limit-tokens-per-second", "token-bucket rate limiting"),
    ("--tokenizer-cache-enable-l1", "gRPC routing (local tokenizer)"),
    ("--tokenizer-cache-l1-max-memory", "gRPC routing (local tokenizer)"),
    ("--jwt-issuer", "JWT authentication of the control plane"),
    ("--jwt-audience", "JWT authentication of the control plane"),
    ("--jwt-jwks-uri", "JWT authentication of the control plane"),
    ("--jwt-role-mapping", "JWT authentication of the control plane"),
    ("--control-plane-api-keys", "control-plane API keys (routerd has --admin-api-key)"),
    ("--control-plane-audit-enabled", "control-plane audit logs"),
    ("--postgres-db-url", "the Postgres history backend"),
    ("--postgres-pool-max", "the Postgres history backend"),
    ("--redis-url", "the Redis history backend"),
    ("--redis-pool-max", "the Redis history backend"),
    ("--redis-retention-days", "the Redis history backend"),
    ("--prometheus-duration-buckets", "custom latency histogram buckets"),
];

/// The first unsupported sgl-router flag in `args` (as `--flag` or `--flag=value`), with a
/// message saying so.
pub fn unsupported_flag<S: AsRef<str>>(args: &[S]) -> Option<String> {
    for a in args.iter().map(AsRef::as_ref) {
        if a == "--" {
            return None;
        }
        let name = a.split('=').next().unwrap_or(a);
        if let Some((flag, what)) = UNSUPPORTED_SGL_ROUTER_FLAGS.iter().find(|(f, _)| *f == name) {
            return Some(format!(
                "{flag} is an sgl-router flag for {what}, which routerd does not implement; \
                 remove it (see docs/migrating-from-sgl-router.md)"
            ));
        }
    }
    None
}

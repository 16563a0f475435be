//! The configuration file as written: serde structs that reject unknown keys, with spans on
//! the values that are validated after parsing, so their errors can point at the file.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub policy: RawPolicy,
    pub workers: Vec<RawWorker>,
    pub health: RawHealth,
    pub circuit_breaker: RawBreaker,
    pub retry: RawRetry,
    pub prefill: Vec<RawPrefill>,
    pub decode: Vec<RawWorker>,
    pub metrics: RawMetrics,
    pub discovery: Option<RawDiscovery>,
    pub security: RawSecurity,
    pub tls: RawTls,
    pub kv_events: RawKvEvents,
    pub tokenizer: RawTokenizer,
    pub peers: RawPeers,
    pub trace: RawTrace,
}

/// `[trace]`: OpenTelemetry traces.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTrace {
    pub enabled: Option<bool>,
    pub endpoint: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<Spanned<f64>>,
    pub max_queue_size: Option<Spanned<u64>>,
    pub max_export_batch_size: Option<Spanned<u64>>,
    pub schedule_delay: Option<Spanned<String>>,
}

/// `[peers]`: the other router replicas.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPeers {
    pub urls: Vec<Spanned<String>>,
    pub max_pages: Option<Spanned<u64>>,
}

/// `[kv_events]`: where workers publish KV events when their `/server_info` does not say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKvEvents {
    pub enabled: Option<bool>,
    pub endpoint: Option<Spanned<String>>,
    pub replay_endpoint: Option<Spanned<String>>,
    pub load_endpoint: Option<Spanned<String>>,
    pub topic: Option<String>,
    pub block_size: Option<Spanned<u64>>,
    pub dp_size: Option<Spanned<u32>>,
    pub pending_ttl: Option<Spanned<String>>,
    pub max_blocks: Option<Spanned<u64>>,
    pub prefill: Option<RawKvEndpoint>,
    pub decode: Option<RawKvEndpoint>,
    pub workers: Vec<RawKvEndpoint>,
}

/// `[kv_events.prefill]`, `[kv_events.decode]` (no `url`) and `[[kv_events.workers]]` (a `url`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKvEndpoint {
    pub url: Option<Spanned<String>>,
    pub endpoint: Spanned<String>,
    pub replay_endpoint: Option<Spanned<String>>,
    pub load_endpoint: Option<Spanned<String>>,
    pub dp_size: Option<Spanned<u32>>,
}

/// `[tokenizer]`: the model's `tokenizer.json` (or its directory) and chat template.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTokenizer {
    pub path: Option<Spanned<std::path::PathBuf>>,
    /// A Jinja chat template file (else the one beside the tokenizer).
    pub chat_template: Option<Spanned<std::path::PathBuf>>,
    /// `[tokenizer.prefill]`, `[tokenizer.decode]`: a PD pool's own, replacing the above.
    pub prefill: Option<Spanned<RawPoolTokenizer>>,
    pub decode: Option<Spanned<RawPoolTokenizer>>,
}

/// `[tokenizer.prefill]` or `[tokenizer.decode]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolTokenizer {
    pub path: Spanned<std::path::PathBuf>,
    pub chat_template: Option<Spanned<std::path::PathBuf>>,
}

/// `[tls]`: how `https://` workers are verified and the client certificate shown to them;
/// `[tls.prefill]` and `[tls.decode]` override it for a PD pool.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub ca_cert_paths: Option<Spanned<Vec<std::path::PathBuf>>>,
    pub client_cert_path: Option<Spanned<std::path::PathBuf>>,
    pub client_key_path: Option<Spanned<std::path::PathBuf>>,
    pub prefill: Option<RawTlsClient>,
    pub decode: Option<RawTlsClient>,
}

/// The worker TLS keys, as they stand in `[tls]`, a pool's table or a worker's entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTlsClient {
    pub ca_cert_paths: Option<Spanned<Vec<std::path::PathBuf>>>,
    pub client_cert_path: Option<Spanned<std::path::PathBuf>>,
    pub client_key_path: Option<Spanned<std::path::PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSecurity {
    pub api_key: Option<Spanned<String>>,
    pub api_key_file: Option<Spanned<std::path::PathBuf>>,
    pub api_key_env: Option<Spanned<String>>,
    pub admin_api_key: Option<Spanned<String>>,
    pub admin_api_key_file: Option<Spanned<std::path::PathBuf>>,
    pub admin_api_key_env: Option<Spanned<String>>,
    pub allowed_worker_networks: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDiscovery {
    pub enabled: Option<bool>,
    pub namespace: Option<Spanned<String>>,
    pub port: Option<u16>,
    pub selector: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub prefill_selector: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub decode_selector: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub bootstrap_port_annotation: Option<Spanned<String>>,
    pub kubeconfig: Option<Spanned<std::path::PathBuf>>,
    pub scheme: Option<Spanned<String>>,
    pub api_key: Option<Spanned<String>>,
    pub api_key_file: Option<Spanned<std::path::PathBuf>>,
    pub api_key_env: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub host: Option<Spanned<String>>,
    pub port: Option<u16>,
    pub max_payload_size: Option<Spanned<u64>>,
    pub request_timeout: Option<Spanned<String>>,
    pub max_concurrent_requests: Option<u64>,
    pub queue_size: Option<u64>,
    pub queue_timeout: Option<Spanned<String>>,
    pub request_id_headers: Option<Vec<Spanned<String>>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub worker_threads: Option<usize>,
    pub connect_timeout: Option<Spanned<String>>,
    pub header_timeout: Option<Spanned<String>>,
    pub stream_idle_timeout: Option<Spanned<String>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub keep_alive_timeout: Option<Spanned<String>>,
    pub cors_allowed_origins: Option<Vec<String>>,
    pub tls_cert_path: Option<Spanned<std::path::PathBuf>>,
    pub tls_key_path: Option<Spanned<std::path::PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub enabled: Option<bool>,
    pub host: Option<Spanned<String>>,
    pub port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    pub enabled: Option<bool>,
    pub endpoint: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub failure_threshold: Option<Spanned<u32>>,
    pub success_threshold: Option<Spanned<u32>>,
    pub startup_timeout: Option<Spanned<String>>,
    pub startup_check_interval: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBreaker {
    pub enabled: Option<bool>,
    pub failure_threshold: Option<Spanned<u32>>,
    pub success_threshold: Option<Spanned<u32>>,
    pub timeout: Option<Spanned<String>>,
    pub window: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    pub enabled: Option<bool>,
    pub max_retries: Option<u32>,
    pub migration_limit: Option<u32>,
    pub initial_backoff: Option<Spanned<String>>,
    pub max_backoff: Option<Spanned<String>>,
    pub backoff_multiplier: Option<Spanned<f64>>,
    pub jitter_factor: Option<Spanned<f64>>,
    pub budget_ratio: Option<Spanned<f64>>,
    pub budget_min_per_sec: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    pub name: Option<Spanned<String>>,
    pub cache_threshold: Option<Spanned<f64>>,
    pub balance_abs_threshold: Option<u64>,
    pub balance_rel_threshold: Option<Spanned<f64>>,
    pub eviction_interval: Option<Spanned<String>>,
    pub max_tree_size: Option<Spanned<u64>>,
    pub load_poll_interval: Option<Spanned<String>>,
    pub dp_aware: Option<bool>,
    pub panic_routing: Option<bool>,
    pub assignment_mode: Option<Spanned<String>>,
    pub max_idle: Option<Spanned<String>>,
    pub max_routing_keys: Option<Spanned<u64>>,
    pub bucket_adjust_interval: Option<Spanned<String>>,
    pub prefill_policy: Option<Spanned<String>>,
    pub decode_policy: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrefill {
    pub url: Spanned<String>,
    pub bootstrap_port: Option<Spanned<u16>>,
    pub api_key: Option<Spanned<String>>,
    pub api_key_file: Option<Spanned<std::path::PathBuf>>,
    pub api_key_env: Option<Spanned<String>>,
    pub ca_cert_paths: Option<Spanned<Vec<std::path::PathBuf>>>,
    pub client_cert_path: Option<Spanned<std::path::PathBuf>>,
    pub client_key_path: Option<Spanned<std::path::PathBuf>>,
}

impl RawPrefill {
    pub fn tls_fields(&mut self) -> RawTlsClient {
        RawTlsClient {
            ca_cert_paths: self.ca_cert_paths.take(),
            client_cert_path: self.client_cert_path.take(),
            client_key_path: self.client_key_path.take(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    pub url: Spanned<String>,
    pub api_key: Option<Spanned<String>>,
    pub api_key_file: Option<Spanned<std::path::PathBuf>>,
    pub api_key_env: Option<Spanned<String>>,
    pub ca_cert_paths: Option<Spanned<Vec<std::path::PathBuf>>>,
    pub client_cert_path: Option<Spanned<std::path::PathBuf>>,
    pub client_key_path: Option<Spanned<std::path::PathBuf>>,
}

impl RawWorker {
    pub fn tls_fields(&mut self) -> RawTlsClient {
        RawTlsClient {
            ca_cert_paths: self.ca_cert_paths.take(),
            client_cert_path: self.client_cert_path.take(),
            client_key_path: self.client_key_path.take(),
        }
    }

    pub fn secret_fields(&mut self) -> super::security::SecretFields {
        super::security::SecretFields {
            inline: self.api_key.take(),
            file: self.api_key_file.take(),
            env: self.api_key_env.take(),
        }
    }
}

impl RawPrefill {
    pub fn secret_fields(&mut self) -> super::security::SecretFields {
        super::security::SecretFields {
            inline: self.api_key.take(),
            file: self.api_key_file.take(),
            env: self.api_key_env.take(),
        }
    }
}

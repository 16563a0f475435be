//! Flags of `routerctl sim-worker`: the simulated engine's identity, capacity, timing model and
//! fault injection. One struct doubles as the worker's configuration in tests.

use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::engine::EngineConfig;

/// The PD role of the worker, as SGLang's `--disaggregation-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An ordinary worker (SGLang's `null` disaggregation mode).
    #[default]
    #[value(alias = "null")]
    Regular,
    Prefill,
    Decode,
}

impl Role {
    /// The value SGLang reports as `disaggregation_mode` in `/get_server_info`.
    pub fn disaggregation_mode(self) -> &'static str {
        match self {
            Role::Regular => "null",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, default_value_t = 31001)]
    pub port: u16,
    /// Model path reported by /get_model_info, /get_server_info and /v1/models.
    #[arg(long, default_value = "routerd-sim/sim-8b")]
    pub model_path: String,
    /// Model name served on the OpenAI routes (defaults to --model-path).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// PD role: regular (alias null), prefill or decode.
    #[arg(long, value_enum, default_value_t = Role::Regular)]
    pub role: Role,
    /// Prefill role: port of the bootstrap server decode workers contact (0 picks a free one).
    /// Decode role: the port used when a request's bootstrap_port is null.
    #[arg(long, default_value_t = 8998)]
    pub bootstrap_port: u16,
    /// How long one leg of a PD pair waits for the other before failing the request, as a real
    /// engine's KV bootstrap does. Not scaled by --speed.
    #[arg(long, default_value_t = 120.0)]
    pub bootstrap_timeout_secs: f64,
    /// Data-parallel size reported by /get_server_info; `data_parallel_rank` in a request must
    /// be below it.
    #[arg(long, default_value_t = 1)]
    pub dp_size: u32,
    /// Maximum requests in the running batch; the rest wait in a FIFO queue.
    #[arg(long, default_value_t = 64)]
    pub max_running_requests: usize,
    /// Prompt tokens prefilled in one scheduler step at most (chunked prefill budget).
    #[arg(long, default_value_t = 8192)]
    pub max_prefill_tokens: usize,
    /// Prefix (KV) cache capacity in tokens; least recently used entries are evicted beyond it.
    #[arg(long, default_value_t = 131_072)]
    pub cache_capacity_tokens: usize,
    /// Characters per token of the deterministic tokenizer.
    #[arg(long, default_value_t = 4)]
    pub chars_per_token: usize,
    /// Prefill compute per uncached prompt token, in microseconds.
    #[arg(long, default_value_t = 40.0)]
    pub prefill_us_per_token: f64,
    /// Decode step time (one output token for every running request), in milliseconds.
    #[arg(long, default_value_t = 12.0)]
    pub decode_ms_per_step: f64,
    /// Extra decode step time per running request, in microseconds.
    #[arg(long, default_value_t = 40.0)]
    pub decode_us_per_running: f64,
    /// Divides every simulated duration (e.g. 100 runs 100x faster than the model above).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// No simulated compute time at all (measures the HTTP path only).
    #[arg(long)]
    pub zero_compute: bool,
    /// Streaming `/generate` events carry only what is new (text and `output_ids` since the
    /// last event), as SGLang's `--incremental-streaming-output` does; by default each event
    /// carries the whole text and ids so far.
    #[arg(long)]
    pub incremental_streaming_output: bool,
    /// max_new_tokens when a request does not say.
    #[arg(long, default_value_t = 16)]
    pub default_max_new_tokens: u32,
    /// Context length reported to clients; longer prompts are rejected with 400.
    #[arg(long, default_value_t = 32_768)]
    pub context_length: usize,
    /// Dimension of /v1/embeddings vectors.
    #[arg(long, default_value_t = 64)]
    pub embedding_dim: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health and /sim/*.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require a client certificate signed by a CA in this PEM file (mTLS; needs --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Publish KV cache events as SGLang does, with SGLang's JSON, e.g.
    /// '{"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'
    /// (port 0 picks a free port; /server_info tells which).
    #[arg(long, value_name = "JSON")]
    pub kv_events_config: Option<String>,
    /// Publish this worker's load as SGLang does (needs --kv-events-config): `LoadStat`
    /// messages on a ZMQ PUB socket, topic `load`, on every change and each second. `auto`
    /// takes the port after the KV-event range (after the replay socket when that is next;
    /// a free port when the events' port is 0), `tcp://*:PORT` sets it, `off` (the default)
    /// publishes none. /server_info's kv_events block tells where.
    #[arg(long, value_name = "auto|off|tcp://*:PORT")]
    pub load_publish_endpoint: Option<String>,
    /// Tokens per KV cache page: the cache holds whole pages, and events hash pages.
    #[arg(long, default_value_t = 1)]
    pub page_size: usize,
    /// Tokenize with this Hugging Face tokenizer.json (or a model directory with one) instead
    /// of --chars-per-token chunks; chat requests are rendered with the chat template beside
    /// it, as SGLang does (give routerd the same path with --tokenizer-path to route text and
    /// chat prompts on the events).
    #[arg(long, value_name = "FILE|DIR")]
    pub tokenizer_path: Option<std::path::PathBuf>,
    /// Write a byte-level tokenizer (one token per UTF-8 byte) and exit: to FILE when it ends
    /// in .json, else into the directory DIR with a tokenizer_config.json that holds a ChatML
    /// chat template. A tokenizer routerd and simulated workers can share without downloading
    /// a model.
    #[arg(long, value_name = "FILE|DIR")]
    pub write_byte_tokenizer: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub faults: Faults,
}

/// Fault injection. Every field can also be changed at runtime with `POST /sim/faults`.
#[derive(Debug, Clone, Args, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Delay before answering any inference request, in milliseconds.
    #[arg(long = "fault-latency-ms", default_value_t = 0)]
    pub latency_ms: u64,
    /// Status returned by injected errors.
    #[arg(long = "fault-error-status", default_value_t = 500)]
    pub error_status: u16,
    /// Fraction (0..=1) of inference requests answered with --fault-error-status.
    #[arg(long = "fault-error-rate", default_value_t = 0.0)]
    pub error_rate: f64,
    /// The first N inference requests are answered with --fault-error-status.
    #[arg(long = "fault-error-first", default_value_t = 0)]
    pub error_first: u64,
    /// Adds `Retry-After: SECS` to injected errors (useful with status 429).
    #[arg(long = "fault-retry-after-secs")]
    pub retry_after_secs: Option<u64>,
    /// Inference requests never get response headers (until the client gives up).
    #[arg(long = "fault-hang")]
    pub hang: bool,
    /// Responses stall forever after this many output tokens (streams stop mid-way).
    #[arg(long = "fault-stall-after-tokens")]
    pub stall_after_tokens: Option<u32>,
    /// Streams fail after this many output tokens with an error event (as an engine error
    /// mid-stream looks: `data: {"error": ...}`, then `data: [DONE]`).
    #[arg(long = "fault-error-after-tokens")]
    pub error_after_tokens: Option<u32>,
    /// The worker crashes (drops every connection and exits) when inference request N+1
    /// arrives.
    #[arg(long = "fault-crash-after")]
    pub crash_after: Option<u64>,
    /// /health and /health_generate answer 503.
    #[arg(long = "fault-unhealthy")]
    pub unhealthy: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_status: 500,
            error_rate: 0.0,
            error_first: 0,
            retry_after_secs: None,
            hang: false,
            stall_after_tokens: None,
            error_after_tokens: None,
            crash_after: None,
            unhealthy: false,
        }
    }
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!("fault error_rate must be within 0..=1, got {}", self.error_rate));
        }
        if http::StatusCode::from_u16(self.error_status).is_err() {
            return Err(format!("fault error_status {} is not an HTTP status", self.error_status));
        }
        Ok(())
    }
}

impl SimArgs {
    /// Defaults for a worker on an ephemeral loopback port (tests and in-process fleets).
    pub fn ephemeral() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: SimArgs,
        }
        let mut args = Wrapper::parse_from(["sim-worker"]).args;
        args.port = 0;
        args.bootstrap_port = 0;
        args
    }

    pub fn served_model(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.model_path)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.faults.validate()?;
        if self.speed.is_nan() || self.speed <= 0.0 {
            return Err(format!("--speed must be positive, got {}", self.speed));
        }
        for (name, v) in [
            ("--prefill-us-per-token", self.prefill_us_per_token),
            ("--decode-ms-per-step", self.decode_ms_per_step),
            ("--decode-us-per-running", self.decode_us_per_running),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a non-negative number, got {v}"));
            }
        }
        if self.max_running_requests == 0 {
            return Err("--max-running-requests must be at least 1".into());
        }
        if self.page_size == 0 {
            return Err("--page-size must be at least 1".into());
        }
        if let Some(c) = &self.kv_events_config {
            super::kv_events::KvEventsConfig::parse(c)?;
        }
        if let Some(l) = &self.load_publish_endpoint {
            let on = super::kv_events::load_endpoint(l, self.kv_events_config.as_deref())?;
            if on.is_some() && self.kv_events_config.is_none() {
                return Err("--load-publish-endpoint needs --kv-events-config (as SGLang's \
                            does: routers find the load socket in its kv_events block)"
                    .into());
            }
        }
        if self.dp_size == 0 {
            return Err("--dp-size must be at least 1".into());
        }
        if !self.bootstrap_timeout_secs.is_finite() || self.bootstrap_timeout_secs <= 0.0 {
            return Err("--bootstrap-timeout-secs must be positive".into());
        }
        Ok(())
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            page_size: self.page_size,
            kv_events: self.kv_events_config.is_some(),
            max_running_requests: self.max_running_requests,
            max_prefill_tokens: self.max_prefill_tokens.max(1),
            cache_capacity_tokens: self.cache_capacity_tokens,
            prefill_time_per_token: Duration::from_secs_f64(self.prefill_us_per_token / 1e6),
            decode_time_per_step: Duration::from_secs_f64(self.decode_ms_per_step / 1e3),
            decode_time_per_running: Duration::from_secs_f64(self.decode_us_per_running / 1e6),
            speed: if self.zero_compute { f64::INFINITY } else { self.speed },
        }
    }
}

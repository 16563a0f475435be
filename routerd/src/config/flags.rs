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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file (and flags) and exit: 0 if valid, 1 with every error.
    Check {
        #[command(flatten)]
        flags: Flags,
    },
}

#[derive(Debug, Default, Clone, Args)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on [default: 30000].
    #[arg(long)]
    pub port: Option<u16>,
    /// Worker URLs (regular mode).
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Option<Vec<String>>,
    /// Load-balancing policy: cache_aware, round_robin, random or power_of_two
    /// [default: cache_aware].
    #[arg(long)]
    pub policy: Option<String>,
    /// cache_aware: route to the best prefix match when it covers more than this fraction of the
    /// prompt [default: 0.5].
    #[arg(long)]
    pub cache_threshold: Option<f64>,
    /// cache_aware: loads are imbalanced when max - min exceeds this... [default: 32].
    #[arg(long)]
    pub balance_abs_threshold: Option<u64>,
    /// ...and max exceeds min times this [default: 1.0001].
    #[arg(long)]
    pub balance_rel_threshold: Option<f64>,
    /// cache_aware: accepted for sgl-router compatibility; routerd bounds the tree on every
    /// insert, so no periodic eviction is needed [default: 60].
    #[arg(long, alias = "eviction-interval")]
    pub eviction_interval_secs: Option<u64>,
    /// cache_aware: the prefix tree's budget in characters, for all workers together
    /// [default: 16777216].
    #[arg(long)]
    pub max_tree_size: Option<u64>,
    /// Largest request body accepted, in bytes [default: 268435456].
    #[arg(long)]
    pub max_payload_size: Option<u64>,
    /// Longest time a request may take end to end, in seconds [default: 600].
    #[arg(long)]
    pub request_timeout_secs: Option<u64>,
    /// Requests proxied at once; more wait in a queue [default: unlimited].
    #[arg(long)]
    pub max_concurrent_requests: Option<u64>,
    /// Requests that may wait for a slot; beyond it they get 429 [default: 100].
    #[arg(long)]
    pub queue_size: Option<u64>,
    /// Longest wait for a slot before 503, in seconds [default: 60].
    #[arg(long)]
    pub queue_timeout_secs: Option<u64>,
    /// Headers carrying a request id, first present wins
    /// [default: x-request-id x-correlation-id x-trace-id request-id].
    #[arg(long, num_args = 1.., value_name = "HEADER")]
    pub request_id_headers: Option<Vec<String>>,
    /// Do not watch --config for changes (reload only on SIGHUP or POST /admin/reload).
    #[arg(long)]
    pub no_watch_config: bool,
    /// Async runtime threads; 1 runs everything on one thread [default: one per CPU].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Log level: trace, debug, info, warn or error [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
}

//! routerctl's command line. Subcommands arrive as their issues land; today: `sim-worker`,
//! `bench`.

use clap::{Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::sim::SimArgs;

#[derive(Debug, Parser)]
#[command(name = "routerctl", version, about = "Operator CLI for routerd")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one simulated SGLang worker (same HTTP API, no GPU needed).
    SimWorker(Box<SimArgs>),
    /// Load a router (or, with --affinity, the workers directly) with an LLM workload.
    Bench(Box<BenchArgs>),
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::SimWorker(args) => crate::sim::run(*args).await,
        Command::Bench(args) => crate::bench::run(*args).await,
    }
}

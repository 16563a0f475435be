//! routerctl's command line: the operator's commands against a running router, the live
//! dashboard, and the tools (`sim-worker`, `bench`).

use clap::{CommandFactory, Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::ops::{StatusArgs, WorkersArgs};
use crate::sim::SimArgs;
use crate::top::TopArgs;

#[derive(Debug, Parser)]
#[command(name = "routerctl", version, about = "Operator CLI for routerd")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub endpoint: crate::admin::Endpoint,
    /// Output format of workers, status and bench: a table or JSON.
    #[arg(short = 'o', long, global = true, value_enum, env = "ROUTERCTL_OUTPUT",
          default_value_t = crate::bench::Output::Table)]
    pub output: crate::bench::Output,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List, add or remove the router's workers.
    Workers(WorkersArgs),
    /// Router health, readiness, configuration generation and last reload.
    Status(StatusArgs),
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Live dashboard of the router and its workers.
    Top(TopArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Start workers (one per GPU, or a PD fleet), register them with routerd, keep them
    /// running, and stop them all on Ctrl-C.
    Launch(Box<crate::launch::LaunchArgs>),
    /// Run one simulated SGLang worker (same HTTP API, no GPU needed).
    SimWorker(Box<SimArgs>),
    /// Load a router (or, with --affinity, the workers directly) with an LLM workload.
    Bench(Box<BenchArgs>),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a routerd configuration file: exit 0, or 1 with every error.
    Check { file: std::path::PathBuf },
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    // The global options (before or after the subcommand) reach each subcommand here.
    let (endpoint, output) = (cli.endpoint, cli.output);
    match cli.command {
        Command::Workers(mut args) => {
            args.endpoint = endpoint;
            Ok(crate::ops::workers(args, output).await)
        }
        Command::Status(mut args) => {
            (args.endpoint, args.output) = (endpoint, output);
            Ok(crate::ops::status(args).await)
        }
        Command::Config { command: ConfigCommand::Check { file } } => {
            Ok(crate::ops::config_check(&file))
        }
        Command::Top(mut args) => {
            args.endpoint = endpoint;
            crate::top::run(args).await
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "routerctl",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Launch(mut args) => {
            args.endpoint = endpoint;
            crate::launch::run(*args).await
        }
        Command::SimWorker(args) => crate::sim::run(*args).await,
        Command::Bench(mut args) => {
            args.output = output;
            crate::bench::run(*args).await
        }
    }
}

//! Thin entry point: parse flags, validate the configuration, set up logging, bind, run until
//! SIGTERM/SIGINT, drain. Exit codes: 0 clean shutdown, 1 invalid configuration, 2 usage
//! error (clap), 3 cannot bind.

use std::process::ExitCode;

use clap::Parser;
use routerd::config::{Cli, Command, Config, Flags};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(msg) = routerd::config::unsupported_flag(&args[1..]) {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.flags),
        None => serve(cli.flags),
    }
}

fn load(flags: &Flags) -> Result<Config, ExitCode> {
    Config::load(flags).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("error: {e}");
        }
        eprintln!(
            "routerd: invalid configuration ({} error{})",
            errors.0.len(),
            if errors.0.len() == 1 { "" } else { "s" }
        );
        ExitCode::from(1)
    })
}

fn check(flags: &Flags) -> ExitCode {
    match load(flags) {
        Ok(c) => {
            let file = flags
                .config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "flags".into());
            let workers = match &c.pd {
                None => format!("{} workers, policy {}", c.workers.len(), c.policy.name.as_str()),
                Some(pd) => format!(
                    "PD: {} prefill workers, policy {}; {} decode workers, policy {}",
                    pd.prefill.len(),
                    pd.prefill_policy.as_str(),
                    pd.decode.len(),
                    pd.decode_policy.as_str()
                ),
            };
            println!("{file}: configuration is valid ({workers})");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn serve(flags: Flags) -> ExitCode {
    let config = match load(&flags) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Logs go to stderr, or to daily-rotated files; a background thread writes them so a slow
    // disk never stalls a request. The guard flushes what is left at exit.
    let (writer, _flush_at_exit) = match &config.log_dir {
        Some(dir) => {
            tracing_appender::non_blocking(tracing_appender::rolling::daily(dir, "routerd.log"))
        }
        None => tracing_appender::non_blocking(std::io::stderr()),
    };
    let ansi = config.log_dir.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "routerd={0},warn",
            config.log_level
        )))
        .with_writer(writer)
        .with_ansi(ansi);
    match config.log_format {
        routerd::config::LogFormat::Json => logs.json().flatten_event(true).init(),
        routerd::config::LogFormat::Text => logs.init(),
    }
    for warning in routerd::security::startup_warnings(&config.security, &config.server.host) {
        tracing::warn!("{warning}");
    }
    let mut builder = match config.server.worker_threads.map(|n| n.get()) {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("routerd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (host, port) = (config.server.host.clone(), config.server.port);
        let main = match tokio::net::TcpListener::bind((host.as_str(), port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("routerd: cannot listen on {host}:{port}: {e}");
                return ExitCode::from(3);
            }
        };
        let metrics = match &config.metrics {
            Some(m) => match tokio::net::TcpListener::bind((m.host.as_str(), m.port)).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("routerd: cannot listen for metrics on {}:{}: {e}", m.host, m.port);
                    return ExitCode::from(3);
                }
            },
            None => None,
        };
        // Every signal handler is in place before readiness is announced: a signal that arrives
        // right after the startup line must not meet the default action (terminate).
        let control = routerd::run::Control::default();
        if let Err(e) = signals(control.clone()) {
            eprintln!("routerd: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        let listeners = routerd::run::Listeners { main, metrics };
        let ready = |r: routerd::run::Ready| {
            // One write, errors ignored: a supervisor that reads only the first line and
            // closes the pipe must not make the router fail later.
            let mut out = format!("routerd listening on {}\n", r.url);
            if let Some(u) = r.metrics_url {
                out.push_str(&format!("routerd metrics on {u}\n"));
            }
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
        };
        match routerd::run::run(listeners, config, flags, control, ready).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("routerd: cannot start: {e}");
                ExitCode::from(3)
            }
        }
    })
}

/// SIGTERM and SIGINT drain and stop; SIGHUP reloads the configuration file (the same path as
/// `POST /admin/reload`).
fn signals(control: routerd::run::Control) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => control.reload.notify_one(),
            }
        }
        control.shutdown.cancel();
    });
    Ok(())
}

//! `routerctl sim-worker`: a simulated SGLang engine with SGLang's HTTP API, a prefix KV cache
//! model, a continuous-batching timing model, PD roles and fault injection, so routerd can be
//! developed, tested and benchmarked on machines without GPUs. See docs/sim-worker.md.

pub mod args;
pub mod cache;
pub mod engine;
pub mod error;
pub mod native;
pub mod openai;
pub mod pd;
pub mod request;
pub mod run;
pub mod server;
pub mod tokenizer;

pub use args::{Faults, Role, SimArgs};
pub use server::SimWorker;

use routerd::serve::Ended;

/// Runs a worker until Ctrl-C / SIGTERM (graceful) or an injected crash. Returns the process
/// exit code.
pub async fn run(args: SimArgs) -> anyhow::Result<i32> {
    let worker = SimWorker::start(args).await?;
    let a = &worker.state.args;
    println!(
        "sim-worker listening on {} (model {}, role {}{})",
        worker.url(),
        a.model_path,
        serde_json::to_value(a.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        worker.bootstrap_addr.map(|b| format!(", bootstrap port {}", b.port())).unwrap_or_default()
    );
    let stop = worker.stopper();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.drain.cancel();
    });
    Ok(match worker.wait().await {
        Ended::Aborted => {
            eprintln!("sim-worker: injected crash");
            1
        }
        Ended::Drained | Ended::GraceExpired => 0,
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

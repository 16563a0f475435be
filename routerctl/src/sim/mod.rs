//! `routerctl sim-worker`: a simulated SGLang engine with SGLang's HTTP API, a prefix KV cache
//! model, a continuous-batching timing model, PD roles and fault injection, so routerd can be
//! developed, tested and benchmarked on machines without GPUs. See docs/sim-worker.md.

pub mod args;
pub mod cache;
pub mod engine;
pub mod error;
pub mod kv_events;
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

/// The text a simulated worker (with its own tokenizer, not `--tokenizer-path`) answers to
/// `body` on `path` when it runs to its length limit: what any answer routed through failures
/// must equal (`routerctl bench --check-answers`). `None` for requests it cannot tell (no
/// explicit length, batches).
pub fn expected_answer(path: &str, body: &serde_json::Value) -> Option<String> {
    use tokenizer::{token_text, Sequence};
    let obj = body.as_object()?;
    let (sequence, n) = match path {
        "/generate" => {
            let n = body["sampling_params"]["max_new_tokens"].as_u64()?;
            let sequence = match (body["text"].as_str(), body["input_ids"].as_array()) {
                (Some(t), _) => Sequence::of_text(t),
                (None, Some(ids)) => Sequence::of_ids(
                    &ids.iter()
                        .map(|i| i.as_u64().map(|i| i as u32))
                        .collect::<Option<Vec<_>>>()?,
                ),
                _ => return None,
            };
            (sequence, n)
        }
        "/v1/chat/completions" => {
            let n = obj.get("max_completion_tokens").or(obj.get("max_tokens"))?.as_u64()?;
            let messages = obj.get("messages")?.as_array()?;
            (Sequence::of_text(&request::render_chat_request(obj, messages).ok()?), n)
        }
        "/v1/completions" => {
            let n = obj.get("max_tokens")?.as_u64()?;
            (Sequence::of_text(obj.get("prompt")?.as_str()?), n)
        }
        _ => return None,
    };
    Some(sequence.generate(n as usize).into_iter().map(token_text).collect())
}

/// Runs a worker until Ctrl-C / SIGTERM (graceful) or an injected crash. Returns the process
/// exit code.
pub async fn run(args: SimArgs) -> anyhow::Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    if let Some(path) = &args.write_byte_tokenizer {
        let is_file = path.extension().is_some_and(|e| e == "json");
        let written = if is_file {
            std::fs::write(path, routerd::kv::tokenize::byte_level_json())
        } else {
            routerd::kv::tokenize::write_byte_level(path)
        };
        written.map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        if is_file {
            println!("wrote a byte-level tokenizer to {}", path.display());
        } else {
            println!(
                "wrote a byte-level tokenizer.json and a tokenizer_config.json (ChatML chat \
                 template) to {}",
                path.display()
            );
        }
        return Ok(0);
    }
    let worker = SimWorker::start(args).await?;
    // Handlers go in before the startup line: a signal right after it must not meet the
    // default action (terminate).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
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

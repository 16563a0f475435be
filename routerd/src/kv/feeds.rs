//! Starts and stops the subscribers with the workers, while a policy in use routes on events
//! (cache_aware in any pool) or on load (any but round_robin and random: then only the load
//! subscribers run): every second, each worker of the
//! registry (whatever added it: configuration, API, discovery, launch) that publishes KV events
//! gets one subscriber per dp rank; a worker that leaves has its subscribers stopped and its
//! blocks dropped. Where a worker publishes comes from `[kv_events]`, else from its
//! `/server_info` (asked again every 10 s until it answers with a `kv_events` block). Where the
//! worker also publishes its load, a load subscriber per rank runs beside (`load`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tokenize::{Tokenizer, TokenizerFiles};
use super::{feed_from_config, feed_from_server_info, subscriber, Feed};
use crate::app::App;
use crate::registry::{split_rank, WorkerRole};

const EVERY: Duration = Duration::from_secs(1);
const ASK_AGAIN: Duration = Duration::from_secs(10);

pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    let tasks = TaskTracker::new();
    // Each worker's subscribers, and whether they include its KV events (a policy that routes
    // on them is in use) or only its load reports.
    let mut running: HashMap<String, (CancellationToken, bool)> = HashMap::new();
    let mut asked: HashMap<String, Instant> = HashMap::new();
    let mut tokenizer_failed: [Option<(TokenizerFiles, Instant)>; 3] = Default::default();
    // Said once per stretch of event routing without a tokenizer (again after one is removed).
    let mut told_no_tokenizer = false;
    loop {
        let live = app.live();
        let cfg = &live.config.kv_events;
        app.kv.set_pending_ttl(cfg.pending_ttl);
        for (role, failed) in WorkerRole::ALL.into_iter().zip(&mut tokenizer_failed) {
            load_tokenizer(&app, role, live.config.tokenizer_for(role), failed).await;
        }
        let snapshot = app.registry.snapshot();
        let kv_on = live.uses_kv_events();
        let wanted: BTreeMap<String, WorkerRole> = if cfg.enabled && (kv_on || live.uses_load()) {
            snapshot
                .workers
                .iter()
                .map(|w| (split_rank(w.url()).0.to_owned(), w.spec.role))
                .collect()
        } else {
            BTreeMap::new()
        };
        let any_tokenizer =
            WorkerRole::ALL.into_iter().any(|r| live.config.tokenizer_for(r).is_some());
        if kv_on && !running.is_empty() && !any_tokenizer {
            if !told_no_tokenizer {
                tracing::info!(
                    "KV events without a tokenizer: requests with input_ids route on the events, \
                     text and chat prompts on the approximate tree (--tokenizer-path or \
                     --model-path gives routerd the model's tokenizer)"
                );
                told_no_tokenizer = true;
            }
        } else if any_tokenizer {
            told_no_tokenizer = false;
        }
        let again = app.kv.take_reresolve();
        running.retain(|base, (stop, with_kv)| {
            let keep = wanted.contains_key(base) && !again.contains(base) && *with_kv == kv_on;
            if !keep {
                stop.cancel();
                app.kv.untrack(base);
                tracing::info!(worker = %base, "kv events: unsubscribed");
            }
            keep
        });
        asked.retain(|base, _| wanted.contains_key(base) && !again.contains(base));
        let new: Vec<(String, WorkerRole)> = wanted
            .iter()
            .filter(|(b, _)| !running.contains_key(*b))
            .map(|(b, r)| (b.clone(), *r))
            .collect();
        for (base, role) in &new {
            let feed = match feed_from_config(base, *role, cfg) {
                Some(f) => Some(f),
                None if asked.get(base).is_some_and(|t| t.elapsed() < ASK_AGAIN) => None,
                None => {
                    asked.insert(base.clone(), Instant::now());
                    let Some(w) = snapshot.workers.iter().find(|w| split_rank(w.url()).0 == base)
                    else {
                        continue;
                    };
                    let timeout = live.config.health.timeout;
                    let info = tokio::select! {
                        _ = cancel.cancelled() => break,
                        i = app.http.get_json(w, "/server_info", timeout) => i,
                    };
                    info.and_then(|i| feed_from_server_info(base, &i))
                }
            };
            if let Some(feed) = feed {
                let stop = start(&app, &tasks, base, &feed, kv_on, &cancel);
                running.insert(base.clone(), (stop, kv_on));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// Loads the tokenizer configured for `role`'s pool when it changed (off the runtime's
/// threads: a real model's tokenizer.json takes a moment to parse); one another pool already
/// loaded from the same files is shared. A file that does not load is logged once, leaves
/// text prompts on the approximate tree, and is tried again every 10 s (not every pass: a
/// large file that fails late would cost a parse a second).
async fn load_tokenizer(
    app: &Arc<App>,
    role: WorkerRole,
    files: Option<&TokenizerFiles>,
    failed: &mut Option<(TokenizerFiles, Instant)>,
) {
    let current = app.kv.tokenizer(role);
    if current.as_ref().map(|t| &t.files) == files {
        return;
    }
    let Some(files) = files.cloned() else {
        app.kv.set_tokenizer(role, None);
        return;
    };
    let mut loaded = WorkerRole::ALL.into_iter().filter_map(|r| app.kv.tokenizer(r));
    if let Some(same) = loaded.find(|t| t.files == files) {
        app.kv.set_tokenizer(role, Some(same));
        return;
    }
    if failed.as_ref().is_some_and(|(f, at)| *f == files && at.elapsed() < ASK_AGAIN) {
        return;
    }
    *failed = Some((files.clone(), Instant::now()));
    let loaded = tokio::task::spawn_blocking(move || Tokenizer::load_files(&files)).await;
    match loaded {
        Ok(Ok(t)) => {
            *failed = None;
            tracing::info!(path = %t.files.path.display(), pool = role.as_str(), "tokenizer loaded: text prompts route on KV events");
            match &t.chat {
                Ok(c) => {
                    tracing::info!(from = %c.origin, "chat template loaded: chat requests route on KV events")
                }
                Err(e) => tracing::warn!(error = %e, "chat requests route on the approximate tree"),
            }
            app.kv.set_tokenizer(role, Some(Arc::new(t)));
        }
        Ok(Err(e)) => {
            if app.kv.tokenizer_error(&e) {
                tracing::warn!(error = %e, "tokenizer not loaded: text prompts route on the approximate tree");
            }
        }
        Err(e) => tracing::warn!(error = %e, "tokenizer load panicked"),
    }
}

fn start(
    app: &Arc<App>,
    tasks: &TaskTracker,
    base: &str,
    feed: &Feed,
    kv_on: bool,
    cancel: &CancellationToken,
) -> CancellationToken {
    let stop = cancel.child_token();
    if kv_on {
        app.kv.track(base, feed);
    }
    for (rank, endpoint) in feed.endpoints.iter().enumerate().filter(|_| kv_on) {
        let target = subscriber::Target {
            base: base.to_owned(),
            rank: rank as u16,
            endpoint: endpoint.clone(),
            replay: feed.replay.get(rank).cloned().flatten(),
            topic: feed.topic.clone(),
        };
        tasks.spawn(subscriber::run(app.kv.clone(), target, stop.clone()));
    }
    let ranks: super::load::RankLoads =
        Arc::new(std::sync::Mutex::new(vec![None; feed.load.len()]));
    for (rank, endpoint) in feed.load.iter().enumerate() {
        let target = super::load::Target {
            base: base.to_owned(),
            rank: rank as u16,
            endpoint: endpoint.clone(),
            ranks: ranks.clone(),
        };
        tasks.spawn(super::load::run(app.clone(), target, stop.clone()));
    }
    stop
}

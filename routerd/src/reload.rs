//! Reloading the configuration: load → validate → diff → apply, all or nothing, with an
//! explicit outcome (applied, unchanged, rejected with every error) that is logged, counted and
//! served by `GET /admin/config`. A change of the file (watched), SIGHUP and
//! `POST /admin/reload` all come through here.
//!
//! What applies live: workers (those that stay keep their state: counters, tree entries; removed
//! ones finish what they are doing), the policy and its parameters (cache_aware keeps its tree
//! unless the policy itself changes), limits, timeouts, request id headers, load polling.
//! What needs a restart: the listen address, the thread count, the shutdown grace, the log
//! level and turning HTTPS on or off; a file that changes them is rejected whole. The serving
//! certificate is read again on every reload (and when its files change): a new one applies to
//! new connections, a bad one is rejected and the current one stays.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use crate::app::{App, Live, PoolPolicies};
use crate::config::{Config, Flags, PolicyConfig};
use crate::policy::{self, Policy};
use crate::registry::WorkerSource;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Applied { generation: u64, changes: Vec<String> },
    Unchanged { generation: u64 },
    Rejected { generation: u64, errors: Vec<String> },
}

pub struct Reloader {
    flags: Flags,
    /// Serialises reloads; also holds the last outcome and when it happened.
    state: Mutex<Option<(Outcome, u64)>>,
    generation: AtomicU64,
    pub applied: AtomicU64,
    pub rejected: AtomicU64,
}

impl Reloader {
    pub fn new(flags: Flags) -> Self {
        Self {
            flags,
            state: Mutex::new(None),
            generation: AtomicU64::new(1),
            applied: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn watch_disabled(&self) -> bool {
        self.flags.no_watch_config
    }

    /// The configuration file reloads read, if any.
    pub fn source(&self) -> Option<std::path::PathBuf> {
        self.flags.config.clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Rebuilds the configuration from the same flags (so flags keep overriding the file) and
/// applies it whole, or not at all.
pub fn reload(app: &App) -> Outcome {
    let r = &app.reloader;
    let mut last = r.state.lock().expect("reload state");
    let generation = r.generation();
    let outcome = match r.flags.config {
        // Without a file only the serving certificate (named by flags) can change.
        None => match &app.server_tls {
            Some(tls) => match tls.reload(&tls.spec()) {
                Ok(true) => Outcome::Applied {
                    generation,
                    changes: vec!["serving certificate reloaded".into()],
                },
                Ok(false) => Outcome::Unchanged { generation },
                Err(e) => Outcome::Rejected {
                    generation,
                    errors: vec![format!(
                        "server.tls_cert_path: {e}; the current certificate stays"
                    )],
                },
            },
            None => Outcome::Rejected {
                generation,
                errors: vec![
                    "routerd was started without --config: there is no file to reload".into()
                ],
            },
        },
        Some(_) => match Config::load(&r.flags) {
            Err(errors) => Outcome::Rejected {
                generation,
                errors: errors.0.iter().map(ToString::to_string).collect(),
            },
            Ok(new) => apply(app, new, generation),
        },
    };
    app.events.push(
        "reload",
        match &outcome {
            Outcome::Applied { generation, changes } => {
                format!("applied, generation {generation}: {}", changes.join("; "))
            }
            Outcome::Unchanged { .. } => "unchanged".to_owned(),
            Outcome::Rejected { errors, .. } => format!("rejected: {}", errors.join("; ")),
        },
    );
    app.metrics.reload(match &outcome {
        Outcome::Applied { .. } => "applied",
        Outcome::Unchanged { .. } => "unchanged",
        Outcome::Rejected { .. } => "rejected",
    });
    match &outcome {
        Outcome::Applied { generation, changes } => {
            r.generation.store(*generation, Relaxed);
            r.applied.fetch_add(1, Relaxed);
            tracing::info!(generation, ?changes, "configuration reloaded");
        }
        Outcome::Unchanged { .. } => tracing::info!("configuration reload: unchanged"),
        Outcome::Rejected { errors, .. } => {
            r.rejected.fetch_add(1, Relaxed);
            tracing::warn!(
                ?errors,
                "configuration reload rejected; the running configuration stays"
            );
        }
    }
    *last = Some((outcome.clone(), now_secs()));
    outcome
}

fn apply(app: &App, new: Config, generation: u64) -> Outcome {
    let live = app.live();
    let old = &live.config;
    let (os, ns) = (&old.server, &new.server);
    let mut restart = Vec::new();
    if os.tls.is_some() != ns.tls.is_some() {
        restart.push("server.tls_cert_path/tls_key_path (serving HTTPS on or off)".to_owned());
    }
    if (&os.host, os.port) != (&ns.host, ns.port) {
        restart
            .push(format!("server.host/port: {}:{} -> {}:{}", os.host, os.port, ns.host, ns.port));
    }
    if os.worker_threads != ns.worker_threads {
        restart.push("server.worker_threads".to_owned());
    }
    if os.shutdown_grace != ns.shutdown_grace {
        restart.push("server.shutdown_grace".to_owned());
    }
    if old.log_level != new.log_level {
        restart.push("log_level".to_owned());
    }
    if old.metrics != new.metrics {
        restart.push("metrics (the listener)".to_owned());
    }
    if (old.log_format, &old.log_dir) != (new.log_format, &new.log_dir) {
        restart.push("log_format/log_dir".to_owned());
    }
    if old.trace != new.trace {
        restart.push("trace (the OpenTelemetry exporter)".to_owned());
    }
    if old.pd.is_some() != new.pd.is_some() {
        restart.push("PD mode (on or off)".to_owned());
    }
    if !restart.is_empty() {
        let errors = restart
            .into_iter()
            .map(|k| format!("{k}: changing it requires a restart; nothing was applied"))
            .collect();
        return Outcome::Rejected { generation, errors };
    }
    // The certificate files may have changed under the same paths: read them again whatever
    // else changed. (Applied to new handshakes; open connections keep theirs.)
    let cert_changed = match (&app.server_tls, &ns.tls) {
        (Some(tls), Some(spec)) => match tls.reload(spec) {
            Ok(changed) => changed,
            Err(e) => {
                let errors =
                    vec![format!("server.tls_cert_path: {e}; the current certificate stays")];
                return Outcome::Rejected { generation, errors };
            }
        },
        _ => false,
    };
    if *old == new {
        return if cert_changed {
            Outcome::Applied { generation, changes: vec!["serving certificate reloaded".into()] }
        } else {
            Outcome::Unchanged { generation }
        };
    }
    let mut changes = Vec::new();
    if cert_changed {
        changes.push("serving certificate reloaded".to_owned());
    }
    let policy = carry(&live.policy, (&old.policy, &new.policy), &mut changes, "policy");
    let pools = match (&live.pools, &old.pd, &new.pd) {
        (Some(p), Some(o), Some(n)) => Some(PoolPolicies {
            prefill: carry(
                &p.prefill,
                (&old.policy.named(o.prefill_policy), &new.policy.named(n.prefill_policy)),
                &mut changes,
                "prefill policy",
            ),
            decode: carry(
                &p.decode,
                (&old.policy.named(o.decode_policy), &new.policy.named(n.decode_policy)),
                &mut changes,
                "decode policy",
            ),
        }),
        _ => None,
    };
    let (ol, nl) = (&old.server, &new.server);
    let limiter = if (ol.max_concurrent_requests, ol.queue_size, ol.queue_timeout)
        == (nl.max_concurrent_requests, nl.queue_size, nl.queue_timeout)
    {
        live.limiter.clone()
    } else {
        changes.push("admission limits".to_owned());
        crate::app::limiter_for(&new)
    };
    if old.server != new.server {
        changes.push("server settings".to_owned());
    }
    let rediscover = old.discovery != new.discovery;
    if rediscover {
        changes.push(match &new.discovery {
            Some(_) => "discovery reconfigured".to_owned(),
            None => "discovery off".to_owned(),
        });
    }
    // The new configuration is live first; its workers are then computed from it (and the dp
    // sizes known now) under the new generation, so a worker set computed from the old one
    // (a dp resolution in flight) is dropped by the registry instead of undoing this.
    let generation = generation + 1;
    let specs = crate::dp::config_specs(&app.dp, &new);
    app.swap_live(Live { config: new, policy, pools, limiter, generation });
    let synced = app.registry.sync_source(WorkerSource::Config, specs, generation);
    let mut worker_changes: Vec<String> =
        synced.added.iter().map(|u| format!("worker added: {u}")).collect();
    worker_changes.extend(synced.removed.iter().map(|u| format!("worker removed: {u}")));
    worker_changes.append(&mut changes);
    if rediscover {
        // After the swap: the discovery task reads the new settings when it restarts.
        app.discovery.reconfigured.notify_one();
    }
    Outcome::Applied { generation, changes: worker_changes }
}

/// The same policy object when only its parameters change (it keeps what it learned; the
/// registry tells it of removed workers), a new one when the algorithm changes.
fn carry(
    current: &Arc<dyn Policy>,
    (old, new): (&PolicyConfig, &PolicyConfig),
    changes: &mut Vec<String>,
    label: &str,
) -> Arc<dyn Policy> {
    if old.name != new.name {
        changes.push(format!("{label} {} -> {}", old.name.as_str(), new.name.as_str()));
        return policy::build(new);
    }
    if old != new {
        current.reconfigure(new);
        changes.push(format!("{label} {} reconfigured", new.name.as_str()));
    }
    current.clone()
}

/// `POST /admin/reload`: 200 with the outcome, or 400 with every error when rejected.
pub async fn admin_reload(State(app): State<Arc<App>>) -> Response {
    let app2 = app.clone();
    let outcome =
        tokio::task::spawn_blocking(move || reload(&app2)).await.expect("reload does not panic");
    let status = if matches!(outcome, Outcome::Rejected { .. }) {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (status, Json(outcome)).into_response()
}

/// `GET /admin/config`: the running configuration (secrets redacted), its generation and the
/// last reload's outcome.
pub async fn admin_config(State(app): State<Arc<App>>) -> Json<Value> {
    let live = app.live();
    let r = &app.reloader;
    let last = r.state.lock().expect("reload state").clone();
    Json(json!({
        "generation": r.generation(),
        "source": r.flags.config.as_ref().map(|p| p.display().to_string()),
        "config": live.config,
        "reloads": {"applied": r.applied.load(Relaxed), "rejected": r.rejected.load(Relaxed)},
        "last_reload": last.map(|(o, at)| json!({"outcome": o, "at_unix_secs": at})),
    }))
}

/// Watches the configuration file's directory (editors write a temporary file and rename it;
/// Kubernetes swaps a `..data` symlink; a file may be deleted and re-created) and reloads when,
/// after a burst of events settles, the file's content differs from the last content seen. A
/// missing file is waited for: the running configuration stays. The watch is in place when
/// this returns; the returned future handles the events until `cancel`.
pub fn watch_file(
    app: Arc<App>,
    path: std::path::PathBuf,
    cancel: tokio_util::sync::CancellationToken,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    use notify_debouncer_mini::notify::RecursiveMode;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handler = move |_: notify_debouncer_mini::DebounceEventResult| {
        let _ = tx.send(());
    };
    let mut debouncer = match notify_debouncer_mini::new_debouncer(
        std::time::Duration::from_millis(200),
        handler,
    ) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration file; use SIGHUP or POST /admin/reload");
            return None;
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    if let Err(e) = debouncer.watcher().watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the configuration directory");
        return None;
    }
    let mut last = std::fs::read(&path).ok();
    Some(async move {
        let _watching = debouncer;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            while rx.try_recv().is_ok() {}
            let Ok(now) = std::fs::read(&path) else { continue }; // deleted or mid-swap: wait
            if last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now);
            let app = app.clone();
            let _ = tokio::task::spawn_blocking(move || reload(&app)).await;
        }
    })
}

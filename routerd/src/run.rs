//! The router's lifecycle: `start` serves a configuration on a bound listener with its
//! background tasks (load polling, health checks, metrics upkeep, discovery, dp resolution, the
//! config file watch), each tracked and cancelled at shutdown; `Running::shutdown` drains
//! (readiness fails first, open requests and streams finish within the grace period); `run` is
//! the whole life of the daemon for `main`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::{Config, Flags};
use crate::poll;
use crate::routes::{not_found, router};
use crate::serve::{serve_router, Ended, Stop};

/// A started router.
pub struct Running {
    pub app: Arc<App>,
    pub addr: std::net::SocketAddr,
    stop: Stop,
    serving: JoinHandle<Ended>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// Serves `config` on `listener` (already bound, so tests can pass `127.0.0.1:0`). Without
/// the flags it was built from there is nothing to reload; see `start_with_flags`.
pub fn start(listener: TcpListener, config: Config) -> std::io::Result<Running> {
    start_with_flags(listener, config, Flags::default())
}

/// Serves `config`, built from `flags`: SIGHUP or `POST /admin/reload` rebuild it from them.
pub fn start_with_flags(
    listener: TcpListener,
    config: Config,
    flags: Flags,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let grace = config.server.shutdown_grace;
    let app = Arc::new(App::new(config, flags)?);
    // A worker that leaves, whoever removed it, is forgotten by its pool's policy.
    let weak = Arc::downgrade(&app);
    app.registry.set_on_removed(Box::new(move |w| {
        if let Some(app) = weak.upgrade() {
            app.policy_for(w.spec.role).worker_removed(w.url());
            app.peers.forget(w.url());
        }
    }));
    let stop = Stop::new(grace);
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    tasks.spawn(poll::poll_loads(app.clone(), cancel.clone()));
    tasks.spawn(crate::health::run(app.clone(), cancel.clone()));
    tasks.spawn(crate::metrics::upkeep(app.clone(), cancel.clone()));
    tasks.spawn(crate::discovery::run(app.clone(), cancel.clone()));
    tasks.spawn(crate::dp::run(app.clone(), cancel.clone()));
    tasks.spawn(crate::kv::feeds::run(app.clone(), cancel.clone()));
    tasks.spawn(crate::peers::run(app.clone(), cancel.clone()));
    // The configuration file and the serving certificate's files, when watched.
    let mut watched: Vec<std::path::PathBuf> = app.reloader.source().into_iter().collect();
    if let Some(tls) = &app.server_tls {
        let spec = tls.spec();
        watched.extend([spec.cert_path, spec.key_path]);
    }
    if !app.reloader.watch_disabled() {
        for path in watched {
            if let Some(watching) = crate::reload::watch_file(app.clone(), path, cancel.clone()) {
                tasks.spawn(watching);
            }
        }
    }
    let serving =
        tokio::spawn(serve_router(listener, app.clone(), router(app.clone()), stop.clone()));
    Ok(Running { app, addr, stop, serving, tasks, cancel })
}

impl Running {
    pub fn url(&self) -> String {
        let scheme = if self.app.server_tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Graceful shutdown: readiness fails, no new connections, in-flight requests and streams
    /// finish (up to `server.shutdown_grace`), background tasks stop.
    pub async fn shutdown(self) -> Ended {
        self.app.draining.store(true, Relaxed);
        self.stop.drain.cancel();
        let ended = self.serving.await.unwrap_or(Ended::Aborted);
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // The last spans (the drained requests') go out, within a few seconds.
        if self.app.otel.is_some() {
            let app = self.app.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(o) = &app.otel {
                    o.shutdown()
                }
            })
            .await;
        }
        ended
    }

    /// A token that starts `shutdown` when cancelled, for signal handlers.
    pub fn drain_token(&self) -> CancellationToken {
        self.stop.drain.clone()
    }

    /// Serves Prometheus metrics (`GET /metrics`) on `listener` until shutdown.
    pub fn serve_metrics(&self, listener: TcpListener) {
        let router = Router::new()
            .route("/metrics", get(crate::metrics::serve_metrics))
            .fallback(not_found)
            .with_state(self.app.clone());
        let stop = Stop::new(std::time::Duration::ZERO);
        let cancel = self.cancel.clone();
        let drain = stop.drain.clone();
        self.tasks.spawn(async move {
            let serving = crate::serve::serve(listener, router, stop);
            tokio::pin!(serving);
            tokio::select! {
                _ = &mut serving => {}
                _ = cancel.cancelled() => {
                    drain.cancel();
                    serving.await;
                }
            }
        });
    }

    pub async fn wait_drain_requested(&self) {
        self.stop.drain.cancelled().await
    }
}

/// The listeners the daemon serves on, bound by the caller (so a bind failure is its exit code).
pub struct Listeners {
    pub main: TcpListener,
    /// Prometheus metrics (`GET /metrics`), when configured.
    pub metrics: Option<TcpListener>,
}

/// What the process asks of a running daemon: stop (drain and return), or reload its file.
#[derive(Clone, Default)]
pub struct Control {
    pub shutdown: CancellationToken,
    pub reload: Arc<tokio::sync::Notify>,
}

/// Where the daemon answers, once it does.
pub struct Ready {
    pub url: String,
    pub metrics_url: Option<String>,
}

/// The daemon's whole life: serves `config` (built from `flags`, which reloads rebuild it from)
/// on `listeners`, calls `ready` once it answers, reloads on `control.reload`, and when
/// `control.shutdown` is cancelled drains and returns how the drain ended.
pub async fn run(
    listeners: Listeners,
    config: Config,
    flags: Flags,
    control: Control,
    ready: impl FnOnce(Ready),
) -> std::io::Result<Ended> {
    let running = start_with_flags(listeners.main, config, flags)?;
    let metrics_url = match listeners.metrics {
        Some(l) => {
            let url = l.local_addr().ok().map(|a| format!("http://{a}/metrics"));
            running.serve_metrics(l);
            url
        }
        None => None,
    };
    let app = running.app.clone();
    tracing::info!(
        url = %running.url(),
        policy = app.policy().name(),
        workers = app.registry.load().workers.len(),
        "routerd listening"
    );
    ready(Ready { url: running.url(), metrics_url });
    loop {
        tokio::select! {
            _ = control.shutdown.cancelled() => break,
            _ = running.wait_drain_requested() => break,
            _ = control.reload.notified() => {
                let app = app.clone();
                let _ = tokio::task::spawn_blocking(move || crate::reload::reload(&app)).await;
            }
        }
    }
    tracing::info!("shutting down: readiness fails, draining in-flight requests");
    Ok(running.shutdown().await)
}

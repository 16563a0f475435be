//! Kubernetes service discovery: workers follow the pods that match the configured selectors.
//! One task runs for the router's life; it (re)starts a watch session whenever `[discovery]`
//! changes on reload and removes the discovered workers when discovery is turned off. The
//! session itself (kube-rs watchers, level-triggered reconciliation) is in `watch.rs`, behind
//! the `k8s` cargo feature. See docs/discovery.md.

#[cfg(feature = "k8s")]
pub mod pods;
#[cfg(feature = "k8s")]
mod watch;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::DiscoveryConfig;
use crate::registry::{WorkerRole, WorkerSource};

/// Discovery's health, as `GET /admin/discovery` and the metrics show it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct State {
    pub enabled: bool,
    /// `off`, `connecting` (building the client), `listing` (waiting for the first full
    /// list), `watching`, or `error` (the API server is failing; the last known set stays).
    pub state: &'static str,
    pub namespace: Option<String>,
    /// Label selector per pool (`regular`, `prefill`, `decode`).
    pub selectors: std::collections::BTreeMap<&'static str, String>,
    /// Pods the watches report, and how many of them are workers (Running, Ready, an IP).
    pub pods: u64,
    pub ready_pods: u64,
    /// Workers registered by discovery now.
    pub workers: u64,
    /// Complete lists (the first, and every relist after a lost watch).
    pub lists_total: u64,
    pub events_total: u64,
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// Unix seconds.
    pub last_error_at: Option<u64>,
    pub last_change_at: Option<u64>,
    /// Ready pods whose address the security rules refuse (link-local, metadata, outside
    /// `allowed_worker_networks`), with the reason.
    pub refused: Vec<String>,
}

/// Shared between the discovery task, reloads and the admin API.
#[derive(Debug, Default)]
pub struct Status {
    state: Mutex<State>,
    /// A reload changed `[discovery]`: the session restarts with the new settings.
    pub reconfigured: Notify,
}

impl Status {
    pub fn get(&self) -> State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn reset(&self, cfg: Option<&DiscoveryConfig>, pd: bool) {
        self.update(|s| {
            let counters = (s.lists_total, s.events_total, s.errors_total);
            *s = State::default();
            (s.lists_total, s.events_total, s.errors_total) = counters;
            s.state = "off";
            if let Some(c) = cfg {
                s.enabled = true;
                s.state = "connecting";
                s.namespace = c.namespace.clone();
                s.selectors = pools(c, pd)
                    .into_iter()
                    .map(|(role, sel)| (role.as_str(), crate::config::label_selector(sel)))
                    .collect();
            }
        });
    }

    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    fn error(&self, message: String) {
        self.update(|s| {
            s.state = "error";
            s.errors_total += 1;
            s.last_error = Some(message);
            s.last_error_at = Some(now());
        });
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The pools discovery fills, with their selectors: the regular pool, or in PD mode the
/// prefill and decode pools that have a selector.
pub fn pools(
    c: &DiscoveryConfig,
    pd: bool,
) -> Vec<(WorkerRole, &std::collections::BTreeMap<String, String>)> {
    if !pd {
        return vec![(WorkerRole::Regular, &c.selector)];
    }
    [(WorkerRole::Prefill, &c.prefill_selector), (WorkerRole::Decode, &c.decode_selector)]
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

/// Runs discovery for the router's life, following `[discovery]` across reloads.
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    loop {
        let live = app.live();
        let cfg = live.config.discovery.clone();
        let pd = live.config.pd.is_some();
        app.discovery.reset(cfg.as_ref(), pd);
        let session = async {
            match &cfg {
                None => {
                    apply(&app, Vec::new());
                    std::future::pending::<()>().await
                }
                #[cfg(feature = "k8s")]
                Some(c) => watch::session(&app, c, pd).await,
                #[cfg(not(feature = "k8s"))]
                Some(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = session => {}
            _ = app.discovery.reconfigured.notified() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Makes the discovered workers exactly `specs`: new ones added, the others removed (requests
/// already on them finish; the registry tells the policies).
fn apply(app: &App, mut specs: Vec<crate::registry::WorkerSpec>) {
    let live = app.live();
    let sec = &live.config.security;
    let key = live.config.discovery.as_ref().and_then(|d| d.api_key.clone());
    let key = key.or_else(|| sec.api_key.clone());
    let https = live.config.discovery.as_ref().is_some_and(|d| d.https);
    let mut refused = Vec::new();
    specs.retain_mut(|s| {
        if https {
            // Pods are found by address; the scheme is the discovery configuration's.
            s.url = s.url.replacen("http://", "https://", 1);
        }
        s.tls = live.config.tls.for_worker(s.role, &Default::default());
        if let Err(why) = crate::security::check_worker_addr(&s.url, &sec.allowed_worker_networks) {
            refused.push(why);
            return false;
        }
        s.api_key = key.clone();
        true
    });
    let newly_refused: Vec<String> = {
        let old = app.discovery.get().refused;
        refused.iter().filter(|r| !old.contains(r)).cloned().collect()
    };
    for why in &newly_refused {
        tracing::warn!(reason = %why, "discovery: pod refused as a worker");
        app.events.push("worker_refused", format!("{why} (discovery)"));
    }
    app.discovery.update(|s| s.refused = refused);
    let (generation, specs) = crate::dp::discovered_specs(app, specs);
    let synced = app.registry.sync_source(WorkerSource::Discovery, specs, generation);
    let (added, removed) = (synced.added, synced.removed);
    for url in &removed {
        app.events.push("worker_removed", format!("{url} (discovery)"));
    }
    for url in &added {
        app.events.push("worker_added", format!("{url} (discovery)"));
    }
    if !added.is_empty() || !removed.is_empty() {
        tracing::info!(?added, ?removed, "discovery changed the workers");
    }
    let n = app
        .registry
        .load()
        .workers
        .iter()
        .filter(|w| w.spec.source == WorkerSource::Discovery)
        .count();
    app.discovery.update(|s| {
        s.workers = n as u64;
        if !added.is_empty() || !removed.is_empty() {
            s.last_change_at = Some(now());
        }
    });
}

/// `GET /admin/discovery`: discovery's state, counts and last error.
pub async fn admin_discovery(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"discovery": app.discovery.get()}))
}

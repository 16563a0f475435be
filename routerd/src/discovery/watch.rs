//! One discovery session: a kube-rs watcher per pool (server-side label selector), each
//! folded into a `Pool`; after every event, once every pool has been listed, the desired set
//! is applied to the registry (level-triggered: the set is recomputed from the pools, never
//! patched by events). A lost watch relists, and the relist is swapped in whole, so a pod still
//! there is neither removed nor re-added. While the API server fails, the watchers back off
//! and the last known set keeps serving.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;

use super::pods::{desired, key_of, worker_of, PodEvent, Pool};
use crate::app::App;
use crate::config::DiscoveryConfig;

/// Runs until the client cannot be built (then returns after a pause, and `run` retries) or
/// forever; cancelled from outside.
pub async fn session(app: &Arc<App>, c: &DiscoveryConfig, pd: bool) {
    let client = match client(c).await {
        Ok(client) => client,
        Err(e) => {
            app.discovery.error(format!("cannot build a Kubernetes client: {e}"));
            tracing::warn!(error = %e, "discovery: cannot build a Kubernetes client; retrying");
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
    };
    let api: Api<Pod> = match &c.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let pools = super::pools(c, pd);
    let mut streams = Vec::new();
    for (i, (role, selector)) in pools.iter().enumerate() {
        let config = watcher::Config::default().labels(&crate::config::label_selector(selector));
        let (role, selector) = (*role, (*selector).clone());
        let (port, annotation) = (c.port, c.bootstrap_port_annotation.clone());
        let stream = watcher::watcher(api.clone(), config).default_backoff().map(move |e| {
            let to = |p: &Pod| (key_of(p), worker_of(p, role, &selector, port, &annotation));
            let e = e.map(|e| match e {
                Event::Init => PodEvent::Init,
                Event::InitApply(p) => {
                    let (k, w) = to(&p);
                    PodEvent::InitApply(k, w)
                }
                Event::InitDone => PodEvent::InitDone,
                Event::Apply(p) => {
                    let (k, w) = to(&p);
                    PodEvent::Apply(k, w)
                }
                Event::Delete(p) => PodEvent::Delete(key_of(&p)),
            });
            (i, e)
        });
        streams.push(stream.boxed());
    }
    let mut events = futures_util::stream::select_all(streams);
    let mut state: Vec<Pool> = pools.iter().map(|_| Pool::default()).collect();
    app.discovery.update(|s| s.state = "listing");
    while let Some((i, event)) = events.next().await {
        match event {
            Ok(e) => {
                state[i].apply(e);
                let all_listed = state.iter().all(|p| p.listed);
                let (pods, ready) = state.iter().fold((0, 0), |(a, b), p| {
                    let (x, y) = p.counts();
                    (a + x, b + y)
                });
                app.discovery.update(|s| {
                    s.events_total += 1;
                    s.lists_total = state.iter().map(|p| p.lists).sum();
                    s.pods = pods as u64;
                    s.ready_pods = ready as u64;
                    if all_listed {
                        s.state = "watching";
                    }
                });
                if all_listed {
                    super::apply(app, desired(&state));
                }
            }
            Err(e) => {
                // The watcher backs off and retries by itself; the last known set stays.
                tracing::warn!(error = %e, "discovery: watch failed; keeping the last known workers");
                app.discovery.error(e.to_string());
            }
        }
    }
}

async fn client(c: &DiscoveryConfig) -> Result<kube::Client, String> {
    let mut config = match &c.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    // The client's own retries of 429/503 would hide an unavailable API server for minutes;
    // the watchers' backoff retries instead, and every failure shows in the status.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

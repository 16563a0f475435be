//! DP-aware routing (`--dp-aware`): a worker running SGLang with `--dp-size N` is N routing
//! targets, `URL@0` .. `URL@N-1`, each with its own load count, prefix-tree tenant, circuit
//! breaker and connections; a request sent to `URL@r` goes to `URL` with
//! `"data_parallel_rank": r` added to its body. `N` is the `dp_size` of the worker's
//! `/get_server_info` (asked with its API key). Workers whose size is not known yet (not up)
//! are registered once it is: a resolver retries them at the health startup interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::registry::{Worker, WorkerSource, WorkerSpec};

/// What the resolver knows: each base URL's `dp_size`, and the discovered workers' base specs
/// with the generation of that set (re-expanded when a size becomes known).
#[derive(Debug, Default)]
pub struct DpState {
    sizes: Mutex<HashMap<String, u32>>,
    discovered: Mutex<(u64, Vec<WorkerSpec>)>,
}

impl DpState {
    pub fn size(&self, base: &str) -> Option<u32> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).get(base).copied()
    }

    fn learn(&self, base: &str, size: u32) {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(base.to_owned(), size);
    }

    /// The discovered workers' base specs and the generation of that set.
    fn discovered(&self) -> (u64, Vec<WorkerSpec>) {
        self.discovered.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `spec` as one spec per rank (`URL@r`), given its size.
pub fn ranks(spec: &WorkerSpec, size: u32) -> Vec<WorkerSpec> {
    (0..size).map(|r| WorkerSpec { url: format!("{}@{r}", spec.url), ..spec.clone() }).collect()
}

/// The specs expanded with the sizes known; those not known yet are left out (pending).
pub fn expand(state: &DpState, specs: &[WorkerSpec]) -> (Vec<WorkerSpec>, Vec<WorkerSpec>) {
    let (mut ready, mut pending) = (Vec::new(), Vec::new());
    for s in specs {
        match state.size(&s.url) {
            Some(n) => ready.extend(ranks(s, n)),
            None => pending.push(s.clone()),
        }
    }
    (ready, pending)
}

/// The configuration's workers as the registry should hold them: as they are, or per rank in
/// DP-aware mode (without those whose size is not known yet).
pub fn config_specs(state: &DpState, config: &crate::config::Config) -> Vec<WorkerSpec> {
    let specs = crate::app::config_workers(config);
    if !config.policy.dp_aware {
        return specs;
    }
    expand(state, &specs).0
}

/// A new set of discovered workers (base specs): its generation, and the specs to register
/// (per rank in DP-aware mode, once their sizes are known).
pub fn discovered_specs(app: &App, specs: Vec<WorkerSpec>) -> (u64, Vec<WorkerSpec>) {
    let mut d = app.dp.discovered.lock().unwrap_or_else(|p| p.into_inner());
    d.0 += 1;
    if !app.live().config.policy.dp_aware {
        d.1.clear();
        return (d.0, specs);
    }
    let out = expand(&app.dp, &specs).0;
    d.1 = specs;
    (d.0, out)
}

/// Asks `spec`'s worker for its `dp_size` (1 when it reports none).
pub async fn fetch_size(app: &App, spec: &WorkerSpec, timeout: Duration) -> Result<u32, String> {
    let probe = Worker::new(spec.clone());
    let info = app
        .http
        .get_json(&probe, "/get_server_info", timeout)
        .await
        .ok_or_else(|| format!("{}/get_server_info did not answer with JSON", spec.url))?;
    match info.get("dp_size") {
        None | Some(serde_json::Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=1024) => Ok(n as u32),
            _ => Err(format!(
                "{}/get_server_info: dp_size {v} is not a size from 1 to 1024",
                spec.url
            )),
        },
    }
}

/// Learns the size of `spec` now (for a worker added through the API).
pub async fn resolve(app: &App, spec: &WorkerSpec) -> Result<u32, String> {
    if let Some(n) = app.dp.size(&spec.url) {
        return Ok(n);
    }
    let timeout = app.live().config.health.timeout;
    let n = fetch_size(app, spec, timeout).await?;
    app.dp.learn(&spec.url, n);
    Ok(n)
}

/// Retries the configuration's and discovery's workers whose size is not known, and registers
/// their ranks as sizes become known.
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    loop {
        let live = app.live();
        let every = live.config.health.startup_check_interval;
        if live.config.policy.dp_aware {
            let config = crate::app::config_workers(&live.config);
            let (_, discovered) = app.dp.discovered();
            let mut learnt = false;
            for spec in
                expand(&app.dp, &config).1.iter().chain(expand(&app.dp, &discovered).1.iter())
            {
                match fetch_size(&app, spec, live.config.health.timeout).await {
                    Ok(n) => {
                        tracing::info!(worker = %spec.url, dp_size = n, "dp-aware: ranks registered");
                        app.dp.learn(&spec.url, n);
                        learnt = true;
                    }
                    Err(e) => {
                        tracing::debug!(worker = %spec.url, error = %e, "dp-aware: size not known yet")
                    }
                }
            }
            if learnt {
                // The sets are computed from what is current now, after the awaits, and tagged
                // with its generation: if a reload or a discovery change lands before they are
                // applied, the registry drops them rather than undo it.
                let now = app.live();
                let specs = config_specs(&app.dp, &now.config);
                let added = app.registry.sync_source(WorkerSource::Config, specs, now.generation);
                let (generation, discovered) = app.dp.discovered();
                let specs = expand(&app.dp, &discovered).0;
                let more = app.registry.sync_source(WorkerSource::Discovery, specs, generation);
                for url in added.added.iter().chain(&more.added) {
                    app.events.push("worker_added", format!("{url} (dp rank)"));
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The body with `"data_parallel_rank": rank` as its last key (JSON decoders keep the last of
/// duplicate keys, so this one wins over a client's).
pub fn with_rank(body: &[u8], rank: u32) -> Bytes {
    let field = format!("\"data_parallel_rank\":{rank}");
    Bytes::from(crate::proxy::extract::append_fields(body, &field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{split_rank, WorkerRole};

    #[test]
    fn ranks_and_injection() {
        let spec = WorkerSpec {
            url: "http://10.0.0.1:8000".into(),
            role: WorkerRole::Regular,
            bootstrap_port: None,
            api_key: None,
            source: WorkerSource::Config,
            tls: Default::default(),
        };
        let r = ranks(&spec, 3);
        let urls: Vec<&str> = r.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(
            urls,
            ["http://10.0.0.1:8000@0", "http://10.0.0.1:8000@1", "http://10.0.0.1:8000@2"]
        );
        let w = Worker::new(r[2].clone());
        assert_eq!((w.authority.as_str(), w.dp_rank), ("10.0.0.1:8000", Some(2)));
        let v: serde_json::Value =
            serde_json::from_slice(&with_rank(br#"{"text": "a", "data_parallel_rank": 9} "#, 2))
                .unwrap();
        assert_eq!((v["data_parallel_rank"].as_u64(), v["text"].as_str()), (Some(2), Some("a")));
        let v: serde_json::Value = serde_json::from_slice(&with_rank(b"{ }", 0)).unwrap();
        assert_eq!(v, serde_json::json!({"data_parallel_rank": 0}));
        assert_eq!(split_rank("http://h:1@3"), ("http://h:1", Some(3)));
        assert_eq!(split_rank("http://h:1"), ("http://h:1", None));
        let state = DpState::default();
        state.learn("http://10.0.0.1:8000", 2);
        let other = WorkerSpec { url: "http://10.0.0.2:8000".into(), ..spec.clone() };
        let (ready, pending) = expand(&state, &[spec, other.clone()]);
        assert_eq!((ready.len(), pending), (2, vec![other]));
    }
}

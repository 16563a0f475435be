//! Which pods are workers, and the worker set a watch stream describes: a pod is a worker when
//! it matches its pool's selector, is Running and Ready, is not being deleted, and has an IP.
//! Pure, so every rule is unit-tested without an API server.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;

use crate::registry::{WorkerRole, WorkerSource, WorkerSpec};

/// The worker `pod` stands for in the pool of `role`, if it qualifies now.
pub fn worker_of(
    pod: &Pod,
    role: WorkerRole,
    selector: &BTreeMap<String, String>,
    port: u16,
    annotation: &str,
) -> Option<WorkerSpec> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let labels = meta.labels.as_ref();
    if !selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    if !ready {
        return None;
    }
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    let bootstrap_port = match role {
        WorkerRole::Prefill => meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation))
            .and_then(|v| v.trim().parse::<u16>().ok())
            .filter(|p| *p > 0),
        _ => None,
    };
    Some(WorkerSpec {
        url: format!("http://{host}:{port}"),
        role,
        bootstrap_port,
        api_key: None,
        source: WorkerSource::Discovery,
        tls: Default::default(),
    })
}

/// A pod's identity across events: `namespace/name`.
pub fn key_of(pod: &Pod) -> String {
    let m = &pod.metadata;
    format!("{}/{}", m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or(""))
}

/// One watch stream's view, fed its events in order. A relist (`Init`..`InitDone`) is
/// buffered and swapped in whole when it completes, so pods still there are never seen to
/// leave; until the first list completes the pool is not `listed` and nothing is decided.
#[derive(Debug, Default)]
pub struct Pool {
    /// Every pod the stream reports, with the worker it is now (or `None`).
    pods: HashMap<String, Option<WorkerSpec>>,
    relist: Option<HashMap<String, Option<WorkerSpec>>>,
    pub listed: bool,
    /// Completed lists (the first and every relist).
    pub lists: u64,
}

/// A watch event, reduced to what the pool needs.
#[derive(Debug, Clone, PartialEq)]
pub enum PodEvent {
    Init,
    InitApply(String, Option<WorkerSpec>),
    InitDone,
    Apply(String, Option<WorkerSpec>),
    Delete(String),
}

impl Pool {
    pub fn apply(&mut self, e: PodEvent) {
        match e {
            PodEvent::Init => self.relist = Some(HashMap::new()),
            PodEvent::InitApply(k, w) => {
                self.relist.get_or_insert_with(HashMap::new).insert(k, w);
            }
            PodEvent::InitDone => {
                self.pods = self.relist.take().unwrap_or_default();
                self.listed = true;
                self.lists += 1;
            }
            PodEvent::Apply(k, w) => {
                self.pods.insert(k, w);
            }
            PodEvent::Delete(k) => {
                self.pods.remove(&k);
            }
        }
    }

    /// Pods seen, and how many of them are workers now.
    pub fn counts(&self) -> (usize, usize) {
        (self.pods.len(), self.pods.values().filter(|w| w.is_some()).count())
    }
}

/// The workers the pools describe, one per URL (a pod in two pools counts in the first), in a
/// stable order.
pub fn desired(pools: &[Pool]) -> Vec<WorkerSpec> {
    let mut out: Vec<WorkerSpec> = Vec::new();
    for pool in pools {
        let mut specs: Vec<&WorkerSpec> = pool.pods.values().flatten().collect();
        specs.sort_by(|a, b| a.url.cmp(&b.url));
        for s in specs {
            if !out.iter().any(|o| o.url == s.url) {
                out.push(s.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)], phase: &str, ready: bool, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": "llm",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "annotations": {"sglang.ai/bootstrap-port": "9001"},
            },
            "status": {
                "phase": phase,
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        }))
        .unwrap()
    }

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const A: &str = "sglang.ai/bootstrap-port";

    #[test]
    fn a_worker_is_matching_running_ready_and_addressed() {
        let s = sel(&[("app", "sglang")]);
        let ok = pod("w", &[("app", "sglang"), ("x", "y")], "Running", true, "10.0.0.7");
        let w = worker_of(&ok, WorkerRole::Regular, &s, 8000, A).unwrap();
        assert_eq!((w.url.as_str(), w.bootstrap_port), ("http://10.0.0.7:8000", None));
        assert_eq!(w.source, WorkerSource::Discovery);
        let other = pod("w", &[("app", "vllm")], "Running", true, "10.0.0.7");
        assert!(worker_of(&other, WorkerRole::Regular, &s, 8000, A).is_none());
        let pending = pod("w", &[("app", "sglang")], "Pending", false, "");
        assert!(worker_of(&pending, WorkerRole::Regular, &s, 8000, A).is_none());
        let not_ready = pod("w", &[("app", "sglang")], "Running", false, "10.0.0.7");
        assert!(worker_of(&not_ready, WorkerRole::Regular, &s, 8000, A).is_none());
        let no_ip = pod("w", &[("app", "sglang")], "Running", true, "");
        assert!(worker_of(&no_ip, WorkerRole::Regular, &s, 8000, A).is_none());
        let mut leaving = ok.clone();
        leaving.metadata.deletion_timestamp =
            Some(serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap());
        assert!(worker_of(&leaving, WorkerRole::Regular, &s, 8000, A).is_none());
        let v6 = pod("w", &[("app", "sglang")], "Running", true, "fd00::7");
        assert_eq!(
            worker_of(&v6, WorkerRole::Regular, &s, 80, A).unwrap().url,
            "http://[fd00::7]:80"
        );
    }

    #[test]
    fn prefill_pods_take_their_bootstrap_port_from_the_annotation() {
        let s = sel(&[("role", "prefill")]);
        let p = pod("p", &[("role", "prefill")], "Running", true, "10.0.0.8");
        let w = worker_of(&p, WorkerRole::Prefill, &s, 30000, A).unwrap();
        assert_eq!(w.bootstrap_port, Some(9001));
        assert_eq!(
            worker_of(&p, WorkerRole::Prefill, &s, 30000, "other/key").unwrap().bootstrap_port,
            None
        );
        assert_eq!(worker_of(&p, WorkerRole::Decode, &s, 30000, A).unwrap().bootstrap_port, None);
    }

    fn spec(url: &str) -> Option<WorkerSpec> {
        Some(WorkerSpec {
            url: url.into(),
            role: WorkerRole::Regular,
            bootstrap_port: None,
            api_key: None,
            source: WorkerSource::Discovery,
            tls: Default::default(),
        })
    }

    #[test]
    fn a_relist_swaps_in_whole_and_keeps_what_is_still_there() {
        let mut pool = Pool::default();
        pool.apply(PodEvent::Init);
        pool.apply(PodEvent::InitApply("a".into(), spec("http://a:80")));
        assert!(!pool.listed && desired(std::slice::from_ref(&pool)).is_empty());
        pool.apply(PodEvent::InitApply("b".into(), spec("http://b:80")));
        pool.apply(PodEvent::InitDone);
        assert_eq!(desired(std::slice::from_ref(&pool)).len(), 2);
        // A relist in progress changes nothing until it completes.
        pool.apply(PodEvent::Init);
        pool.apply(PodEvent::InitApply("b".into(), spec("http://b:80")));
        assert_eq!(desired(std::slice::from_ref(&pool)).len(), 2);
        pool.apply(PodEvent::InitApply("c".into(), None));
        pool.apply(PodEvent::InitDone);
        let urls: Vec<String> =
            desired(std::slice::from_ref(&pool)).into_iter().map(|w| w.url).collect();
        assert_eq!(urls, ["http://b:80"]);
        assert_eq!((pool.counts(), pool.lists), ((2, 1), 2));
        pool.apply(PodEvent::Apply("c".into(), spec("http://c:80")));
        pool.apply(PodEvent::Delete("b".into()));
        let urls: Vec<String> = desired(&[pool]).into_iter().map(|w| w.url).collect();
        assert_eq!(urls, ["http://c:80"]);
    }
}

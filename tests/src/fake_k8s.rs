//! A fake Kubernetes API server for discovery tests: pods in memory, `GET` list and watch of
//! `/api/v1/pods` and `/api/v1/namespaces/{ns}/pods` with label selectors and resource
//! versions, in the shapes the real API server sends, and faults to inject: ADDED, MODIFIED and
//! DELETED events, 410 Gone (expired resource version), dropped watches and downtime.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// One change, as every watch must see it.
struct Change {
    rv: u64,
    old: Option<Value>,
    new: Option<Value>,
}

struct Watch {
    namespace: Option<String>,
    selector: BTreeMap<String, String>,
    tx: mpsc::UnboundedSender<Value>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    pods: BTreeMap<String, Value>,
    history: Vec<Change>,
    /// Watches from a resource version older than this get 410 Gone.
    oldest: u64,
    watches: Vec<Watch>,
    down: bool,
    lists: u64,
    watch_requests: u64,
}

/// A running fake API server.
pub struct FakeK8s {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeK8s {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pod as the API server returns it.
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, ready: bool) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("uid-{ns}-{name}"),
            "labels": labels,
            "annotations": {},
            "creationTimestamp": "2026-11-21T10:00:00Z",
        },
        "spec": {"containers": [{"name": "sglang", "image": "lmsysorg/sglang:latest"}]},
        "status": {
            "phase": if ip.is_empty() { "Pending" } else { "Running" },
            "podIP": ip,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ],
        },
    })
}

fn key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap(),
        pod["metadata"]["name"].as_str().unwrap()
    )
}

fn matches(pod: &Value, namespace: &Option<String>, selector: &BTreeMap<String, String>) -> bool {
    namespace.as_deref().is_none_or(|ns| pod["metadata"]["namespace"] == ns)
        && selector.iter().all(|(k, v)| pod["metadata"]["labels"][k] == v.as_str())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl Change {
    /// The event a watch with this namespace and selector sees, if any: objects moving into
    /// the selection are ADDED, out of it DELETED, as the API server's watch cache does.
    fn event_for(&self, w_ns: &Option<String>, sel: &BTreeMap<String, String>) -> Option<Value> {
        let was = self.old.as_ref().is_some_and(|p| matches(p, w_ns, sel));
        let is = self.new.as_ref().is_some_and(|p| matches(p, w_ns, sel));
        let (kind, obj) = match (was, is) {
            (false, true) => ("ADDED", self.new.as_ref()),
            (true, true) => ("MODIFIED", self.new.as_ref()),
            (true, false) => ("DELETED", self.new.as_ref().or(self.old.as_ref())),
            (false, false) => return None,
        };
        Some(json!({"type": kind, "object": obj}))
    }
}

impl Inner {
    fn record(&mut self, old: Option<Value>, new: Option<Value>) {
        self.rv += 1;
        let change = Change { rv: self.rv, old, new };
        self.watches.retain(|w| match change.event_for(&w.namespace, &w.selector) {
            Some(e) => w.tx.send(e).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push(change);
    }
}

impl FakeK8s {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner { rv: 100, oldest: 0, ..Default::default() }));
        let app = Router::new()
            .route("/api/v1/pods", get(all_pods))
            .route("/api/v1/namespaces/{ns}/pods", get(ns_pods))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, inner, task }
    }

    /// A kubeconfig that points at this server, written to `path`.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url
        );
        std::fs::write(path, text).unwrap();
    }

    /// Creates or replaces a pod (ADDED or MODIFIED).
    pub fn apply(&self, mut pod: Value) {
        let mut s = self.inner.lock().unwrap();
        pod["metadata"]["resourceVersion"] = json!((s.rv + 1).to_string());
        let old = s.pods.insert(key(&pod), pod.clone());
        s.record(old, Some(pod));
    }

    /// Changes a pod in place with `edit`.
    pub fn edit(&self, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut pod = self.inner.lock().unwrap().pods[&format!("{ns}/{name}")].clone();
        edit(&mut pod);
        self.apply(pod);
    }

    pub fn delete(&self, ns: &str, name: &str) {
        let mut s = self.inner.lock().unwrap();
        if let Some(old) = s.pods.remove(&format!("{ns}/{name}")) {
            s.record(Some(old), None);
        }
    }

    /// The resource versions seen so far expire: open watches get a 410 Gone event and end,
    /// and a watch from an older version is refused with 410, so the client must relist.
    pub fn expire(&self) {
        let mut s = self.inner.lock().unwrap();
        s.oldest = s.rv;
        let gone = status(410, "Expired", "too old resource version");
        for w in s.watches.drain(..) {
            let _ = w.tx.send(json!({"type": "ERROR", "object": gone}));
        }
    }

    /// Open watches end without an error, as a dropped connection does.
    pub fn drop_watches(&self) {
        self.inner.lock().unwrap().watches.clear();
    }

    /// While down, every request fails with 503 and open watches end.
    pub fn set_down(&self, down: bool) {
        let mut s = self.inner.lock().unwrap();
        s.down = down;
        if down {
            s.watches.clear();
        }
    }

    /// (lists, watch requests) served so far.
    pub fn requests(&self) -> (u64, u64) {
        let s = self.inner.lock().unwrap();
        (s.lists, s.watch_requests)
    }
}

type Params = Query<BTreeMap<String, String>>;

async fn all_pods(State(s): State<Arc<Mutex<Inner>>>, q: Params) -> Response {
    serve(s, None, q.0)
}

async fn ns_pods(
    State(s): State<Arc<Mutex<Inner>>>,
    Path(ns): Path<String>,
    q: Params,
) -> Response {
    serve(s, Some(ns), q.0)
}

fn serve(state: Arc<Mutex<Inner>>, ns: Option<String>, q: BTreeMap<String, String>) -> Response {
    let mut s = state.lock().unwrap();
    if s.down {
        let body = status(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    let selector: BTreeMap<String, String> = q
        .get("labelSelector")
        .map(|l| {
            l.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim_end_matches('=').to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        s.lists += 1;
        let items: Vec<&Value> = s.pods.values().filter(|p| matches(p, &ns, &selector)).collect();
        let body = json!({"kind": "PodList", "apiVersion": "v1",
                          "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
        return axum::Json(body).into_response();
    }
    s.watch_requests += 1;
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(s.rv);
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    if from < s.oldest {
        let gone =
            status(410, "Expired", &format!("too old resource version: {from} ({})", s.oldest));
        let _ = tx.send(json!({"type": "ERROR", "object": gone}));
    } else {
        for c in s.history.iter().filter(|c| c.rv > from) {
            if let Some(e) = c.event_for(&ns, &selector) {
                let _ = tx.send(e);
            }
        }
        s.watches.push(Watch { namespace: ns, selector, tx });
    }
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|e| e.map(|e| Ok::<_, std::io::Error>(format!("{e}\n").into_bytes())))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

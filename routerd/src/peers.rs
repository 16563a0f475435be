//! Approximate mode across replicas: where workers publish no KV events, each routerd replica
//! tells its peers what it routed where, so that a prefix one replica sent to a worker is a hit
//! there for all of them.
//!
//! - **What is shared.** For each request cache_aware routed on its approximate tree, the
//!   routing text's whole 64-byte pages as chained 64-bit hashes (page i's hash mixes page
//!   i-1's), with the worker's URL. No prompt text leaves the replica.
//! - **How.** Every 50 ms (every second while no peer is configured, to notice a reload),
//!   what was routed since is POSTed as one batch to each peer's
//!   `/admin/peers/routed`, with the admin key (`Authorization: Bearer`). Peers come from
//!   `[peers] urls` (`--peer-urls`); a name that resolves to several addresses (a Kubernetes
//!   headless Service) is a peer per address, resolved again every 5 s. A replica ignores its
//!   own batches (each carries the sender's random id).
//! - **Bounded and lossy.** At most 4,096 routed entries wait between sends (more are
//!   dropped and counted), a send that takes over 1 s is abandoned, and each replica keeps at
//!   most `[peers] max_pages` of its peers' pages, the least recently told forgotten first. A
//!   lost batch costs cache misses, never a wrong answer.
//! - **Matching.** cache_aware's share of the prompt on a worker is the larger of its own
//!   tree's match and the peers' leading pages there.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// Bytes per shared page of routing text.
pub const PAGE: usize = 64;
const EVERY: Duration = Duration::from_millis(50);
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_OUTBOX: usize = 4096;

/// The chained hashes of `text`'s whole pages.
pub fn text_pages(text: &[u8]) -> Vec<u64> {
    let mut prev = 0x51_7c_c1_b7_27_22_0a_95u64;
    text.chunks_exact(PAGE)
        .map(|page| {
            let mut h = prev;
            for word in page.chunks_exact(8) {
                let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                h = (h.rotate_left(5) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            }
            h ^= h >> 29;
            prev = h;
            h
        })
        .collect()
}

/// What peers said they routed: (worker, page hash) pairs, the least recently told forgotten
/// first past `cap`.
#[derive(Debug, Default)]
struct PeerPages {
    workers: HashMap<String, u32>,
    pages: HashMap<(u32, u64), u64>,
    /// Every recording in order (with its stamp); an entry told again later is skipped when
    /// its old recording comes up.
    order: VecDeque<((u32, u64), u64)>,
    stamp: u64,
    cap: usize,
}

impl PeerPages {
    fn record(&mut self, worker: &str, pages: &[u64]) {
        let next = self.workers.len() as u32;
        let w = *self.workers.entry(worker.to_owned()).or_insert(next);
        for &p in pages {
            self.stamp += 1;
            self.pages.insert((w, p), self.stamp);
            self.order.push_back(((w, p), self.stamp));
        }
        while self.pages.len() > self.cap || self.order.len() > 2 * self.cap.max(1) {
            let Some((key, stamp)) = self.order.pop_front() else { break };
            if self.pages.get(&key) == Some(&stamp) {
                self.pages.remove(&key);
            }
        }
    }

    /// Leading pages of `pages` peers routed to `worker`.
    fn leading(&self, worker: &str, pages: &[u64]) -> usize {
        let Some(&w) = self.workers.get(worker) else { return 0 };
        pages.iter().take_while(|p| self.pages.contains_key(&(w, **p))).count()
    }

    fn forget(&mut self, worker: &str) {
        if let Some(w) = self.workers.get(worker).copied() {
            self.pages.retain(|(x, _), _| *x != w);
        }
    }
}

/// One routing decision to tell the peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Routed {
    pub worker: String,
    pub pages: Vec<u64>,
}

/// A batch as sent to `/admin/peers/routed`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Batch {
    /// The sender's id: a replica drops its own batches.
    pub from: u64,
    pub routed: Vec<Routed>,
}

/// One peer address, as `/admin/peers` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    pub sent: u64,
    pub failed: u64,
    pub last_error: Option<String>,
}

/// This replica's side of peer sharing.
#[derive(Debug)]
pub struct Peers {
    pub id: u64,
    /// Peers are configured: cache_aware shares its decisions and reads theirs.
    active: std::sync::atomic::AtomicBool,
    pages: Mutex<PeerPages>,
    outbox: Mutex<Vec<Routed>>,
    status: Mutex<HashMap<String, PeerStatus>>,
    pub dropped: AtomicU64,
    pub received: AtomicU64,
}

impl Peers {
    /// Active from the start when `[peers]` lists any (a reload turns it on or off).
    pub fn new(cfg: &crate::config::PeersConfig) -> Self {
        let max_pages = cfg.max_pages;
        Self {
            id: rand::random(),
            active: std::sync::atomic::AtomicBool::new(!cfg.urls.is_empty()),
            pages: Mutex::new(PeerPages { cap: max_pages, ..Default::default() }),
            outbox: Mutex::new(Vec::new()),
            status: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    pub fn active(&self) -> bool {
        self.active.load(Relaxed)
    }

    pub fn set_max_pages(&self, max: usize) {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).cap = max;
    }

    /// Queues a decision for the next batch (dropped when 4,096 wait already).
    pub fn note_routed(&self, worker: &str, pages: Vec<u64>) {
        if pages.is_empty() {
            return;
        }
        let mut out = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        if out.len() >= MAX_OUTBOX {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        out.push(Routed { worker: worker.to_owned(), pages });
    }

    /// For each of `urls`, the leading `pages` peers routed there.
    pub fn matched(&self, urls: &[&str], pages: &[u64]) -> Vec<usize> {
        let g = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        urls.iter().map(|u| g.leading(u, pages)).collect()
    }

    /// Records a peer's batch (only for workers this replica has: `known`); the number of
    /// decisions recorded.
    pub fn receive(&self, batch: Batch, known: impl Fn(&str) -> bool) -> usize {
        if batch.from == self.id {
            return 0;
        }
        let mut g = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for r in batch.routed.iter().filter(|r| known(&r.worker)) {
            g.record(&r.worker, &r.pages);
            n += 1;
        }
        self.received.fetch_add(n as u64, Relaxed);
        n
    }

    pub fn forget(&self, worker: &str) {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).forget(worker);
    }

    fn take_outbox(&self) -> Vec<Routed> {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn note(&self, peer: &str, r: Result<(), String>) {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let s = g.entry(peer.to_owned()).or_default();
        match r {
            Ok(()) => {
                s.sent += 1;
                s.last_error = None;
            }
            Err(e) => {
                s.failed += 1;
                s.last_error = Some(e);
            }
        }
    }

    pub fn pages_held(&self) -> usize {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).pages.len()
    }
}

/// Every peer address of `urls`: `http://HOST:PORT` with HOST resolved (each address one
/// peer).
async fn resolve(urls: &[String]) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::new();
    for u in urls {
        let Ok(uri) = u.parse::<http::Uri>() else { continue };
        let (Some(host), port) = (uri.host(), uri.port_u16().unwrap_or(80)) else { continue };
        let target = format!("{host}:{port}");
        if let Ok(addrs) = tokio::net::lookup_host(target).await {
            for a in addrs {
                if !out.iter().any(|(_, x)| *x == a) {
                    out.push((u.clone(), a));
                }
            }
        }
    }
    out
}

/// Sends what was routed to every peer every 50 ms, while `[peers] urls` lists any.
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    let mut addrs: Vec<(String, SocketAddr)> = Vec::new();
    let mut resolved_for: Vec<String> = Vec::new();
    let mut resolved_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let live = app.live();
        let cfg = &live.config.peers;
        app.peers.set_max_pages(cfg.max_pages);
        app.peers.active.store(!cfg.urls.is_empty(), Relaxed);
        if cfg.urls.is_empty() {
            app.peers.take_outbox();
            // No peers: only a reload can bring some; look again in a second.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        if resolved_for != cfg.urls || resolved_at.is_none_or(|t| t.elapsed() > RESOLVE_EVERY) {
            addrs = tokio::select! {
                _ = cancel.cancelled() => return,
                a = resolve(&cfg.urls) => a,
            };
            resolved_for = cfg.urls.clone();
            resolved_at = Some(Instant::now());
        }
        let routed = app.peers.take_outbox();
        if routed.is_empty() || addrs.is_empty() {
            continue;
        }
        let body = match serde_json::to_vec(&Batch { from: app.peers.id, routed }) {
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        let key = live.config.security.admin_api_key.as_ref().map(|k| k.expose().to_owned());
        let sends = addrs.iter().map(|(name, addr)| {
            let (body, key) = (body.clone(), key.clone());
            let client = app.http.plain();
            async move {
                let r = send(client, *addr, body, key.as_deref()).await;
                (format!("{name} ({addr})"), r)
            }
        });
        let results = tokio::select! {
            _ = cancel.cancelled() => return,
            r = futures_util::future::join_all(sends) => r,
        };
        for (peer, r) in results {
            app.peers.note(&peer, r);
        }
    }
}

type PlainClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

async fn send(
    client: &PlainClient,
    addr: SocketAddr,
    body: Bytes,
    key: Option<&str>,
) -> Result<(), String> {
    let mut req = http::Request::post(format!("http://{addr}/admin/peers/routed"))
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req.body(http_body_util::Full::new(body)).map_err(|e| e.to_string())?;
    match tokio::time::timeout(SEND_TIMEOUT, client.request(req)).await {
        Ok(Ok(r)) if r.status().is_success() => Ok(()),
        Ok(Ok(r)) => Err(format!("answered {}", r.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// `POST /admin/peers/routed`: a peer's batch.
pub async fn admin_routed(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return crate::error::RouterError::BadRequest(format!("not a peers batch: {e}"))
                .into_response()
        }
    };
    let snapshot = app.registry.snapshot();
    let n = app.peers.receive(batch, |url| snapshot.workers.iter().any(|w| w.url() == url));
    Json(serde_json::json!({"recorded": n})).into_response()
}

/// `GET /admin/peers`: the peers and what was exchanged.
pub async fn admin_peers(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let live = app.live();
    let status = app.peers.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Json(serde_json::json!({
        "id": app.peers.id,
        "urls": live.config.peers.urls,
        "peers": status,
        "received": app.peers.received.load(Relaxed),
        "dropped": app.peers.dropped.load(Relaxed),
        "pages": app.peers.pages_held(),
        "max_pages": live.config.peers.max_pages,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_chain_and_only_whole_pages_count() {
        let a = text_pages(&[b'a'; 200]);
        assert_eq!(a.len(), 3);
        assert_ne!(a[0], a[1], "the same bytes at another depth hash differently");
        let mut other = vec![b'a'; 200];
        other[10] = b'b';
        let b = text_pages(&other);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y), "a change spreads to every later page");
        assert!(text_pages(b"short").is_empty());
    }

    #[test]
    fn peers_pages_are_matched_bounded_and_never_our_own() {
        let p = Peers::new(&crate::config::PeersConfig { urls: Vec::new(), max_pages: 4 });
        let pages = text_pages(&[b'x'; 64 * 3]);
        let batch = |from, worker: &str| Batch {
            from,
            routed: vec![Routed { worker: worker.into(), pages: pages.clone() }],
        };
        assert_eq!(p.receive(batch(p.id, "http://w:1"), |_| true), 0, "our own batch");
        assert_eq!(p.receive(batch(7, "http://gone:1"), |u| u != "http://gone:1"), 0);
        assert_eq!(p.receive(batch(7, "http://w:1"), |_| true), 1);
        assert_eq!(p.matched(&["http://w:1", "http://v:1"], &pages), vec![3, 0]);
        // Four pages at most: a new decision pushes the oldest out.
        let more = text_pages(&[b'y'; 64 * 2]);
        p.receive(
            Batch {
                from: 7,
                routed: vec![Routed { worker: "http://v:1".into(), pages: more.clone() }],
            },
            |_| true,
        );
        assert_eq!(p.pages_held(), 4);
        assert_eq!(
            p.matched(&["http://w:1", "http://v:1"], &pages),
            vec![0, 0],
            "its first page went"
        );
        assert_eq!(p.matched(&["http://v:1"], &more), vec![2]);
        p.forget("http://v:1");
        assert_eq!(p.matched(&["http://v:1"], &more), vec![0]);
    }

    #[test]
    fn the_outbox_is_bounded() {
        let p = Peers::new(&crate::config::PeersConfig { urls: Vec::new(), max_pages: 16 });
        for _ in 0..MAX_OUTBOX + 10 {
            p.note_routed("http://w:1", vec![1]);
        }
        assert_eq!(p.dropped.load(Relaxed), 10);
        assert_eq!(p.take_outbox().len(), MAX_OUTBOX);
    }
}

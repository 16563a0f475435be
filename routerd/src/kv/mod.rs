//! Exact cache state from the engines' KV events (SGLang's `--kv-events-config`): the wire,
//! the block hashes, an index of which worker holds which block, and one subscriber per
//! (worker, dp rank) that keeps the index in step with the worker's real cache.
//!
//! Routing asks [`KvState::matches`] for each candidate worker's matched tokens: `Some` where a
//! worker's events flow, `None` where they do not (the policy falls back on its approximate
//! tree). Nothing on the request path waits on a subscriber.

pub mod chat;
pub mod feeds;
pub mod hash;
pub mod index;
pub mod load;
pub mod subscriber;
pub mod tokenize;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::registry::WorkerRole;

use hash::BlockHash;
use index::{BlockIndex, Holder, WorkerId};

/// `[kv_events]`: where workers publish their KV events, for those whose `/server_info` does
/// not say (docs/kv-events.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvEventsConfig {
    /// Subscribe at all (default on, while cache_aware routes: a worker that publishes nothing
    /// costs one `/server_info` every 10 s).
    pub enabled: bool,
    /// `tcp://HOST:PORT` of the PUB socket of rank 0 (rank r at PORT + r); `{host}` is the
    /// worker URL's host. `None`: only workers whose `/server_info` has a `kv_events` block.
    pub endpoint: Option<String>,
    pub replay_endpoint: Option<String>,
    /// Rank 0's load PUB socket (SGLang's `--load-publish-endpoint`), rank r at PORT + r.
    pub load_endpoint: Option<String>,
    pub topic: String,
    /// Tokens per page, when the worker does not say (its first stored block says too).
    pub block_size: Option<usize>,
    pub dp_size: u32,
    /// How long what routerd sent counts as cached before events confirm it.
    #[serde(serialize_with = "crate::config::ser::duration")]
    pub pending_ttl: Duration,
    /// Blocks the index records at most (all workers): see `index`'s cost per block.
    pub max_blocks: usize,
    /// `[kv_events.prefill]`, `[kv_events.decode]`: a PD pool's endpoints, over the above.
    pub prefill: Option<KvEndpoint>,
    pub decode: Option<KvEndpoint>,
    /// `[[kv_events.workers]]`: one worker's endpoints (by its URL), over its pool's.
    pub workers: Vec<KvWorkerEndpoint>,
}

/// Where some workers publish: `tcp://HOST:PORT` of rank 0's PUB socket (`{host}` is the
/// worker URL's host; rank r at PORT + r), the replay socket likewise, and the ranks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvEndpoint {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub load_endpoint: Option<String>,
    /// Ranks (default: `[kv_events] dp_size`).
    pub dp_size: Option<u32>,
}

/// One worker's endpoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvWorkerEndpoint {
    /// Normalised, as the registry has it.
    pub url: String,
    #[serde(flatten)]
    pub at: KvEndpoint,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: None,
            replay_endpoint: None,
            load_endpoint: None,
            topic: String::new(),
            block_size: None,
            dp_size: 1,
            pending_ttl: Duration::from_secs(2),
            max_blocks: 4 << 20,
            prefill: None,
            decode: None,
            workers: Vec::new(),
        }
    }
}

/// One worker's event match for a prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageHit {
    /// Tokens matched (tier-weighted).
    pub tokens: usize,
    /// Leading pages held.
    pub pages: usize,
}

/// A prompt matched against workers' events (`KvState::matches`).
#[derive(Debug, Default)]
pub struct Matches {
    /// Per worker asked: `None` where no events flow for it.
    pub per: Vec<Option<PageHit>>,
    hashes: Vec<(usize, Vec<BlockHash>)>,
    prompt_tokens: usize,
}

impl Matches {
    /// The hash of the prompt's first page that no worker asked holds (or, when some hold
    /// all of it, its last page): what identifies a prefix new to the fleet.
    pub fn first_new_page(&self) -> Option<BlockHash> {
        let (_, hashes) = self.hashes.first()?;
        let held = self.per.iter().flatten().map(|h| h.pages).max().unwrap_or(0);
        hashes.get(held.min(hashes.len().checked_sub(1)?)).copied()
    }

    /// The tokens matched on the `i`-th worker asked, `None` without events for it.
    pub fn tokens(&self, i: usize) -> Option<usize> {
        self.per.get(i).copied().flatten().map(|h| h.tokens)
    }
}

/// Where one worker publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feed {
    /// PUB endpoint of each rank.
    pub endpoints: Vec<String>,
    pub replay: Vec<Option<String>>,
    pub topic: String,
    pub block_size: Option<usize>,
    /// Each rank's load PUB endpoint (SGLang's `--load-publish-endpoint`; topic `load`), or
    /// empty where the worker publishes no load.
    pub load: Vec<String>,
    /// The KV tokens one rank's cache holds at most (`max_total_num_tokens` of its
    /// `/server_info`), when known; a rank's load reports say it too, and win.
    pub capacity: Option<u64>,
}

/// The last load report of a rank, as `/admin/kv` shows it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LoadSeen {
    pub running: u64,
    pub waiting: u64,
    pub tokens: u64,
    pub max_tokens: u64,
}

/// One rank's subscriber, as `/admin/kv` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RankStatus {
    pub endpoint: String,
    pub connected: bool,
    pub last_seq: Option<i64>,
    pub batches: u64,
    pub malformed: u64,
    pub replays: u64,
    /// Times the rank's state was dropped (publisher restart, unreplayable gap, cache cleared).
    pub resets: u64,
    pub last_error: Option<String>,
    /// Its load socket, when it publishes load: connected, reports received, the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_reports: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadSeen>,
}

struct WorkerKv {
    id: WorkerId,
    block_size: Option<usize>,
    ranks: Vec<RankStatus>,
    /// Each rank's cache size in tokens by its `/server_info` (`Feed::capacity`).
    capacity: Option<u64>,
}

impl WorkerKv {
    /// Whether its events flow (a rank's subscriber is connected).
    fn flowing(&self) -> bool {
        self.ranks.iter().any(|r| r.connected)
    }

    /// Its ranks: all of them, or the one a dp-aware target names.
    fn ranks(&self, rank: Option<u32>) -> Vec<u16> {
        match rank {
            Some(r) => vec![r as u16],
            None => (0..self.ranks.len() as u16).collect(),
        }
    }

    /// Blocks those ranks hold.
    fn held(&self, index: &BlockIndex, rank: Option<u32>) -> usize {
        let holder = |rank| Holder { worker: self.id, rank };
        self.ranks(rank).into_iter().map(|r| index.holder_blocks(holder(r))).sum()
    }

    /// The tokens those ranks' caches hold at most: each rank's last load report
    /// (`max_total_num_tokens`), else its `/server_info`; `None` while a rank's is unknown.
    fn capacity(&self, rank: Option<u32>) -> Option<u64> {
        self.ranks(rank)
            .into_iter()
            .map(|r| {
                let reported = self.ranks.get(usize::from(r)).and_then(|s| s.load);
                reported.map(|l| l.max_tokens).filter(|&m| m > 0).or(self.capacity)
            })
            .sum()
    }
}

/// How full a worker's cache is, by its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheRoom {
    /// Blocks it holds, plus those just sent there and not yet confirmed.
    pub blocks: usize,
    pub block_size: usize,
    /// The tokens it can hold, when known (`WorkerKv::capacity`).
    pub capacity_tokens: Option<u64>,
}

impl CacheRoom {
    /// Tokens taken.
    pub fn tokens(&self) -> usize {
        self.blocks * self.block_size
    }
}

struct Inner {
    index: BlockIndex,
    workers: HashMap<String, WorkerKv>,
    next_id: WorkerId,
    pending_ttl: Duration,
}

/// The index and every worker's feed state, shared by the subscribers and the policies.
pub struct KvState {
    inner: Mutex<Inner>,
    /// Workers tracked (the request path skips tokenizing while there are none).
    tracked: std::sync::atomic::AtomicUsize,
    /// The tokenizer of each pool (regular, prefill, decode: `slot`); pools with the same
    /// files share one.
    tokenizers: [arc_swap::ArcSwapOption<tokenize::Tokenizer>; 3],
    tokenizer_error: Mutex<Option<String>>,
    /// Digests of recently hashed prompt pages (a shared prefix is hashed once).
    digests: Mutex<hash::DigestCache>,
    /// Workers whose feed must be looked up again (they restarted: their publisher may have
    /// moved).
    reresolve: Mutex<Vec<String>>,
    /// Counters for `/metrics`.
    pub events: AtomicU64,
    pub malformed: AtomicU64,
    pub replays: AtomicU64,
    pub resets: AtomicU64,
}

impl std::fmt::Debug for KvState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvState").field("events", &self.events).finish_non_exhaustive()
    }
}

impl Default for KvState {
    fn default() -> Self {
        Self::new(&KvEventsConfig::default())
    }
}

impl KvState {
    pub fn new(cfg: &KvEventsConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                index: BlockIndex::new(cfg.max_blocks),
                workers: HashMap::new(),
                next_id: 0,
                pending_ttl: cfg.pending_ttl,
            }),
            tracked: Default::default(),
            tokenizers: Default::default(),
            tokenizer_error: Mutex::new(None),
            digests: Mutex::new(hash::DigestCache::new(1 << 16)),
            reresolve: Mutex::new(Vec::new()),
            events: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_pending_ttl(&self, ttl: Duration) {
        self.lock().pending_ttl = ttl;
    }

    /// Starts tracking `base` (a worker URL without rank), one rank per feed endpoint.
    pub fn track(&self, base: &str, feed: &Feed) {
        let mut g = self.lock();
        if g.workers.contains_key(base) {
            return;
        }
        let id = g.next_id;
        g.next_id += 1;
        let ranks = feed
            .endpoints
            .iter()
            .enumerate()
            .map(|(r, e)| RankStatus {
                endpoint: e.clone(),
                load_endpoint: feed.load.get(r).cloned(),
                ..Default::default()
            })
            .collect();
        let w = WorkerKv { id, block_size: feed.block_size, ranks, capacity: feed.capacity };
        g.workers.insert(base.to_owned(), w);
        self.tracked.fetch_add(1, Relaxed);
    }

    /// Stops tracking `base`: its blocks leave the index.
    pub fn untrack(&self, base: &str) {
        let mut g = self.lock();
        if let Some(w) = g.workers.remove(base) {
            self.tracked.fetch_sub(1, Relaxed);
            g.index.clear_worker(w.id);
        }
    }

    /// The tokenizer prompts for `role`'s workers are hashed with, when one is loaded.
    pub fn tokenizer(&self, role: WorkerRole) -> Option<Arc<tokenize::Tokenizer>> {
        self.tokenizers[slot(role)].load_full()
    }

    pub fn set_tokenizer(&self, role: WorkerRole, t: Option<Arc<tokenize::Tokenizer>>) {
        self.tokenizers[slot(role)].store(t);
    }

    /// Whether `a`'s and `b`'s workers hash prompts with the same tokenizer (or none).
    pub fn same_tokenizer(&self, a: WorkerRole, b: WorkerRole) -> bool {
        match (self.tokenizer(a), self.tokenizer(b)) {
            (Some(x), Some(y)) => Arc::ptr_eq(&x, &y),
            (x, y) => x.is_none() && y.is_none(),
        }
    }

    /// Records a tokenizer load failure; true the first time this error is seen (logged once).
    pub fn tokenizer_error(&self, e: &str) -> bool {
        let mut g = self.tokenizer_error.lock().unwrap_or_else(|p| p.into_inner());
        let new = g.as_deref() != Some(e);
        *g = Some(e.to_owned());
        new
    }

    /// Blocks in the index (all workers).
    pub fn blocks(&self) -> usize {
        self.lock().index.len()
    }

    /// Whether any worker's events are followed.
    pub fn active(&self) -> bool {
        self.tracked.load(Relaxed) > 0
    }

    /// The prompt's token ids: the request's own (`input_ids`, a completions prompt of ids),
    /// else its text tokenized when a tokenizer is loaded, a chat conversation through the
    /// model's chat template. `None` (route on the approximate tree) without a tokenizer, for
    /// multimodal chats and where the template does not render the request.
    pub fn tokens(
        &self,
        probe: &crate::proxy::extract::Probe,
        route: crate::proxy::extract::Route,
        role: WorkerRole,
    ) -> Option<Vec<u32>> {
        if let Some(ids) = probe.token_ids(route) {
            return Some(ids);
        }
        let tokenizer = self.tokenizers[slot(role)].load();
        let tokenizer = tokenizer.as_ref()?;
        if route == crate::proxy::extract::Route::Chat {
            return match tokenizer.chat_ids(&probe.chat_input()) {
                Ok(ids) => Some(ids),
                Err(e) => {
                    tracing::debug!(error = %e, "chat request routes on the approximate tree");
                    None
                }
            };
        }
        tokenizer.encode(&probe.prompt_string(route)?)
    }

    /// A worker restarted or was flushed: everything known of it is dropped (events rebuild
    /// it), and where it publishes is looked up again.
    pub fn reset_worker(&self, url: &str) {
        let (base, _) = crate::registry::split_rank(url);
        let mut g = self.lock();
        if let Some(id) = g.workers.get(base).map(|w| w.id) {
            g.index.clear_worker(id);
            self.reresolve.lock().unwrap_or_else(|p| p.into_inner()).push(base.to_owned());
        }
    }

    /// The workers `reset_worker` asked to look up again.
    pub fn take_reresolve(&self) -> Vec<String> {
        std::mem::take(&mut *self.reresolve.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a batch a subscriber received for `rank` of `base`.
    pub fn apply(&self, base: &str, rank: u16, events: Vec<wire::Event>) {
        let mut g = self.lock();
        let Inner { index, workers, .. } = &mut *g;
        let Some(w) = workers.get_mut(base) else { return };
        let holder = Holder { worker: w.id, rank };
        let mut cleared = false;
        let n = events.len() as u64;
        for e in events {
            match e {
                wire::Event::Stored { hashes, block_size: bs, medium, namespaced, .. } => {
                    // The first stored block tells the block size when nothing else did.
                    let size = *w.block_size.get_or_insert(bs);
                    if !namespaced && size == bs {
                        index.store(holder, &hashes, medium);
                    }
                }
                wire::Event::Removed { hashes, medium } => index.remove(holder, &hashes, medium),
                wire::Event::Cleared => {
                    index.clear(holder);
                    cleared = true;
                }
            }
        }
        if let Some(r) = w.ranks.get_mut(rank as usize) {
            r.batches += 1;
            r.resets += u64::from(cleared);
        }
        self.events.fetch_add(n, Relaxed);
    }

    /// Drops one rank's blocks (its stream can no longer be trusted).
    pub fn reset_rank(&self, base: &str, rank: u16) {
        let mut g = self.lock();
        let Some(w) = g.workers.get_mut(base) else { return };
        let holder = Holder { worker: w.id, rank };
        if let Some(r) = w.ranks.get_mut(rank as usize) {
            r.resets += 1;
        }
        g.index.clear(holder);
        self.resets.fetch_add(1, Relaxed);
    }

    pub fn update_rank(&self, base: &str, rank: u16, f: impl FnOnce(&mut RankStatus)) {
        if let Some(r) =
            self.lock().workers.get_mut(base).and_then(|w| w.ranks.get_mut(rank as usize))
        {
            f(r);
        }
    }

    /// For each of `urls`, the tokens of `tokens` that worker's cache holds (leading whole
    /// pages, lower tiers weighted down), or `None` where no events flow for it. The prompt is
    /// hashed once per block size, outside the lock.
    pub fn matches(&self, urls: &[&str], tokens: &[u32]) -> Matches {
        let sizes: Vec<Option<usize>> = {
            let g = self.lock();
            urls.iter()
                .map(|url| {
                    let w = g.workers.get(crate::registry::split_rank(url).0)?;
                    w.flowing().then_some(w.block_size.unwrap_or(0))
                })
                .collect()
        };
        let mut hashes: Vec<(usize, Vec<BlockHash>)> = Vec::new();
        for bs in sizes.iter().flatten().copied().filter(|bs| *bs > 0) {
            if !hashes.iter().any(|(b, _)| *b == bs) {
                let hs =
                    self.digests.lock().unwrap_or_else(|p| p.into_inner()).page_hashes(tokens, bs);
                hashes.push((bs, hs));
            }
        }
        let now = Instant::now();
        let g = self.lock();
        let per = urls
            .iter()
            .zip(&sizes)
            .map(|(url, size)| {
                let bs = (*size)?;
                let (base, rank) = crate::registry::split_rank(url);
                let Some(w) = g.workers.get(base) else { return Some(PageHit::default()) };
                let Some((_, hs)) = hashes.iter().find(|(b, _)| *b == bs) else {
                    return Some(PageHit::default());
                };
                let m = g.index.matched(w.id, &w.ranks(rank), hs, now);
                // Whole pages, but the last page may be short: never more than the prompt.
                let tokens = ((m.weighted * bs as f64) as usize).min(tokens.len());
                Some(PageHit { tokens, pages: m.pages })
            })
            .collect();
        Matches { per, hashes, prompt_tokens: tokens.len() }
    }

    /// For each of `urls` (as matched in `m`): how many of the prompt's leading tokens that
    /// worker holds or held last before they were evicted (0 without events). Every replica
    /// reads the same events, so they agree on the home of a prefix no cache holds any more.
    pub fn home_tokens(&self, urls: &[&str], m: &Matches) -> Vec<usize> {
        let g = self.lock();
        urls.iter()
            .zip(&m.per)
            .map(|(url, hit)| {
                if hit.is_none() {
                    return 0;
                }
                let (base, rank) = crate::registry::split_rank(url);
                let Some(w) = g.workers.get(base) else { return 0 };
                let Some(bs) = w.block_size else { return 0 };
                let Some((_, hs)) = m.hashes.iter().find(|(b, _)| *b == bs) else { return 0 };
                (g.index.home_run(w.id, &w.ranks(rank), hs) * bs).min(m.prompt_tokens)
            })
            .collect()
    }

    /// What was just sent to `url` (the `index`-th of the urls `m` was matched for) counts as
    /// held there until events confirm it: the whole pages past its match.
    pub fn note_sent(&self, url: &str, m: &Matches, index: usize) {
        let Some(Some(hit)) = m.per.get(index) else { return };
        let (base, _) = crate::registry::split_rank(url);
        let mut g = self.lock();
        let ttl = g.pending_ttl;
        let Some((id, Some(bs))) = g.workers.get(base).map(|w| (w.id, w.block_size)) else {
            return;
        };
        let Some((_, hs)) = m.hashes.iter().find(|(b, _)| *b == bs) else { return };
        // Whole pages only: an engine does not keep a prompt's last partial page.
        let whole = (m.prompt_tokens / bs).min(hs.len());
        if hit.pages < whole {
            g.index.note_pending(id, &hs[hit.pages..whole], Instant::now(), ttl);
        }
    }

    /// Blocks a worker holds (all ranks, or the rank its URL names) or was just sent, its block
    /// size and its capacity; `None` without events.
    pub fn worker_blocks(&self, url: &str) -> Option<CacheRoom> {
        let (base, rank) = crate::registry::split_rank(url);
        let g = self.lock();
        let w = g.workers.get(base)?;
        if !w.flowing() {
            return None;
        }
        // What was just sent there takes room too: a burst of new prefixes spreads.
        Some(CacheRoom {
            blocks: w.held(&g.index, rank) + g.index.pending_pages(w.id),
            block_size: w.block_size.unwrap_or(1),
            capacity_tokens: w.capacity(rank),
        })
    }

    /// Every tracked worker's feed, for `/admin/kv`.
    pub fn status(&self) -> serde_json::Value {
        let g = self.lock();
        let mut workers: Vec<_> = g
            .workers
            .iter()
            .map(|(url, w)| {
                serde_json::json!({
                    "url": url,
                    "block_size": w.block_size,
                    "blocks": w.held(&g.index, None),
                    "capacity_tokens": w.capacity(None),
                    "ranks": w.ranks,
                })
            })
            .collect();
        workers.sort_by(|a, b| a["url"].as_str().cmp(&b["url"].as_str()));
        let tokenizers: Vec<_> = self.tokenizers.iter().map(|t| t.load_full()).collect();
        // The regular pool's, else the prefill pool's, else the decode pool's.
        let tokenizer = tokenizers.iter().flatten().next();
        let path = |t: &Arc<tokenize::Tokenizer>| t.files.path.display().to_string();
        let per_pool: serde_json::Map<String, serde_json::Value> = WorkerRole::ALL
            .iter()
            .zip(&tokenizers)
            .filter_map(|(role, t)| Some((role.as_str().to_owned(), path(t.as_ref()?).into())))
            .collect();
        serde_json::json!({
            "tokenizer": tokenizer.map(path),
            "tokenizers": per_pool,
            "chat_template": tokenizer.as_ref().map(|t| match &t.chat {
                Ok(c) => serde_json::json!({"from": c.origin}),
                Err(e) => serde_json::json!({"error": e}),
            }),
            "tokenizer_error": self.tokenizer_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "blocks": g.index.len(),
            "dropped_blocks": g.index.dropped,
            "events": self.events.load(Relaxed),
            "malformed": self.malformed.load(Relaxed),
            "replays": self.replays.load(Relaxed),
            "resets": self.resets.load(Relaxed),
            "workers": workers,
        })
    }
}

/// `GET /admin/kv`: every worker's KV-event feed and the index's size.
pub async fn admin_kv(
    axum::extract::State(app): axum::extract::State<std::sync::Arc<crate::app::App>>,
) -> axum::Json<serde_json::Value> {
    axum::Json(app.kv.status())
}

/// The `kv_events` block of a worker's `/server_info` (SGLang >= 0.5.23) as a feed; a
/// wildcard host is the worker URL's host.
pub fn feed_from_server_info(worker_url: &str, info: &serde_json::Value) -> Option<Feed> {
    let kv = info.get("kv_events")?;
    if kv.get("publisher").and_then(|p| p.as_str()).is_some_and(|p| p != "zmq") {
        return None;
    }
    let host = match kv.get("endpoint_host").and_then(|h| h.as_str()) {
        None | Some("*" | "0.0.0.0" | "" | "::") => url_host(worker_url)?,
        Some(h) => h.to_owned(),
    };
    let port = kv.get("endpoint_port_base").and_then(|p| p.as_u64())?;
    let replay = kv.get("replay_endpoint_port_base").and_then(|p| p.as_u64());
    let load = kv.get("load_endpoint_port_base").and_then(|p| p.as_u64());
    let dp = kv.get("dp_size").and_then(|d| d.as_u64()).unwrap_or(1).clamp(1, 1024);
    // The load range pairs with the worker URL's host, whatever `endpoint_host` says.
    let load_host = url_host(worker_url)?;
    Some(Feed {
        load: load
            .map(|p| (0..dp).map(|r| format!("tcp://{load_host}:{}", p + r)).collect())
            .unwrap_or_default(),
        endpoints: (0..dp).map(|r| format!("tcp://{host}:{}", port + r)).collect(),
        replay: (0..dp).map(|r| replay.map(|p| format!("tcp://{host}:{}", p + r))).collect(),
        topic: kv.get("topic").and_then(|t| t.as_str()).unwrap_or("").to_owned(),
        block_size: kv.get("block_size").and_then(|b| b.as_u64()).map(|b| b as usize),
        capacity: crate::info::server_info_count(info, "max_total_num_tokens"),
    })
}

/// The feed `[kv_events]` gives a worker (its host in place of `{host}`).
pub fn feed_from_config(
    worker_url: &str,
    role: crate::registry::WorkerRole,
    cfg: &KvEventsConfig,
) -> Option<Feed> {
    use crate::registry::WorkerRole;
    let (base, _) = crate::registry::split_rank(worker_url);
    let host = url_host(base)?;
    let ranked = |ep: &str, r: u32| -> Option<String> {
        let ep = ep.replace("{host}", &host);
        let (head, port) = ep.rsplit_once(':')?;
        let port: u32 = port.parse().ok()?;
        Some(format!("{head}:{}", port + r))
    };
    // The worker's own endpoints, else its pool's, else the fleet's.
    let pool = match role {
        WorkerRole::Prefill => cfg.prefill.as_ref(),
        WorkerRole::Decode => cfg.decode.as_ref(),
        WorkerRole::Regular => None,
    };
    let (ep, replay, load, dp_size) =
        match cfg.workers.iter().find(|w| w.url == base).map(|w| &w.at).or(pool) {
            Some(at) => (
                at.endpoint.as_str(),
                at.replay_endpoint.as_deref(),
                at.load_endpoint.as_deref(),
                at.dp_size.unwrap_or(cfg.dp_size),
            ),
            None => (
                cfg.endpoint.as_deref()?,
                cfg.replay_endpoint.as_deref(),
                cfg.load_endpoint.as_deref(),
                cfg.dp_size,
            ),
        };
    Some(Feed {
        load: match load {
            Some(l) => (0..dp_size).map(|r| ranked(l, r)).collect::<Option<_>>()?,
            None => Vec::new(),
        },
        endpoints: (0..dp_size).map(|r| ranked(ep, r)).collect::<Option<_>>()?,
        replay: (0..dp_size).map(|r| replay.and_then(|e| ranked(e, r))).collect(),
        topic: cfg.topic.clone(),
        block_size: cfg.block_size,
        // The load reports say it, where the worker publishes them.
        capacity: None,
    })
}

fn url_host(url: &str) -> Option<String> {
    let (base, _) = crate::registry::split_rank(url);
    let u: http::Uri = base.parse().ok()?;
    Some(u.host()?.to_owned())
}

/// The index of `role`'s pool in `KvState::tokenizers`.
fn slot(role: WorkerRole) -> usize {
    match role {
        WorkerRole::Regular => 0,
        WorkerRole::Prefill => 1,
        WorkerRole::Decode => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_info_block() {
        let info = serde_json::json!({"kv_events": {"publisher": "zmq", "endpoint_host": "10.9.9.9",
            "endpoint_port_base": 5557, "topic": "kv", "block_size": 16, "dp_size": 2,
            "replay_endpoint_port_base": 5560, "load_endpoint_port_base": 5562,
            "load_topic": "load"}});
        let f = feed_from_server_info("http://10.0.0.7:30000", &info).unwrap();
        assert_eq!(f.endpoints, vec!["tcp://10.9.9.9:5557", "tcp://10.9.9.9:5558"]);
        assert_eq!(
            f.replay,
            vec![Some("tcp://10.9.9.9:5560".to_owned()), Some("tcp://10.9.9.9:5561".to_owned())]
        );
        // The load range pairs with the worker URL's host, as SGLang asks.
        assert_eq!(f.load, vec!["tcp://10.0.0.7:5562", "tcp://10.0.0.7:5563"]);
        assert_eq!((f.topic.as_str(), f.block_size), ("kv", Some(16)));
        assert_eq!(f.capacity, None, "no max_total_num_tokens");
        assert_eq!(feed_from_server_info("http://h:1", &serde_json::json!({})), None);
        // The cache's size: SGLang's scheduler info, else its first scheduler's state.
        let mut info = serde_json::json!({"kv_events": {"endpoint_port_base": 5557},
            "internal_states": [{"max_total_num_tokens": 7000}]});
        assert_eq!(feed_from_server_info("http://h:1", &info).unwrap().capacity, Some(7000));
        info["max_total_num_tokens"] = 9000.into();
        assert_eq!(feed_from_server_info("http://h:1", &info).unwrap().capacity, Some(9000));
    }

    #[test]
    fn config_feed() {
        use crate::registry::WorkerRole::{Decode, Prefill, Regular};
        let cfg = KvEventsConfig {
            endpoint: Some("tcp://{host}:5557".into()),
            replay_endpoint: Some("tcp://{host}:5558".into()),
            load_endpoint: Some("tcp://{host}:5559".into()),
            dp_size: 1,
            ..Default::default()
        };
        let f = feed_from_config("http://w1:8000@0", Regular, &cfg).unwrap();
        assert_eq!(f.endpoints, vec!["tcp://w1:5557"]);
        assert_eq!(f.replay, vec![Some("tcp://w1:5558".to_owned())]);
        assert_eq!(f.load, vec!["tcp://w1:5559"]);
        assert_eq!(feed_from_config("http://w1:8000", Regular, &KvEventsConfig::default()), None);
        // A pool's endpoints over the fleet's, a worker's over its pool's.
        let cfg = KvEventsConfig {
            decode: Some(KvEndpoint {
                endpoint: "tcp://{host}:6000".into(),
                replay_endpoint: None,
                load_endpoint: None,
                dp_size: Some(2),
            }),
            workers: vec![KvWorkerEndpoint {
                url: "http://d2:8000".into(),
                at: KvEndpoint {
                    endpoint: "tcp://10.1.1.1:7000".into(),
                    replay_endpoint: Some("tcp://10.1.1.1:7100".into()),
                    load_endpoint: Some("tcp://10.1.1.1:7200".into()),
                    dp_size: None,
                },
            }],
            ..cfg
        };
        let f = feed_from_config("http://d1:8000", Decode, &cfg).unwrap();
        assert_eq!(f.endpoints, vec!["tcp://d1:6000", "tcp://d1:6001"]);
        assert_eq!(f.replay, vec![None, None]);
        assert!(f.load.is_empty(), "the pool names no load socket");
        let f = feed_from_config("http://d2:8000", Decode, &cfg).unwrap();
        assert_eq!(f.endpoints, vec!["tcp://10.1.1.1:7000"]);
        assert_eq!(f.replay, vec![Some("tcp://10.1.1.1:7100".to_owned())]);
        assert_eq!(f.load, vec!["tcp://10.1.1.1:7200"]);
        let f = feed_from_config("http://p1:8000", Prefill, &cfg).unwrap();
        assert_eq!(f.endpoints, vec!["tcp://p1:5557"]);
    }

    #[test]
    fn a_cache_size_is_its_ranks_load_reports_else_its_server_info() {
        let kv = KvState::default();
        let feed = |capacity| Feed {
            endpoints: vec!["tcp://a:1".into(), "tcp://a:2".into()],
            replay: vec![None, None],
            topic: String::new(),
            block_size: Some(4),
            load: Vec::new(),
            capacity,
        };
        kv.track("http://a:1", &feed(Some(1000)));
        kv.track("http://b:1", &feed(None));
        for (url, rank) in [("http://a:1", 0), ("http://a:1", 1), ("http://b:1", 0)] {
            kv.update_rank(url, rank, |r| r.connected = true);
        }
        let size = |url: &str| kv.worker_blocks(url).unwrap().capacity_tokens;
        assert_eq!(size("http://a:1"), Some(2000), "two ranks of 1000");
        assert_eq!(size("http://b:1"), None, "unknown");
        let report = |max_tokens| Some(LoadSeen { max_tokens, ..Default::default() });
        kv.update_rank("http://a:1", 1, |r| r.load = report(3000));
        assert_eq!(size("http://a:1"), Some(4000), "rank 1 reported 3000");
        assert_eq!(size("http://a:1@1"), Some(3000), "a dp-aware target: its rank's");
        assert_eq!(size("http://a:1@0"), Some(1000));
        kv.update_rank("http://b:1", 0, |r| r.load = report(0));
        assert_eq!(size("http://b:1"), None, "a report of 0 says nothing");
        kv.update_rank("http://b:1", 1, |r| r.load = report(500));
        assert_eq!(size("http://b:1"), None, "rank 0 still unknown");
        assert_eq!(kv.status()["workers"][0]["capacity_tokens"], 4000);
    }

    #[test]
    fn matches_follow_events_and_none_without_a_feed() {
        let kv = KvState::default();
        let feed = Feed {
            endpoints: vec!["tcp://a:1".into()],
            replay: vec![None],
            topic: String::new(),
            block_size: Some(4),
            load: Vec::new(),
            capacity: None,
        };
        kv.track("http://a:1", &feed);
        let tokens: Vec<u32> = (0..10).collect();
        let toks = |urls: &[&str], t: &[u32]| {
            let m = kv.matches(urls, t);
            (0..urls.len()).map(|i| m.tokens(i)).collect::<Vec<_>>()
        };
        assert_eq!(toks(&["http://a:1"], &tokens), vec![None], "not connected yet");
        kv.update_rank("http://a:1", 0, |r| r.connected = true);
        let hs = hash::page_hashes(&tokens, 4);
        kv.apply(
            "http://a:1",
            0,
            vec![wire::Event::Stored {
                hashes: hs[..2].to_vec(),
                parent: None,
                tokens: 8,
                block_size: 4,
                medium: wire::Medium::Gpu,
                namespaced: false,
            }],
        );
        assert_eq!(toks(&["http://a:1", "http://b:1"], &tokens), vec![Some(8), None]);
        let longer: Vec<u32> = (0..13).collect();
        let m = kv.matches(&["http://a:1"], &longer);
        assert_eq!(m.per[0], Some(PageHit { tokens: 8, pages: 2 }));
        kv.note_sent("http://a:1", &m, 0);
        assert_eq!(
            toks(&["http://a:1"], &longer),
            vec![Some(12)],
            "pending counts, whole pages only"
        );
        assert_eq!(
            toks(&["http://a:1"], &tokens),
            vec![Some(8)],
            "its own partial page is not held"
        );
        kv.reset_worker("http://a:1");
        assert_eq!(toks(&["http://a:1"], &tokens), vec![Some(0)]);
    }
}

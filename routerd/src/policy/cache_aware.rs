//! cache_aware: send each request to the worker whose KV cache most likely holds the longest
//! part of its prompt, without overloading anyone.
//!
//! With sgl-router's parameters and semantics:
//! 1. Loads are imbalanced when `max - min > balance_abs_threshold` and
//!    `max > min * balance_rel_threshold` (load: in-flight requests, streams included).
//! 2. The request's text is matched against an approximate radix tree of what was routed to each
//!    worker. If the best match covers more than `cache_threshold` of the text, it goes there.
//! 3. Otherwise (a miss) it goes to the worker with the most cache room: the smallest tree.
//! 4. The text is recorded in the tree for the chosen worker; the tree is bounded by
//!    `max_tree_size` characters at every insert.
//!
//! Where sgl-router is known to do worse, this does better: when loads are imbalanced it keeps
//! locality among the workers that are not overloaded (load within `balance_abs_threshold` of
//! the minimum) instead of sending everything to the single least-loaded worker; ties between
//! equally good workers go to the less loaded, then at random, so misses do not pile onto one
//! worker; and `max_tree_size` bounds the whole tree (all workers) rather than each worker's
//! share, so memory does not grow with the fleet.

use std::sync::{Arc, Mutex};

use rand::Rng;

use super::tree::{Tenant, TenantIds, Tree};
use super::{Policy, Predicted, RequestInfo, Unit};
use crate::registry::Worker;

#[derive(Debug, Clone, PartialEq)]
pub struct CacheAwareConfig {
    pub cache_threshold: f64,
    pub balance_abs_threshold: u64,
    pub balance_rel_threshold: f64,
    pub max_tree_size: usize,
}

pub struct CacheAware {
    state: Mutex<State>,
}

struct State {
    cfg: CacheAwareConfig,
    tree: Tree,
    ids: TenantIds,
}

/// Which rule chose the worker (for tests now, decision records later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    Hit,
    Miss,
    /// Event routing: no cache holds the prompt; it goes back where the tree says it was sent.
    Home,
}

impl CacheAware {
    pub fn new(cfg: CacheAwareConfig) -> Self {
        let tree = Tree::new(cfg.max_tree_size);
        Self { state: Mutex::new(State { cfg, tree, ids: TenantIds::default() }) }
    }

    /// `select` that also says which rule decided.
    pub fn choose(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<(usize, Branch)> {
        self.choose_explained(workers, req).map(|d| (d.index, d.branch))
    }

    fn choose_explained(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<Choice> {
        let routable = super::usable(workers, req);
        if routable.is_empty() {
            return None;
        }
        // Everything that needs no shared state is done before the lock.
        let loads: Vec<u64> = routable.iter().map(|&i| workers[i].load()).collect();
        let min = *loads.iter().min().expect("non-empty");
        let max = *loads.iter().max().expect("non-empty");
        let text_chars = req.text.chars().count();
        // The routable workers' URLs, for the event index and the peers (when either is used).
        let urls: Vec<&str> = if req.kv.is_some() || req.peers.is_some() {
            routable.iter().map(|&i| workers[i].url()).collect()
        } else {
            Vec::new()
        };
        // Where a worker's KV events flow, its match is what its cache really holds, in
        // tokens (hashing the prompt needs none of this policy's state).
        let ev = event_matches(&urls, req);
        let token_count = req.tokens.map_or(0, <[u32]>::len);
        // What peer replicas routed (approximate mode across replicas), in whole pages.
        let peer_pages = req
            .peers
            .filter(|_| text_chars > 0)
            .map(|_| crate::peers::text_pages(req.text.as_bytes()));
        let peer_hits: Vec<usize> = match (req.peers, &peer_pages) {
            (Some(p), Some(pages)) => p.matched(&urls, pages),
            _ => Vec::new(),
        };
        let text_bytes = req.text.len().max(1) as f64;
        let mut rng = rand::rng();
        let mut st = self.state.lock().expect("cache_aware state");
        let c = st.cfg.clone();
        let imbalanced = max - min > c.balance_abs_threshold
            && max as f64 > min as f64 * c.balance_rel_threshold;
        // Imbalanced: only workers that are not overloaded stay candidates.
        let candidates: Vec<usize> = (0..routable.len())
            .filter(|&k| !imbalanced || loads[k] <= min + c.balance_abs_threshold)
            .collect();

        let tenants: Vec<Tenant> =
            routable.iter().map(|&i| st.ids.id_for(workers[i].url())).collect();
        let matches = if text_chars > 0 { st.tree.prefix_match(req.text) } else { Vec::new() };
        let matched =
            |k: usize| matches.iter().find(|(t, _)| *t == tenants[k]).map_or(0, |(_, n)| *n);
        // The tree's match, or the peers' where it is longer.
        let tree_share = |k: usize| {
            if text_chars > 0 {
                let peers = peer_hits
                    .get(k)
                    .map_or(0.0, |&p| ((p * crate::peers::PAGE) as f64 / text_bytes).min(1.0));
                (matched(k) as f64 / text_chars as f64).max(peers)
            } else {
                0.0
            }
        };
        // The events' match in tokens where they flow, the tree's in characters elsewhere:
        // both as shares of the prompt.
        let share = |k: usize| match ev.tokens(k) {
            Some(t) if token_count > 0 => t as f64 / token_count as f64,
            Some(_) => 0.0,
            None => tree_share(k),
        };
        let best = candidates
            .iter()
            .map(|&k| (k, (share(k) * 1e9) as u64, rng.random::<u32>()))
            .max_by_key(|&(k, m, r)| (m, std::cmp::Reverse(loads[k]), r))
            .map(|(k, _, _)| k)
            .expect("candidates are never empty: the least loaded worker always qualifies");
        let has_prompt = text_chars > 0 || token_count > 0;
        // Cached nowhere by the events: the prompt goes back to its home, so a prefix evicted
        // under pressure comes back where it was rather than to whichever cache is emptiest,
        // which keeps each worker's set of prefixes small. The home is the worker the events
        // say held its leading pages last (every replica reads the same events, so they
        // agree), else the one the tree says it was last sent to.
        let home = || {
            // Where each worker held the prompt last (computed on a miss only).
            let ev_home: Vec<usize> = req.kv.map_or_else(Vec::new, |kv| kv.home_tokens(&urls, &ev));
            let by = |share: &dyn Fn(usize) -> f64| {
                candidates
                    .iter()
                    .map(|&k| (k, (share(k) * 1e9) as u64, std::cmp::Reverse(loads[k])))
                    .max_by_key(|&(_, m, l)| (m, l))
                    .filter(|&(_, m, _)| m as f64 / 1e9 > c.cache_threshold)
                    .map(|(k, _, _)| k)
            };
            let held_last =
                |k: usize| ev_home.get(k).map_or(0.0, |&t| t as f64 / token_count.max(1) as f64);
            by(&held_last).or_else(|| by(&tree_share))
        };
        let (pick, branch) = if has_prompt && share(best) > c.cache_threshold {
            (best, Branch::Hit)
        } else if let Some(k) = ev.per.iter().any(Option::is_some).then(home).flatten() {
            (k, Branch::Home)
        } else {
            // Cache room where events flow: what the cache holds (and was just sent), as a
            // share of its size where every candidate's size is known (a cache twice the size
            // takes twice the prefixes), else in tokens; the tree's share elsewhere.
            let rooms: Vec<Option<crate::kv::CacheRoom>> = candidates
                .iter()
                .map(|&k| {
                    let url = workers[routable[k]].url();
                    ev.tokens(k).and(req.kv).and_then(|kv| kv.worker_blocks(url))
                })
                .collect();
            let sized = !rooms.is_empty()
                && rooms.iter().all(|r| r.is_some_and(|r| r.capacity_tokens.is_some()));
            let capacity = |i: usize| rooms[i].and_then(|r| r.capacity_tokens).unwrap_or(1).max(1);
            let sizes: Vec<(usize, u64)> = candidates
                .iter()
                .enumerate()
                .map(|(i, &k)| {
                    let used = match (ev.tokens(k), rooms[i]) {
                        (Some(_), Some(r)) if sized => r.tokens() as u64 * PARTS / capacity(i),
                        (Some(_), Some(r)) => r.tokens() as u64,
                        (Some(_), None) => 0,
                        (None, _) => st.tree.tenant_chars(tenants[k]) as u64,
                    };
                    (i, used)
                })
                .collect();
            // Where every candidate's events flow, the caches with about the most room (within
            // 1/32 of the emptiest's use: closer than a prompt on a warm cache, so the fleet
            // fills evenly) are equally good, and the prompt's first page that no cache holds
            // picks among them (rendezvous hashing, weighted by the caches' sizes when known):
            // router replicas, which see the same caches but not each other's just-sent
            // requests, then place a new prefix on the same worker, and full caches share the
            // new prefixes in proportion to their sizes.
            let key = ev.per.iter().all(Option::is_some).then(|| ev.first_new_page()).flatten();
            let min = sizes.iter().map(|&(_, s)| s).min().unwrap_or(0);
            let slack = min / 32;
            let room = match key {
                Some(key) => {
                    let score = |i: usize| {
                        let url = workers[routable[candidates[i]]].url();
                        weighted(rendezvous(key, url), if sized { capacity(i) } else { 1 })
                    };
                    sizes
                        .iter()
                        .filter(|&&(_, s)| s <= min + slack)
                        .map(|&(i, _)| (i, score(i)))
                        .max_by(|a, b| {
                            let load = |i: usize| loads[candidates[i]];
                            a.1.total_cmp(&b.1).then(load(b.0).cmp(&load(a.0)))
                        })
                        .map(|(i, _)| candidates[i])
                }
                None => sizes
                    .iter()
                    .map(|&(i, s)| (candidates[i], s, rng.random::<u32>()))
                    .min_by_key(|&(k, size, r)| (size, loads[k], r))
                    .map(|(k, _, _)| k),
            }
            .expect("non-empty");
            (room, Branch::Miss)
        };
        // What the accounting compares with the worker's answer: in tokens where the chosen
        // worker's events flow, else in characters (the tree's match, or the peers').
        let predicted = match ev.tokens(pick) {
            Some(chosen) if token_count > 0 => Some(Predicted {
                unit: Unit::Tokens,
                prompt: token_count,
                best: (0..routable.len()).filter_map(|k| ev.tokens(k)).max().unwrap_or(0),
                chosen,
            }),
            Some(_) => None,
            None if text_chars > 0 => {
                let chars = |k: usize| (tree_share(k) * text_chars as f64).round() as usize;
                Some(Predicted {
                    unit: Unit::Chars,
                    prompt: text_chars,
                    best: (0..routable.len()).map(chars).max().unwrap_or(0),
                    chosen: chars(pick),
                })
            }
            None => None,
        };
        if text_chars > 0 {
            st.tree.insert(req.text, tenants[pick]);
        }
        let match_ratio = has_prompt.then(|| share(pick));
        let matched = matched(pick);
        drop(st);
        let matched_tokens = ev.tokens(pick);
        if let (Some(p), Some(pages), None) = (req.peers, peer_pages, matched_tokens) {
            // Routed on the tree: the peers learn it.
            p.note_routed(workers[routable[pick]].url(), pages);
        }
        if let (Some(_), Some(kv)) = (matched_tokens, req.kv) {
            // Counted as held there until its events confirm it: the next request of a burst
            // with the same new prefix follows it.
            kv.note_sent(workers[routable[pick]].url(), &ev, pick);
        }
        Some(Choice {
            index: routable[pick],
            branch,
            match_ratio,
            imbalanced,
            matched,
            matched_tokens,
            prompt_tokens: matched_tokens.map(|_| token_count),
            predicted,
        })
    }

    pub fn whole_tree_stats(&self) -> super::tree::TreeStats {
        self.state.lock().expect("cache_aware state").tree.stats()
    }
}

struct Choice {
    index: usize,
    branch: Branch,
    match_ratio: Option<f64>,
    imbalanced: bool,
    matched: usize,
    matched_tokens: Option<usize>,
    prompt_tokens: Option<usize>,
    predicted: Option<Predicted>,
}

/// Cache use is compared in millionths of a cache's size.
const PARTS: u64 = 1_000_000;

/// A rendezvous score weighted by `weight` (logarithmic method): over many pages, each worker
/// takes the highest score in proportion to its weight; equal weights keep `score`'s order.
fn weighted(score: u64, weight: u64) -> f64 {
    // A uniform draw in (0, 1) from the score's top 53 bits.
    let u = ((score >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight as f64 / -u.ln()
}

/// A worker's rendezvous score for a page: the highest takes the page.
fn rendezvous(page: crate::kv::hash::BlockHash, url: &str) -> u64 {
    let mut h = (page as u64) ^ 0x2545_F491_4F6C_DD1D;
    for b in url.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^= h >> 31;
    h.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (h >> 29)
}

/// Each routable worker's event match, by its URL (`None`: no events for it, or no tokens to
/// match).
fn event_matches(urls: &[&str], req: &RequestInfo) -> crate::kv::Matches {
    match (req.kv, req.tokens) {
        (Some(kv), Some(tokens)) if !tokens.is_empty() => kv.matches(urls, tokens),
        _ => Default::default(),
    }
}

impl Branch {
    pub fn as_str(self) -> &'static str {
        match self {
            Branch::Hit => "hit",
            Branch::Miss => "miss",
            Branch::Home => "home",
        }
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn needs_text(&self) -> bool {
        true
    }

    fn select(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<usize> {
        self.choose(workers, req).map(|(i, _)| i)
    }

    fn decide(&self, workers: &[Arc<Worker>], req: &RequestInfo) -> Option<super::Decision> {
        self.choose_explained(workers, req).map(|c| super::Decision {
            index: c.index,
            branch: c.branch.as_str(),
            match_ratio: c.match_ratio,
            imbalanced: c.imbalanced,
            matched_chars: c.matched,
            estimate_ms: None,
            matched_tokens: c.matched_tokens,
            prompt_tokens: c.prompt_tokens,
            predicted: c.predicted,
        })
    }

    fn tree_totals(&self) -> Option<super::tree::TreeStats> {
        Some(self.whole_tree_stats())
    }

    fn reconfigure(&self, cfg: &crate::config::PolicyConfig) {
        let mut st = self.state.lock().expect("cache_aware state");
        st.cfg = CacheAwareConfig {
            cache_threshold: cfg.cache_threshold,
            balance_abs_threshold: cfg.balance_abs_threshold,
            balance_rel_threshold: cfg.balance_rel_threshold,
            max_tree_size: cfg.max_tree_size,
        };
        st.tree.set_max_chars(cfg.max_tree_size);
    }

    fn worker_removed(&self, url: &str) {
        let mut st = self.state.lock().expect("cache_aware state");
        if let Some(id) = st.ids.remove(url) {
            st.tree.remove_tenant(id);
        }
    }

    fn worker_reset(&self, url: &str) {
        let mut st = self.state.lock().expect("cache_aware state");
        if let Some(id) = st.ids.get(url) {
            st.tree.remove_tenant(id);
        }
    }

    fn tree_stats(&self, url: &str) -> super::tree::TenantStats {
        let st = self.state.lock().expect("cache_aware state");
        st.ids.get(url).map(|id| st.tree.tenant_stats(id)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::{set_healthy, workers};

    fn policy(threshold: f64, abs: u64) -> CacheAware {
        CacheAware::new(CacheAwareConfig {
            cache_threshold: threshold,
            balance_abs_threshold: abs,
            balance_rel_threshold: 1.0001,
            max_tree_size: 1 << 20,
        })
    }

    fn req(text: &str) -> RequestInfo<'_> {
        RequestInfo { text, ..Default::default() }
    }

    #[test]
    fn a_hit_returns_to_the_worker_that_has_the_prefix() {
        let ws = workers(4);
        let p = policy(0.5, 32);
        let sys = "You are a helpful assistant. ".repeat(10);
        let (first, b) = p.choose(&ws, &req(&format!("{sys}Q1"))).unwrap();
        assert_eq!(b, Branch::Miss);
        for q in 2..20 {
            assert_eq!(p.choose(&ws, &req(&format!("{sys}Q{q}"))).unwrap(), (first, Branch::Hit));
        }
    }

    #[test]
    fn misses_spread_by_cache_room_then_load() {
        let ws = workers(4);
        let p = policy(0.5, 32);
        let mut seen = std::collections::HashSet::new();
        for i in 0..4 {
            let (w, b) =
                p.choose(&ws, &req(&format!("{i}: a distinct prompt with its own text"))).unwrap();
            assert_eq!(b, Branch::Miss);
            seen.insert(w);
        }
        assert_eq!(seen.len(), 4, "four misses of equal size land on four different workers");
        // Equal cache room: the less loaded worker wins.
        let q = policy(0.5, 32);
        let _busy: Vec<_> = (0..3).map(|_| ws[0].start_request()).collect();
        let _busy2: Vec<_> = (0..3).map(|_| ws[1].start_request()).collect();
        let _busy3: Vec<_> = (0..3).map(|_| ws[3].start_request()).collect();
        assert_eq!(q.choose(&ws, &req("fresh")).unwrap(), (2, Branch::Miss));
    }

    #[test]
    fn below_the_threshold_is_a_miss() {
        let ws = workers(2);
        let p = policy(0.8, 32);
        let (a, _) = p.choose(&ws, &req("abcdefghij")).unwrap();
        // 5 of 10 chars match a's tree: below 0.8, so a miss, which goes to the emptier tree.
        let (b, branch) = p.choose(&ws, &req("abcdeXXXXX")).unwrap();
        assert_eq!(branch, Branch::Miss);
        assert_ne!(a, b);
    }

    #[test]
    fn imbalance_keeps_locality_among_workers_not_overloaded() {
        let ws = workers(3);
        let p = policy(0.5, 2);
        let text = "shared system prompt and a question";
        let (home, _) = p.choose(&ws, &req(text)).unwrap();
        // The home worker gets overloaded: the request must go elsewhere, and once there,
        // its prefix follows it while loads stay imbalanced.
        let _busy: Vec<_> = (0..10).map(|_| ws[home].start_request()).collect();
        let (other, b1) = p.choose(&ws, &req(text)).unwrap();
        assert_ne!(other, home);
        assert_eq!(b1, Branch::Miss);
        assert_eq!(
            p.choose(&ws, &req(text)).unwrap(),
            (other, Branch::Hit),
            "locality kept among the rest"
        );
    }

    #[test]
    fn unroutable_and_removed_workers() {
        let ws = workers(2);
        let p = policy(0.5, 32);
        let (home, _) = p.choose(&ws, &req("prompt prompt prompt")).unwrap();
        let share = p.tree_stats(ws[home].url());
        assert_eq!(share.chars, 20);
        assert_eq!(share.nodes, 1);
        assert!(share.approx_bytes > share.chars);
        set_healthy(&ws[home], false);
        assert_eq!(p.choose(&ws, &req("prompt prompt prompt")).unwrap().0, 1 - home);
        p.worker_removed(ws[home].url());
        assert_eq!(p.tree_stats(ws[home].url()), Default::default());
        set_healthy(&ws[1 - home], false);
        assert_eq!(p.choose(&ws, &req("x")), None);
    }

    #[test]
    fn empty_text_is_a_miss_and_records_nothing() {
        let ws = workers(2);
        let p = policy(0.5, 32);
        assert_eq!(p.choose(&ws, &req("")).unwrap().1, Branch::Miss);
        assert_eq!(p.whole_tree_stats().chars, 0);
    }

    /// KV events for workers `ws` (page size 4), none stored yet.
    fn events_for(ws: &[Arc<Worker>]) -> crate::kv::KvState {
        let kv = crate::kv::KvState::default();
        for w in ws {
            let feed = crate::kv::Feed {
                load: Vec::new(),
                capacity: None,
                endpoints: vec!["tcp://x:1".into()],
                replay: vec![None],
                topic: String::new(),
                block_size: Some(4),
            };
            kv.track(w.url(), &feed);
            kv.update_rank(w.url(), 0, |r| r.connected = true);
        }
        kv
    }

    fn stored(kv: &crate::kv::KvState, url: &str, tokens: &[u32]) {
        let hashes = crate::kv::hash::page_hashes(&tokens[..tokens.len() / 4 * 4], 4);
        kv.apply(
            url,
            0,
            vec![crate::kv::wire::Event::Stored {
                hashes,
                parent: None,
                tokens: tokens.len(),
                block_size: 4,
                medium: crate::kv::wire::Medium::Gpu,
                namespaced: false,
            }],
        );
    }

    #[test]
    fn a_new_prefix_goes_to_the_cache_with_the_most_room_for_its_size_when_sizes_are_known() {
        let ws = workers(2);
        let p = policy(0.5, 32);
        let kv = events_for(&ws);
        // Worker 0 holds 1000 tokens, worker 1 holds 500.
        stored(&kv, ws[0].url(), &(1000..2000).collect::<Vec<u32>>());
        stored(&kv, ws[1].url(), &(5000..5500).collect::<Vec<u32>>());
        let ask = |text: &str| {
            let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
            let r =
                RequestInfo { text, tokens: Some(&tokens), kv: Some(&kv), ..Default::default() };
            let d = p.decide(&ws, &r).unwrap();
            (d.index, d.branch)
        };
        assert_eq!(ask("a first new prefix of some length"), (1, "miss"), "fewer tokens held");
        // Their sizes become known (load reports): 4000 and 1000 tokens. Worker 0 is a quarter
        // full, worker 1 half full.
        for (w, max_tokens) in ws.iter().zip([4000, 1000]) {
            let seen = crate::kv::LoadSeen { max_tokens, ..Default::default() };
            kv.update_rank(w.url(), 0, |r| r.load = Some(seen));
        }
        assert_eq!(ask("a second new prefix, as long"), (0, "miss"), "more room for its size");
    }

    #[test]
    fn weighted_rendezvous_shares_pages_by_weight_and_keeps_the_order_at_equal_weights() {
        let n = 20_000;
        let mut first = 0;
        for page in 0..n {
            let (a, b) = (rendezvous(page, "http://a:1"), rendezvous(page, "http://b:1"));
            first += u32::from(weighted(a, 3) > weighted(b, 1));
            assert_eq!(weighted(a, 7) > weighted(b, 7), a > b);
        }
        let share = f64::from(first) / n as f64;
        assert!((share - 0.75).abs() < 0.02, "a worker of weight 3 against 1 took {share}");
    }

    #[test]
    fn events_decide_where_they_show_the_prompt_and_the_tree_keeps_its_home_where_they_do_not() {
        let ws = workers(3);
        let p = policy(0.5, 32);
        let kv = events_for(&ws);
        let text = "a system prompt long enough to matter, then a question";
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        let ask = RequestInfo { text, tokens: Some(&tokens), kv: Some(&kv), ..Default::default() };
        let first = p.decide(&ws, &ask).unwrap();
        assert_eq!(first.branch, "miss");
        let home = first.index;
        // Its pages were pending there; the cache then lost them (a flush confirmed by events).
        kv.apply(ws[home].url(), 0, vec![crate::kv::wire::Event::Cleared]);
        for _ in 0..5 {
            let d = p.decide(&ws, &ask).unwrap();
            assert_eq!(
                (d.index, d.branch),
                (home, "home"),
                "back where it was sent, not to any empty cache"
            );
            kv.apply(ws[home].url(), 0, vec![crate::kv::wire::Event::Cleared]);
        }
        // Another worker really holds it: the events win over the tree.
        let other = (home + 1) % 3;
        stored(&kv, ws[other].url(), &tokens);
        let d = p.decide(&ws, &ask).unwrap();
        assert_eq!((d.index, d.branch), (other, "hit"));
        assert_eq!(d.matched_tokens, Some(tokens.len() / 4 * 4));
        assert_eq!(d.prompt_tokens, Some(tokens.len()));
    }

    /// Two replicas (two policies with their own trees) over the same events: a prefix the
    /// first routed, then evicted everywhere, goes back to the worker that held it last from
    /// either replica, though the second never routed it.
    #[test]
    fn replicas_agree_on_the_home_of_an_evicted_prefix() {
        let ws = workers(3);
        let (a, b) = (policy(0.5, 32), policy(0.5, 32));
        let kv = events_for(&ws);
        let text = "a system prompt long enough to matter, then a question";
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        let ask = RequestInfo { text, tokens: Some(&tokens), kv: Some(&kv), ..Default::default() };
        let home = a.decide(&ws, &ask).unwrap().index;
        stored(&kv, ws[home].url(), &tokens);
        let hashes = crate::kv::hash::page_hashes(&tokens[..tokens.len() / 4 * 4], 4);
        let evicted = crate::kv::wire::Event::Removed {
            hashes: hashes.clone(),
            medium: crate::kv::wire::Medium::Gpu,
        };
        kv.apply(ws[home].url(), 0, vec![evicted]);
        // Load elsewhere is lower: only the home rule keeps it there.
        let _busy: Vec<_> = (0..3).map(|_| ws[home].start_request()).collect();
        let d = b.decide(&ws, &ask).unwrap();
        assert_eq!((d.index, d.branch), (home, "home"));
        // What b just sent there counts as held there (pending) for a too.
        let d = a.decide(&ws, &ask).unwrap();
        assert_eq!((d.index, d.branch), (home, "hit"));
    }

    /// Replicas do not see each other's pending sends: a prefix new to the fleet must still
    /// land on the same worker from each, and new prefixes spread over the workers.
    #[test]
    fn replicas_place_a_new_prefix_alike_and_new_prefixes_spread() {
        let ws = workers(4);
        let (a, b) = (policy(0.5, 32), policy(0.5, 32));
        let (ka, kb) = (events_for(&ws), events_for(&ws));
        let mut per_worker = [0usize; 4];
        for n in 0..40u32 {
            let text = format!("prompt {n} with a few pages of its own");
            let tokens: Vec<u32> = (0..40).map(|i| n * 1000 + i).collect();
            let ask = |kv| RequestInfo {
                text: &text,
                tokens: Some(&tokens),
                kv: Some(kv),
                ..Default::default()
            };
            let da = a.decide(&ws, &ask(&ka)).unwrap();
            let db = b.decide(&ws, &ask(&kb)).unwrap();
            assert_eq!((da.branch, db.branch), ("miss", "miss"));
            assert_eq!(da.index, db.index, "prompt {n}");
            per_worker[da.index] += 1;
            // The caches fill alike, as both replicas' events say.
            stored(&ka, ws[da.index].url(), &tokens);
            stored(&kb, ws[da.index].url(), &tokens);
        }
        assert!(per_worker.iter().all(|&n| (5..=15).contains(&n)), "{per_worker:?}");
    }
}

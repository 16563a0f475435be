//! The simulated engine's KV cache: a radix tree over token ids with a capacity in tokens and
//! LRU eviction of whole leaves, as SGLang's RadixAttention cache does. `match_prefix` gives the
//! `cached_tokens` a real engine would report for a request, given the request history.
//!
//! With a page size above 1 the cache holds whole pages only, as SGLang's paged radix cache
//! does: a prompt's last partial page is not stored, and matches end on a page boundary. With
//! events on, every node stored, evicted or flushed is recorded as SGLang's KV events
//! (`BlockStored` with the pages' hashes chained from the parent's, `BlockRemoved`,
//! `AllBlocksCleared`) for the publisher to send.

use std::collections::{BTreeSet, HashMap};

use routerd::kv::hash::{published, BlockHash, Chain};

const ROOT: usize = 0;

#[derive(Debug, Default)]
struct Node {
    key: Vec<u32>,
    /// Keyed by the first page of the child's key.
    children: HashMap<u64, usize>,
    parent: usize,
    last_access: u64,
    /// With events on: the digest of each page of `key`.
    digests: Vec<[u8; 32]>,
}

/// A change to the cache, as SGLang's KV events describe it.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheEvent {
    Stored { hashes: Vec<BlockHash>, parent: Option<BlockHash>, tokens: Vec<u32> },
    Removed { hashes: Vec<BlockHash> },
    Cleared,
}

#[derive(Debug)]
pub struct PrefixCache {
    nodes: Vec<Node>,
    free: Vec<usize>,
    /// Evictable nodes (non-root leaves) ordered by last access: the first is the LRU one.
    leaves: BTreeSet<(u64, usize)>,
    capacity: usize,
    size: usize,
    clock: u64,
    evicted: u64,
    page: usize,
    /// Events not yet taken by the publisher (`None`: events off).
    events: Option<Vec<CacheEvent>>,
}

/// Counters describing the cache, served by `/sim/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub tokens: usize,
    pub capacity: usize,
    pub nodes: usize,
    pub evicted_tokens: u64,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self::paged(capacity, 1, false)
    }

    /// A cache of whole pages of `page` tokens, recording events when `events`.
    pub fn paged(capacity: usize, page: usize, events: bool) -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            leaves: BTreeSet::new(),
            capacity,
            size: 0,
            clock: 0,
            evicted: 0,
            page: page.max(1),
            events: events.then(Vec::new),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page
    }

    /// The events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The map key of a key starting with `tokens` (its first page).
    fn first_page(&self, tokens: &[u32]) -> u64 {
        tokens[..self.page.min(tokens.len())].iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
            (h ^ u64::from(*t)).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// The common prefix of `a` and `b`, in whole pages.
    fn common(&self, a: &[u32], b: &[u32]) -> usize {
        let c = common_prefix(a, b);
        c - c % self.page
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            tokens: self.size,
            capacity: self.capacity,
            nodes: self.nodes.len() - self.free.len() - 1,
            evicted_tokens: self.evicted,
        }
    }

    /// Number of leading tokens of `tokens` held in the cache. Touches the matched path, so a
    /// hit protects those entries from eviction as a real engine's use of them would.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> usize {
        self.clock += 1;
        let mut node = ROOT;
        let mut matched = 0;
        while tokens.len() - matched >= self.page {
            let first = self.first_page(&tokens[matched..]);
            let Some(&child) = self.nodes[node].children.get(&first) else { break };
            let common = self.common(&self.nodes[child].key, &tokens[matched..]);
            if common == 0 {
                break;
            }
            self.touch(child);
            matched += common;
            if common < self.nodes[child].key.len() {
                break;
            }
            node = child;
        }
        matched
    }

    /// Stores `tokens` (a prompt, or a prompt with its output), then evicts least recently
    /// used leaves until the cache is within capacity again.
    pub fn insert(&mut self, tokens: &[u32]) {
        self.clock += 1;
        let tokens = &tokens[..tokens.len() - tokens.len() % self.page];
        let mut node = ROOT;
        let mut pos = 0;
        while pos < tokens.len() {
            let rest = &tokens[pos..];
            let first = self.first_page(rest);
            match self.nodes[node].children.get(&first).copied() {
                None => {
                    self.add_leaf(node, rest.to_vec());
                    break;
                }
                Some(child) => {
                    let common = self.common(&self.nodes[child].key, rest);
                    if common == 0 {
                        // Another key whose first page hashes alike: keep what is cached.
                        break;
                    }
                    let next = if common < self.nodes[child].key.len() {
                        self.split(child, common)
                    } else {
                        child
                    };
                    self.touch(next);
                    pos += common;
                    node = next;
                }
            }
        }
        self.evict_to_capacity();
    }

    /// Drops everything (SGLang's `/flush_cache`).
    pub fn flush(&mut self) {
        let evicted = self.evicted;
        let events = self.events.take().map(|mut e| {
            e.push(CacheEvent::Cleared);
            e
        });
        *self = Self::paged(self.capacity, self.page, false);
        self.evicted = evicted;
        self.events = events;
    }

    fn add_leaf(&mut self, parent: usize, key: Vec<u32>) {
        if parent != ROOT && self.nodes[parent].children.is_empty() {
            self.leaves.remove(&(self.nodes[parent].last_access, parent));
        }
        let first = self.first_page(&key);
        self.size += key.len();
        let mut digests = Vec::new();
        if let Some(events) = &mut self.events {
            let prev = self.nodes[parent].digests.last().copied();
            let mut chain = prev.map(Chain::after).unwrap_or_default();
            digests = key.chunks(self.page).map(|p| chain.page(p)).collect();
            events.push(CacheEvent::Stored {
                hashes: digests.iter().map(published).collect(),
                parent: prev.as_ref().map(published),
                tokens: key.clone(),
            });
        }
        let node = Node { key, children: HashMap::new(), parent, last_access: self.clock, digests };
        let id = self.alloc(node);
        self.nodes[parent].children.insert(first, id);
        self.leaves.insert((self.clock, id));
    }

    /// Places a node in a free slot of the arena, or at its end.
    fn alloc(&mut self, node: Node) -> usize {
        match self.free.pop() {
            Some(id) => {
                self.nodes[id] = node;
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// Splits `child`'s edge after `at` tokens; returns the new upper node.
    fn split(&mut self, child: usize, at: usize) -> usize {
        let parent = self.nodes[child].parent;
        let tail = self.nodes[child].key.split_off(at);
        let head = std::mem::replace(&mut self.nodes[child].key, tail);
        let pages = at / self.page;
        let held = self.nodes[child].digests.len();
        let tail_digests = self.nodes[child].digests.split_off(pages.min(held));
        let head_digests = std::mem::replace(&mut self.nodes[child].digests, tail_digests);
        let mid = Node {
            key: head,
            children: HashMap::from([(self.first_page(&self.nodes[child].key), child)]),
            parent,
            last_access: self.nodes[child].last_access,
            digests: head_digests,
        };
        let id = self.alloc(mid);
        self.nodes[child].parent = id;
        let first = self.first_page(&self.nodes[id].key);
        self.nodes[parent].children.insert(first, id);
        id
    }

    fn touch(&mut self, node: usize) {
        let old = self.nodes[node].last_access;
        self.nodes[node].last_access = self.clock;
        if self.nodes[node].children.is_empty() && self.leaves.remove(&(old, node)) {
            self.leaves.insert((self.clock, node));
        }
    }

    fn evict_to_capacity(&mut self) {
        while self.size > self.capacity {
            let Some((_, leaf)) = self.leaves.pop_first() else { break };
            let node = std::mem::take(&mut self.nodes[leaf]);
            self.size -= node.key.len();
            self.evicted += node.key.len() as u64;
            self.free.push(leaf);
            let parent = node.parent;
            let first = self.first_page(&node.key);
            self.nodes[parent].children.remove(&first);
            if let Some(events) = &mut self.events {
                events.push(CacheEvent::Removed {
                    hashes: node.digests.iter().map(published).collect(),
                });
            }
            if parent != ROOT && self.nodes[parent].children.is_empty() {
                self.leaves.insert((self.nodes[parent].last_access, parent));
            }
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut stack = vec![ROOT];
        let mut total = 0;
        let mut leaves = 0;
        while let Some(n) = stack.pop() {
            let node = &self.nodes[n];
            total += node.key.len();
            if n != ROOT {
                assert!(!node.key.is_empty());
                if node.children.is_empty() {
                    leaves += 1;
                    assert!(self.leaves.contains(&(node.last_access, n)), "leaf {n} not tracked");
                }
            }
            for (first, &c) in &node.children {
                assert_eq!(self.first_page(&self.nodes[c].key), *first);
                assert_eq!(self.nodes[c].key.len() % self.page, 0);
                assert_eq!(self.nodes[c].parent, n);
                stack.push(c);
            }
        }
        assert_eq!(total, self.size);
        assert_eq!(leaves, self.leaves.len());
        assert!(self.size <= self.capacity);
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hit_after_shared_prefix() {
        let mut c = PrefixCache::new(1000);
        assert_eq!(c.match_prefix(&[1, 2, 3, 4]), 0);
        c.insert(&[1, 2, 3, 4]);
        assert_eq!(c.match_prefix(&[1, 2, 3, 4, 5, 6]), 4);
        assert_eq!(c.match_prefix(&[1, 2, 9]), 2, "partial edge matches count");
        c.insert(&[1, 2, 9, 9]);
        assert_eq!(c.stats().tokens, 6);
        assert_eq!(c.match_prefix(&[1, 2, 9, 9]), 4);
        assert_eq!(c.match_prefix(&[1, 2, 3, 4]), 4);
        c.check_invariants();
    }

    #[test]
    fn evicts_least_recently_used_at_capacity() {
        let mut c = PrefixCache::new(8);
        c.insert(&[1, 1, 1, 1]);
        c.insert(&[2, 2, 2, 2]);
        assert_eq!(c.match_prefix(&[1, 1, 1, 1]), 4); // 1s are now more recent than 2s
        c.insert(&[3, 3, 3, 3]);
        c.check_invariants();
        assert_eq!(c.stats().tokens, 8);
        assert_eq!(c.stats().evicted_tokens, 4);
        assert_eq!(c.match_prefix(&[2, 2, 2, 2]), 0, "LRU entry evicted");
        assert_eq!(c.match_prefix(&[1, 1, 1, 1]), 4);
        assert_eq!(c.match_prefix(&[3, 3, 3, 3]), 4);
    }

    #[test]
    fn eviction_frees_parents_that_become_leaves() {
        let mut c = PrefixCache::new(6);
        c.insert(&[1, 2, 3]);
        c.insert(&[1, 2, 4]); // splits: [1,2] -> {[3], [4]}
        c.insert(&[7, 7, 7, 7]);
        c.check_invariants();
        assert!(c.stats().tokens <= 6);
        assert_eq!(c.match_prefix(&[7, 7, 7, 7]), 4);
    }

    #[test]
    fn flush_empties() {
        let mut c = PrefixCache::new(100);
        c.insert(&[1, 2, 3]);
        c.flush();
        assert_eq!(c.match_prefix(&[1, 2, 3]), 0);
        assert_eq!(c.stats().tokens, 0);
        c.check_invariants();
    }

    #[test]
    fn pages_and_events() {
        let mut c = PrefixCache::paged(8, 4, true);
        c.insert(&[1, 2, 3, 4, 5]);
        assert_eq!(c.stats().tokens, 4, "the partial last page is not kept");
        assert_eq!(
            c.take_events(),
            vec![CacheEvent::Stored {
                hashes: vec![-3488128144981237669],
                parent: None,
                tokens: vec![1, 2, 3, 4]
            }]
        );
        assert_eq!(c.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8]), 4);
        assert_eq!(c.match_prefix(&[1, 2, 3, 9]), 0, "matches end on a page boundary");
        c.insert(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let ev = c.take_events();
        let want = routerd::kv::hash::page_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(
            ev,
            vec![CacheEvent::Stored {
                hashes: vec![want[1]],
                parent: Some(want[0]),
                tokens: vec![5, 6, 7, 8]
            }],
            "a child's pages chain from its parent's"
        );
        c.insert(&[9, 9, 9, 9]); // over capacity: the LRU leaf [5..8] goes
        let ev = c.take_events();
        assert!(ev.contains(&CacheEvent::Removed { hashes: vec![want[1]] }), "{ev:?}");
        c.flush();
        assert_eq!(c.take_events(), vec![CacheEvent::Cleared]);
        c.check_invariants();
    }

    fn seqs() -> impl Strategy<Value = Vec<Vec<u32>>> {
        prop::collection::vec(prop::collection::vec(0u32..4, 1..12), 1..40)
    }

    proptest! {
        #[test]
        fn stays_within_capacity(ops in seqs(), cap in 1usize..40) {
            let mut c = PrefixCache::new(cap);
            for s in &ops {
                c.insert(s);
                c.check_invariants();
                if s.len() <= cap {
                    prop_assert_eq!(c.match_prefix(s), s.len(), "fresh insert fully cached");
                }
            }
        }

        #[test]
        fn paged_cache_events_describe_its_content(ops in seqs(), cap in 4usize..40) {
            // Replaying the events into a set of hashes gives the cache's own pages.
            let mut c = PrefixCache::paged(cap, 2, true);
            let mut held = std::collections::HashSet::new();
            for s in &ops {
                c.insert(s);
                c.check_invariants();
                for e in c.take_events() {
                    match e {
                        CacheEvent::Stored { hashes, .. } => held.extend(hashes),
                        CacheEvent::Removed { hashes } => for h in hashes { held.remove(&h); },
                        CacheEvent::Cleared => held.clear(),
                    }
                }
                prop_assert_eq!(held.len() * 2, c.stats().tokens);
                let whole = &s[..s.len() - s.len() % 2];
                let hs = routerd::kv::hash::page_hashes(whole, 2);
                let lead = hs.iter().take_while(|h| held.contains(*h)).count();
                prop_assert_eq!(lead * 2, c.match_prefix(s));
            }
        }

        #[test]
        fn matches_longest_stored_prefix_without_eviction(ops in seqs(), probe in prop::collection::vec(0u32..4, 0..12)) {
            let mut c = PrefixCache::new(usize::MAX);
            for s in &ops { c.insert(s); }
            let want = ops.iter().map(|s| common_prefix(s, &probe)).max().unwrap_or(0);
            prop_assert_eq!(c.match_prefix(&probe), want);
            c.check_invariants();
        }
    }
}

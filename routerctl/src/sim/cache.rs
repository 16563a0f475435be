//! The simulated engine's KV cache: a radix tree over token ids with a capacity in tokens and
//! LRU eviction of whole leaves, as SGLang's RadixAttention cache does. `match_prefix` gives the
//! `cached_tokens` a real engine would report for a request, given the request history.

use std::collections::{BTreeSet, HashMap};

const ROOT: usize = 0;

#[derive(Debug, Default)]
struct Node {
    key: Vec<u32>,
    children: HashMap<u32, usize>,
    parent: usize,
    last_access: u64,
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
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            leaves: BTreeSet::new(),
            capacity,
            size: 0,
            clock: 0,
            evicted: 0,
        }
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
        while matched < tokens.len() {
            let Some(&child) = self.nodes[node].children.get(&tokens[matched]) else { break };
            let common = common_prefix(&self.nodes[child].key, &tokens[matched..]);
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
        let mut node = ROOT;
        let mut pos = 0;
        while pos < tokens.len() {
            let rest = &tokens[pos..];
            match self.nodes[node].children.get(&rest[0]).copied() {
                None => {
                    self.add_leaf(node, rest.to_vec());
                    break;
                }
                Some(child) => {
                    let common = common_prefix(&self.nodes[child].key, rest);
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
        *self = Self::new(self.capacity);
        self.evicted = evicted;
    }

    fn add_leaf(&mut self, parent: usize, key: Vec<u32>) {
        if parent != ROOT && self.nodes[parent].children.is_empty() {
            self.leaves.remove(&(self.nodes[parent].last_access, parent));
        }
        let first = key[0];
        self.size += key.len();
        let node = Node { key, children: HashMap::new(), parent, last_access: self.clock };
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
        let mid = Node {
            key: head,
            children: HashMap::from([(self.nodes[child].key[0], child)]),
            parent,
            last_access: self.nodes[child].last_access,
        };
        let id = self.alloc(mid);
        self.nodes[child].parent = id;
        let first = self.nodes[id].key[0];
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
            self.nodes[parent].children.remove(&node.key[0]);
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
                assert_eq!(self.nodes[c].key[0], *first);
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
        fn matches_longest_stored_prefix_without_eviction(ops in seqs(), probe in prop::collection::vec(0u32..4, 0..12)) {
            let mut c = PrefixCache::new(usize::MAX);
            for s in &ops { c.insert(s); }
            let want = ops.iter().map(|s| common_prefix(s, &probe)).max().unwrap_or(0);
            prop_assert_eq!(c.match_prefix(&probe), want);
            c.check_invariants();
        }
    }
}

//! The approximate radix tree behind cache_aware: the prompt texts routed to each worker
//! (tenant), sharing common prefixes. It answers "how much of this text has each worker
//! probably cached" and is bounded: after every insert, least recently used leaf entries are
//! evicted until the total stored characters are within `max_chars`, so it never grows past its
//! budget between timer runs (sgl-router's tree could).
//!
//! Nodes live in an arena; an edge's label is a string split only at char boundaries. A tenant
//! present on a node is present on all its ancestors. The "leaf tenancies" (a tenant on a node
//! where none of the node's children has it) are kept ordered by last access; eviction pops the
//! oldest, so it costs O(log n) per evicted entry.

use std::collections::BTreeSet;

pub type Tenant = u16;

const ROOT: u32 = 0;

/// A tenant's presence on a node: when it was last routed through, and whether it is a leaf
/// tenancy (no child of the node has the tenant), i.e. whether it is in `Tree::leaves`.
#[derive(Debug, Clone, Copy)]
struct Tenancy {
    tenant: Tenant,
    time: u64,
    leaf: bool,
}

#[derive(Debug, Default)]
struct Node {
    label: String,
    chars: u32,
    children: Vec<(char, u32)>,
    parent: u32,
    tenants: Vec<Tenancy>,
}

impl Node {
    fn tenancy(&mut self, t: Tenant) -> Option<&mut Tenancy> {
        self.tenants.iter_mut().find(|x| x.tenant == t)
    }

    fn has(&self, t: Tenant) -> bool {
        self.tenants.iter().any(|x| x.tenant == t)
    }

    fn child(&self, c: char) -> Option<u32> {
        self.children.iter().find(|(k, _)| *k == c).map(|(_, n)| *n)
    }
}

#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    leaves: BTreeSet<(u64, u32, Tenant)>,
    tenant_chars: Vec<usize>,
    tenant_nodes: Vec<usize>,
    total_chars: usize,
    max_chars: usize,
    clock: u64,
    evicted_chars: u64,
}

/// Tree tenant numbers for worker URLs: stable while a worker is registered, reused after it
/// leaves (the tree's per-tenant tables stay as small as the fleet).
#[derive(Debug, Default)]
pub struct TenantIds {
    ids: std::collections::HashMap<String, Tenant>,
    free: Vec<Tenant>,
    next: Tenant,
}

impl TenantIds {
    pub fn get(&self, url: &str) -> Option<Tenant> {
        self.ids.get(url).copied()
    }

    /// `url`'s tenant, given one if it has none.
    pub fn id_for(&mut self, url: &str) -> Tenant {
        if let Some(id) = self.ids.get(url) {
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.ids.insert(url.to_owned(), id);
        id
    }

    /// Frees `url`'s tenant for reuse; returns it so that its entries can be removed.
    pub fn remove(&mut self, url: &str) -> Option<Tenant> {
        let id = self.ids.remove(url)?;
        self.free.push(id);
        Some(id)
    }
}

/// Approximate heap bytes per node besides its label: the node, its child and tenant entries,
/// and its place in the eviction order.
const NODE_BYTES: usize = std::mem::size_of::<Node>() + 2 * 8 + 2 * 16 + 24;

/// One worker's share of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantStats {
    pub chars: usize,
    pub nodes: usize,
    pub approx_bytes: usize,
}

/// Size figures for stats and dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeStats {
    pub chars: usize,
    pub nodes: usize,
    pub evicted_chars: u64,
    /// Rough heap bytes: labels plus per-node bookkeeping.
    pub approx_bytes: usize,
}

impl Tree {
    pub fn new(max_chars: usize) -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            leaves: BTreeSet::new(),
            tenant_chars: Vec::new(),
            tenant_nodes: Vec::new(),
            total_chars: 0,
            max_chars,
            clock: 0,
            evicted_chars: 0,
        }
    }

    pub fn stats(&self) -> TreeStats {
        let nodes = self.nodes.len() - self.free.len() - 1;
        let label_bytes: usize = self.nodes.iter().map(|n| n.label.capacity()).sum();
        TreeStats {
            chars: self.total_chars,
            nodes,
            evicted_chars: self.evicted_chars,
            approx_bytes: label_bytes + self.nodes.len() * NODE_BYTES,
        }
    }

    /// Characters stored on nodes that `t` is present on.
    pub fn tenant_chars(&self, t: Tenant) -> usize {
        self.tenant_chars.get(t as usize).copied().unwrap_or(0)
    }

    /// One worker's share: characters and nodes it is on, and their approximate bytes (shared
    /// nodes count for every worker on them).
    pub fn tenant_stats(&self, t: Tenant) -> TenantStats {
        let chars = self.tenant_chars(t);
        let nodes = self.tenant_nodes.get(t as usize).copied().unwrap_or(0);
        TenantStats { chars, nodes, approx_bytes: chars + nodes * NODE_BYTES }
    }

    pub fn set_max_chars(&mut self, max: usize) {
        self.max_chars = max;
        self.evict_to(max);
    }

    /// How many leading characters of `text` each tenant holds, as `(tenant, chars)`.
    pub fn prefix_match(&self, text: &str) -> Vec<(Tenant, usize)> {
        // A tenant on a node is on all its ancestors, so walking down and overwriting leaves
        // each tenant with the match at the deepest node it is on.
        let mut best = vec![0usize; self.tenant_chars.len()];
        let mut node = ROOT;
        let mut rest = text;
        let mut matched = 0usize;
        while let Some(c) = rest.chars().next() {
            let Some(child) = self.nodes[node as usize].child(c) else { break };
            let n = &self.nodes[child as usize];
            let (bytes, chars) = common_prefix(&n.label, rest);
            matched += chars;
            for x in &n.tenants {
                best[x.tenant as usize] = matched;
            }
            if bytes < n.label.len() {
                break;
            }
            rest = &rest[bytes..];
            node = child;
        }
        best.iter().enumerate().filter(|(_, m)| **m > 0).map(|(t, m)| (t as Tenant, *m)).collect()
    }

    /// Records that `text` was routed to `t`, then evicts down to the budget.
    pub fn insert(&mut self, text: &str, t: Tenant) {
        if self.tenant_chars.len() <= t as usize {
            self.tenant_chars.resize(t as usize + 1, 0);
            self.tenant_nodes.resize(t as usize + 1, 0);
        }
        self.clock += 1;
        let mut node = ROOT;
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let next = match self.nodes[node as usize].child(c) {
                None => {
                    let leaf = self.add_node(node, rest.to_owned());
                    self.touch(leaf, t);
                    break;
                }
                Some(child) => {
                    let (bytes, _) = common_prefix(&self.nodes[child as usize].label, rest);
                    let next = if bytes < self.nodes[child as usize].label.len() {
                        self.split(child, bytes)
                    } else {
                        child
                    };
                    rest = &rest[bytes..];
                    next
                }
            };
            self.touch(next, t);
            node = next;
        }
        self.evict_to(self.max_chars);
    }

    /// Forgets everything routed to `t` (a removed worker).
    pub fn remove_tenant(&mut self, t: Tenant) {
        // Dropping a leaf can make its parent a leaf for `t`: repeat until none is left.
        loop {
            let doomed: Vec<(u64, u32, Tenant)> =
                self.leaves.iter().filter(|e| e.2 == t).copied().collect();
            if doomed.is_empty() {
                break;
            }
            for e in doomed {
                self.leaves.remove(&e);
                self.drop_tenancy(e.1, t);
            }
        }
        debug_assert_eq!(self.tenant_chars.get(t as usize).copied().unwrap_or(0), 0);
    }

    fn add_node(&mut self, parent: u32, label: String) -> u32 {
        let first = label.chars().next().expect("labels are never empty");
        let chars = label.chars().count() as u32;
        let node = Node { label, chars, children: Vec::new(), parent, tenants: Vec::new() };
        let id = self.alloc(node);
        self.nodes[parent as usize].children.push((first, id));
        self.total_chars += chars as usize;
        id
    }

    /// Places a node in a free slot of the arena, or at its end.
    fn alloc(&mut self, node: Node) -> u32 {
        match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Splits `child`'s label after `at` bytes (a char boundary); returns the new upper node,
    /// which carries the same tenants and times.
    fn split(&mut self, child: u32, at: usize) -> u32 {
        let c = &mut self.nodes[child as usize];
        let tail = c.label.split_off(at);
        let head = std::mem::replace(&mut c.label, tail);
        let head_chars = head.chars().count() as u32;
        c.chars -= head_chars;
        // The child keeps every tenant, so none is a leaf on the new upper node; each is now on
        // one more node.
        let tenants: Vec<Tenancy> =
            c.tenants.iter().map(|x| Tenancy { leaf: false, ..*x }).collect();
        for x in &tenants {
            self.tenant_nodes[x.tenant as usize] += 1;
        }
        let parent = c.parent;
        let tail_first = c.label.chars().next().expect("split inside the label");
        let head_first = head.chars().next().expect("split after at least one char");
        let mid = Node {
            label: head,
            chars: head_chars,
            children: vec![(tail_first, child)],
            parent,
            tenants,
        };
        let id = self.alloc(mid);
        self.nodes[child as usize].parent = id;
        let p = &mut self.nodes[parent as usize];
        if let Some(e) = p.children.iter_mut().find(|(k, _)| *k == head_first) {
            e.1 = id;
        }
        id
    }

    /// Marks `t` present on `node` now, keeping the leaf-tenancy order and the accounting.
    fn touch(&mut self, node: u32, t: Tenant) {
        let now = self.clock;
        let n = &mut self.nodes[node as usize];
        match n.tenancy(t) {
            Some(x) => {
                let old = x.time;
                x.time = now;
                if x.leaf {
                    self.leaves.remove(&(old, node, t));
                    self.leaves.insert((now, node, t));
                }
            }
            None => {
                n.tenants.push(Tenancy { tenant: t, time: now, leaf: true });
                self.tenant_chars[t as usize] += n.chars as usize;
                self.tenant_nodes[t as usize] += 1;
                self.leaves.insert((now, node, t));
                let parent = n.parent;
                if parent != ROOT {
                    if let Some(p) = self.nodes[parent as usize].tenancy(t) {
                        if p.leaf {
                            p.leaf = false;
                            let pt = p.time;
                            self.leaves.remove(&(pt, parent, t));
                        }
                    }
                }
            }
        }
    }

    fn evict_to(&mut self, budget: usize) {
        while self.total_chars > budget {
            let Some((_, node, t)) = self.leaves.pop_first() else { break };
            self.drop_tenancy(node, t);
        }
    }

    /// Removes leaf tenancy (node, t), and the node if nobody is left on it.
    fn drop_tenancy(&mut self, node: u32, t: Tenant) {
        let n = &mut self.nodes[node as usize];
        n.tenants.retain(|x| x.tenant != t);
        let chars = n.chars as usize;
        let parent = n.parent;
        self.tenant_chars[t as usize] -= chars;
        self.tenant_nodes[t as usize] -= 1;
        if self.nodes[node as usize].tenants.is_empty() {
            let first = self.nodes[node as usize]
                .label
                .chars()
                .next()
                .expect("non-root labels are non-empty");
            self.nodes[parent as usize].children.retain(|(k, _)| *k != first);
            self.nodes[node as usize] = Node::default();
            self.free.push(node);
            self.total_chars -= chars;
            self.evicted_chars += chars as u64;
        }
        if parent != ROOT {
            let child_has_t = self.nodes[parent as usize]
                .children
                .iter()
                .any(|(_, c)| self.nodes[*c as usize].has(t));
            if !child_has_t {
                if let Some(p) = self.nodes[parent as usize].tenancy(t) {
                    p.leaf = true;
                    let pt = p.time;
                    self.leaves.insert((pt, parent, t));
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut total = 0;
        let mut per_tenant = vec![0usize; self.tenant_chars.len()];
        let mut nodes_per_tenant = vec![0usize; self.tenant_nodes.len()];
        let mut leaf_count = 0;
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            let n = &self.nodes[id as usize];
            if id != ROOT {
                assert!(!n.label.is_empty());
                assert_eq!(n.chars as usize, n.label.chars().count());
                assert!(!n.tenants.is_empty(), "empty node {id} kept");
                total += n.chars as usize;
                let parent = &self.nodes[n.parent as usize];
                for x in &n.tenants {
                    let t = x.tenant;
                    per_tenant[t as usize] += n.chars as usize;
                    nodes_per_tenant[t as usize] += 1;
                    if n.parent != ROOT {
                        assert!(parent.has(t), "tenant {t} on {id} but not on its parent");
                    }
                    let is_leaf = !n.children.iter().any(|(_, c)| self.nodes[*c as usize].has(t));
                    assert_eq!(is_leaf, x.leaf, "leaf flag of ({id}, {t})");
                    assert_eq!(
                        is_leaf,
                        self.leaves.contains(&(x.time, id, t)),
                        "leaf tenancy ({id}, {t})"
                    );
                    leaf_count += usize::from(is_leaf);
                }
            }
            for (k, c) in &n.children {
                assert_eq!(self.nodes[*c as usize].label.chars().next(), Some(*k));
                assert_eq!(self.nodes[*c as usize].parent, id);
                stack.push(*c);
            }
        }
        assert_eq!(total, self.total_chars);
        assert_eq!(per_tenant, self.tenant_chars);
        assert_eq!(nodes_per_tenant, self.tenant_nodes);
        assert_eq!(leaf_count, self.leaves.len());
        assert!(self.total_chars <= self.max_chars, "{} > {}", self.total_chars, self.max_chars);
    }
}

/// Common prefix of `a` and `b` in (bytes, chars), ending on a char boundary. Compares bytes
/// 8 at a time, then backs off to the last char boundary.
fn common_prefix(a: &str, b: &str) -> (usize, usize) {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let n = x.len().min(y.len());
    let mut i = 0;
    while i + 8 <= n && x[i..i + 8] == y[i..i + 8] {
        i += 8;
    }
    while i < n && x[i] == y[i] {
        i += 1;
    }
    while !a.is_char_boundary(i) {
        i -= 1;
    }
    (i, a[..i].chars().count())
}

#[cfg(test)]
mod tests;

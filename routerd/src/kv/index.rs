//! Which (worker, dp rank) holds which block, as the engines' KV events said, plus what routerd
//! just sent (pending until events confirm it or a short TTL passes).
//!
//! One hash map keyed by `(holder, block hash)` with the tiers holding it as bits. Cost per
//! block and holder: a 24-byte slot plus hashbrown's control byte, at a load factor between 7/16
//! and 7/8 depending on when the table last grew, so 28-57 bytes; 10^6 blocks are 27-55 MiB
//! (the `kv_index` criterion bench measures it). The number of blocks is capped
//! (`max_blocks`): past it new blocks are not recorded, which makes routing colder, never
//! wrong. Clearing one holder (a restart, a flush) walks the whole map: rare, and about 10 ms
//! per 10^6 blocks.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use super::hash::BlockHash;
use super::wire::Medium;

/// A worker's id in the index; a holder is a worker's dp rank.
pub type WorkerId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Holder {
    pub worker: WorkerId,
    pub rank: u16,
}

/// Weight of a page held only in a lower tier: reusing it costs a copy back to the GPU, which
/// is cheaper than a prefill but not free. GPU 1, host memory 1/2, disk or external 1/4.
pub fn tier_weight(tiers: u8) -> f64 {
    if tiers & bit(Medium::Gpu) != 0 {
        1.0
    } else if tiers & bit(Medium::CpuPinned) != 0 {
        0.5
    } else {
        0.25
    }
}

fn bit(m: Medium) -> u8 {
    match m {
        Medium::Gpu => 1,
        Medium::CpuPinned => 2,
        Medium::Disk => 4,
        Medium::External => 8,
    }
}

/// Block hashes are SHA-256 prefixes already: a multiply and a fold mix the holder in.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(26) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// A worker's match for a request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PageMatch {
    /// Leading pages held by the best rank (or pending).
    pub pages: usize,
    /// The same pages weighted by tier (`tier_weight`).
    pub weighted: f64,
}

#[derive(Debug)]
pub struct BlockIndex {
    blocks: Map<(Holder, BlockHash), u8>,
    per_holder: Map<Holder, usize>,
    pending: Map<(WorkerId, BlockHash), Instant>,
    /// Pages pending per worker (expired ones included until the next sweep).
    pending_pages: Map<WorkerId, usize>,
    last_sweep: Option<Instant>,
    max_blocks: usize,
    /// Blocks not recorded because the index was full.
    pub dropped: u64,
    /// Where evicted blocks were last held (the worker whose `BlockRemoved` dropped the last
    /// copy): a prefix evicted everywhere goes back there, and every router replica, reading
    /// the same events, picks the same worker. Oldest first, at most `max_blocks / 4`.
    last_held: Map<BlockHash, WorkerId>,
    last_held_order: std::collections::VecDeque<BlockHash>,
}

const MAX_PENDING: usize = 1 << 18;

impl BlockIndex {
    pub fn new(max_blocks: usize) -> Self {
        Self {
            blocks: Map::default(),
            per_holder: Map::default(),
            pending: Map::default(),
            pending_pages: Map::default(),
            last_sweep: None,
            max_blocks,
            dropped: 0,
            last_held: Map::default(),
            last_held_order: std::collections::VecDeque::new(),
        }
    }

    /// Records that `w` held the last copy of `hash`.
    fn held_last(&mut self, hash: BlockHash, w: WorkerId) {
        if self.last_held.insert(hash, w).is_none() {
            self.last_held_order.push_back(hash);
            while self.last_held_order.len() > (self.max_blocks / 4).max(1) {
                if let Some(old) = self.last_held_order.pop_front() {
                    self.last_held.remove(&old);
                }
            }
        }
    }

    /// Leading pages of `hashes` that `w` holds or held last (all ranks): how much of the
    /// prompt `w` is the home of.
    pub fn home_run(&self, w: WorkerId, ranks: &[u16], hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|hash| {
                self.last_held.get(hash) == Some(&w)
                    || ranks.iter().any(|&rank| {
                        self.blocks.contains_key(&(Holder { worker: w, rank }, **hash))
                    })
            })
            .count()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Heap bytes of the block map: its allocated slots (24 bytes each) and control bytes.
    pub fn approx_bytes(&self) -> usize {
        let slots = self.blocks.capacity() * 8 / 7;
        slots * (std::mem::size_of::<((Holder, BlockHash), u8)>() + 1)
    }

    pub fn holder_blocks(&self, h: Holder) -> usize {
        self.per_holder.get(&h).copied().unwrap_or(0)
    }

    pub fn store(&mut self, h: Holder, hashes: &[BlockHash], medium: Medium) {
        for &hash in hashes {
            if self.pending.remove(&(h.worker, hash)).is_some() {
                self.uncount_pending(h.worker, 1);
            }
            let full = self.blocks.len() >= self.max_blocks;
            match self.blocks.get_mut(&(h, hash)) {
                Some(tiers) => *tiers |= bit(medium),
                None if full => self.dropped += 1,
                None => {
                    self.blocks.insert((h, hash), bit(medium));
                    *self.per_holder.entry(h).or_default() += 1;
                }
            }
        }
    }

    pub fn remove(&mut self, h: Holder, hashes: &[BlockHash], medium: Medium) {
        for &hash in hashes {
            let Some(tiers) = self.blocks.get_mut(&(h, hash)) else { continue };
            *tiers &= !bit(medium);
            if *tiers == 0 {
                self.blocks.remove(&(h, hash));
                if let Some(n) = self.per_holder.get_mut(&h) {
                    *n = n.saturating_sub(1);
                }
                self.held_last(hash, h.worker);
            }
        }
    }

    /// Forgets everything `h` held, and what was sent to its worker before (the cache it
    /// went to is gone).
    pub fn clear(&mut self, h: Holder) {
        if self.per_holder.remove(&h).unwrap_or(0) > 0 {
            self.blocks.retain(|(holder, _), _| *holder != h);
        }
        self.clear_pending(h.worker);
    }

    fn clear_pending(&mut self, w: WorkerId) {
        self.pending.retain(|(worker, _), _| *worker != w);
        self.pending_pages.remove(&w);
    }

    fn uncount_pending(&mut self, w: WorkerId, n: usize) {
        if let Some(c) = self.pending_pages.get_mut(&w) {
            *c = c.saturating_sub(n);
        }
    }

    /// Pages routerd sent `w` that its events have not confirmed yet.
    pub fn pending_pages(&self, w: WorkerId) -> usize {
        self.pending_pages.get(&w).copied().unwrap_or(0)
    }

    /// Drops expired pending pages (and recounts).
    fn sweep(&mut self, now: Instant) {
        self.pending.retain(|_, until| *until > now);
        self.pending_pages.clear();
        for (w, _) in self.pending.keys() {
            *self.pending_pages.entry(*w).or_default() += 1;
        }
        self.last_sweep = Some(now);
    }

    /// Forgets every rank of a worker and what was sent to it, in one walk of the map.
    pub fn clear_worker(&mut self, w: WorkerId) {
        // A worker that leaves is nobody's home.
        self.last_held.retain(|_, holder| *holder != w);
        let before = self.per_holder.len();
        self.per_holder.retain(|h, _| h.worker != w);
        if self.per_holder.len() < before {
            self.blocks.retain(|(holder, _), _| holder.worker != w);
        }
        self.clear_pending(w);
    }

    /// Records that `hashes` were just sent to `w`: they count as held until events confirm
    /// them or `ttl` passes. Expired entries are swept once per `ttl`; a full map is swept at
    /// once, and emptied if that frees less than a quarter of it (pending sends forgotten:
    /// colder, never wrong).
    pub fn note_pending(&mut self, w: WorkerId, hashes: &[BlockHash], now: Instant, ttl: Duration) {
        if self.last_sweep.is_none_or(|t| now.duration_since(t) > ttl) {
            self.sweep(now);
        }
        if self.pending.len() + hashes.len() > MAX_PENDING {
            self.sweep(now);
            if self.pending.len() + hashes.len() > MAX_PENDING / 4 * 3 {
                self.pending.clear();
                self.pending_pages.clear();
            }
            if hashes.len() > MAX_PENDING {
                return;
            }
        }
        let until = now + ttl;
        let mut new = 0;
        for &hash in hashes {
            new += usize::from(self.pending.insert((w, hash), until).is_none());
        }
        *self.pending_pages.entry(w).or_default() += new;
    }

    /// The best match among `ranks` of worker `w` (what it holds, or was just sent); nothing
    /// without a rank.
    pub fn matched(
        &self,
        w: WorkerId,
        ranks: &[u16],
        hashes: &[BlockHash],
        now: Instant,
    ) -> PageMatch {
        let mut best = PageMatch::default();
        let pending = |hash: BlockHash| match self.pending.get(&(w, hash)) {
            Some(until) if *until > now => bit(Medium::Gpu),
            _ => 0,
        };
        for &rank in ranks {
            let h = Holder { worker: w, rank };
            let mut m = PageMatch::default();
            for &hash in hashes {
                // Held by this rank, or just sent to the worker (whichever rank takes it).
                let tiers = match self.blocks.get(&(h, hash)) {
                    Some(t) => *t,
                    None if self.pending.is_empty() => 0,
                    None => pending(hash),
                };
                if tiers == 0 {
                    break;
                }
                m.pages += 1;
                m.weighted += tier_weight(tiers);
            }
            if m.weighted > best.weighted {
                best = m;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WorkerId = 1;
    fn h(rank: u16) -> Holder {
        Holder { worker: W, rank }
    }

    #[test]
    fn leading_pages_count_until_the_first_missing_one() {
        let mut ix = BlockIndex::new(100);
        let now = Instant::now();
        ix.store(h(0), &[1, 2, 3], Medium::Gpu);
        ix.store(h(0), &[5], Medium::Gpu);
        assert_eq!(ix.matched(W, &[0], &[1, 2, 3, 4, 5], now).pages, 3);
        assert_eq!(ix.matched(W, &[0], &[4, 5], now).pages, 0, "nothing after a missing page");
        ix.remove(h(0), &[2], Medium::Gpu);
        assert_eq!(ix.matched(W, &[0], &[1, 2, 3], now).pages, 1);
        assert_eq!(ix.holder_blocks(h(0)), 3);
        ix.clear(h(0));
        assert_eq!((ix.len(), ix.holder_blocks(h(0))), (0, 0));
    }

    #[test]
    fn lower_tiers_count_less_and_a_tier_removed_keeps_the_others() {
        let mut ix = BlockIndex::new(100);
        let now = Instant::now();
        ix.store(h(0), &[1, 2], Medium::Gpu);
        ix.store(h(0), &[2], Medium::CpuPinned);
        ix.remove(h(0), &[2], Medium::Gpu);
        let m = ix.matched(W, &[0], &[1, 2], now);
        assert_eq!((m.pages, m.weighted), (2, 1.5));
        ix.remove(h(0), &[2], Medium::CpuPinned);
        assert_eq!(ix.matched(W, &[0], &[1, 2], now).pages, 1);
    }

    #[test]
    fn the_best_rank_of_a_worker_counts() {
        let mut ix = BlockIndex::new(100);
        let now = Instant::now();
        ix.store(h(0), &[1], Medium::Gpu);
        ix.store(h(1), &[1, 2], Medium::Gpu);
        assert_eq!(ix.matched(W, &[0, 1], &[1, 2], now).pages, 2);
        ix.clear_worker(W);
        assert_eq!(ix.matched(W, &[0, 1], &[1, 2], now).pages, 0);
    }

    #[test]
    fn pending_pages_count_until_their_ttl() {
        let mut ix = BlockIndex::new(100);
        let now = Instant::now();
        ix.note_pending(W, &[1, 2], now, Duration::from_secs(2));
        assert_eq!(ix.matched(W, &[0], &[1, 2, 3], now).pages, 2);
        assert_eq!(ix.matched(W, &[0], &[1, 2], now + Duration::from_secs(3)).pages, 0);
        assert_eq!(ix.matched(2, &[0], &[1, 2], now).pages, 0, "pending is per worker");
        assert_eq!(ix.pending_pages(W), 2);
        // Confirmed by an event: held for good.
        ix.store(h(0), &[1], Medium::Gpu);
        assert_eq!(ix.pending_pages(W), 1);
        assert_eq!(ix.matched(W, &[0], &[1, 2], now + Duration::from_secs(3)).pages, 1);
    }

    #[test]
    fn an_evicted_prefix_keeps_its_home() {
        let mut ix = BlockIndex::new(8);
        ix.store(h(0), &[1, 2, 3], Medium::Gpu);
        ix.remove(h(0), &[2, 3], Medium::Gpu);
        assert_eq!(ix.home_run(W, &[0], &[1, 2, 3, 4]), 3, "held, then held last");
        assert_eq!(ix.home_run(2, &[0], &[1, 2, 3]), 0);
        // Held again elsewhere and evicted there: the home moves.
        ix.store(Holder { worker: 2, rank: 0 }, &[2], Medium::Gpu);
        ix.remove(Holder { worker: 2, rank: 0 }, &[2], Medium::Gpu);
        assert_eq!(ix.home_run(W, &[0], &[1, 2, 3]), 1);
        // At most max_blocks / 4 remembered, the oldest forgotten first.
        ix.store(h(0), &[10, 11, 12], Medium::Gpu);
        ix.remove(h(0), &[10, 11, 12], Medium::Gpu);
        assert_eq!(ix.home_run(W, &[0], &[2]), 0);
        assert_eq!(ix.home_run(W, &[0], &[11, 12]), 2);
        ix.clear_worker(W);
        assert_eq!(ix.home_run(W, &[0], &[11, 12]), 0, "a worker that left is nobody's home");
    }

    #[test]
    fn a_full_index_drops_new_blocks() {
        let mut ix = BlockIndex::new(2);
        ix.store(h(0), &[1, 2, 3], Medium::Gpu);
        assert_eq!((ix.len(), ix.dropped), (2, 1));
        ix.store(h(0), &[1], Medium::CpuPinned);
        assert_eq!(ix.dropped, 1, "a new tier of a known block is not a new block");
    }
}

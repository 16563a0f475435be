//! SGLang's block hashes (`srt/disaggregation/kv_events.py`, the same as vLLM's external hash):
//! a page digest is `d_i = SHA-256(d_{i-1} || the page's token ids as little-endian u32)`, with
//! no `d_{i-1}` for the first page; the published hash is the digest's first 8 bytes read as a
//! big-endian signed 64-bit integer. The last page may be shorter than the block size.

use sha2::{Digest, Sha256};

/// The published form of a page digest.
pub type BlockHash = i64;

/// A running chain of page digests: feed pages in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chain {
    prev: Option<[u8; 32]>,
}

impl Chain {
    /// A chain that continues after a page whose digest is `prev`.
    pub fn after(prev: [u8; 32]) -> Self {
        Self { prev: Some(prev) }
    }

    /// The digest of the next page, which becomes the chain's last.
    pub fn page(&mut self, tokens: &[u32]) -> [u8; 32] {
        let mut h = Sha256::new();
        if let Some(p) = &self.prev {
            h.update(p);
        }
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        let d: [u8; 32] = h.finalize().into();
        self.prev = Some(d);
        d
    }
}

/// The published hash of a digest.
pub fn published(digest: &[u8; 32]) -> BlockHash {
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The hashes of `tokens`' pages of `block_size` tokens (the last may be shorter).
pub fn page_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut chain = Chain::default();
    tokens.chunks(block_size.max(1)).map(|p| published(&chain.page(p))).collect()
}

/// Page digests of prompts seen recently, keyed by a fast 64-bit chain hash of the same pages:
/// a prompt whose prefix was hashed before (a shared system prompt) costs a multiply per token
/// instead of a SHA-256 per page. Bounded by two generations of `cap / 2` pages (56 bytes
/// each): when the current one fills, it becomes the previous and the oldest is dropped; a page
/// found in the previous one moves to the current, so a hot prefix is never dropped while a
/// stream of one-off questions passes through.
/// Two different prefixes with the same 64-bit key would share a digest; the chance is about
/// n^2 / 2^65 for n pages held, and the cost of it a mispredicted match, never a wrong answer.
#[derive(Debug)]
pub struct DigestCache {
    map: DigestMap,
    prev: DigestMap,
    cap: usize,
}

type DigestMap = std::collections::HashMap<
    u64,
    (BlockHash, [u8; 32]),
    std::hash::BuildHasherDefault<super::index::KeyHasher>,
>;

impl DigestCache {
    pub fn new(cap: usize) -> Self {
        Self { map: Default::default(), prev: Default::default(), cap }
    }

    /// `page_hashes`, through the cache.
    pub fn page_hashes(&mut self, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        if self.map.len() >= self.cap / 2 {
            self.prev = std::mem::take(&mut self.map);
        }
        let bs = block_size.max(1);
        let mut key = 0x243F_6A88_85A3_08D3u64 ^ bs as u64;
        let mut prev: Option<[u8; 32]> = None;
        let mut out = Vec::with_capacity(tokens.len() / bs + 1);
        for page in tokens.chunks(bs) {
            let mut pairs = page.chunks_exact(2);
            for p in &mut pairs {
                let v = u64::from(p[0]) | u64::from(p[1]) << 32;
                key = (key.rotate_left(23) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            }
            if let [t] = pairs.remainder() {
                key = (key.rotate_left(23) ^ u64::from(*t)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            }
            // The page's length is part of its identity (a short last page).
            let k = key ^ (page.len() as u64) << 56;
            let (h, d) = match self.map.get(&k) {
                Some(e) => *e,
                None if self.prev.contains_key(&k) => {
                    let e = self.prev[&k];
                    self.map.insert(k, e);
                    e
                }
                None => {
                    let d = prev.map(Chain::after).unwrap_or_default().page(page);
                    let e = (published(&d), d);
                    self.map.insert(k, e);
                    e
                }
            };
            out.push(h);
            prev = Some(d);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_hashes() {
        // The values SGLang publishes (checked against Python's hashlib as well).
        assert_eq!(page_hashes(&[1, 2, 3, 4], 4), vec![-3488128144981237669]);
        assert_eq!(
            page_hashes(&[1, 2, 3, 4, 5], 4),
            vec![-3488128144981237669, -3787494577174227566]
        );
        assert!(page_hashes(&[], 4).is_empty());
    }

    #[test]
    fn the_digest_cache_gives_the_same_hashes() {
        let mut c = DigestCache::new(8);
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[37] = 99;
        for t in [&a, &b, &a, &a[..38].to_vec(), &b] {
            assert_eq!(c.page_hashes(t, 4), page_hashes(t, 4));
        }
        assert!(c.map.len() + c.prev.len() <= 8 + 2 * 10, "bounded by two generations");
    }

    #[test]
    fn a_chain_continued_after_a_page_equals_the_whole() {
        let mut c = Chain::default();
        let first = c.page(&[1, 2, 3, 4]);
        let mut d = Chain::after(first);
        assert_eq!(published(&d.page(&[5])), -3787494577174227566);
    }
}

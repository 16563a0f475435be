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
    fn a_chain_continued_after_a_page_equals_the_whole() {
        let mut c = Chain::default();
        let first = c.page(&[1, 2, 3, 4]);
        let mut d = Chain::after(first);
        assert_eq!(published(&d.page(&[5])), -3787494577174227566);
    }
}

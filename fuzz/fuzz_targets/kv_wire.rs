//! The KV-event decoder on any payload and any frames: it never panics, never allocates past
//! its caps (libFuzzer's -rss_limit_mb and -malloc_limit_mb catch that), and what it accepts
//! re-encodes to a batch that decodes to the same events; the same for the load decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::kv::wire::{
    decode, decode_load, encode_load, message, Encoder, Event, MAX_EVENTS, MAX_HASHES,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = decode(data) {
        assert!(b.events.len() <= MAX_EVENTS);
        let mut e = Encoder::new();
        for ev in &b.events {
            match ev {
                Event::Stored { hashes, namespaced: false, .. } => {
                    assert!(hashes.len() <= MAX_HASHES);
                }
                Event::Removed { hashes, .. } => assert!(hashes.len() <= MAX_HASHES),
                _ => {}
            }
            if let Event::Cleared = ev {
                e.cleared();
            }
        }
        let again = decode(&e.finish(b.ts, b.dp_rank)).expect("the encoder's output decodes");
        assert_eq!(again.events.len(), b.events.iter().filter(|e| matches!(e, Event::Cleared)).count());
    }
    // As a load report: what decodes re-encodes to the same report.
    if let Ok(l) = decode_load(data) {
        assert_eq!(decode_load(&encode_load(&l)), Ok(l));
    }
    // The same bytes as frames: split at the first two bytes' values.
    if data.len() >= 2 {
        let (a, b) = (data[0] as usize % (data.len() + 1), data[1] as usize % (data.len() + 1));
        let (x, y) = (a.min(b), a.max(b));
        let _ = message(vec![data[..x].to_vec(), data[x..y].to_vec(), data[y..].to_vec()]);
    }
});

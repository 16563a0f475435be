//! The chunked decoder on arbitrary bytes (not only well-formed streams), fed whole and in two
//! pieces cut anywhere: it never panics, the cut never changes the outcome (payload, bytes used,
//! done, or the error), and it never hands out more payload than it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::http1::chunked::Chunked;

fn decode(parts: &[&[u8]]) -> (Vec<u8>, usize, bool, bool) {
    let mut dec = Chunked::default();
    let (mut out, mut used) = (Vec::new(), 0);
    for p in parts {
        match dec.feed(p, |d| out.extend_from_slice(d)) {
            Ok(n) => {
                assert!(n <= p.len());
                used += n;
                if n < p.len() {
                    // It stopped early: only at the end of the message.
                    assert!(dec.is_done());
                    return (out, used, true, false);
                }
            }
            Err(_) => return (out, used, dec.is_done(), true),
        }
    }
    (out, used, dec.is_done(), false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let body = &data[1..];
    let cut = cut.min(body.len());
    let whole = decode(&[body]);
    let split = decode(&[&body[..cut], &body[cut..]]);
    // An error is counted at a different byte offset, never a different verdict or payload.
    assert_eq!((&whole.0, whole.2, whole.3), (&split.0, split.2, split.3));
    if !whole.3 {
        assert_eq!(whole.1, split.1);
    }
    assert!(whole.0.len() <= whole.1.max(body.len()));
});

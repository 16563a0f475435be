//! The SSE re-framer and the chunked decoder it sits behind, on any worker stream cut in any
//! pieces: decoding a chunked encoding gives back the payload, the events cut from it add up
//! to the payload, each ends at its first blank line, and how the bytes were split never
//! changes the result. Editing any event never panics. The relay's `Cutter` hands the client
//! whole events only, in order, and once finished exactly the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::http1::chunked::Chunked;
use routerd::proxy::relay::sse::{edit, Cutter, Events};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (chunk, piece) = (data[0] as usize % 64 + 1, data[1] as usize % 32 + 1);
    let payload = &data[2..];

    // Chunked on the wire (chunks of `chunk` bytes), read back in pieces of `piece` bytes.
    let mut wire = Vec::new();
    for c in payload.chunks(chunk) {
        wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        wire.extend_from_slice(c);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let mut dec = Chunked::default();
    let mut decoded = Vec::new();
    let mut used = 0;
    for p in wire.chunks(piece) {
        used += dec.feed(p, |d| decoded.extend_from_slice(d)).expect("valid chunked encoding");
    }
    assert!(dec.is_done());
    assert_eq!(used, wire.len());
    assert_eq!(decoded, payload);

    // Events, cut from pieces of two different sizes, agree and add up to the payload.
    let cut = |size: usize| {
        let mut ev = Events::default();
        let mut out = Vec::new();
        for p in payload.chunks(size) {
            ev.push(p);
            while let Some(e) = ev.next_event() {
                out.push(e);
            }
        }
        (out, ev.finish())
    };
    let (events, rest) = cut(piece);
    assert_eq!((events.clone(), rest.clone()), cut(payload.len().max(1)));
    let joined: Vec<u8> = events.iter().flatten().copied().chain(rest.iter().copied()).collect();
    assert_eq!(joined, payload);
    for e in &events {
        let end = e.len();
        assert!(e.ends_with(b"\n\n") || e.ends_with(b"\r\n\r\n"), "an event ends with a blank line");
        let first = e.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
        let first_crlf = e.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        assert_eq!(first.into_iter().chain(first_crlf).min(), Some(end), "cut at the first");
        // An edit that, like the PD logprob merge, touches objects only.
        let mut add = |v: &mut serde_json::Value| {
            if let Some(o) = v.as_object_mut() {
                o.insert("x".into(), serde_json::json!(1));
            }
        };
        let edited = edit(e.clone(), &mut add);
        assert!(edited.ends_with(b"\n"), "an edited event still ends its line");
    }
    assert!(!rest.windows(2).any(|w| w == b"\n\n"), "no whole event left behind");

    let mut cutter = Cutter::new();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in payload.chunks(piece) {
        cutter.feed(p, &mut |e| out.push(e.to_vec()));
    }
    for e in &out {
        assert!(e.ends_with(b"\n\n") || e.ends_with(b"\r\n\r\n"), "only whole events go out");
    }
    cutter.finish(&mut |e| out.push(e.to_vec()));
    assert_eq!(out.concat(), payload);
});

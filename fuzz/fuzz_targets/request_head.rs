//! The client request-head parser on arbitrary bytes: it never panics; a head it accepts is a
//! prefix of the input, its target is a path, its body is delimited one way only; a strict
//! prefix of an accepted head is never a head of its own (no two parses of the same bytes);
//! and parsing the accepted bytes alone gives the same head.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::http1::head::{parse, BodyLen};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((head, n))) = parse(data) else { return };
    assert!(n <= data.len());
    assert!(head.target.starts_with('/'), "{:?}", head.target);
    let te = head.headers.contains_key("transfer-encoding");
    let cl = head.headers.contains_key("content-length");
    assert!(!(te && cl), "both framings accepted");
    if te {
        assert_eq!(head.body, BodyLen::Chunked);
    }
    for k in [n - 1, n / 2] {
        assert!(!matches!(parse(&data[..k]), Ok(Some(_))), "a prefix of {k} bytes parsed too");
    }
    let (again, m) = parse(&data[..n]).expect("same bytes").expect("complete");
    assert_eq!((again.target, again.body, m), (head.target, head.body, n));
});

//! The worker response-head parser on arbitrary bytes: it never panics; a head it accepts is a
//! prefix of the input with a valid status; a strict prefix of it is never a head; the same
//! bytes alone parse the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::http1::worker::{parse_head, Framing};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((head, n))) = parse_head(data) else { return };
    assert!(n <= data.len());
    assert!((100..=599).contains(&head.status()), "{}", head.status());
    if matches!(head.status(), 100..=199 | 204 | 304) {
        assert_eq!(head.framing(), Framing::Empty);
    }
    for k in [n - 1, n / 2] {
        assert!(!matches!(parse_head(&data[..k]), Ok(Some(_))), "a prefix of {k} bytes parsed");
    }
    let (again, m) = parse_head(&data[..n]).expect("same bytes").expect("complete");
    assert_eq!((again.status(), again.framing(), m), (head.status(), head.framing(), n));
});

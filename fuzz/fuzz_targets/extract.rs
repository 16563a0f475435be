//! Routing-text extraction on any request body: it never panics; what it accepts is a JSON
//! object; and a plain string `text`/`prompt` is routed on exactly its decoded value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::proxy::extract::{probe, Route};

const ROUTES: [Route; 4] = [Route::Generate, Route::Completions, Route::Chat, Route::Embeddings];

fuzz_target!(|body: &[u8]| {
    let Ok(p) = probe(body) else { return };
    // RFC 8259 leaves number range to implementations: 1e4444 is JSON (Python reads inf)
    // though serde_json's Value refuses it (the second fuzz finding, not a bug).
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) if e.to_string().contains("number out of range") => return,
        Err(e) => panic!("accepted bodies are JSON: {e}"),
    };
    assert!(v.is_object(), "accepted bodies are objects");
    for route in ROUTES {
        let text = p.routing_text(route);
        let _ = p.batch_size(route);
        let field = match route {
            Route::Generate => "text",
            Route::Completions => "prompt",
            _ => continue,
        };
        // serde_json keeps the last of duplicate keys in a Value; the probe may see the first.
        if let Some(serde_json::Value::String(s)) = v.get(field) {
            let count = memchr_count(body, field.as_bytes());
            if count == 1 {
                assert_eq!(text.as_ref(), s.as_str(), "{route:?}");
            }
        }
    }
    let _ = p.wants_logprob();
});

fn memchr_count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

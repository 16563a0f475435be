//! The configuration parser on any text: it never panics, every error it reports can be shown,
//! and a configuration it accepts can be shown as `GET /admin/config` shows it, secrets
//! redacted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::config::{Config, Flags, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Keys read from files or the environment are not what is fuzzed here.
    if text.contains("_file") || text.contains("_env") || text.contains("kubeconfig") {
        return;
    }
    let src = Source { name: "fuzz.toml", text };
    match Config::build(Some(src), &Flags::default()) {
        Ok(config) => {
            let shown = serde_json::to_value(&config).expect("a valid config serialises");
            if config.security.api_key.is_some() {
                assert_eq!(shown["security"]["api_key"], "<redacted>");
            }
            for (i, w) in config.workers.iter().enumerate() {
                if w.api_key.is_some() {
                    assert_eq!(shown["workers"][i]["api_key"], "<redacted>");
                }
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result names at least one error");
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "{e:?}");
            }
            let _ = errors.to_string();
        }
    }
});

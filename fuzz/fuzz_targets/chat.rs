//! Chat-template rendering on any chat request body (what a client sends routerd): it never
//! panics, and a rendering is deterministic. Rendered with the ChatML template routerd writes
//! for tests (tools and `tojson` included) and with a template that loops over content parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routerd::kv::chat::{ChatInput, ChatTemplate};
use std::sync::OnceLock;

const PARTS: &str = "{%- for message in messages %}{{ message.role }}:\
{%- for c in message['content'] %}{{ c.text | tojson(indent=2, sort_keys=true) }}{% endfor %}\
{{ message.content | tojson(separators=(',', ':')) }}{% endfor %}\
{%- if tools %}{{ tools | tojson(ensure_ascii=true) }}{% endif %}\
{%- for k, v in (extra or {}).items() %}{{ k }}{{ v }}{% endfor %}";

fn templates() -> &'static [ChatTemplate; 2] {
    static T: OnceLock<[ChatTemplate; 2]> = OnceLock::new();
    T.get_or_init(|| {
        let chatml = serde_json::from_str::<serde_json::Value>(
            &routerd::kv::tokenize::chatml_config_json(),
        )
        .unwrap()["chat_template"]
            .as_str()
            .unwrap()
            .to_owned();
        [
            ChatTemplate::new(&chatml, "chatml".into(), vec![]).unwrap(),
            ChatTemplate::new(PARTS, "parts".into(), vec![]).unwrap(),
        ]
    })
}

fuzz_target!(|body: &[u8]| {
    let Ok(text) = std::str::from_utf8(body) else { return };
    let Ok(input) = ChatInput::parse(text) else { return };
    for t in templates() {
        let first = t.prompt(&input);
        assert_eq!(first, t.prompt(&input), "rendering is deterministic");
    }
});

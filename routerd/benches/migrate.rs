//! What following a stream for mid-stream failover costs per event: a chat chunk and a
//! `/generate` event (cumulative, 200 tokens in) seen by `Resume::on_event`, the filter every
//! continuable stream's events go through.
//!
//!   cargo bench -p routerd --bench migrate

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use routerd::proxy::extract::{probe, Route};
use routerd::proxy::migrate::plan;

fn events(c: &mut Criterion) {
    let chat =
        br#"{"messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 64}"#;
    let chunk = br#"data: {"id":"4f7b2a9c1e","object":"chat.completion.chunk","created":1764720000,"model":"routerd-sim/sim-8b","choices":[{"index":0,"delta":{"content":" router"},"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}

"#;
    c.bench_function("chat chunk", |b| {
        let mut r = plan(Route::Chat, &probe(chat).unwrap(), 1).unwrap();
        b.iter(|| black_box(r.on_event(black_box(chunk))))
    });
    let ids: Vec<String> = (0..200).map(|i| (1000 + i * 37).to_string()).collect();
    let text: String = (0..200).map(|_| " cache").collect();
    let event = format!(
        "data: {{\"text\":\"{text}\",\"output_ids\":[{}],\"meta_info\":{{\"id\":\"x\",\"finish_reason\":null,\"prompt_tokens\":40,\"completion_tokens\":200,\"cached_tokens\":8}}}}\n\n",
        ids.join(",")
    );
    let generate = br#"{"text": "hi", "stream": true}"#;
    c.bench_function("generate event, 200 tokens so far", |b| {
        let mut r = plan(Route::Generate, &probe(generate).unwrap(), 1).unwrap();
        b.iter(|| black_box(r.on_event(black_box(event.as_bytes()))))
    });
}

criterion_group!(benches, events);
criterion_main!(benches);

//! The simulated engine's models: prefix cache hits and eviction, prefill time that follows
//! uncached tokens, continuous batching, streaming pass-through, and abort on disconnect.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use routerd_e2e::{client, disconnect_twice, post_json, post_stream, sim, sse_events, stats};
use serde_json::{json, Value};

fn cached(v: &Value) -> u64 {
    v["meta_info"]["cached_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn shared_prefix_and_multi_turn_hit_the_cache() {
    let w = sim(|_| {}).await;
    let u = format!("{}/generate", w.url());
    let system = "You are a helpful assistant who answers briefly. ".repeat(8); // 392 chars = 98 tokens
    let (_, a) = post_json(
        &u,
        &json!({"text": format!("{system}Q: one?"), "sampling_params": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(cached(&a), 0);
    let (_, b) = post_json(
        &u,
        &json!({"text": format!("{system}Q: two?"), "sampling_params": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(cached(&b), 98, "the shared system prompt is cached");

    // Multi-turn over chat: turn 2 resends turn 1 and its answer, which the cache holds.
    let c = format!("{}/v1/chat/completions", w.url());
    let mut messages = vec![json!({"role": "user", "content": "Tell me about routers."})];
    let (_, t1) = post_json(&c, &json!({"messages": messages, "max_tokens": 8})).await;
    let answer = t1["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(json!({"role": "user", "content": "And caches?"}));
    let (_, t2) = post_json(&c, &json!({"messages": messages, "max_tokens": 8})).await;
    let t1_total = t1["usage"]["total_tokens"].as_u64().unwrap();
    let t2_cached = t2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    // Everything but the chunk straddling the end of turn 1's answer is a hit.
    assert!(t2_cached + 2 >= t1_total, "turn 2 cached {t2_cached} of turn 1's {t1_total} tokens");
    let s = stats(&w).await;
    assert_eq!(s["cached_tokens"].as_u64().unwrap(), 98 + t2_cached);
    w.shutdown().await;
}

#[tokio::test]
async fn eviction_at_capacity_forgets_the_least_recent() {
    let w = sim(|a| a.cache_capacity_tokens = 300).await;
    let u = format!("{}/generate", w.url());
    // 400 chars = 100 tokens, distinct per i.
    let send = |i: usize| {
        let body = json!({"text": format!("{i:03} ").repeat(100), "sampling_params": {"max_new_tokens": 1}});
        let u = u.clone();
        async move { post_json(&u, &body).await }
    };
    send(0).await;
    assert_eq!(cached(&send(0).await.1), 99, "held while within capacity");
    for i in 1..=3 {
        send(i).await;
    }
    let s = stats(&w).await;
    assert!(s["cache"]["tokens"].as_u64().unwrap() <= 300, "{s}");
    assert!(s["cache"]["evicted_tokens"].as_u64().unwrap() >= 100);
    assert_eq!(cached(&send(0).await.1), 0, "prompt 0 was the least recently used and is gone");
    assert_eq!(cached(&send(3).await.1), 99, "the most recent prompt is still cached");
    w.shutdown().await;
}

#[tokio::test]
async fn prefill_time_follows_uncached_tokens() {
    // 2 ms per uncached token at real speed: a 200-token prompt costs 400 ms cold.
    let w = sim(|a| {
        a.speed = 1.0;
        a.prefill_us_per_token = 2000.0;
        a.decode_ms_per_step = 1.0;
    })
    .await;
    let u = format!("{}/generate", w.url());
    let req = json!({"text": "x".repeat(800), "sampling_params": {"max_new_tokens": 1}});
    let t = Instant::now();
    post_json(&u, &req).await;
    let cold = t.elapsed();
    let t = Instant::now();
    let (_, warm_body) = post_json(&u, &req).await;
    let warm = t.elapsed();
    assert_eq!(cached(&warm_body), 199);
    assert!(cold >= Duration::from_millis(380), "cold prefill took {cold:?}");
    assert!(warm * 4 < cold, "warm {warm:?} vs cold {cold:?}");
    w.shutdown().await;
}

#[tokio::test]
async fn continuous_batching_queues_beyond_max_running() {
    let w = sim(|a| {
        a.speed = 1.0;
        a.max_running_requests = 2;
        a.decode_ms_per_step = 10.0;
    })
    .await;
    let u = format!("{}/generate", w.url());
    let reqs = (0..6).map(|i| {
        let u = u.clone();
        async move {
            post_json(
                &u,
                &json!({"text": format!("p{i}"), "sampling_params": {"max_new_tokens": 10}}),
            )
            .await
        }
    });
    let all = tokio::spawn(futures_util::future::join_all(reqs));
    let (mut max_waiting, mut max_running) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(&w).await;
        max_waiting = max_waiting.max(s["waiting"].as_u64().unwrap());
        max_running = max_running.max(s["running"].as_u64().unwrap());
        if s["completed"] == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "requests did not complete: {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let results = all.await.unwrap();
    assert!(results.iter().all(|(s, _)| *s == 200));
    assert!(max_running <= 2, "running batch bounded, saw {max_running}");
    assert!(max_waiting >= 1, "the rest waited in the queue, saw {max_waiting}");
    w.shutdown().await;
}

#[tokio::test]
async fn streaming_delivers_first_event_before_the_end() {
    let w = sim(|a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
    })
    .await;
    let t = Instant::now();
    let resp = client()
        .post(format!("{}/generate", w.url()))
        .json(&json!({"text": "stream me", "stream": true, "sampling_params": {"max_new_tokens": 15}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let ttfe = t.elapsed();
    let mut rest = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = body.next().await {
        rest.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let total = t.elapsed();
    assert!(ttfe * 3 < total, "first event at {ttfe:?}, end at {total:?}");
    let events = sse_events(&rest);
    assert_eq!(events.len(), 16, "15 steps and [DONE]");
    assert_eq!(events[15], "[DONE]");
    let last: Value = serde_json::from_str(&events[14]).unwrap();
    assert_eq!(last["meta_info"]["completion_tokens"], 15);
    assert_eq!(last["meta_info"]["finish_reason"]["type"], "length");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert!(first["meta_info"]["finish_reason"].is_null());
    assert!(
        last["text"].as_str().unwrap().starts_with(first["text"].as_str().unwrap()),
        "cumulative text"
    );
    w.shutdown().await;
}

#[tokio::test]
async fn batched_stream_tags_each_event_with_its_index() {
    let w = sim(|_| {}).await;
    let body =
        json!({"text": ["a", "b"], "stream": true, "sampling_params": {"max_new_tokens": 3}});
    let objs = post_stream(format!("{}/generate", w.url()), &body).await;
    assert_eq!(objs.len(), 6);
    for i in 0..2 {
        let mine: Vec<_> = objs.iter().filter(|o| o["index"] == i).collect();
        assert_eq!(mine.len(), 3);
        assert_eq!(mine[2]["meta_info"]["finish_reason"]["length"], 3);
    }
    w.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_aborts_streaming_and_plain_requests() {
    let w = sim(|a| {
        a.speed = 1.0;
        a.decode_ms_per_step = 20.0;
    })
    .await;
    disconnect_twice(&format!("{}/generate", w.url()), &w).await;
    assert_eq!(stats(&w).await["completed"], 0);
    w.shutdown().await;
}

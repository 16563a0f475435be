//! The simulated worker answers SGLang's HTTP API with SGLang's shapes.

use routerd_e2e::{client, get_json, post_json, post_stream, sim, stats};
use serde_json::{json, Value};

#[tokio::test]
async fn info_routes_have_sglang_shapes() {
    let w = sim(|a| a.dp_size = 2).await;
    let u = w.url();
    assert_eq!(client().get(format!("{u}/health")).send().await.unwrap().status(), 200);
    assert_eq!(client().get(format!("{u}/health_generate")).send().await.unwrap().status(), 200);
    for path in ["get_server_info", "server_info"] {
        let info = get_json(&format!("{u}/{path}")).await;
        assert_eq!(info["model_path"], "routerd-sim/sim-8b");
        assert_eq!(info["dp_size"], 2);
        assert_eq!(info["disaggregation_mode"], "null");
        assert_eq!(info["internal_states"].as_array().unwrap().len(), 2);
        assert!(info["version"].is_string());
    }
    let mi = get_json(&format!("{u}/get_model_info")).await;
    assert_eq!(mi["is_generation"], true);
    assert_eq!(mi["tokenizer_path"], "routerd-sim/sim-8b");
    let models = get_json(&format!("{u}/v1/models")).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "routerd-sim/sim-8b");
    assert_eq!(models["data"][0]["owned_by"], "sglang");
    let load = get_json(&format!("{u}/get_load")).await;
    assert_eq!(load, json!({"load": 0, "num_reqs": 0, "num_waiting_reqs": 0}));
    let flush = client().post(format!("{u}/flush_cache")).send().await.unwrap();
    assert_eq!(flush.status(), 200);
    assert!(flush.text().await.unwrap().starts_with("Cache flushed."));
    let missing = client().get(format!("{u}/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(stats(&w).await["flushes"], 1);
    w.shutdown().await;
}

#[tokio::test]
async fn generate_text_ids_and_batches() {
    let w = sim(|_| {}).await;
    let u = format!("{}/generate", w.url());
    let (s, one) = post_json(
        &u,
        &json!({"text": "The capital of France is", "rid": "r1",
        "sampling_params": {"max_new_tokens": 5}}),
    )
    .await;
    assert_eq!(s, 200);
    let meta = &one["meta_info"];
    assert_eq!(meta["id"], "r1");
    assert_eq!(meta["prompt_tokens"], 6);
    assert_eq!(meta["completion_tokens"], 5);
    assert_eq!(meta["cached_tokens"], 0);
    assert_eq!(meta["finish_reason"], json!({"type": "length", "length": 5}));
    assert!(meta["e2e_latency"].as_f64().unwrap() > 0.0);
    assert_eq!(one["output_ids"].as_array().unwrap().len(), 5);
    assert!(!one["text"].as_str().unwrap().is_empty());

    let (_, again) = post_json(
        &u,
        &json!({"text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 5}}),
    )
    .await;
    assert_eq!(again["text"], one["text"], "deterministic model");

    let (s, ids) = post_json(&u, &json!({"input_ids": [1, 2, 3], "return_logprob": true})).await;
    assert_eq!(s, 200);
    assert_eq!(ids["meta_info"]["prompt_tokens"], 3);
    assert_eq!(ids["meta_info"]["completion_tokens"], 16, "default max_new_tokens");
    let inlp = ids["meta_info"]["input_token_logprobs"].as_array().unwrap();
    assert_eq!(inlp.len(), 3);
    assert!(inlp[0][0].is_null() && inlp[1][0].is_f64());
    assert_eq!(inlp[2][1], 3);
    assert_eq!(ids["meta_info"]["output_token_logprobs"].as_array().unwrap().len(), 16);

    let (s, batch) = post_json(
        &u,
        &json!({"text": ["a b c d", "e f g h"],
        "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]}),
    )
    .await;
    assert_eq!(s, 200);
    let batch = batch.as_array().unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[1]["meta_info"]["completion_tokens"], 2);

    let (s, batch) = post_json(&u, &json!({"input_ids": [[1, 2], [3, 4, 5]]})).await;
    assert_eq!(s, 200);
    assert_eq!(batch[1]["meta_info"]["prompt_tokens"], 3);
    w.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_sglang_errors() {
    let w = sim(|a| a.context_length = 64).await;
    let u = w.url();
    let resp = client().post(format!("{u}/generate")).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "error");
    assert_eq!(body["code"], 400);
    assert!(body["message"].as_str().unwrap().contains("JSON decode error"));
    for (path, req, want) in [
        ("generate", json!({"sampling_params": {}}), "Either text or input_ids"),
        (
            "generate",
            json!({"input_ids": [1], "sampling_params": {"max_new_tokens": 100}}),
            "maximum context length",
        ),
        ("v1/chat/completions", json!({"messages": []}), "messages must not be empty"),
        ("v1/completions", json!({"max_tokens": 2}), "prompt is required"),
        ("v1/embeddings", json!({}), "input is required"),
    ] {
        let (s, body) = post_json(&format!("{u}/{path}"), &req).await;
        assert_eq!(s, 400, "{path} {req}");
        assert!(body["message"].as_str().unwrap().contains(want), "{path}: {body}");
    }
    w.shutdown().await;
}

#[tokio::test]
async fn openai_routes() {
    let w = sim(|_| {}).await;
    let u = w.url();
    let (s, c) = post_json(
        &format!("{u}/v1/completions"),
        &json!({"model": "m", "prompt": "Say hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["model"], "m");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 3);
    assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let chat = json!({"messages": [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Hi there"}], "max_tokens": 4});
    let (s, r) = post_json(&format!("{u}/v1/chat/completions"), &chat).await;
    assert_eq!(s, 200);
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "routerd-sim/sim-8b");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["usage"]["total_tokens"], r["usage"]["prompt_tokens"].as_u64().unwrap() + 4);
    let (_, r2) = post_json(&format!("{u}/v1/chat/completions"), &chat).await;
    let prompt = r2["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        r2["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt - 1,
        "repeat hits the cache"
    );

    let mut stream_req = chat.clone();
    stream_req["stream"] = json!(true);
    stream_req["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream(format!("{u}/v1/chat/completions"), &stream_req).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, r["choices"][0]["message"]["content"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");

    let (s, e) = post_json(&format!("{u}/v1/embeddings"), &json!({"input": ["a", "b"]})).await;
    assert_eq!(s, 200);
    assert_eq!(e["data"].as_array().unwrap().len(), 2);
    let v: Vec<f64> = serde_json::from_value(e["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 64);
    assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-9, "unit vector");
    w.shutdown().await;
}

#[tokio::test]
async fn dp_rank_is_checked_and_counted() {
    let w = sim(|a| a.dp_size = 2).await;
    let u = format!("{}/generate", w.url());
    let (s, _) = post_json(&u, &json!({"text": "x", "data_parallel_rank": 1})).await;
    assert_eq!(s, 200);
    let (s, body) = post_json(&u, &json!({"text": "x", "data_parallel_rank": 2})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(stats(&w).await["dp_rank_requests"], json!([0, 1]));
    w.shutdown().await;
}

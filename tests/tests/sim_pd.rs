//! PD roles: a prefill and a decode simulated worker meet on `bootstrap_room`; either leg
//! alone fails after the bootstrap timeout like a real engine's KV transfer.

use std::time::{Duration, Instant};

use routerctl::sim::{Role, SimWorker};
use routerd_e2e::{post_json, post_stream, sim, stats};
use serde_json::{json, Value};

async fn pair(timeout_secs: f64) -> (SimWorker, SimWorker) {
    let p = sim(|a| {
        a.role = Role::Prefill;
        a.bootstrap_timeout_secs = timeout_secs;
    })
    .await;
    let d = sim(|a| {
        a.role = Role::Decode;
        a.bootstrap_timeout_secs = timeout_secs;
    })
    .await;
    (p, d)
}

fn with_boot(mut body: Value, p: &SimWorker, room: Value) -> Value {
    let port = p.bootstrap_addr.unwrap().port();
    let n = room.as_array().map(Vec::len);
    body["bootstrap_host"] = match n {
        Some(n) => json!(vec!["127.0.0.1"; n]),
        None => json!("127.0.0.1"),
    };
    body["bootstrap_port"] = match n {
        Some(n) => json!(vec![port; n]),
        None => json!(port),
    };
    body["bootstrap_room"] = room;
    body
}

#[tokio::test]
async fn both_legs_meet_on_the_room() {
    let (p, d) = pair(10.0).await;
    let body = with_boot(
        json!({"text": "PD prompt for the pair", "return_logprob": true, "sampling_params": {"max_new_tokens": 6}}),
        &p,
        json!(42),
    );
    let (pr, dr) = tokio::join!(
        post_json(format!("{}/generate", p.url()), &body),
        post_json(format!("{}/generate", d.url()), &body)
    );
    assert_eq!(pr.0, 200, "{}", pr.1);
    assert_eq!(dr.0, 200, "{}", dr.1);
    assert_eq!(pr.1["meta_info"]["completion_tokens"], 1, "prefill produces the first token only");
    assert_eq!(dr.1["meta_info"]["completion_tokens"], 6);
    assert_eq!(dr.1["meta_info"]["prompt_tokens"], pr.1["meta_info"]["prompt_tokens"]);
    let prompt_len = pr.1["meta_info"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(pr.1["meta_info"]["input_token_logprobs"].as_array().unwrap().len(), prompt_len);
    assert_eq!(dr.1["meta_info"]["input_token_logprobs"], json!([]), "decode never saw the prompt");

    // Second time: the prefill worker's cache hit is reported by the decode worker too.
    let body = with_boot(
        json!({"text": "PD prompt for the pair", "sampling_params": {"max_new_tokens": 2}}),
        &p,
        json!(43),
    );
    let (pr, dr) = tokio::join!(
        post_json(format!("{}/generate", p.url()), &body),
        post_json(format!("{}/generate", d.url()), &body)
    );
    assert_eq!(pr.1["meta_info"]["cached_tokens"], prompt_len as u64 - 1);
    assert_eq!(dr.1["meta_info"]["cached_tokens"], prompt_len as u64 - 1);
    let ps = stats(&p).await;
    assert_eq!(ps["role"], "prefill");
    assert_eq!(ps["open_rooms"], 0, "rooms are cleaned up");
    assert_eq!(stats(&d).await["prompt_tokens"], 0, "decode does no prefill");
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn batched_rooms_and_streaming_decode() {
    let (p, d) = pair(10.0).await;
    let body = with_boot(
        json!({"text": ["first", "second"], "stream": true, "sampling_params": {"max_new_tokens": 3}}),
        &p,
        json!([7, 8]),
    );
    let prefill = {
        let mut b = body.clone();
        b["stream"] = json!(false);
        let u = format!("{}/generate", p.url());
        tokio::spawn(async move { post_json(&u, &b).await })
    };
    let objs = post_stream(format!("{}/generate", d.url()), &body).await;
    let (s, pr) = prefill.await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(pr.as_array().unwrap().len(), 2);
    assert_eq!(objs.len(), 6, "{objs:?}");
    assert_eq!(objs.iter().filter(|o| o["index"] == 1).count(), 3);
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn openai_routes_carry_bootstrap_fields() {
    let (p, d) = pair(10.0).await;
    let body = with_boot(
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        &p,
        json!(99),
    );
    let (pr, dr) = tokio::join!(
        post_json(format!("{}/v1/chat/completions", p.url()), &body),
        post_json(format!("{}/v1/chat/completions", d.url()), &body)
    );
    assert_eq!(pr.0, 200);
    assert_eq!(dr.0, 200);
    assert_eq!(dr.1["usage"]["completion_tokens"], 3);
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn null_bootstrap_port_uses_the_decode_default() {
    let p = sim(|a| a.role = Role::Prefill).await;
    let port = p.bootstrap_addr.unwrap().port();
    let d = sim(|a| {
        a.role = Role::Decode;
        a.bootstrap_port = port;
    })
    .await;
    let body = json!({"text": "x", "bootstrap_host": "127.0.0.1", "bootstrap_port": null, "bootstrap_room": 5});
    let (pr, dr) = tokio::join!(
        post_json(format!("{}/generate", p.url()), &body),
        post_json(format!("{}/generate", d.url()), &body)
    );
    assert_eq!((pr.0, dr.0), (200, 200), "{} {}", pr.1, dr.1);
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn a_missing_leg_fails_after_the_bootstrap_timeout() {
    let (p, d) = pair(0.3).await;
    for (w, other) in [(&d, &p), (&p, &p)] {
        let body = with_boot(json!({"text": "alone"}), other, json!(1234));
        let t = Instant::now();
        let (s, err) = post_json(format!("{}/generate", w.url()), &body).await;
        let took = t.elapsed();
        assert_eq!(s, 500, "{err}");
        let msg = err["message"].as_str().unwrap();
        assert!(
            msg.contains("KVTransferError(bootstrap_room=1234)") && msg.contains("Bootstrapping"),
            "{msg}"
        );
        assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3), "{took:?}");
        assert_eq!(stats(w).await["bootstrap_timeouts"], 1);
    }
    // A streaming request gets its headers, then one error event and [DONE].
    let body = with_boot(json!({"text": "alone", "stream": true}), &p, json!(77));
    let objs = post_stream(format!("{}/generate", d.url()), &body).await;
    assert_eq!(objs.len(), 1, "{objs:?}");
    assert!(objs[0]["error"]["message"].as_str().unwrap().contains("KVTransferError"));
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn pd_workers_require_bootstrap_fields() {
    let (p, d) = pair(1.0).await;
    for w in [&p, &d] {
        let (s, err) = post_json(format!("{}/generate", w.url()), &json!({"text": "x"})).await;
        assert_eq!(s, 400);
        assert!(err["message"].as_str().unwrap().contains("bootstrap_room are required"));
    }
    let info = routerd_e2e::get_json(&format!("{}/get_server_info", p.url())).await;
    assert_eq!(info["disaggregation_mode"], "prefill");
    assert_eq!(info["disaggregation_bootstrap_port"], p.bootstrap_addr.unwrap().port());
    p.shutdown().await;
    d.shutdown().await;
}

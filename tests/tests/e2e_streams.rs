//! Stopping a stream when its budget runs out, through a real Envoy (1.40, V8) with the compiled
//! filter, the sidecar and the official OpenAI Python SDK as the client (installed into the
//! project's `.venv` by `./tg test`).
//!
//! The hold covers 100 output tokens; the upstream streams 1,000; the account has 300 credits
//! (one a token). The filter extends the hold twice (to 200, to 300), is refused the third time,
//! ends the stream with an OpenAI error chunk and `[DONE]`; the SDK raises `APIError` and nothing
//! else; the ledger charges exactly the tokens the client received.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_sidecar::clock::SystemClock;
use wasm_host::envoy::Envoy;
use wasm_host::stores::Backend;

const SIDECAR: &str = r#"
meters = ["requests", "output_tokens"]
[server]
listen = "127.0.0.1:0"
shards = 2
[plans.metered]
limits = [{ meter = "output_tokens", window = "day", max = 1000000 }]
[prices.chat]
requests = 0
output_tokens = 1
"#;

fn filter_config() -> String {
    json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 5000, "token": wasm_host::stores::DECISION_TOKEN},
        "deadline_ms": 5000,
        "key": "bearer",
        "commit_interval_ms": 20,
        "routes": [{
            "name": "chat", "method": "POST", "path_prefix": "/v1/chat/", "failure_mode": "closed",
            "charges": {"requests": {"fixed": 1},
                        "output_tokens": {"body_field": "max_tokens", "default": 100, "cap": 100}},
            "usage": {"source": "body"}, "model_field": "model",
            "stream_budget": {"step": 100, "bytes_per_token": 4}
        }]
    })
    .to_string()
}

/// The project's Python with the OpenAI SDK.
fn python() -> String {
    let py = std::env::var("TOLLGATE_PYTHON")
        .unwrap_or_else(|_| format!("{}/../.venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let ok = std::process::Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{py} cannot import openai: run ./tg test (it installs the OpenAI SDK into .venv)"
    );
    py
}

/// Streams `tokens` tokens through Envoy with the OpenAI SDK; returns its report.
fn sdk_stream(envoy_port: u16, key: &str, tokens: u64) -> Value {
    let script = format!("{}/sdk/openai_stream.py", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python())
        .args([
            script.as_str(),
            &format!("http://127.0.0.1:{envoy_port}/v1"),
            key,
            &tokens.to_string(),
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the SDK raised something else than its documented error:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

async fn stopped_at_the_budget(backend: Backend) {
    let run = tollgate_sidecar::apikey::new_id("tgs");
    let cfg = wasm_host::stores::sidecar_config(SIDECAR, backend, &run);
    let engine = tollgate_sidecar::build_engine(cfg, Arc::new(SystemClock))
        .await
        .unwrap();
    let _background = tollgate_sidecar::spawn_background(&engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(tollgate_sidecar::serve(engine.clone(), listener));
    let mut keys = Vec::new();
    for id in ["acme", "fits", "cheat", "twin"] {
        engine
            .create_account(serde_json::from_value(json!({"id": id, "plan": "metered"})).unwrap())
            .await
            .unwrap();
        engine
            .grant(
                id,
                serde_json::from_value(json!({"grant_id": "pack", "amount": 300})).unwrap(),
            )
            .await
            .unwrap();
        keys.push(engine.create_key(id, Default::default()).await.unwrap().1);
    }
    let mock = wasm_host::mock::start_mock().await.unwrap();
    let envoy = Envoy::start_with(
        mock.port,
        port,
        Some((&wasm_host::wasm_path(), &filter_config())),
    )
    .unwrap();

    // 1,000 tokens streamed, 300 credits: stopped after 300, the SDK's APIError raised.
    let (p, k) = (envoy.port, keys[0].clone());
    let got = tokio::task::spawn_blocking(move || sdk_stream(p, &k, 1000))
        .await
        .unwrap();
    let text = got["text"].as_str().unwrap();
    let received = text.matches(" the").count() as i64;
    println!(
        "stream budget: {received} tokens received of 1000, {} chunks, error {}",
        got["chunks"], got["error"]
    );
    assert_eq!(text, " the".repeat(received as usize), "whole events only");
    assert_eq!(
        got["error"]["class"], "APIError",
        "the documented error: {got}"
    );
    assert_eq!(got["error"]["code"], "budget_exhausted");
    assert!(
        (250..=300).contains(&received),
        "about 300 tokens' worth: {received}"
    );
    assert_eq!(envoy.stat("wasmcustom.tollgate.stream_extensions"), Some(2));
    assert_eq!(envoy.stat("wasmcustom.tollgate.streams_stopped"), Some(1));

    // 250 tokens fit: the stream runs to its end, charged by its own usage.
    let (p, k) = (envoy.port, keys[1].clone());
    let fits = tokio::task::spawn_blocking(move || sdk_stream(p, &k, 250))
        .await
        .unwrap();
    assert_eq!(fits["error"], Value::Null, "{fits}");
    assert_eq!(fits["text"], " the".repeat(250));

    // Cheating it: the response asked compressed (the filter could not read it), a hold of
    // one token (`max_tokens: 1`), no usage asked, an `x-request-id` of another request, then
    // the client goes away right after the error. Still stopped at 300, charged what it got.
    let r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            envoy.port
        ))
        .bearer_auth(&keys[2])
        .header("accept-encoding", "gzip")
        .header("x-mock-stream-tokens", "1000")
        .header("x-request-id", "tg-1")
        .json(
            &json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 1,
                      "stream_options": {"include_usage": false}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("content-encoding"), None);
    let body = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    let cheat = body.matches(r#""content":" the""#).count() as i64;
    println!("cheat: {cheat} tokens received of 1000");
    assert!((250..=300).contains(&cheat), "{cheat}");
    assert!(body.contains("budget_exhausted") && body.ends_with("data: [DONE]\n\n"));

    // Two streams at once on one account of 300 credits (each hold covers 100): they extend
    // against the same balance, so together they get at most 300, each charged what it got.
    let twins = futures::future::join_all((0..2).map(|i| {
        let url = format!("http://127.0.0.1:{}//v1/chat/./completions", envoy.port);
        let key = keys[3].clone();
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .header("x-mock-stream-tokens", "1000")
                .header("x-request-id", "twin")
                .json(&json!({"model": "gpt-4o-mini", "stream": true, "n": i + 1}))
                .send()
                .await
                .unwrap();
            let body = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
            body.matches(r#""content":" the""#).count() as i64
        }
    }))
    .await;
    let twin: i64 = twins.iter().sum();
    println!("two streams at once on 300 credits: {twins:?} tokens received");
    assert!((250..=300).contains(&twin), "{twins:?}");

    // The ledger: exactly what was delivered, for each.
    for (acct, used) in [
        ("acme", received),
        ("fits", 250),
        ("cheat", cheat),
        ("twin", twin),
    ] {
        let t = Instant::now();
        let (mut left, mut counted) = (-1, -1);
        while t.elapsed() < Duration::from_secs(20) {
            left = engine.ledger.grants_of(acct).await.unwrap()[0].remaining;
            counted = engine
                .ledger
                .usage_of(acct)
                .await
                .unwrap()
                .iter()
                .find(|u| u.1 == "output_tokens")
                .map_or(-1, |u| u.3);
            if left == 300 - used && counted == used {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("{acct}: ledger credit left {left}, output_tokens {counted} (delivered {used})");
        assert_eq!((left, counted), (300 - used, used), "{acct}");
        assert_eq!(engine.balance(acct).await.unwrap() as i64, 300 - used);
    }
    // Two extensions each for 1,000 and 250 tokens; from a hold of 1 token, three; the twins
    // share two (100 + 100 held, 100 more between them).
    assert!(
        engine.metrics.extended.get() >= 8,
        "{}",
        engine.metrics.extended.get()
    );
    drop(envoy);
    engine.ledger.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_stopped_at_its_budget_and_charged_what_it_delivered_on_redis_and_postgres() {
    stopped_at_the_budget(Backend::RedisPostgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_stopped_at_its_budget_and_charged_what_it_delivered_on_the_embedded_store() {
    stopped_at_the_budget(Backend::Embedded).await
}

//! End to end through a real Envoy (1.40, V8) with the compiled filter, the sidecar (real Redis
//! and PostgreSQL) and a mock OpenAI-style upstream: allowed, settled from JSON and from SSE at
//! the same price, 429 with RateLimit headers and Retry-After, 402.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tollgate_sidecar::clock::SystemClock;
use tollgate_sidecar::config::Config;
use wasm_host::envoy::Envoy;

const SIDECAR: &str = r#"
meters = ["requests", "input_tokens", "output_tokens"]
[server]
listen = "127.0.0.1:0"
shards = 2
[plans.basic]
limits = [{ meter = "requests", window = "day", max = 3 }]
[prices.chat]
requests = 1
input_tokens = 1
output_tokens = 1
"#;

fn filter_config(sidecar_cluster: &str) -> String {
    json!({
        "sidecar": {"cluster": sidecar_cluster, "timeout_ms": 2000},
        "deadline_ms": 2000,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 50,
        "routes": [{
            "name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
            "charges": {"requests": {"fixed": 1}, "input_tokens": {"fixed": 0},
                        "output_tokens": {"body_field": "max_tokens", "default": 100, "cap": 1000}},
            "usage": {"source": "body"}, "model_field": "model"
        }]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_allow_settle_429_and_402() {
    // The sidecar, on its own database and key prefix.
    let run = tollgate_sidecar::apikey::new_id("tgt");
    let mut cfg = Config::from_toml(SIDECAR).unwrap();
    cfg.redis.key_prefix = run.clone();
    cfg.postgres.url = format!(
        "{}/{run}",
        std::env::var("TOLLGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    );
    cfg.server.admin_token = Some("e2e-admin-token-xxxx".into());
    let engine = tollgate_sidecar::build_engine(cfg, Arc::new(SystemClock))
        .await
        .unwrap();
    let _bg = tollgate_sidecar::spawn_background(&engine);
    let sidecar = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar_port = sidecar.local_addr().unwrap().port();
    tokio::spawn(tollgate_sidecar::serve(engine.clone(), sidecar));

    let up_port = wasm_host::mock::start().await.unwrap();

    let mut keys = Vec::new();
    for (id, credits) in [("acme", 1000u64), ("poor", 0)] {
        engine
            .create_account(serde_json::from_value(json!({"id": id, "plan": "basic"})).unwrap())
            .await
            .unwrap();
        keys.push(engine.create_key(id, Default::default()).await.unwrap().1);
        if credits > 0 {
            engine
                .grant(
                    id,
                    serde_json::from_value(json!({"grant_id": "pack", "amount": credits})).unwrap(),
                )
                .await
                .unwrap();
        }
    }

    let envoy = Envoy::start(
        up_port,
        sidecar_port,
        &wasm_host::wasm_path(),
        &filter_config("tollgate_sidecar"),
    )
    .expect("envoy starts");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port);
    let send = |key: &str, id: &str, body: Value| {
        http.post(&url)
            .header("x-api-key", key)
            .header("x-request-id", id)
            .json(&body)
            .send()
    };

    // 1. Allowed, settled from the JSON usage: 1 + 10 + 20 credits.
    let r = match send(&keys[0], "e2e-1", json!({"model": "m", "max_tokens": 50})).await {
        Ok(r) => r,
        Err(e) => panic!("{e}; envoy log:\n{}", envoy.log()),
    };
    assert_eq!(r.status(), 200, "{}", envoy.log());
    assert_eq!(r.headers()["ratelimit-limit"], "3");
    assert_eq!(r.headers()["ratelimit-remaining"], "2");
    assert_eq!(
        r.json::<Value>().await.unwrap()["choices"][0]["message"]["content"],
        "Hello from the mock"
    );
    wait_for_balance(&engine, "acme", 969).await;

    // 2. The same completion streamed costs the same.
    let r = send(
        &keys[0],
        "e2e-2",
        json!({"model": "m", "max_tokens": 50, "stream": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
    wait_for_balance(&engine, "acme", 938).await;

    // 3. The third request of the day passes, the fourth is refused with 429.
    assert_eq!(
        send(&keys[0], "e2e-3", json!({"max_tokens": 5}))
            .await
            .unwrap()
            .status(),
        200
    );
    wait_for_balance(&engine, "acme", 907).await;
    let r = send(&keys[0], "e2e-4", json!({"max_tokens": 5}))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(h["ratelimit-remaining"], "0");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "rate_limited"
    );

    // 4. No credits: 402.
    let r = send(&keys[1], "e2e-5", json!({"max_tokens": 5}))
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "insufficient_credits"
    );

    // 5. The retried request id is charged once.
    let r = send(&keys[0], "e2e-1", json!({"model": "m", "max_tokens": 50}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(engine.balance("acme").await.unwrap(), 907);
    assert!(
        envoy.stat("wasmcustom.tollgate.allowed").unwrap_or(0) >= 3,
        "stats: {:?}",
        envoy.stat("wasmcustom.tollgate.allowed")
    );

    drop(envoy);
    engine.ledger.pool().close().await;
}

async fn wait_for_balance(engine: &tollgate_sidecar::engine::Engine, acct: &str, want: u64) {
    let mut last = 0;
    for _ in 0..100 {
        last = engine.balance(acct).await.unwrap();
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("balance of {acct} is {last}, expected {want}");
}

/// The sidecar is down: a fail-closed route answers 503 and a fail-open route passes, each
/// within the deadline (here 300 ms; a connect failure usually resolves sooner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_with_the_sidecar_down_each_route_fails_its_own_way() {
    let up_port = wasm_host::mock::start().await.unwrap();
    let nobody = wasm_host::envoy::free_port(); // nothing listens here
    let cfg = json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 250},
        "deadline_ms": 300,
        "key": {"header": "x-api-key"},
        "routes": [
            {"name": "chat", "host": "closed.test", "failure_mode": "closed",
             "charges": {"requests": {"fixed": 1}}},
            {"name": "open", "host": "open.test", "failure_mode": "open",
             "charges": {"requests": {"fixed": 1}}}
        ]
    })
    .to_string();
    let envoy = Envoy::start(up_port, nobody, &wasm_host::wasm_path(), &cfg).expect("envoy starts");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for (host, want) in [("closed.test", 503u16), ("open.test", 200)] {
        let path = host;
        let started = std::time::Instant::now();
        let r = http
            .post(format!(
                "http://127.0.0.1:{}/v1/chat/completions",
                envoy.port
            ))
            .header("host", host)
            .header("x-api-key", "tg_whatever")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(r.status(), want, "{path}: {}", envoy.log());
        assert!(
            took < Duration::from_millis(300 + 200),
            "{path} took {took:?}"
        );
        if want == 503 {
            assert_eq!(
                r.json::<Value>().await.unwrap()["error"]["code"],
                "unavailable"
            );
        }
    }
    assert_eq!(envoy.stat("wasmcustom.tollgate.failed_closed"), Some(1));
    assert_eq!(envoy.stat("wasmcustom.tollgate.failed_open"), Some(1));
}

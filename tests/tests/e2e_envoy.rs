//! End to end through a real Envoy (1.40, V8) with the compiled filter, the sidecar (real Redis
//! and PostgreSQL) and a mock OpenAI-style upstream: allowed, settled from JSON and from SSE at
//! the same price, 429 with RateLimit headers and Retry-After, 402.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tollgate_sidecar::clock::SystemClock;
use tollgate_sidecar::config::Config;
use wasm_host::envoy::Envoy;
use wasm_host::sidecar::SidecarProcess;
use wasm_host::stores::{remove_sqlite, Backend};

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
        "sidecar": {"cluster": sidecar_cluster, "timeout_ms": 2000, "token": wasm_host::stores::DECISION_TOKEN},
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

/// This file's sidecar configuration on `backend`, private to run `run`.
fn sidecar_config(backend: Backend, run: &str) -> Config {
    wasm_host::stores::sidecar_config(SIDECAR, backend, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_allow_settle_429_and_402_on_redis_and_postgres() {
    allow_settle_429_and_402(Backend::RedisPostgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_allow_settle_429_and_402_on_the_embedded_store() {
    allow_settle_429_and_402(Backend::Embedded).await
}

async fn allow_settle_429_and_402(backend: Backend) {
    // The sidecar, on its own database and key prefix.
    let run = tollgate_sidecar::apikey::new_id("tgt");
    let cfg = sidecar_config(backend, &run);
    let engine = tollgate_sidecar::build_engine(cfg.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let _bg = tollgate_sidecar::spawn_background(&engine);
    let sidecar = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar_port = sidecar.local_addr().unwrap().port();
    tokio::spawn(tollgate_sidecar::serve(engine.clone(), sidecar));

    let up_port = wasm_host::mock::start().await.unwrap();

    let mut keys = Vec::new();
    for (id, credits) in [("acme", 1000u64), ("poor", 0), ("late", 1000)] {
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

    // 5. A client's request id is not an idempotency key: the same id again, after the 429,
    //    is a new request — refused at the limit, not served from the first answer.
    let r = send(&keys[0], "e2e-1", json!({"model": "m", "max_tokens": 50}))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(engine.balance("acme").await.unwrap(), 907);
    assert!(
        envoy.stat("wasmcustom.tollgate.allowed").unwrap_or(0) >= 3,
        "stats: {:?}",
        envoy.stat("wasmcustom.tollgate.allowed")
    );

    // 6. A stream without `usage` is charged by the tokenizer's count of the text it carried.
    let r = http
        .post(&url)
        .header("x-api-key", &keys[2])
        .header("x-request-id", "e2e-nousage")
        .header("x-mock-no-usage", "1")
        .json(&json!({"model": "gpt-4o", "max_tokens": 50, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.text().await.unwrap().contains("\"usage\":{"));
    let counted = tollgate_sidecar::tokens::count(Some("gpt-4o"), "Hello from the mock");
    assert!(counted >= 4, "{counted}");
    wait_for_balance(&engine, "late", 1000 - 1 - counted).await;

    // 7. A client that goes away mid-stream is still settled (at the estimate: no usage seen).
    let stalled = format!("http://127.0.0.1:{}/v1/chat/stalled", envoy.port);
    let mut r = http
        .post(&stalled)
        .header("x-api-key", &keys[2])
        .header("x-request-id", "e2e-gone")
        .json(&json!({"max_tokens": 40, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.chunk().await.unwrap().is_some(),
        "the first event arrives"
    );
    drop(r);
    let mut status = String::new();
    for _ in 0..100 {
        while engine.sync.sync_all().await.unwrap() > 0 {}
        // The hold's id is the filter's own key; the client's request id is on its entry.
        let entries = engine.ledger.history("late", 0, 1000).await.unwrap();
        let Some(hold_id) = entries
            .iter()
            .find(|e| e.kind == "hold" && e.correlation_id.as_deref() == Some("e2e-gone"))
            .and_then(|e| e.hold_id.clone())
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if let Some(h) = engine.ledger.hold("late", &hold_id).await.unwrap() {
            status = h.status;
            if status != "open" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status, "committed",
        "the hold is settled after the disconnect"
    );
    // The stalled stream's first event carried "He" and no usage: counted as text, 1 token.
    let he = tollgate_sidecar::tokens::count(None, "He");
    assert_eq!(
        engine.balance("late").await.unwrap(),
        1000 - 1 - counted - 1 - he
    );

    drop(envoy);
    engine.ledger.close().await;
    remove_sqlite(&cfg);
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
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 250, "token": wasm_host::stores::DECISION_TOKEN},
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

const ADMIN_TOKEN: &str = "e2e-admin-token-xxxx";

/// The real sidecar binary (built by `cargo test` for the host-sidecar package's own tests, and
/// explicitly by `./tg test`; `TOLLGATE_SIDECAR_BIN` points elsewhere).
fn sidecar_binary() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("TOLLGATE_SIDECAR_BIN") {
        return p.into();
    }
    // target/debug/deps/e2e_envoy-… -> target/debug/tollgate-sidecar
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("tollgate-sidecar");
    assert!(
        bin.exists(),
        "{} not built: cargo build -p tollgate-sidecar",
        bin.display()
    );
    bin
}

/// The environment that points a sidecar process at `cfg`'s store and ledger.
fn env_of(cfg: &Config) -> Vec<(String, String)> {
    vec![
        ("TOLLGATE_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        (
            "TOLLGATE_DECISION_TOKEN".into(),
            wasm_host::stores::DECISION_TOKEN.into(),
        ),
        (
            "TOLLGATE_SQLITE_PATH".into(),
            cfg.postgres.sqlite_path.clone(),
        ),
        (
            "TOLLGATE_REDIS_URL".into(),
            cfg.redis.url.clone().unwrap_or_default(),
        ),
        (
            "TOLLGATE_DATABASE_URL".into(),
            cfg.postgres.url.clone().unwrap_or_default(),
        ),
    ]
}

/// What the ledger of `acct` holds: (holds, commits) and the requests counted today.
async fn ledger_counts(http: &reqwest::Client, base: &str, acct: &str) -> (usize, usize) {
    let v: Value = http
        .get(format!("{base}/v1/accounts/{acct}/ledger?limit=1000"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let kind = |k: &str| entries.iter().filter(|e| e["kind"] == k).count();
    (kind("hold"), kind("commit"))
}

async fn wait_for_ledger(http: &reqwest::Client, base: &str, acct: &str, want: (usize, usize)) {
    let mut last = (0, 0);
    for _ in 0..100 {
        last = ledger_counts(http, base, acct).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ledger of {acct} has (holds, commits) {last:?}, expected {want:?}");
}

/// The sidecar process is killed (kill -9) between requests: a fail-closed route answers 503 and
/// a fail-open route passes, each within the deadline; when the sidecar comes back on the same
/// address, enforcement resumes where it stopped (the daily limit counts what was used before the
/// kill) and the ledger holds exactly the allowed requests. On the embedded store the restarted
/// process has an empty key space and rebuilds the account from the SQLite ledger.
async fn sidecar_killed_and_back(backend: Backend) {
    let run = tollgate_sidecar::apikey::new_id("tgt");
    let mut cfg = sidecar_config(backend, &run);
    let limit = 8;
    let text = format!(
        "{SIDECAR}\n[plans.resume]\nlimits = [{{ meter = \"requests\", window = \"day\", max = {limit} }}]\n[prices.open]\nrequests = 1\n[redis]\nkey_prefix = \"{run}\"\n"
    );
    cfg.plans = Config::from_toml(&text).unwrap().plans;
    let dir = std::env::temp_dir().join(format!("{run}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sidecar.toml");
    std::fs::write(&config, &text).unwrap();
    let port = wasm_host::envoy::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let mut sidecar = SidecarProcess::start(&sidecar_binary(), &config, &env_of(&cfg), port).await;
    let admin = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let r = admin("/admin/accounts", json!({"id": "acme", "plan": "resume"}))
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let key: Value = admin("/admin/accounts/acme/keys", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["api_key"].as_str().unwrap().to_string();
    let r = admin(
        "/admin/accounts/acme/grants",
        json!({"grant_id": "pack", "amount": 1000}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success());

    let up_port = wasm_host::mock::start().await.unwrap();
    let filter = json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 1000, "token": wasm_host::stores::DECISION_TOKEN},
        "deadline_ms": 1000,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 20,
        "routes": [
            {"name": "chat", "host": "closed.test", "failure_mode": "closed",
             "charges": {"requests": {"fixed": 1}}},
            {"name": "open", "host": "open.test", "failure_mode": "open",
             "charges": {"requests": {"fixed": 1}}}
        ]
    })
    .to_string();
    let envoy = Envoy::start(up_port, port, &wasm_host::wasm_path(), &filter).expect("envoy");
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port);
    let mut n = 0;
    let mut send = |host: &'static str| {
        n += 1;
        let req = http
            .post(&url)
            .header("host", host)
            .header("x-api-key", &key)
            .header("x-request-id", format!("kill-{n}"))
            .json(&json!({}))
            .send();
        async move {
            let started = std::time::Instant::now();
            let r = req.await.unwrap();
            (r.status().as_u16(), started.elapsed())
        }
    };

    // Before: three allowed and settled, and in the ledger.
    for _ in 0..3 {
        let (status, took) = send("closed.test").await;
        assert_eq!(status, 200, "before the kill ({took:?})");
    }
    wait_for_ledger(&http, &base, "acme", (3, 3)).await;

    // Killed: each route fails its own way, within the deadline (1 s; a refused connection is
    // noticed at once, so this is far sooner).
    sidecar.kill9();
    for (host, want) in [
        ("closed.test", 503),
        ("open.test", 200),
        ("closed.test", 503),
    ] {
        let (status, took) = send(host).await;
        assert_eq!(status, want, "{host} with the sidecar killed");
        assert!(took < Duration::from_millis(1000), "{host} took {took:?}");
    }

    // Back on the same address: enforcement resumes where it stopped.
    let _sidecar = SidecarProcess::start(&sidecar_binary(), &config, &env_of(&cfg), port).await;
    let mut allowed = 0;
    let mut last = 0;
    for _ in 0..limit {
        // The first requests may still find Envoy's old connection closed: retry those.
        let mut status = 0;
        for _ in 0..20 {
            status = send("closed.test").await.0;
            if status != 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last = status;
        if status == 200 {
            allowed += 1;
        } else {
            break;
        }
    }
    assert_eq!(
        (allowed, last),
        (limit - 3, 429),
        "after the restart {allowed} more were allowed (limit {limit}, 3 before the kill)"
    );
    let total = limit as usize;
    wait_for_ledger(&http, &base, "acme", (total, total)).await;
    let bal: Value = http
        .get(format!("{base}/v1/accounts/acme/balance"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // One request = 1 credit (prices.chat requests = 1; no tokens measured on this route).
    assert_eq!(bal["balance"], json!(1000 - limit), "{bal}");
    drop(envoy);
    drop(_sidecar);
    remove_sqlite(&cfg);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_during_traffic_then_back_on_redis_and_postgres() {
    sidecar_killed_and_back(Backend::RedisPostgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_during_traffic_then_back_on_the_embedded_store() {
    sidecar_killed_and_back(Backend::Embedded).await
}

/// A leased route through Envoy: most requests are admitted from the worker's lease with no
/// callout, the daily limit still holds (never more than its maximum admitted), and once the
/// lease is committed the ledger charges exactly what the admitted requests used.
/// A sidecar served from this process, its plan `capped` allowing `limit` requests a day, and
/// account `acme` on that plan with one key.
struct InProcess {
    engine: Arc<tollgate_sidecar::engine::Engine>,
    cfg: Config,
    port: u16,
    key: String,
    _background: Vec<tokio::task::JoinHandle<()>>,
}

async fn in_process(backend: Backend, limit: u64) -> InProcess {
    let run = tollgate_sidecar::apikey::new_id("tgt");
    let mut cfg = sidecar_config(backend, &run);
    let text = format!(
        "{SIDECAR}\n[plans.capped]\nlimits = [{{ meter = \"requests\", window = \"day\", max = {limit} }}]\n"
    );
    cfg.plans = Config::from_toml(&text).unwrap().plans;
    let engine = tollgate_sidecar::build_engine(cfg.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let background = tollgate_sidecar::spawn_background(&engine);
    let sidecar = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = sidecar.local_addr().unwrap().port();
    tokio::spawn(tollgate_sidecar::serve(engine.clone(), sidecar));
    engine
        .create_account(serde_json::from_value(json!({"id": "acme", "plan": "capped"})).unwrap())
        .await
        .unwrap();
    let key = engine
        .create_key("acme", Default::default())
        .await
        .unwrap()
        .1;
    InProcess {
        engine,
        cfg,
        port,
        key,
        _background: background,
    }
}

async fn leased_route_through_envoy(backend: Backend) {
    let limit = 40u64;
    let side = in_process(backend, limit).await;
    let (engine, key, sidecar_port) = (&side.engine, &side.key, side.port);
    engine
        .grant(
            "acme",
            serde_json::from_value(json!({"grant_id": "pack", "amount": 100000})).unwrap(),
        )
        .await
        .unwrap();
    let up_port = wasm_host::mock::start().await.unwrap();
    let filter = json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 2000, "token": wasm_host::stores::DECISION_TOKEN},
        "deadline_ms": 2000,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 20,
        "routes": [{
            "name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
            "charges": {"requests": {"fixed": 1}, "input_tokens": {"fixed": 0},
                        "output_tokens": {"fixed": 50}},
            "usage": {"source": "body"},
            "lease": {"requests": 10, "ttl_ms": 500}
        }]
    })
    .to_string();
    let envoy = Envoy::start(up_port, sidecar_port, &wasm_host::wasm_path(), &filter).unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port);
    let mut ok = 0u64;
    for i in 0..60 {
        let r = http
            .post(&url)
            .header("x-api-key", key)
            .header("x-request-id", format!("lease-e2e-{i}"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected {s}: {}", r.text().await.unwrap()),
        }
        let _ = r.bytes().await;
    }
    let leased = envoy.stat("wasmcustom.tollgate.leased").unwrap_or(0) as u64;
    assert!(ok <= limit, "{ok} admitted over a limit of {limit}");
    assert!(ok >= limit - 10, "only {ok} of {limit} admitted");
    assert!(leased >= ok / 2, "{leased} of {ok} admitted from leases");
    // Once the leases are committed (500 ms, then the next tick), the ledger has it all: each
    // admitted request used 1 request, 10 input and 20 output tokens (the mock's usage).
    let per_request = 1 + wasm_host::mock::PROMPT_TOKENS + wasm_host::mock::COMPLETION_TOKENS;
    wait_for_balance(engine, "acme", 100000 - ok * per_request).await;
    while engine.sync.sync_all().await.unwrap() > 0 {}
    let used: i64 = engine
        .ledger
        .usage_of("acme")
        .await
        .unwrap()
        .iter()
        .filter(|u| u.1 == "requests")
        .map(|u| u.3)
        .sum();
    assert_eq!(
        used as u64, ok,
        "the ledger counts every admitted request once"
    );
    println!("leases: {ok} admitted, {leased} of them from a lease, limit {limit}");
    drop(envoy);
    engine.ledger.close().await;
    remove_sqlite(&side.cfg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_route_through_envoy_on_redis_and_postgres() {
    leased_route_through_envoy(Backend::RedisPostgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_route_through_envoy_on_the_embedded_store() {
    leased_route_through_envoy(Backend::Embedded).await
}

/// Authorize batches in a real Envoy with two workers (a VM and a wake-up queue each): 150
/// requests at once over many connections against a limit of 60 a day are admitted exactly 60
/// times, each admitted one charged once, the rest refused 429 — most of them decided in
/// batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_authorizes_on_two_envoy_workers_admit_exactly_the_limit() {
    let limit = 60u64;
    let side = in_process(Backend::RedisPostgres, limit).await;
    let (engine, key, sidecar_port) = (&side.engine, side.key.clone(), side.port);
    engine
        .grant(
            "acme",
            serde_json::from_value(json!({"grant_id": "pack", "amount": 100000})).unwrap(),
        )
        .await
        .unwrap();
    let up_port = wasm_host::mock::start().await.unwrap();
    let filter = json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 5000, "token": wasm_host::stores::DECISION_TOKEN},
        "deadline_ms": 5000,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 20,
        "routes": [{
            "name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
            "charges": {"requests": {"fixed": 1}, "output_tokens": {"body_field": "max_tokens", "cap": 100}},
            "usage": {"source": "body"}
        }]
    })
    .to_string();
    let envoy = Envoy::start_workers(
        up_port,
        sidecar_port,
        Some((&wasm_host::wasm_path(), &filter)),
        2,
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port);
    // A client per request: each its own connection, spread over both workers.
    let statuses = futures::future::join_all((0..150).map(|i| {
        let (url, key) = (url.clone(), key.clone());
        async move {
            let r = reqwest::Client::new()
                .post(&url)
                .header("x-api-key", &key)
                .header("x-request-id", format!("two-workers-{i}"))
                .json(&json!({"max_tokens": 30}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            s
        }
    }))
    .await;
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    let denied = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!((ok, denied), (limit, 150 - limit), "{statuses:?}");
    let batched = envoy
        .stat("wasmcustom.tollgate.authorize_batched")
        .unwrap_or(0);
    let batches = envoy
        .stat("wasmcustom.tollgate.authorize_batches")
        .unwrap_or(0);
    assert!(
        batched > 0 && batches < batched,
        "{batched} in {batches} batches"
    );
    // Every admitted request settled once: the ledger's requests are the limit.
    let want = limit;
    let t = std::time::Instant::now();
    loop {
        let commits = engine.metrics.committed.get();
        if commits >= want || t.elapsed() > std::time::Duration::from_secs(20) {
            while engine.sync.sync_all().await.unwrap() > 0 {}
            let used: i64 = engine
                .ledger
                .usage_of("acme")
                .await
                .unwrap()
                .iter()
                .filter(|u| u.1 == "requests")
                .map(|u| u.3)
                .sum();
            assert_eq!(
                used as u64, want,
                "the ledger counts every admitted request once"
            );
            assert_eq!(commits, want, "each admitted request committed once");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    println!("two workers: {ok} admitted of 150, {batched} authorized in {batches} batches");
    drop(envoy);
    engine.ledger.close().await;
}

/// Scale-out on a Redis Cluster: two sidecars on a local 3-master cluster and one PostgreSQL,
/// each behind its own Envoy; one key's requests alternate between the two Envoys, and together
/// they admit exactly the daily limit, charged once each in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_and_two_sidecars_share_a_redis_cluster() {
    let cluster = wasm_host::cluster::LocalCluster::start().await;
    let run = tollgate_sidecar::apikey::new_id("tgt");
    let mut cfg = sidecar_config(Backend::RedisPostgres, &run);
    cfg.redis.url = Some(cluster.url());
    let limit = 30u64;
    let text = format!(
        "{SIDECAR}\n[plans.shared]\nlimits = [{{ meter = \"requests\", window = \"day\", max = {limit} }}]\n"
    );
    cfg.plans = Config::from_toml(&text).unwrap().plans;
    let mut envoys = Vec::new();
    let mut engines = Vec::new();
    let up_port = wasm_host::mock::start().await.unwrap();
    for _ in 0..2 {
        let engine = tollgate_sidecar::build_engine(cfg.clone(), Arc::new(SystemClock))
            .await
            .unwrap();
        let _ = tollgate_sidecar::spawn_background(&engine);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(tollgate_sidecar::serve(engine.clone(), listener));
        envoys.push(
            Envoy::start(
                up_port,
                port,
                &wasm_host::wasm_path(),
                &filter_config("tollgate_sidecar"),
            )
            .unwrap(),
        );
        engines.push(engine);
    }
    let engine = engines[0].clone();
    engine
        .create_account(serde_json::from_value(json!({"id": "acme", "plan": "shared"})).unwrap())
        .await
        .unwrap();
    let key = engine
        .create_key("acme", Default::default())
        .await
        .unwrap()
        .1;
    engine
        .grant(
            "acme",
            serde_json::from_value(json!({"grant_id": "pack", "amount": 100000})).unwrap(),
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let sends = (0..50).map(|i| {
        let url = format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            envoys[i % 2].port
        );
        let (http, key) = (http.clone(), key.clone());
        async move {
            http.post(url)
                .header("x-api-key", key)
                .header("x-request-id", format!("cl-{i}"))
                .json(&json!({"max_tokens": 5}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    });
    let statuses = futures::future::join_all(sends).await;
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    let limited = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!((ok, limited), (limit, 50 - limit), "{statuses:?}");
    // Once both filters have settled and the ledger synced: each admitted request once.
    let mut used = 0;
    for _ in 0..100 {
        for e in &engines {
            while e.sync.sync_all().await.unwrap() > 0 {}
        }
        let commits = engine
            .ledger
            .history("acme", 0, 1000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == "commit")
            .count() as u64;
        used = engine
            .ledger
            .usage_of("acme")
            .await
            .unwrap()
            .iter()
            .filter(|u| u.1 == "requests")
            .map(|u| u.3)
            .sum::<i64>() as u64;
        if commits == limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(used, limit, "the ledger counts each admitted request once");
    drop(envoys);
    for e in engines {
        e.ledger.close().await;
    }
    drop(cluster);
}

//! Issue 16's limits through a real Envoy (1.40, V8) with the compiled filter and the sidecar:
//! a concurrency limit counted where it matters — at the upstream — shadow limits and a shadow
//! route, which never refuse and say in `x-tollgate-shadow` what they would have done, and a soft
//! limit, which passes and alerts.

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_sidecar::clock::SystemClock;
use wasm_host::envoy::Envoy;
use wasm_host::stores::Backend;

const SIDECAR: &str = r#"
meters = ["requests", "input_tokens", "output_tokens"]
[server]
listen = "127.0.0.1:0"
shards = 2
[plans.conc]
limits = [{ meter = "requests", window = "concurrent", max = 10 }]
[plans.shadowed]
limits = [{ meter = "requests", window = "day", max = 3, mode = "shadow" }]
[plans.tight]
limits = [{ meter = "requests", window = "day", max = 2 }]
[plans.soft]
limits = [{ meter = "requests", window = "day", max = 2, mode = "soft" }]
[plans.team]
limits = [{ meter = "requests", window = "day", max = 100 }]
[plans.member]
limits = [{ meter = "requests", window = "day", max = 100000 }]
[prices.chat]
requests = 1
"#;

/// Two routes on the mock's chat path: host `shadow.test` is in shadow mode, any other host is
/// enforced.
fn filter_config() -> String {
    let route = |name: &str| {
        json!({
            "name": name, "method": "POST", "path_prefix": "/v1/chat/",
            "charges": {"requests": {"fixed": 1}},
            "usage": {"source": "estimate"}
        })
    };
    let mut shadow = route("chat");
    shadow["host"] = json!("shadow.test");
    shadow["shadow"] = json!(true);
    json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 5000, "token": wasm_host::stores::DECISION_TOKEN},
        "deadline_ms": 5000,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 20,
        "routes": [shadow, route("chat")]
    })
    .to_string()
}

struct Side {
    engine: Arc<tollgate_sidecar::engine::Engine>,
    port: u16,
    _background: Vec<tokio::task::JoinHandle<()>>,
}

impl Side {
    async fn start(backend: Backend) -> Side {
        let run = tollgate_sidecar::apikey::new_id("tgt");
        let cfg = wasm_host::stores::sidecar_config(SIDECAR, backend, &run);
        let engine = tollgate_sidecar::build_engine(cfg, Arc::new(SystemClock))
            .await
            .unwrap();
        let background = tollgate_sidecar::spawn_background(&engine);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(tollgate_sidecar::serve(engine.clone(), listener));
        Side {
            engine,
            port,
            _background: background,
        }
    }

    /// A mock upstream and an Envoy with the filter in front of it and this sidecar; returns
    /// them and the chat completions URL.
    async fn envoy(&self) -> (wasm_host::mock::Mock, Envoy, String) {
        let mock = wasm_host::mock::start_mock().await.unwrap();
        let envoy = Envoy::start_with(
            mock.port,
            self.port,
            Some((&wasm_host::wasm_path(), &filter_config())),
        )
        .unwrap();
        let url = format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port);
        (mock, envoy, url)
    }

    /// Waits (up to 20 s) until the sidecar has committed `n` holds.
    async fn committed(&self, n: u64) {
        let t = Instant::now();
        while self.engine.metrics.committed.get() < n && t.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An account on `plan` with credit; returns its key.
    async fn account(&self, id: &str, plan: &str) -> String {
        self.member(id, plan, None).await
    }

    /// An account on `plan` under `parent`, with credit; returns its key.
    async fn member(&self, id: &str, plan: &str, parent: Option<&str>) -> String {
        let e = &self.engine;
        e.create_account(
            serde_json::from_value(json!({"id": id, "plan": plan, "parent": parent})).unwrap(),
        )
        .await
        .unwrap();
        e.grant(
            id,
            serde_json::from_value(json!({"grant_id": "pack", "amount": 100000})).unwrap(),
        )
        .await
        .unwrap();
        e.create_key(id, Default::default()).await.unwrap().1
    }
}

/// Against a concurrency limit of 10: never more than 10 at the upstream, at least 10 served,
/// the upstream served exactly what was admitted, and each was settled once.
async fn served_ten_at_most(side: &Side, mock: &wasm_host::mock::Mock, ok: u64, what: &str) {
    let peak = mock.peak_in_flight();
    println!(
        "{}, at most {peak} at once at the upstream",
        what.replace("{ok}", &ok.to_string())
    );
    assert!(peak <= 10, "{peak} in flight at the upstream");
    assert!(
        ok >= 10 && mock.served() == ok,
        "{ok} served, the mock saw {}",
        mock.served()
    );
    side.committed(ok).await;
    assert_eq!(side.engine.metrics.committed.get(), ok);
}

/// POSTs one chat completion; returns the status and the response's headers.
async fn chat(
    url: &str,
    key: &str,
    host: Option<&str>,
    delay_ms: u64,
) -> (u16, reqwest::header::HeaderMap) {
    let mut r = reqwest::Client::new()
        .post(url)
        .header("x-api-key", key)
        .header("x-mock-delay-ms", delay_ms.to_string());
    if let Some(h) = host {
        r = r.header("host", h);
    }
    let r = r.json(&json!({"model": "gpt-test"})).send().await.unwrap();
    let (s, h) = (r.status().as_u16(), r.headers().clone());
    let _ = r.bytes().await;
    (s, h)
}

async fn concurrency_counted_at_the_upstream(backend: Backend) {
    let side = Side::start(backend).await;
    let key = side.account("acme", "conc").await;
    let (mock, envoy, url) = side.envoy().await;

    // A hundred at once, each held 300 ms at the upstream, against at most ten in flight.
    let answers = futures::future::join_all((0..100).map(|_| chat(&url, &key, None, 300))).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count() as u64;
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        refused
            .iter()
            .all(|(s, h)| *s == 429 && h.get("retry-after").is_some_and(|v| v == "1")),
        "refusals are 429 with retry-after: 1: {:?}",
        refused
            .iter()
            .map(|(s, h)| (*s, h.get("retry-after").cloned()))
            .collect::<Vec<_>>()
    );
    served_ten_at_most(&side, &mock, ok, "concurrency 10: {ok} of 100 served").await;

    // Every admitted request gave its place back: ten more fit at once.
    let again = futures::future::join_all((0..10).map(|_| chat(&url, &key, None, 100))).await;
    assert!(
        again.iter().all(|(s, _)| *s == 200),
        "{:?}",
        again.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(mock.peak_in_flight() <= 10);
    drop(envoy);
    side.engine.ledger.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_of_10_never_has_more_than_10_at_the_upstream_on_redis_and_postgres() {
    concurrency_counted_at_the_upstream(Backend::RedisPostgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_of_10_never_has_more_than_10_at_the_upstream_on_the_embedded_store() {
    concurrency_counted_at_the_upstream(Backend::Embedded).await
}

/// A shadow limit admits every request over it and says so; a shadow route is decided (a check)
/// but never refused, held or charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_limits_and_a_shadow_route_pass_everything_and_report_would_be_denials() {
    let side = Side::start(Backend::RedisPostgres).await;
    let shadowed = side.account("shadowed", "shadowed").await;
    let tight = side.account("tight", "tight").await;
    let (mock, envoy, url) = side.envoy().await;

    // A shadow limit of 3 a day: six requests served; the last three carry the would-be denial.
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (s, h) = chat(&url, &shadowed, None, 0).await;
        assert_eq!(s, 200);
        seen.push(
            h.get("x-tollgate-shadow")
                .map(|v| v.to_str().unwrap().to_string()),
        );
    }
    let would = Some("would-deny limit=account:requests:day".to_string());
    assert_eq!(
        seen,
        vec![
            None,
            None,
            None,
            would.clone(),
            would.clone(),
            would.clone()
        ]
    );
    assert_eq!(envoy.stat("wasmcustom.tollgate.shadow_would_deny"), Some(3));
    assert_eq!(side.engine.metrics.shadow_denials.get(), 3);

    // An enforced limit of 2 a day, used up on the enforced route: the third is refused there...
    for _ in 0..2 {
        assert_eq!(chat(&url, &tight, None, 0).await.0, 200);
    }
    assert_eq!(chat(&url, &tight, None, 0).await.0, 429);
    // ... and served on the shadow route, which reports what enforcement would have done and
    // charges nothing.
    let allowed_before = side.engine.metrics.allowed.get();
    for _ in 0..3 {
        let (s, h) = chat(&url, &tight, Some("shadow.test"), 0).await;
        assert_eq!(s, 200);
        assert_eq!(
            h.get("x-tollgate-shadow").and_then(|v| v.to_str().ok()),
            Some("would-deny limit=account:requests:day")
        );
    }
    assert_eq!(envoy.stat("wasmcustom.tollgate.shadow_would_deny"), Some(6));
    assert_eq!(
        side.engine.metrics.allowed.get(),
        allowed_before,
        "no hold for a shadow route"
    );
    assert_eq!(mock.served(), 6 + 2 + 3);
    side.committed(8).await;
    // The ledger's usage of `tight` is its two enforced requests. (A pass of the background sync
    // worker may still be committing when ours finds nothing to do: read until it has landed.)
    let t = Instant::now();
    let used = loop {
        while side.engine.sync.sync_all().await.unwrap() > 0 {}
        let used: i64 = side
            .engine
            .ledger
            .usage_of("tight")
            .await
            .unwrap()
            .iter()
            .filter(|u| u.1 == "requests")
            .map(|u| u.3)
            .sum();
        if used >= 2 || t.elapsed() > Duration::from_secs(10) {
            break used;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(used, 2, "the shadow route charged nothing");
    drop(envoy);
    side.engine.ledger.close().await;
}

/// A soft limit of 2 a day: five requests served and charged, the overage on the usage report
/// and in one 100 % alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_limit_passes_every_request_and_alerts() {
    let side = Side::start(Backend::RedisPostgres).await;
    let key = side.account("acme", "soft").await;
    let (mock, envoy, url) = side.envoy().await;
    for _ in 0..5 {
        assert_eq!(chat(&url, &key, None, 0).await.0, 200);
    }
    assert_eq!(mock.served(), 5);
    assert_eq!(side.engine.metrics.soft_overages.get(), 3);
    side.committed(5).await;
    let usage = side.engine.usage("acme", None).await.unwrap();
    assert_eq!(
        (usage[0].used, usage[0].over, usage[0].mode.as_str()),
        (5, 3, "soft"),
        "{usage:?}"
    );
    let t = Instant::now();
    let full = loop {
        let alerts = side.engine.ledger.alerts_of("acme", 100).await.unwrap();
        let full: Vec<_> = alerts.into_iter().filter(|a| a.level == 100).collect();
        if !full.is_empty() || t.elapsed() > Duration::from_secs(10) {
            break full;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(full.len(), 1, "{full:?}");
    assert_eq!(full[0].name, "account:requests:day");
    drop(envoy);
    side.engine.ledger.close().await;
}

/// A client trying to get past a concurrency limit of 10 through Envoy: two keys of the same
/// account, odd spellings of the path, one `x-request-id` for every request, odd JSON (a
/// duplicate field, a string where a number goes). The upstream still never has more than ten
/// of its requests at once, and everything it served is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_cannot_be_dodged_with_keys_paths_ids_or_odd_json() {
    let side = Side::start(Backend::RedisPostgres).await;
    let key1 = side.account("acme", "conc").await;
    let key2 = side
        .engine
        .create_key("acme", Default::default())
        .await
        .unwrap()
        .1;
    let (mock, envoy, url) = side.envoy().await;
    let base = url.trim_end_matches("/v1/chat/completions").to_string();
    let paths = [
        "/v1/chat/completions",
        "//v1/chat/completions",
        "/v1/chat/./completions",
        "/v1/%63hat/completions",
    ];
    let bodies = [
        r#"{"model": "gpt-test"}"#,
        r#"{"model": "gpt-test", "model": "other"}"#,
        r#"{"model": "gpt-test", "max_tokens": "10"}"#,
        "not json at all",
    ];
    let answers = futures::future::join_all((0..60).map(|i| {
        let url = format!("{base}{}", paths[i % paths.len()]);
        let key = if i % 2 == 0 {
            key1.clone()
        } else {
            key2.clone()
        };
        let body = bodies[i % bodies.len()];
        async move {
            let r = reqwest::Client::new()
                .post(&url)
                .header("x-api-key", key)
                .header("x-request-id", "the-same-id")
                .header("x-mock-delay-ms", "300")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            s
        }
    }))
    .await;
    let ok = answers.iter().filter(|s| **s == 200).count() as u64;
    assert!(
        answers.iter().all(|s| *s == 200 || *s == 429),
        "{answers:?}"
    );
    served_ten_at_most(
        &side,
        &mock,
        ok,
        "dodging a concurrency limit of 10: {ok} of 60 served",
    )
    .await;
    let usage = side.engine.usage("acme", None).await.unwrap();
    let conc = usage.iter().find(|u| u.window == "concurrent").unwrap();
    assert_eq!(conc.used, 0, "{usage:?}");
    drop(envoy);
    side.engine.ledger.close().await;
}

/// A team limit of 100 a day shared by two accounts, through Envoy: 400 requests at once, half
/// from each account's key, some on odd spellings of the path, one `x-request-id` for all →
/// exactly 100 reach the upstream, the rest are refused 429 naming the team's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_limit_is_shared_by_its_accounts_and_cannot_be_dodged_with_two_keys() {
    let side = Side::start(Backend::RedisPostgres).await;
    side.engine
        .create_account(serde_json::from_value(json!({"id": "eng", "plan": "team"})).unwrap())
        .await
        .unwrap();
    let alice = side.member("alice", "member", Some("eng")).await;
    let bob = side.member("bob", "member", Some("eng")).await;
    let (mock, envoy, url) = side.envoy().await;
    let odd = url.replace("/v1/chat/", "//v1/chat/./");
    let answers = futures::future::join_all((0..400).map(|i| {
        let key = if i % 2 == 0 { &alice } else { &bob };
        let u = if i % 3 == 0 { &odd } else { &url };
        async move {
            let r = reqwest::Client::new()
                .post(u)
                .header("x-api-key", key)
                .header("x-request-id", "same-for-all")
                .json(&json!({"model": "gpt-test"}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            (s, body)
        }
    }))
    .await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    println!(
        "team limit 100 through Envoy: {ok} of 400 served, the upstream saw {}",
        mock.served()
    );
    assert_eq!(ok, 100);
    assert_eq!(mock.served(), 100);
    assert!(
        answers
            .iter()
            .filter(|(s, _)| *s != 200)
            .all(|(s, b)| *s == 429 && b.contains("parent(eng):requests:day")),
        "{:?}",
        answers.iter().find(|(s, _)| *s != 200)
    );
    side.committed(100).await;
    drop(envoy);
    side.engine.ledger.close().await;
}

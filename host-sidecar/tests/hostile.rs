//! Bad input from callers and operators, generated: random bytes and random JSON built from the
//! API's own field names with hostile values (negative, huge, fractional, wrong types, long or
//! odd strings), sent to every mutating endpoint. The sidecar must answer each with a 4xx or a
//! 200 — never a 5xx, never a panic — and a 4xx must change nothing. Then the secrets: what the
//! sidecar logs never contains an API key, the admin token or the key pepper.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use serde_json::{json, Value};

const ENDPOINTS: &[&str] = &[
    "/v1/authorize",
    "/v1/consume",
    "/v1/check",
    "/v1/commit",
    "/v1/commit/batch",
    "/v1/authorize/batch",
    "/v1/release",
    "/v1/extend",
    "/admin/accounts",
    "/admin/accounts/acme/grants",
    "/admin/accounts/acme/keys",
];

const FIELDS: &[&str] = &[
    "api_key",
    "account",
    "idempotency_key",
    "route",
    "model",
    "meters",
    "credits",
    "resource",
    "hold_id",
    "commits",
    "grant_id",
    "amount",
    "priority",
    "expires_at_ms",
    "source",
    "id",
    "plan",
    "timezone",
    "billing_anchor_day",
    "limits",
    "requests",
    "tokens",
    "output_text",
];

fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1e300)),
        Just(json!(0.5)),
        "[a-z_.:/-]{0,12}".prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("x".repeat(5000))),
        Just(Value::from("acme")),
        Just(Value::from("acme/h1")),
        Just(Value::from("paid")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(FIELDS).prop_map(str::to_string),
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        hostile_value().prop_map(|v| v.to_string().into_bytes()),
        // A well-formed request with one field made hostile.
        (prop::sample::select(FIELDS), hostile_value()).prop_map(|(f, v)| {
            let mut base = json!({"api_key": "tg_unknown", "idempotency_key": "r1",
                                  "route": "paid", "meters": {"requests": 1}});
            base[f] = v;
            base.to_string().into_bytes()
        }),
    ]
}

/// What would change if a request changed something: the account's ledger rows (after sync),
/// its balance and its usage report.
async fn state(env: &Env) -> (i64, u64, Value) {
    env.sync().await;
    let (_, usage) = env.admin_get("/v1/accounts/acme/usage").await;
    (
        env.ledger_rows("acme").await,
        env.engine().balance("acme").await.unwrap(),
        usage,
    )
}

#[test]
fn hostile_bodies_get_a_4xx_or_a_200_and_a_4xx_changes_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = rt.block_on(async {
        let env = Env::new(1).await;
        env.account("acme", "tokens", "UTC").await;
        env.grant("acme", "g1", 1000, json!({})).await;
        env
    });
    let http = reqwest::Client::new();
    let mut runner = TestRunner::new(PropConfig {
        cases: 300,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let counts = std::cell::RefCell::new([0u32; 3]); // 2xx, 4xx, other
    runner
        .run(
            &(
                prop::sample::select(ENDPOINTS),
                hostile_body(),
                any::<bool>(),
            ),
            |(path, body, admin)| {
                let outcome = rt.block_on(async {
                    let before = state(&env).await;
                    let mut r = http
                        .post(format!("{}{path}", env.base(0)))
                        .header("content-type", "application/json")
                        .body(body.clone());
                    if admin {
                        r = r.bearer_auth(ADMIN);
                    }
                    let status = r.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
                    let after = state(&env).await;
                    (status, before, after)
                });
                let (status, before, after) = outcome;
                match status {
                    200..=299 => counts.borrow_mut()[0] += 1,
                    400..=499 => {
                        counts.borrow_mut()[1] += 1;
                        prop_assert_eq!(
                            &before,
                            &after,
                            "{} {} answered {} and changed state",
                            path,
                            String::from_utf8_lossy(&body),
                            status
                        );
                    }
                    _ => {
                        counts.borrow_mut()[2] += 1;
                        prop_assert!(
                            false,
                            "{} {:?} answered {}",
                            path,
                            String::from_utf8_lossy(&body),
                            status
                        );
                    }
                }
                Ok(())
            },
        )
        .unwrap();
    let counts = counts.into_inner();
    println!(
        "hostile bodies: {} answered 2xx, {} answered 4xx (state unchanged), {} other",
        counts[0], counts[1], counts[2]
    );
    assert!(counts[1] > 100, "most hostile bodies are refused");
}

/// The sidecar process at debug level, through a day of the usual calls and some wrong ones:
/// no log line carries an API key, the admin token or the key pepper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log() {
    let prefix = unique("tgt");
    let dir = std::env::temp_dir().join(format!("{prefix}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sidecar.toml");
    std::fs::write(
        &config,
        format!("{CONFIG}\n[redis]\nkey_prefix = \"{prefix}\"\n"),
    )
    .unwrap();
    let log = dir.join("sidecar.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = "admin-secret-0123456789abcdef";
    let pepper = "pepper-secret-fedcba9876543210";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
        .arg("--config")
        .arg(&config)
        .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_REDIS_URL", redis_url())
        .env("TOLLGATE_DATABASE_URL", format!("{}/{prefix}", pg_base()))
        .env("TOLLGATE_ADMIN_TOKEN", token)
        .env("TOLLGATE_DECISION_TOKEN", DECISION)
        .env("TOLLGATE_SERVICE_TOKEN", SERVICE)
        .env("TOLLGATE_KEY_PEPPER", pepper)
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(format!("{base}/readyz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let admin = |path: &str, body: Value, t: &str| {
        http.post(format!("{base}{path}"))
            .bearer_auth(t)
            .json(&body)
            .send()
    };
    admin(
        "/admin/accounts",
        json!({"id": "acme", "plan": "basic"}),
        token,
    )
    .await
    .unwrap();
    let k: Value = admin("/admin/accounts/acme/keys", json!({}), token)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = k["api_key"].as_str().unwrap().to_string();
    admin(
        "/admin/accounts/acme/grants",
        json!({"grant_id": "g", "amount": 100}),
        token,
    )
    .await
    .unwrap();
    // Wrong token, wrong key, the key in a malformed body, a valid decision and its commit.
    admin(
        "/admin/accounts",
        json!({"id": "x", "plan": "basic"}),
        "wrong-token-xxxxxxxxxxxx",
    )
    .await
    .unwrap();
    for body in [
        json!({"api_key": key, "idempotency_key": "r1", "meters": {"requests": 1}}),
        json!({"api_key": format!("{key}x"), "idempotency_key": "r2", "meters": {"requests": 1}}),
        json!({"api_key": key, "idempotency_key": "bad id!", "meters": {"requests": -1}}),
    ] {
        http.post(format!("{base}/v1/authorize"))
            .bearer_auth(SERVICE)
            .json(&body)
            .send()
            .await
            .unwrap();
    }
    http.post(format!("{base}/v1/commit"))
        .bearer_auth(SERVICE)
        .json(&json!({"hold_id": "acme/r1", "meters": {"requests": 1}}))
        .send()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !text.is_empty(),
        "the sidecar logged something at trace level"
    );
    for (what, secret) in [
        ("API key", key.as_str()),
        ("admin token", token),
        ("pepper", pepper),
    ] {
        assert!(
            !text.contains(secret),
            "the {what} appears in the log:\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The key's secret part is not there in pieces either (only the masked form may be).
    let secret_part = &key[key.len() - 20..key.len() - 4];
    assert!(
        !text.contains(secret_part),
        "part of the API key appears in the log"
    );
}

/// Ids with a control character — in a path (percent-encoded) or in a body — get a 400 before
/// they reach the ledger (PostgreSQL text cannot hold a NUL: it used to answer 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_ids_get_a_400() {
    let env = Env::new(1).await;
    env.account("acme", "basic", "UTC").await;
    for path in [
        "/admin/accounts/%00",
        "/admin/accounts/a%00b/alerts",
        "/v1/accounts/%01/balance",
        "/admin/pools/%7F",
        "/admin/plans/%0A",
    ] {
        let (s, v) = env.admin_get(path).await;
        assert_eq!(s, 400, "{path}: {v}");
    }
    let (s, _) = env
        .admin_post(
            "/admin/accounts/%00/grants",
            &json!({"grant_id": "g", "amount": 1}),
        )
        .await;
    assert_eq!(s, 400);
    let (s, v) = env
        .admin_post("/admin/accounts", &json!(["x", "\u{0}"]))
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = env
        .admin_post("/admin/accounts", &json!({"id": "y", "plan": "\u{0}"}))
        .await;
    assert_eq!(s, 400, "{v}");
    let (_, a) = env.admin_get("/admin/accounts/acme").await;
    assert_eq!(a["plan"], "basic");
}

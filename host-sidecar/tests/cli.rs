//! The operator's CLI (`tollgate`, a separate process) against running sidecars: after a load
//! run on two sidecars, reconciliation reports zero differences (and finds one planted in
//! Redis); export, top consumers, accounts, grants, pools and its exit statuses.

#[macro_use]
mod common;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};

/// Runs the CLI against sidecar 0; returns exit status, stdout and stderr.
async fn cli(env: &Env, args: &[&str]) -> (i32, String, String) {
    cli_at(env.base(0), ADMIN, args).await
}

/// Runs the CLI against `url` with `token`.
async fn cli_at(url: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["--url", url, "--token", token]).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("the CLI runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Limits on both meters, high enough never to refuse the load run.
const LOAD_PLAN: &str = r#"
[plans.load]
limits = [
  { meter = "requests", window = "day", max = 100000 },
  { meter = "tokens", window = "month", max = 100000000 },
]
"#;

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

conformance! {
    async fn after_a_load_run_the_cli_reconciles_to_zero_and_reports(backend: Backend) {
        let env = Env::build(backend, 2, LOAD_PLAN, &redis_url(), None).await;
        let mut keys = Vec::new();
        for (i, acct) in ["acme", "beta", "gamma"].iter().enumerate() {
            let key = env.account(acct, "load", "UTC").await;
            assert_eq!(env.grant(acct, "pack", 100_000, json!({})).await.0, 201);
            keys.push((acct.to_string(), key, (i + 1) * 100));
        }
        // Load: authorize on both sidecars, then commit most (less or more than held), release
        // the rest; plus one-shot consumes.
        let calls = keys.iter().flat_map(|(acct, key, n)| {
            (0..*n).map(move |i| (acct.clone(), key.clone(), i))
        });
        let results = join_all(calls.map(|(acct, key, i)| {
            let env = &env;
            async move {
                let body = json!({"api_key": key, "idempotency_key": format!("r{i}"), "route": "paid",
                    "meters": {"requests": 1, "tokens": 20}});
                let (s, v, _) = env.post_to(i, "/v1/authorize", &body).await;
                assert_eq!((s, v["allowed"].clone()), (200, json!(true)), "{v}");
                let hold = v["hold_id"].as_str().unwrap().to_string();
                let settle = if i % 5 == 0 {
                    ("/v1/release", json!({"hold_id": hold}))
                } else {
                    ("/v1/commit", json!({"hold_id": hold, "route": "paid",
                        "meters": {"requests": 1, "tokens": 5 + (i % 30)}}))
                };
                let (s, v, _) = env.post_to(i + 1, settle.0, &settle.1).await;
                assert_eq!(s, 200, "{v}");
                let (s, _, _) = env.post_to(i, "/v1/consume", &json!({"api_key": key,
                    "idempotency_key": format!("c{i}"), "meters": {"tokens": 3}})).await;
                assert_eq!(s, 200);
                acct
            }
        }))
        .await;
        assert_eq!(results.len(), 600);

        let (code, out, err) = cli(&env, &["reconcile"]).await;
        let rec = json_of(&out);
        println!("cli: reconcile after 600 authorizes, 600 settles and 600 consumes: {err}");
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(rec["differences"], json!([]));
        // Per account: two counters and one grant.
        assert_eq!(rec["values_compared"], 9, "{rec}");
        assert!(err.contains("0 differences"), "{err}");

        // A counter planted wrong in Redis is found, and the exit status says so.
        let e = env.engine();
        let period = tollgate_sidecar::windows::current_period(
            tollgate_sidecar::windows::Window::Day, NOON, chrono_tz::Tz::UTC, &e.windows, 1).id;
        let mut conn = e.store.conn();
        let k = e.store.keys.counter("beta", "a:beta", "requests", &period);
        let _: () = redis::AsyncCommands::set(&mut conn, &k, 1).await.unwrap();
        let (code, out, _) = cli(&env, &["reconcile", "--account", "beta"]).await;
        assert_eq!(code, 2, "{out}");
        let rec = json_of(&out);
        assert_eq!(rec["differences"][0]["account"], "beta", "{rec}");
        assert_eq!(rec["differences"][0]["redis"], 1);

        // Export: one CSV line per ledger row (paged by the CLI), plus the header.
        let (code, out, err) = cli(&env, &["export", "--format", "csv"]).await;
        assert_eq!(code, 0, "{err}");
        let rows: i64 = {
            let mut n = 0;
            for a in ["acme", "beta", "gamma"] {
                n += env.ledger_rows(a).await;
            }
            n
        };
        assert_eq!(out.lines().count() as i64, rows + 1);
        assert!(out.starts_with("seq,account_id,kind,"));
        let (_, out, _) = cli(&env, &["export", "--account", "acme"]).await;
        assert_eq!(out.lines().count() as i64, env.ledger_rows("acme").await);
        assert!(out.lines().all(|l| json_of(l)["account_id"] == "acme"));

        // Top consumers of requests today: gamma (300) > beta (200) > acme (100), less releases.
        let (code, out, _) = cli(&env, &["top", "--meter", "requests", "--window", "day"]).await;
        assert_eq!(code, 0);
        let top = json_of(&out);
        let order: Vec<&str> = top["top"].as_array().unwrap().iter()
            .map(|r| r["account_id"].as_str().unwrap()).collect();
        assert_eq!(order, vec!["gamma", "beta", "acme"], "{top}");

        // Accounts, grants, pools; a refusal exits 1 with the API's error.
        let (code, _, _) = cli(&env, &["accounts", "create", "delta", "--plan", "basic"]).await;
        assert_eq!(code, 0);
        let (code, out, _) = cli(&env, &["grants", "add", "delta", "--id", "g1", "--amount", "42"]).await;
        assert_eq!(code, 0, "{out}");
        let (_, out, _) = cli(&env, &["balance", "delta"]).await;
        assert_eq!(json_of(&out)["balance"], 42);
        let (code, _, _) = cli(&env, &["pools", "create", "trial", "--stock", "1"]).await;
        assert_eq!(code, 0);
        let (_, out, _) = cli(&env, &["pools", "claim", "trial", "--account", "delta"]).await;
        assert_eq!(json_of(&out)["claimed"], true);
        let (_, out, _) = cli(&env, &["pools", "claim", "trial", "--account", "acme"]).await;
        assert_eq!(json_of(&out)["claimed"], false, "the stock of one is gone");
        let (code, _, err) = cli(&env, &["accounts", "show", "nobody"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("404"), "{err}");
        let (_, out, _) = cli(&env, &["plans", "list"]).await;
        assert!(json_of(&out)["plans"].as_array().unwrap().iter().any(|p| p["name"] == "basic"));
        // A plan written through the CLI; delta (on basic) is moved onto it.
        let (code, out, err) = cli(&env, &["plans", "set", "team", "--limit", "requests:day:2",
            "--limit", "tokens:month:5000:soft", "--limit", "requests:concurrent:4",
            "--included-credits", "10", "--credits-period", "week"]).await;
        assert_eq!(code, 0, "{out}{err}");
        let limits = json_of(&out)["limits"].clone();
        assert_eq!(limits.as_array().unwrap().len(), 3);
        assert_eq!(limits[1]["mode"], "soft", "{limits}");
        assert_eq!(limits[2]["window"], "concurrent", "{limits}");
        let (code, _, err) = cli(&env, &["plans", "set", "bad", "--limit", "requests:day:1:loud"]).await;
        assert_eq!(code, 1, "{err}");
        let (code, _, _) = cli(&env, &["accounts", "set-plan", "delta", "team"]).await;
        assert_eq!(code, 0);
        let (_, out, _) = cli(&env, &["plans", "show", "team"]).await;
        assert_eq!(json_of(&out)["credits_period"], "week");
        let (code, _, err) = cli(&env, &["plans", "set", "bad", "--limit", "requests:fortnight:1"]).await;
        assert_eq!(code, 1, "{err}");
        // delta is on team: not deleted until it moves.
        let (code, _, err) = cli(&env, &["plans", "delete", "team"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("409"), "{err}");
        assert_eq!(cli(&env, &["accounts", "set-plan", "delta", "basic"]).await.0, 0);
        let (code, out, err) = cli(&env, &["plans", "delete", "team"]).await;
        assert_eq!((code, json_of(&out)["deleted"].clone()), (0, json!(true)), "{out}{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_when_the_sidecar_is_unreachable_or_the_token_is_wrong() {
    let env = Env::new(1).await;
    let (code, _, _) = cli_at("http://127.0.0.1:9", ADMIN, &["plans", "list"]).await;
    assert_eq!(code, 3);
    let (code, _, err) = cli_at(env.base(0), "not-the-admin-token", &["plans", "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"));
}

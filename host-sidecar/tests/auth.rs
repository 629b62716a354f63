//! Only the filter and the operator can move money: the decision routes need the filter's token
//! (or a trusted caller's, for a bare account), a hold is settled only as it was made, junk keys
//! cost no lookup, and a sidecar that faces a network will not start without a token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;

/// A POST with `token` (None: no authorization header at all).
async fn post_as(env: &Env, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let mut r = env.http.post(format!("{}{path}", env.base(0))).json(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// What a decision could have changed: the account's balance, used requests, ledger rows.
async fn state(env: &Env, acct: &str) -> (u64, u64, i64) {
    env.sync().await;
    (
        env.balance(acct).await,
        env.used(acct, "account:requests:day").await,
        env.ledger_rows(acct).await,
    )
}

conformance! {
    async fn every_decision_route_needs_the_filters_token(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        env.grant("acme", "g", 1000, json!({})).await;
        let (_, held) = post_as(&env, "/v1/authorize",
            &json!({"api_key": key, "idempotency_key": "held", "route": "paid", "meters": {"requests": 1}}),
            Some(DECISION)).await;
        let hold = held["hold_id"].as_str().unwrap().to_string();
        let before = state(&env, "acme").await;
        let routes: Vec<(&str, Value)> = vec![
            ("/v1/authorize", json!({"api_key": key, "idempotency_key": "a1", "meters": {"requests": 1}})),
            ("/v1/check", json!({"api_key": key, "meters": {"requests": 1}})),
            ("/v1/consume", json!({"api_key": key, "idempotency_key": "c1", "route": "paid", "meters": {"requests": 1}})),
            ("/v1/extend", json!({"hold_id": hold, "meters": {"requests": 2}})),
            ("/v1/commit", json!({"hold_id": hold, "route": "paid", "meters": {"requests": 1}})),
            ("/v1/commit/batch", json!({"commits": [{"hold_id": hold, "meters": {"requests": 1}}]})),
            ("/v1/authorize/batch", json!({"requests": [{"api_key": key, "idempotency_key": "a2", "meters": {"requests": 1}}]})),
            ("/v1/release", json!({"hold_id": hold})),
        ];
        for (path, body) in &routes {
            for token in [None, Some("wrong-token-of-some-length"), Some(ADMIN.get(..5).unwrap())] {
                let (s, v) = post_as(&env, path, body, token).await;
                assert_eq!(s, 401, "{path} with {token:?}: {v}");
                assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            }
        }
        assert_eq!(state(&env, "acme").await, before, "nothing changed");
        // With the filter's token each of them is decided (the release of a hold the commits
        // above settled is a 409, as it would be for anyone).
        for (path, body) in &routes {
            let (s, v) = post_as(&env, path, body, Some(DECISION)).await;
            let want = if *path == "/v1/release" { 409 } else { 200 };
            assert_eq!(s, want, "{path}: {v}");
        }
    }

    async fn a_bare_account_needs_the_trusted_scope(backend: Backend) {
        let env = Env::on(backend, 1).await;
        env.account("acme", "basic", "UTC").await;
        env.grant("acme", "g", 1000, json!({})).await;
        let before = state(&env, "acme").await;
        for path in ["/v1/authorize", "/v1/consume", "/v1/check"] {
            let body = json!({"account": "acme", "idempotency_key": "x1", "route": "paid",
                              "meters": {"requests": 1}, "credits": 5});
            let (s, v) = post_as(&env, path, &body, Some(DECISION)).await;
            assert_eq!((s, v["error"]["code"].clone()), (403, json!("forbidden")), "{path}: {v}");
        }
        // In a batch too: that item is refused alone.
        let item = json!({"account": "acme", "idempotency_key": "x2", "route": "paid", "meters": {"requests": 1}});
        let (s, v) = post_as(&env, "/v1/authorize/batch", &json!({"requests": [item]}), Some(DECISION)).await;
        assert_eq!((s, v["results"][0]["status"].clone()), (200, json!(403)), "{v}");
        assert_eq!(v["results"][0]["error"]["code"], "forbidden", "{v}");
        assert_eq!(state(&env, "acme").await, before);
        // The service token (and the admin's) may.
        let body = json!({"account": "acme", "idempotency_key": "x1", "route": "paid", "meters": {"requests": 1}});
        let (s, v) = post_as(&env, "/v1/consume", &body, Some(SERVICE)).await;
        assert_eq!((s, v["allowed"].clone()), (200, json!(true)), "{v}");
        let (s, _) = post_as(&env, "/v1/check", &body, Some(ADMIN)).await;
        assert_eq!(s, 200);
        // Reads: the service or the admin, not the filter.
        for (token, want) in [(Some(DECISION), 401), (Some(SERVICE), 200), (None, 401)] {
            let mut r = env.http.get(format!("{}/v1/accounts/acme/balance", env.base(0)));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            assert_eq!(r.send().await.unwrap().status().as_u16(), want, "{token:?}");
        }
    }

    async fn a_hold_is_settled_only_as_it_was_made(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        env.grant("acme", "g", 100_000, json!({})).await;
        let (_, v) = post_as(&env, "/v1/authorize",
            &json!({"api_key": key, "idempotency_key": "h1", "route": "paid", "model": "big-model",
                    "meters": {"requests": 1, "tokens": 500}}),
            Some(DECISION)).await;
        let hold = v["hold_id"].as_str().unwrap().to_string();
        let before = state(&env, "acme").await;
        for (body, want) in [
            // Another route (free), another model, extra credits, a guessed hold id.
            (json!({"hold_id": hold, "route": "default", "meters": {"requests": 1, "tokens": 500}}), 409),
            (json!({"hold_id": hold, "route": "paid", "model": "cheap-model", "meters": {"requests": 1}}), 409),
            (json!({"hold_id": hold, "route": "paid", "meters": {"requests": 1}, "credits": 1}), 400),
            (json!({"hold_id": "acme/h2", "route": "paid", "meters": {"requests": 1}}), 404),
            (json!({"hold_id": "acme/tg-00000000000000000000000000000000", "meters": {}}), 404),
        ] {
            let (s, v) = post_as(&env, "/v1/commit", &body, Some(DECISION)).await;
            assert_eq!(s, want, "{body}: {v}");
            let (s, v) = post_as(&env, "/v1/commit/batch", &json!({"commits": [body]}), Some(DECISION)).await;
            assert_eq!((s, v["results"][0]["status"].clone()), (200, json!(want)), "{v}");
        }
        assert_eq!(state(&env, "acme").await, before, "nothing changed");
        // As it was made: priced with its own route and model, the route named or not.
        let (s, v) = post_as(&env, "/v1/commit",
            &json!({"hold_id": hold, "meters": {"requests": 1, "tokens": 40}}), Some(DECISION)).await;
        assert_eq!((s, v["credits"].clone()), (200, json!(10 + 40)), "{v}");
    }

    async fn a_decision_given_up_on_is_never_held(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        env.grant("acme", "g", 1000, json!({})).await;
        let spend = |idem: &str| json!({"api_key": key, "idempotency_key": idem, "route": "paid",
                                         "meters": {"requests": 1}});
        let before = state(&env, "acme").await;
        // The filter gave up before its authorize arrived: the authorize is refused, nothing held.
        let (s, v) = post_as(&env, "/v1/cancel", &json!({"api_key": key, "idempotency_key": "late"}), Some(DECISION)).await;
        assert_eq!((s, v["status"].clone()), (200, json!("cancelled")), "{v}");
        let (s, v) = post_as(&env, "/v1/authorize", &spend("late"), Some(DECISION)).await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(state(&env, "acme").await, before);
        // ... or after it held: released.
        let (_, v) = post_as(&env, "/v1/authorize", &spend("held"), Some(DECISION)).await;
        assert_eq!(v["allowed"], true, "{v}");
        assert_ne!(env.balance("acme").await, before.0);
        let (s, v) = post_as(&env, "/v1/cancel", &json!({"api_key": key, "idempotency_key": "held"}), Some(DECISION)).await;
        assert_eq!((s, v["status"].clone()), (200, json!("released")), "{v}");
        let after = state(&env, "acme").await;
        assert_eq!((after.0, after.1), (before.0, before.1), "the hold was given back");
        // Only with the filter's token, and only for a key of an account.
        let (s, _) = post_as(&env, "/v1/cancel", &json!({"api_key": key, "idempotency_key": "x"}), None).await;
        assert_eq!(s, 401);
        let (s, _) = post_as(&env, "/v1/cancel", &json!({"api_key": "tg_nope", "idempotency_key": "x"}), Some(DECISION)).await;
        assert_eq!(s, 404);
    }

    async fn a_settled_hold_shrinks_to_a_tombstone_for_the_replay_window(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        env.grant("acme", "g", 1000, json!({})).await;
        let e = env.engine().clone();
        let window = e.cfg.server.replay_window_secs * 1000;
        // What Redis keeps of a hold: its record while open, a tombstone once settled.
        let kept = |hold: String| {
            let e = e.clone();
            async move {
                let mut c = e.store.conn();
                let rec: i64 = redis::cmd("EXISTS").arg(e.store.keys.hold("acme", &hold)).query_async(&mut c).await.unwrap();
                let field = tollgate_sidecar::store::keys::tomb_field(&hold);
                let (cur, prev, _) = e.store.keys.tombs("acme", &field, e.clock.now_ms(), window);
                let mut tomb: Option<String> = redis::cmd("HGET").arg(&cur).arg(&field).query_async(&mut c).await.unwrap();
                if tomb.is_none() {
                    tomb = redis::cmd("HGET").arg(&prev).arg(&field).query_async(&mut c).await.unwrap();
                }
                (rec, tomb)
            }
        };
        let auth = |body: Value, token: &'static str| {
            let env = &env;
            async move {
                let (s, v) = post_as(env, "/v1/authorize", &body, Some(token)).await;
                assert_eq!(s, 200, "{v}");
                v
            }
        };
        let filter = json!({"api_key": key, "idempotency_key": "tg-f1", "meters": {"requests": 1}});
        let first = auth(filter.clone(), DECISION).await;
        let hold = first["hold_id"].as_str().unwrap().to_string();
        assert_eq!(kept(hold.clone()).await, (1, None), "an open hold keeps its record");
        let commit = json!({"hold_id": hold, "route": "default", "meters": {"requests": 1}});
        let (s, settled) = post_as(&env, "/v1/commit", &commit, Some(DECISION)).await;
        assert_eq!(s, 200, "{settled}");
        let (rec, tomb) = kept(hold.clone()).await;
        assert_eq!(rec, 0, "the record is gone once settled");
        let tomb = tomb.expect("a tombstone");
        assert!(tomb.starts_with("c|") && tomb.len() < 64, "{tomb}");
        // Its bucket goes by itself: one to two windows from now (an hour-long grace for
        // nothing, and no TTL at all, would each be a leak).
        let field = tollgate_sidecar::store::keys::tomb_field(&hold);
        let (bucket, _, _) = e.store.keys.tombs("acme", &field, e.clock.now_ms(), window);
        let mut c = e.store.conn();
        let pttl: i64 = redis::cmd("PTTL").arg(&bucket).query_async(&mut c).await.unwrap();
        assert!(pttl > window as i64 && pttl <= 2 * window as i64 + 1000, "{pttl}");

        // Within the window both repeats are answered from the tombstone, and change nothing.
        let before = state(&env, "acme").await;
        let again = auth(filter.clone(), DECISION).await;
        assert_eq!((again["hold_id"].clone(), again["credits"].clone()), (first["hold_id"].clone(), first["credits"].clone()), "{again}");
        let (s, re) = post_as(&env, "/v1/commit", &commit, Some(DECISION)).await;
        assert_eq!((s, re["credits"].clone(), re["status"].clone()), (200, settled["credits"].clone(), settled["status"].clone()), "{re}");
        // A different request under the same key, or a different commit, is refused.
        let (s, _) = post_as(&env, "/v1/authorize", &json!({"api_key": key, "idempotency_key": "tg-f1", "meters": {"requests": 2}}), Some(DECISION)).await;
        assert_eq!(s, 409);
        let (s, _) = post_as(&env, "/v1/commit", &json!({"hold_id": hold, "route": "default", "meters": {"requests": 3}}), Some(DECISION)).await;
        assert_eq!(s, 409);
        let (s, _) = post_as(&env, "/v1/release", &json!({"hold_id": hold}), Some(DECISION)).await;
        assert_eq!(s, 409);
        assert_eq!(state(&env, "acme").await, before);

        // Two windows later Redis keeps nothing of it; a retried commit is answered from the
        // ledger: the same settlement, nothing charged again.
        env.clock.advance_ms(2 * window + 1);
        assert_eq!(kept(hold.clone()).await, (0, None));
        let (s, late) = post_as(&env, "/v1/commit", &commit, Some(DECISION)).await;
        assert_eq!((s, late["credits"].clone(), late["status"].clone()), (200, settled["credits"].clone(), settled["status"].clone()), "{late}");
        assert_eq!(state(&env, "acme").await, before);

        // A trusted caller's key may come again any time: past the window its repeat is
        // answered from the ledger, not held again.
        let trusted = json!({"account": "acme", "idempotency_key": "s1", "meters": {"requests": 1}});
        let t1 = auth(trusted.clone(), SERVICE).await;
        let th = t1["hold_id"].as_str().unwrap().to_string();
        let (s, _) = post_as(&env, "/v1/commit", &json!({"hold_id": th, "meters": {"requests": 1}}), Some(DECISION)).await;
        assert_eq!(s, 200);
        let before = state(&env, "acme").await;
        env.clock.advance_ms(2 * window + 1);
        assert_eq!(kept(th.clone()).await, (0, None));
        let t2 = auth(trusted, SERVICE).await;
        assert_eq!(t2["hold_id"], t1["hold_id"], "{t2}");
        let (s, _) = post_as(&env, "/v1/authorize", &json!({"account": "acme", "idempotency_key": "s1", "meters": {"requests": 5}}), Some(SERVICE)).await;
        assert_eq!(s, 409, "a different request under a used key");
        assert_eq!(state(&env, "acme").await, before);
        // And a consume: the same.
        let c = json!({"account": "acme", "idempotency_key": "c1", "meters": {"requests": 1}});
        let (s, c1) = post_as(&env, "/v1/consume", &c, Some(SERVICE)).await;
        assert_eq!(s, 200, "{c1}");
        let before = state(&env, "acme").await;
        let (s, _) = post_as(&env, "/v1/consume", &c, Some(SERVICE)).await;
        assert_eq!(s, 200);
        env.clock.advance_ms(2 * window + 1);
        let (s, c3) = post_as(&env, "/v1/consume", &c, Some(SERVICE)).await;
        assert_eq!((s, c3["credits"].clone()), (200, c1["credits"].clone()), "{c3}");
        assert_eq!(state(&env, "acme").await, before);
    }

    async fn a_key_name_with_a_control_character_is_refused(backend: Backend) {
        // Found by hostile.rs's random bodies: `["\u0000"]` (a struct as a JSON array) reached
        // the ledger as a key name PostgreSQL cannot store, and answered 503.
        let env = Env::on(backend, 1).await;
        env.account("acme", "basic", "UTC").await;
        for body in [r#"["\u0000"]"#, r#"{"name":"a\u0007b"}"#] {
            let (s, v) = env.post_raw("/admin/accounts/acme/keys", body, Some(ADMIN)).await;
            assert_eq!(s, 400, "{body}: {v}");
        }
        let (s, _) = env.post_raw("/admin/accounts/acme/keys", r#"{"name":"ci key"}"#, Some(ADMIN)).await;
        assert_eq!(s, 201);
    }

    async fn keys_that_cannot_be_keys_cost_no_lookup(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        let d = &env.engine().directory;
        let lookups = || d.key_lookups.load(Relaxed);
        let start = lookups();
        // 1,000 made-up keys of the right shape, a few of the wrong one: each refused before any
        // lookup (none can carry the keyed check without the pepper).
        let mut junk: Vec<String> = (0..1000)
            .map(|i| format!("tg_{:040x}{:08x}", u128::from(i as u32) * 0x9e37_79b9_7f4a_7c15, i))
            .collect();
        junk.extend(["", "sk_live_123", "tg_", "x".repeat(256).as_str()].map(str::to_string));
        for k in &junk {
            let (s, v) = post_as(&env, "/v1/authorize",
                &json!({"api_key": k, "idempotency_key": "j", "meters": {"requests": 1}}), Some(DECISION)).await;
            assert!(s == 200 && v["status"] == 401 || s == 400, "{k}: {s} {v}");
        }
        assert_eq!(lookups() - start, 0, "made-up keys reached the ledger");
        assert!(d.keys_refused.load(Relaxed) >= 1000);
        // A real key is looked up once, then cached; a revoked-looking (unknown) real-shaped key
        // of this installation is cached as unknown.
        for i in 0..20 {
            let (_, v) = post_as(&env, "/v1/authorize",
                &json!({"api_key": key, "idempotency_key": format!("ok{i}"), "meters": {"requests": 1}}), Some(DECISION)).await;
            assert_eq!(v["allowed"], true, "{v}");
        }
        assert!(lookups() - start <= 1, "{}", lookups() - start);
    }
}

#[test]
fn a_sidecar_facing_a_network_needs_a_decision_token() {
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TOLLGATE_LISTEN", "0.0.0.0:0")
            .env("TOLLGATE_ADMIN_TOKEN", "an-admin-token-of-length")
            .env(
                "TOLLGATE_SQLITE_PATH",
                std::env::temp_dir()
                    .join(unique("tgt"))
                    .to_string_lossy()
                    .to_string(),
            )
            .env(
                "TOLLGATE_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/tollgate.toml"),
            );
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[]);
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(err.contains("server.decision_token"), "{err}");
    let out = run(&[
        ("TOLLGATE_DECISION_TOKEN", "a-decision-token-xx"),
        ("TOLLGATE_ADMIN_TOKEN", "dev-admin-token-change-me"),
    ]);
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(err.contains("server.admin_token"), "{err}");
}

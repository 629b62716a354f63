//! Decisions against real Redis and PostgreSQL: exactness under concurrency, all-or-nothing,
//! idempotency, hold lifecycle, window rollover. Each test asserts outcomes in Redis (through the
//! API) and, after sync, in the ledger.

#[macro_use]
mod common;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};

/// A plan that limits output tokens and a route that charges one credit per output token.
/// (`output_tokens` is one of the token meters every configuration has, declared or not.)
const TEXT_ROUTE: &str = r#"
[plans.text]
limits = [{ meter = "output_tokens", window = "day", max = 100000000 }]
[prices.text]
requests = 0
output_tokens = 1
"#;

/// `bytes` of English-like prose, different for each `seed`.
fn prose(bytes: usize, seed: u64) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "quota",
        "ledger",
        "counts",
        "every",
        "token",
        "exactly",
        "once,",
        "and",
        "nobody",
        "gets",
        "metered",
        "usage",
        "for",
        "free.",
        "Meanwhile",
        "a",
        "sidecar",
        "settles",
        "its",
        "holds",
        "before",
        "they",
        "expire;",
    ];
    let mut out = String::with_capacity(bytes + 16);
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while out.len() < bytes {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (x >> 33) as usize;
        out.push_str(WORDS[r % WORDS.len()]);
        // Now and then a number, now and then a line break.
        let dice = (r / WORDS.len()) % 100;
        if dice < 9 {
            out.push_str(&format!(" {}", r % 2026));
        }
        out.push(if dice >= 94 { '\n' } else { ' ' });
    }
    out.truncate(bytes);
    out
}

fn text_spend(key: &str, idem: &str) -> Value {
    json!({"api_key": key, "idempotency_key": idem, "route": "text",
           "meters": {"requests": 1, "output_tokens": 100}})
}

fn text_commit(hold: &str, text: &str) -> Value {
    json!({"hold_id": hold, "route": "text", "meters": {"requests": 1, "output_tokens": 100},
           "output_text": text})
}

conformance! {
    async fn a_thousand_concurrent_authorizes_on_two_sidecars_admit_exactly_the_limit(backend: Backend) {
        let env = Env::on(backend, 2).await;
        let key = env.account("acme", "basic", "UTC").await; // 100 requests per day
        let calls = (0..1000).map(|i| {
            let body = authorize_body(&key, &format!("req-{i}"), json!({"requests": 1}));
            let env = &env;
            async move { env.post_to(i, "/v1/authorize", &body).await }
        });
        let results = join_all(calls).await;
        let allowed = results
            .iter()
            .filter(|(s, v, _)| *s == 200 && v["allowed"] == true)
            .count();
        let denied: Vec<_> = results
            .iter()
            .filter(|(_, v, _)| v["allowed"] == false)
            .collect();
        assert_eq!(allowed, 100);
        assert_eq!(denied.len(), 900);
        assert!(denied
            .iter()
            .all(|(s, v, _)| *s == 200 && v["status"] == 429 && v["reason"] == "limit"));
        assert_eq!(denied[0].1["limit"]["name"], "account:requests:day");
        assert_eq!(denied[0].1["limit"]["remaining"], 0);
        assert_eq!(env.used("acme", "account:requests:day").await, 100);

        env.sync().await;
        let used = env
            .sql_i64(
                "SELECT CAST(sum(used) AS BIGINT) FROM usage WHERE account_id = $1",
                "acme",
            )
            .await;
        let holds = env
            .sql_i64(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'hold'",
                "acme",
            )
            .await;
        assert_eq!((used, holds), (100, 100));
    }

    async fn a_thousand_concurrent_spends_never_take_the_balance_below_zero(backend: Backend) {
        let env = Env::on(backend, 2).await;
        let key = env.account("acme", "open", "UTC").await;
        assert_eq!(env.grant("acme", "pack-1", 995, json!({})).await.0, 201);
        // route `paid`: 10 credits per request -> 99 fit in 995.
        let calls = (0..1000).map(|i| {
            let body = json!({"api_key": key, "idempotency_key": format!("r{i}"), "route": "paid", "meters": {"requests": 1}});
            let env = &env;
            async move { env.post_to(i, "/v1/authorize", &body).await }
        });
        let results = join_all(calls).await;
        let allowed = results
            .iter()
            .filter(|(_, v, _)| v["allowed"] == true)
            .count();
        assert_eq!(allowed, 99);
        assert!(results
            .iter()
            .filter(|(_, v, _)| v["allowed"] == false)
            .all(|(_, v, _)| v["status"] == 402 && v["reason"] == "credits" && v["balance"] == 5));
        assert_eq!(env.balance("acme").await, 5);
        env.sync().await;
        let rem = env
            .sql_i64(
                "SELECT CAST(sum(remaining) AS BIGINT) FROM grants WHERE account_id = $1",
                "acme",
            )
            .await;
        assert_eq!(rem, 5);
    }

    async fn a_request_short_on_one_meter_or_on_credit_charges_nothing(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await; // 10 requests, 100 tokens per day
        env.grant("acme", "g1", 1000, json!({})).await;
        let ok = json!({"api_key": key, "idempotency_key": "a", "route": "paid", "meters": {"requests": 1, "tokens": 90}});
        let (_, v) = env.post("/v1/authorize", &ok).await;
        assert_eq!(v["allowed"], true, "{v}");
        let before = (
            env.used("acme", "account:requests:day").await,
            env.balance("acme").await,
        );
        assert_eq!(before, (1, 900));

        // Tokens short (90 + 20 > 100) while requests and credit would fit.
        let short = json!({"api_key": key, "idempotency_key": "b", "route": "paid", "meters": {"requests": 1, "tokens": 20}});
        let (_, v) = env.post("/v1/authorize", &short).await;
        assert_eq!(
            (v["allowed"].clone(), v["reason"].clone()),
            (json!(false), json!("limit"))
        );
        assert_eq!(v["limit"]["name"], "account:tokens:day");
        assert_eq!(v["limit"]["remaining"], 10);
        // Credit short (needs 10 + 5 + extra 900) while both meters fit.
        let broke = json!({"api_key": key, "idempotency_key": "c", "route": "paid", "credits": 900, "meters": {"requests": 1, "tokens": 5}});
        let (_, v) = env.post("/v1/authorize", &broke).await;
        assert_eq!(
            (v["status"].clone(), v["reason"].clone()),
            (json!(402), json!("credits"))
        );
        let after = (
            env.used("acme", "account:requests:day").await,
            env.balance("acme").await,
        );
        assert_eq!(after, before);
        assert_eq!(env.used("acme", "account:tokens:day").await, 90);
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, 2); // the grant and the one hold
    }

    async fn the_same_idempotency_key_charges_once_and_answers_the_same(backend: Backend) {
        let env = Env::on(backend, 2).await;
        let key = env.account("acme", "basic", "UTC").await;
        let body = authorize_body(&key, "trace-1", json!({"requests": 1}));
        let mut answers = Vec::new();
        for i in 0..5 {
            answers.push(env.post_to(i, "/v1/authorize", &body).await);
        }
        assert!(
            answers
                .iter()
                .all(|(s, v, _)| *s == 200 && *v == answers[0].1),
            "{answers:?}"
        );
        assert_eq!(answers.iter().filter(|(_, _, replay)| *replay).count(), 4);
        assert_eq!(env.used("acme", "account:requests:day").await, 1);

        // Concurrently: one new key, five copies at once.
        let body = authorize_body(&key, "trace-2", json!({"requests": 1}));
        let answers = join_all((0..5).map(|i| {
            let (env, body) = (&env, &body);
            async move { env.post_to(i, "/v1/authorize", body).await }
        }))
        .await;
        assert!(answers
            .iter()
            .all(|(_, v, _)| *v == answers[0].1 && v["allowed"] == true));
        assert_eq!(answers.iter().filter(|(_, _, replay)| !*replay).count(), 1);
        assert_eq!(env.used("acme", "account:requests:day").await, 2);

        // Same key, different request: refused, nothing charged.
        let other = authorize_body(&key, "trace-2", json!({"requests": 3}));
        let (s, v) = env.post("/v1/authorize", &other).await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["error"]["code"], "conflict");
        assert_eq!(env.used("acme", "account:requests:day").await, 2);

        // consume: the same decision (a consume is settled at once: its repeat is answered from
        // its tombstone, which keeps the decision and its credits, not the balance of then).
        let c = json!({"account": "acme", "idempotency_key": "job-1", "meters": {"requests": 2}});
        let (a, b) = (
            env.post_to(0, "/v1/consume", &c).await,
            env.post_to(0, "/v1/consume", &c).await,
        );
        let decided = |r: &(u16, Value, bool)| (r.0, r.1["allowed"].clone(), r.1["credits"].clone(), r.1["account"].clone());
        assert_eq!(decided(&a), decided(&b), "{a:?} {b:?}");
        assert!(!a.2 && b.2, "the second is a replay");
        assert_eq!(env.used("acme", "account:requests:day").await, 4);
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, 3);
    }

    async fn holds_commit_less_or_more_resolve_once_and_expire(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await;
        env.grant("acme", "g1", 1000, json!({})).await;
        let auth = |idem: &str, tokens: u64| json!({"api_key": key, "idempotency_key": idem, "route": "paid", "meters": {"requests": 1, "tokens": tokens}});
        // Estimate 50 tokens (60 credits held); actual 20 tokens -> 30 credits.
        let (_, d) = env.post("/v1/authorize", &auth("h1", 50)).await;
        assert_eq!(
            (d["credits"].clone(), d["balance"].clone()),
            (json!(60), json!(940))
        );
        let hold = d["hold_id"].as_str().unwrap().to_string();
        assert_eq!(hold, "acme/h1");
        // No route given: priced with the route the hold was authorized on (`paid`).
        let commit = json!({"hold_id": hold, "meters": {"requests": 1, "tokens": 20}});
        let (s, c) = env.post("/v1/commit", &commit).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(
            (c["status"].clone(), c["credits"].clone()),
            (json!("committed"), json!(30))
        );
        assert_eq!(env.used("acme", "account:tokens:day").await, 20);
        assert_eq!(env.balance("acme").await, 970);
        assert_eq!(
            env.post("/v1/commit", &commit).await,
            (200, c.clone()),
            "a repeat is a replay"
        );
        let (s, v) = env.post("/v1/release", &json!({"hold_id": hold})).await;
        assert_eq!(
            (
                s,
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("committed")
            ),
            (409, true)
        );

        // Release, then a commit is refused.
        let (_, d) = env.post("/v1/authorize", &auth("h2", 30)).await;
        let hold2 = d["hold_id"].as_str().unwrap().to_string();
        assert_eq!(env.used("acme", "account:tokens:day").await, 50);
        let (s, r) = env.post("/v1/release", &json!({"hold_id": hold2})).await;
        assert_eq!(
            (s, r["status"].clone(), r["credits"].clone()),
            (200, json!("released"), json!(0))
        );
        assert_eq!(env.used("acme", "account:tokens:day").await, 20);
        assert_eq!(env.balance("acme").await, 970);
        let (s, _) = env
            .post(
                "/v1/commit",
                &json!({"hold_id": hold2, "route": "paid", "meters": {"tokens": 1}}),
            )
            .await;
        assert_eq!(s, 409);

        // Commit more than held: drawn now; the usage counter records what was used.
        let (_, d) = env.post("/v1/authorize", &auth("h3", 10)).await;
        let hold3 = d["hold_id"].as_str().unwrap().to_string();
        let (_, c) = env
            .post(
                "/v1/commit",
                &json!({"hold_id": hold3, "route": "paid", "meters": {"requests": 1, "tokens": 40}}),
            )
            .await;
        assert_eq!(c["credits"], 50);
        assert_eq!(env.balance("acme").await, 920);
        assert_eq!(env.used("acme", "account:tokens:day").await, 60);

        // Never settled: the sweeper expires it after hold_ttl (60 s) and returns everything.
        let (_, d) = env.post("/v1/authorize", &auth("h4", 30)).await;
        assert_eq!(d["allowed"], true);
        assert_eq!(env.used("acme", "account:tokens:day").await, 90);
        assert_eq!(env.engine().sweep_once().await.unwrap(), 0, "not due yet");
        env.clock.advance_ms(61_000);
        assert_eq!(env.engine().sweep_once().await.unwrap(), 1);
        assert_eq!(env.used("acme", "account:tokens:day").await, 60);
        assert_eq!(env.balance("acme").await, 920);
        let (s, _) = env
            .post(
                "/v1/commit",
                &json!({"hold_id": "acme/h4", "route": "paid", "meters": {"tokens": 1}}),
            )
            .await;
        assert_eq!(s, 409, "an expired hold cannot be committed");

        env.sync().await;
        let st = |id: &'static str| {
            let env = &env;
            async move {
                let hold = env.engine().ledger.hold("acme", id).await.unwrap();
                hold.expect("the ledger has the hold").status
            }
        };
        assert_eq!(st("acme/h1").await, "committed");
        assert_eq!(st("acme/h2").await, "released");
        assert_eq!(st("acme/h4").await, "expired");
        let rem = env
            .sql_i64(
                "SELECT CAST(sum(remaining) AS BIGINT) FROM grants WHERE account_id = $1",
                "acme",
            )
            .await;
        assert_eq!(rem, 920);
    }

    async fn a_day_limit_resets_at_local_midnight_of_the_account(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("sh", "tokens", "Asia/Shanghai").await; // 10 requests per day
                                                                      // 2026-11-22T15:59:00Z is 23:59 in Shanghai.
        env.clock.set(NOON + 3 * 3_600_000 + 59 * 60_000);
        for i in 0..10 {
            let (_, v) = env
                .post(
                    "/v1/authorize",
                    &authorize_body(&key, &format!("d1-{i}"), json!({"requests": 1})),
                )
                .await;
            assert_eq!(v["allowed"], true);
        }
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "d1-x", json!({"requests": 1})),
            )
            .await;
        assert_eq!(v["status"], 429);
        assert_eq!(v["retry_after_s"], 60);
        assert_eq!(v["limit"]["reset_ms"], NOON + 4 * 3_600_000);
        env.clock.advance_ms(60_000); // local midnight
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "d2-0", json!({"requests": 1})),
            )
            .await;
        assert_eq!(v["allowed"], true, "{v}");
        assert_eq!(v["limit"]["remaining"], 9);
        // A UTC account is still in its day.
        let utc = env.account("utc", "tokens", "UTC").await;
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&utc, "u", json!({"requests": 1})),
            )
            .await;
        assert_eq!(v["limit"]["reset_ms"], NOON + 12 * 3_600_000);
    }

    async fn key_limits_sit_below_the_account_and_disabled_keys_are_refused(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let _ = env.account("acme", "basic", "UTC").await;
        let (s, v) = env
            .admin_post(
                "/admin/accounts/acme/keys",
                &json!({"limits": [{"meter": "requests", "window": "day", "max": 500}]}),
            )
            .await;
        assert_eq!(s, 400, "{v}");
        let (s, v) = env
            .admin_post(
                "/admin/accounts/acme/keys",
                &json!({"limits": [{"meter": "requests", "window": "day", "max": 2}]}),
            )
            .await;
        assert_eq!(s, 201);
        let key = v["api_key"].as_str().unwrap().to_string();
        let key_id = v["key_id"].as_str().unwrap().to_string();
        assert!(v["masked"].as_str().unwrap().contains('…'));
        for i in 0..2 {
            let (_, v) = env
                .post(
                    "/v1/authorize",
                    &authorize_body(&key, &format!("k{i}"), json!({"requests": 1})),
                )
                .await;
            assert_eq!(v["allowed"], true);
        }
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "k2", json!({"requests": 1})),
            )
            .await;
        assert_eq!(
            (v["status"].clone(), v["limit"]["name"].clone()),
            (json!(429), json!("key:requests:day"))
        );
        let (_, u) = env
            .admin_get(&format!("/v1/accounts/acme/keys/{key_id}/usage"))
            .await;
        assert_eq!(u["limits"][0]["used"], 2);

        // The key is stored only as a hash.
        let n = env
            .sql_i64(
                "SELECT count(*) FROM api_keys WHERE masked = $1 OR length(key_hash) <> 32",
                &key,
            )
            .await;
        assert_eq!(n, 0);

        let (s, _) = env
            .admin_post(&format!("/admin/keys/{key_id}/disable"), &json!({}))
            .await;
        assert_eq!(s, 200);
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "k3", json!({"requests": 1})),
            )
            .await;
        assert_eq!(
            (v["allowed"].clone(), v["status"].clone()),
            (json!(false), json!(403))
        );
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body("tg_not_a_key_at_all_000", "k4", json!({"requests": 1})),
            )
            .await;
        assert_eq!(v["status"], 401);
    }

    async fn plan_changes_apply_on_the_next_request(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        for i in 0..5 {
            env.post(
                "/v1/authorize",
                &authorize_body(&key, &format!("p{i}"), json!({"requests": 1})),
            )
            .await;
        }
        let (s, _) = env.admin_post("/admin/accounts/acme", &json!({})).await;
        assert_eq!(s, 405, "PATCH, not POST");
        let r = env
            .http
            .patch(format!("{}/admin/accounts/acme", env.base(0)))
            .bearer_auth(ADMIN)
            .json(&json!({"plan": "tokens"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // `tokens` allows 10 requests a day: 5 used, so 5 more.
        let mut allowed = 0;
        for i in 0..10 {
            let (_, v) = env
                .post(
                    "/v1/authorize",
                    &authorize_body(&key, &format!("q{i}"), json!({"requests": 1})),
                )
                .await;
            allowed += usize::from(v["allowed"] == true);
        }
        assert_eq!(allowed, 5);

        // Disabling the account refuses its keys on the next request; enabling it restores them.
        let patch = |body: serde_json::Value| {
            env.http
                .patch(format!("{}/admin/accounts/acme", env.base(0)))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
        };
        assert_eq!(
            patch(json!({"disabled": true})).await.unwrap().status(),
            200
        );
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "off", json!({"requests": 1})),
            )
            .await;
        assert_eq!(
            (v["allowed"].clone(), v["status"].clone()),
            (json!(false), json!(403))
        );
        assert_eq!(
            patch(json!({"disabled": false, "plan": "basic"}))
                .await
                .unwrap()
                .status(),
            200
        );
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "on", json!({"requests": 1})),
            )
            .await;
        assert_eq!(v["allowed"], true);
        assert_eq!(patch(json!({"plan": "gold"})).await.unwrap().status(), 400);
    }

    async fn credit_spends_by_priority_then_expiry_and_expired_credit_is_never_spent(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let _ = env.account("acme", "open", "UTC").await;
        let hour = 3_600_000;
        env.grant("acme", "late", 100, json!({})).await;
        env.grant("acme", "soon", 100, json!({"expires_at_ms": NOON + hour}))
            .await;
        env.grant("acme", "first", 50, json!({"priority": 10}))
            .await;
        env.grant(
            "acme",
            "promo",
            100,
            json!({"priority": 0, "expires_at_ms": NOON + hour / 6}),
        )
        .await;
        let (s, v) = env
            .grant("acme", "stale", 100, json!({"expires_at_ms": NOON - 1}))
            .await;
        assert_eq!(
            (s, v["balance"].clone()),
            (201, json!(350)),
            "an already expired grant adds nothing"
        );
        let spend = |idem: &str, credits: u64| json!({"account": "acme", "idempotency_key": idem, "credits": credits});

        // Priority 0 first.
        let (_, v) = env.post("/v1/consume", &spend("c1", 30)).await;
        assert_eq!(v["balance"], 320);
        // The promo expires with 70 left: never spendable again.
        env.clock.advance_ms(hour / 6 + 1);
        assert_eq!(env.balance("acme").await, 250);
        // Then priority 10, then the grant that expires first.
        let (_, v) = env.post("/v1/consume", &spend("c2", 120)).await;
        assert_eq!(v["balance"], 130);
        let (_, v) = env.post("/v1/consume", &spend("c3", 131)).await;
        assert_eq!(
            (v["status"].clone(), v["balance"].clone()),
            (json!(402), json!(130))
        );

        env.sync().await;
        let mut grants: Vec<(String, i64, i64)> = env
            .engine()
            .ledger
            .grants_of("acme")
            .await
            .unwrap()
            .into_iter()
            .map(|g| (g.grant_id, g.remaining, g.expired))
            .collect();
        grants.sort();
        let want = [
            ("first", 0, 0),
            ("late", 100, 0),
            ("promo", 0, 70),
            ("soon", 30, 0),
            ("stale", 0, 100),
        ];
        let got: Vec<(&str, i64, i64)> = grants
            .iter()
            .map(|(i, r, x)| (i.as_str(), *r, *x))
            .collect();
        assert_eq!(got, want);
    }

    async fn commits_in_a_batch_are_settled_one_by_one(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await;
        for i in 0..3 {
            env.post(
                "/v1/authorize",
                &authorize_body(&key, &format!("b{i}"), json!({"requests": 1, "tokens": 10})),
            )
            .await;
        }
        assert_eq!(env.used("acme", "account:tokens:day").await, 30);
        let batch = json!({"commits": [
            {"hold_id": "acme/b0", "meters": {"requests": 1, "tokens": 4}},
            {"hold_id": "acme/nope", "meters": {"tokens": 1}},
            {"hold_id": "acme/b2", "meters": {"requests": 1, "tokens": 0}},
        ]});
        let (s, v) = env.post("/v1/commit/batch", &batch).await;
        assert_eq!(s, 200, "{v}");
        let r = v["results"].as_array().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0]["status"].clone(), r[0]["hold_id"].clone()),
            (json!("committed"), json!("acme/b0"))
        );
        assert_eq!(
            (r[1]["status"].clone(), r[1]["error"]["code"].clone()),
            (json!(404), json!("not_found"))
        );
        assert_eq!(r[2]["status"], "committed");
        assert_eq!(env.used("acme", "account:tokens:day").await, 14);
        // The batch is idempotent item by item.
        let (_, again) = env.post("/v1/commit/batch", &batch).await;
        assert_eq!(again, v);
        let (s, _) = env.post("/v1/commit/batch", &json!({"commits": []})).await;
        assert_eq!(s, 400);
    }

    /// The filter's authorize batch: each item is one authorize — exact against the limits
    /// however many share the batch, all or nothing, idempotent by its own key — and answered in
    /// order; a bad item fails alone with the error it would have had alone.
    async fn authorizes_in_a_batch_are_decided_one_by_one_and_exactly(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await;
        let mut items: Vec<Value> = (0..12)
            .map(|i| authorize_body(&key, &format!("ab{i}"), json!({"requests": 1, "tokens": 5})))
            .collect();
        items.insert(3, json!({"api_key": key, "idempotency_key": "bad", "meters": {"requests": 1}, "x": 1}));
        items.push(authorize_body("tg_no_such_key_000000000000", "nokey", json!({"requests": 1})));
        let (s, v) = env.post("/v1/authorize/batch", &json!({ "requests": items })).await;
        assert_eq!(s, 200, "{v}");
        let r = v["results"].as_array().unwrap();
        assert_eq!(r.len(), 14, "{v}");
        assert_eq!((r[3]["status"].clone(), r[3]["error"]["code"].clone()), (json!(400), json!("invalid_request")));
        assert!(r[3]["error"]["message"].as_str().unwrap().starts_with("requests[3]"), "{v}");
        let decided: Vec<&Value> = r.iter().filter(|o| o.get("decision").is_some()).collect();
        assert_eq!(decided.len(), 13, "{v}");
        let allowed: Vec<&Value> = decided.iter().filter(|o| o["decision"]["allowed"] == true).copied().collect();
        assert_eq!(allowed.len(), 10, "requests/day is 10: {v}");
        for o in r.iter().take(13).filter(|o| o["decision"]["allowed"] == false) {
            assert_eq!(o["decision"]["reason"], "limit", "{v}");
            assert_eq!(o["decision"]["limit"]["name"], "account:requests:day", "{v}");
        }
        assert_eq!(r[13]["decision"]["allowed"], false, "an unknown key is denied alone");
        assert_eq!(r[13]["decision"]["status"], 401, "{v}");
        assert!(allowed.iter().all(|o| o["replayed"] == false));
        assert_eq!(env.used("acme", "account:requests:day").await, 10);
        assert_eq!(env.used("acme", "account:tokens:day").await, 50);
        // Sent again (the filter retrying), admitted items replay their holds unchanged.
        // (Which ten were admitted depends on the order they ran in.)
        let admitted: Vec<&Value> = r.iter().filter(|o| o["decision"]["allowed"] == true).take(3).collect();
        let first: Vec<Value> = admitted
            .iter()
            .map(|o| {
                let idem = o["decision"]["hold_id"].as_str().unwrap().trim_start_matches("acme/");
                authorize_body(&key, idem, json!({"requests": 1, "tokens": 5}))
            })
            .collect();
        let (_, again) = env.post("/v1/authorize/batch", &json!({ "requests": first })).await;
        for (o, was) in again["results"].as_array().unwrap().iter().zip(&admitted) {
            assert_eq!(o["replayed"], true, "{again}");
            assert_eq!(o["decision"]["hold_id"], was["decision"]["hold_id"], "{again}");
        }
        assert_eq!(env.used("acme", "account:requests:day").await, 10);
        // The same key for another request in a batch is refused alone (409).
        let taken = admitted[0]["decision"]["hold_id"].as_str().unwrap().trim_start_matches("acme/");
        let other = vec![authorize_body(&key, taken, json!({"requests": 1, "tokens": 9}))];
        let (_, v) = env.post("/v1/authorize/batch", &json!({ "requests": other })).await;
        assert_eq!(v["results"][0]["status"], 409, "{v}");
        // What is not a batch, or holds no item or too many, is refused whole.
        let many: Vec<Value> = (0..257)
            .map(|i| authorize_body(&key, &format!("m{i}"), json!({"requests": 1})))
            .collect();
        for body in [json!({"requests": []}), json!({"requests": many}), json!({"requests": {}}), json!([])] {
            let (s, _) = env.post("/v1/authorize/batch", &body).await;
            assert_eq!(s, 400, "{body}");
        }
        assert_eq!(env.used("acme", "account:requests:day").await, 10);
        env.sync().await;
        assert_eq!(
            env.sql_i64("SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'hold'", "acme")
                .await,
            10
        );
    }

    /// A commit may carry the response's text (up to 1 MiB): the commit routes take bodies up to
    /// `server.max_commit_body_bytes` (8 MiB by default), every other route keeps
    /// `server.max_body_bytes` (64 KiB). The text is charged as its token count.
    async fn a_long_output_text_is_accepted_and_charged_its_token_count(backend: Backend) {
        let env = Env::build(backend, 1, TEXT_ROUTE, &redis_url(), None).await;
        let key = env.account("acme", "text", "UTC").await;
        env.grant("acme", "g1", 1_000_000_000, json!({})).await;
        for h in ["h1", "h2"] {
            let (_, v) = env.post("/v1/authorize", &text_spend(&key, h)).await;
            assert_eq!(v["allowed"], true, "{v}");
        }
        let text = prose(300_000, 1);
        let n = tollgate_sidecar::tokens::count(None, &text);
        assert!(n > 40_000, "{n}");
        let (s, v) = env.post("/v1/commit", &text_commit("acme/h1", &text)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (v["status"].clone(), v["meters"]["output_tokens"].clone(), v["credits"].clone()),
            (json!("committed"), json!(n), json!(n))
        );
        assert_eq!(env.used("acme", "account:output_tokens:day").await, n + 100);
        assert_eq!(env.balance("acme").await, 1_000_000_000 - n - 100);

        // Beyond max_commit_body_bytes: refused whole (a 400, or the connection closed while
        // the rest of the body is still being sent: the length alone refuses it), nothing settled.
        // On a client of its own: the server may close that connection mid-body, and a pooled
        // connection it closed would fail the next request of the shared client.
        let huge = text_commit("acme/h2", &"x".repeat(9 << 20));
        let sent = reqwest::Client::new()
            .post(format!("{}/v1/commit", env.base(0)))
            .bearer_auth(SERVICE)
            .json(&huge)
            .send()
            .await;
        if let Ok(r) = sent {
            assert_eq!(r.status(), 400);
        }
        assert_eq!(env.used("acme", "account:output_tokens:day").await, n + 100);
        // Other routes keep max_body_bytes.
        let mut big = text_spend(&key, "h3");
        big["resource"] = json!({"kind": "doc", "id": "x".repeat(100)});
        big["padding"] = json!("x".repeat(100_000));
        let (s, v) = env.post_raw("/v1/authorize", &big.to_string(), None).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("too large"), "{v}");
        let (s, v) = env
            .post_raw("/v1/release", &json!({"hold_id": "acme/h2", "x": "y".repeat(70_000)}).to_string(), None)
            .await;
        assert_eq!(s, 400, "{v}");
        let (s, v) = env.post("/v1/commit", &text_commit("acme/h2", "Hello world")).await;
        assert_eq!((s, v["meters"]["output_tokens"].clone()), (200, json!(2)), "{v}");
        assert_eq!(env.used("acme", "account:output_tokens:day").await, n + 2);
        env.sync().await;
        assert_eq!(
            env.sql_i64(
                "SELECT CAST(sum(credit) AS BIGINT) FROM ledger WHERE account_id = $1 AND kind = 'commit'",
                "acme"
            )
            .await,
            n as i64 + 2
        );
    }

    /// The filter batches commits up to 1 MiB of JSON: ten items of ~100 KB of text settle,
    /// each charged its own count. In a batch, an item that fails — its text over
    /// MAX_OUTPUT_TEXT, or not even a commit (unknown field, wrong type) — fails alone with its
    /// own 400 and changes nothing; the others settle.
    async fn a_batch_of_long_texts_settles_item_by_item_and_a_bad_item_fails_alone(backend: Backend) {
        let env = Env::build(backend, 1, TEXT_ROUTE, &redis_url(), None).await;
        let key = env.account("acme", "text", "UTC").await;
        env.grant("acme", "g1", 1_000_000_000, json!({})).await;
        let texts: Vec<String> = (0..10).map(|i| prose(100_000, 10 + i)).collect();
        for i in 0..10 {
            let (_, v) = env.post("/v1/authorize", &text_spend(&key, &format!("b{i}"))).await;
            assert_eq!(v["allowed"], true, "{v}");
        }
        let batch = json!({"commits": texts
            .iter()
            .enumerate()
            .map(|(i, t)| text_commit(&format!("acme/b{i}"), t))
            .collect::<Vec<_>>()});
        assert!(batch.to_string().len() > 1_000_000);
        let (s, v) = env.post("/v1/commit/batch", &batch).await;
        assert_eq!(s, 200, "{v}");
        let mut total = 0;
        for (i, t) in texts.iter().enumerate() {
            let n = tollgate_sidecar::tokens::count(None, t);
            total += n;
            let r = &v["results"][i];
            assert_eq!(
                (r["hold_id"].clone(), r["status"].clone(), r["meters"]["output_tokens"].clone()),
                (json!(format!("acme/b{i}")), json!("committed"), json!(n))
            );
        }
        assert_eq!(env.used("acme", "account:output_tokens:day").await, total);

        for h in ["g0", "g1", "g2", "g3"] {
            let (_, v) = env.post("/v1/authorize", &text_spend(&key, h)).await;
            assert_eq!(v["allowed"], true, "{v}");
        }
        let too_long = "y".repeat(tollgate_protocol::MAX_OUTPUT_TEXT + 1);
        let good = prose(5_000, 99);
        let n_good = tollgate_sidecar::tokens::count(None, &good);
        let batch = json!({"commits": [
            text_commit("acme/g0", &too_long),
            text_commit("acme/g1", &good),
            {"hold_id": "acme/g2", "meters": {"requests": 1}, "bogus": 1},
            42,
            {"hold_id": "acme/g3", "meters": {"requests": -1}},
        ]});
        let (s, v) = env.post("/v1/commit/batch", &batch).await;
        assert_eq!(s, 200, "{v}");
        let r = v["results"].as_array().unwrap();
        assert_eq!(r.len(), 5, "{v}");
        let failed = |i: usize| (r[i]["status"].clone(), r[i]["error"]["code"].clone());
        assert_eq!(failed(0), (json!(400), json!("invalid_request")), "{v}");
        assert!(r[0]["error"]["message"].as_str().unwrap().contains("output_text"), "{v}");
        assert_eq!(
            (r[1]["status"].clone(), r[1]["meters"]["output_tokens"].clone()),
            (json!("committed"), json!(n_good)),
            "{v}"
        );
        for i in [2, 3, 4] {
            assert_eq!(failed(i), (json!(400), json!("invalid_request")), "{i}: {v}");
            assert!(
                r[i]["error"]["message"].as_str().unwrap().starts_with(&format!("commits[{i}]")),
                "{v}"
            );
        }
        // The failed items' holds are untouched: still open at their estimates.
        assert_eq!(env.used("acme", "account:output_tokens:day").await, total + n_good + 300);
        for h in ["acme/g0", "acme/g2", "acme/g3"] {
            let (s, v) = env.post("/v1/commit", &text_commit(h, "Hello world")).await;
            assert_eq!((s, v["status"].clone()), (200, json!("committed")), "{h}: {v}");
        }
        assert_eq!(env.used("acme", "account:output_tokens:day").await, total + n_good + 6);
        // What is not a batch at all is refused whole.
        for body in [json!({"commits": {"hold_id": "acme/g1"}}), json!({"commits": [], "x": 1}), json!([1])] {
            let (s, v) = env.post("/v1/commit/batch", &body).await;
            assert_eq!(s, 400, "{body}: {v}");
        }
    }
}

/// The scripts are one Redis Functions library, loaded at connect. A Redis that lost it (an
/// operator's `FUNCTION FLUSH`, a restart without persistence) answers "Function not found";
/// the sidecar loads it again and the decision goes through, still exact.
#[tokio::test]
async fn a_redis_that_lost_the_library_gets_it_again_and_decides_exactly() {
    let redis = PrivateRedis::start().await;
    let url = redis.url.clone();
    let env = Env::build(Backend::RedisPostgres, 1, "", &url, Some(redis)).await;
    let key = env.account("acme", "basic", "UTC").await;
    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let libraries = |c: &mut redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            let list: redis::Value = redis::cmd("FUNCTION")
                .arg("LIST")
                .query_async(&mut c)
                .await
                .unwrap();
            match list {
                redis::Value::Array(libs) => libs.len(),
                _ => 0,
            }
        }
    };
    assert_eq!(libraries(&mut c).await, 1, "loaded at connect");
    for (n, idem) in ["lib-1", "lib-2", "lib-3"].iter().enumerate() {
        if n > 0 {
            let _: () = redis::cmd("FUNCTION")
                .arg("FLUSH")
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(libraries(&mut c).await, 0);
        }
        // Five at once: each finds the library missing or loaded; all are decided once.
        let body = authorize_body(&key, idem, json!({"requests": 1}));
        let answers = join_all((0..5).map(|_| env.post("/v1/authorize", &body))).await;
        assert!(
            answers
                .iter()
                .all(|(s, v)| *s == 200 && v["allowed"] == true),
            "{answers:?}"
        );
        assert_eq!(env.used("acme", "account:requests:day").await, n as u64 + 1);
        assert_eq!(libraries(&mut c).await, 1, "loaded again");
    }
    env.sync().await;
    assert_eq!(env.ledger_rows("acme").await, 3);
}

//! Limits that do more than refuse: concurrency limits (requests in flight), sliding windows,
//! soft limits (pass, report and alert the overage) and shadow limits (pass, name the limit that
//! would have refused). Every test runs on every store (Redis + PostgreSQL, Redis Cluster, embedded).

#[macro_use]
mod common;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};

const PLANS: &str = r#"
[plans.conc]
limits = [
  { meter = "requests", window = "concurrent", max = 10 },
  { meter = "requests", window = "day", max = 1000 },
]
[plans.soft]
limits = [{ meter = "requests", window = "day", max = 5, mode = "soft" }]
[plans.shadow]
limits = [
  { meter = "requests", window = "minute", max = 3, mode = "shadow" },
  { meter = "requests", window = "day", max = 100 },
]
"#;

const SLIDING: &str = r#"
[plans.sliding]
limits = [{ meter = "requests", window = "sliding_minute", max = 5 }]
[plans.sixty]
limits = [{ meter = "requests", window = "sliding_minute", max = 60 }]
[plans.slidetok]
limits = [{ meter = "tokens", window = "sliding_hour", max = 20 }]
"#;

async fn env(backend: Backend, instances: usize) -> Env {
    Env::build(backend, instances, PLANS, &redis_url(), None).await
}

fn allowed(r: &(u16, Value, bool)) -> bool {
    r.0 == 200 && r.1["allowed"] == true
}

conformance! {
    async fn a_concurrency_limit_holds_at_most_max_in_flight_and_frees_at_settle(backend: Backend) {
        let env = env(backend, 2).await;
        let key = env.account("acme", "conc", "UTC").await;
        // Fifty at once on two sidecars: exactly ten in flight.
        let answers = join_all((0..50).map(|i| {
            let body = authorize_body(&key, &format!("c-{i}"), json!({"requests": 1}));
            let env = &env;
            async move { env.post_to(i % 2, "/v1/authorize", &body).await }
        }))
        .await;
        let held: Vec<String> = answers
            .iter()
            .filter(|r| allowed(r))
            .map(|r| r.1["hold_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(held.len(), 10, "{answers:?}");
        for r in answers.iter().filter(|r| !allowed(r)) {
            assert_eq!(r.0, 200, "a decision, not an error: {r:?}");
            assert_eq!(r.1["status"], 429, "{r:?}");
            assert_eq!(r.1["limit"]["name"], "account:requests:concurrent", "{r:?}");
            assert_eq!(r.1["retry_after_s"], 1, "{r:?}");
        }
        assert_eq!(env.used("acme", "account:requests:concurrent").await, 10);
        assert_eq!(env.used("acme", "account:requests:day").await, 10);

        // Three commits and two releases give five places back, whatever was committed.
        for h in &held[..3] {
            let (s, v) = env.post("/v1/commit", &json!({"hold_id": h, "meters": {"requests": 1}})).await;
            assert_eq!(s, 200, "{v}");
        }
        for h in &held[3..5] {
            let (s, v) = env.post("/v1/release", &json!({"hold_id": h})).await;
            assert_eq!(s, 200, "{v}");
        }
        assert_eq!(env.used("acme", "account:requests:concurrent").await, 5);
        // The day counts what was committed: three.
        assert_eq!(env.used("acme", "account:requests:day").await, 8);
        let more = join_all((0..8).map(|i| {
            let body = authorize_body(&key, &format!("d-{i}"), json!({"requests": 1}));
            let env = &env;
            async move { env.post_to(i % 2, "/v1/authorize", &body).await }
        }))
        .await;
        assert_eq!(more.iter().filter(|r| allowed(r)).count(), 5, "{more:?}");
        assert_eq!(env.used("acme", "account:requests:concurrent").await, 10);

        // A consume is never in flight: the concurrency limit does not apply to it.
        let c = json!({"account": "acme", "idempotency_key": "job-1", "meters": {"requests": 1}});
        let (s, v, _) = env.post_to(0, "/v1/consume", &c).await;
        assert_eq!((s, v["allowed"].clone()), (200, json!(true)), "{v}");
        assert_eq!(env.used("acme", "account:requests:concurrent").await, 10);

        // The ledger agrees: its usage row of the concurrency counter is what is in flight.
        env.sync().await;
        let in_flight = env
            .sql_i64(
                "SELECT COALESCE(MAX(used), 0) FROM usage WHERE account_id = $1 AND period = 'c'",
                "acme",
            )
            .await;
        assert_eq!(in_flight, 10);
    }

    async fn a_soft_limit_passes_and_reports_and_alerts_its_overage(backend: Backend) {
        let env = env(backend, 1).await;
        let key = env.account("acme", "soft", "UTC").await;
        let mut overs = Vec::new();
        for i in 0..8 {
            let body = authorize_body(&key, &format!("s-{i}"), json!({"requests": 1}));
            let r = env.post_to(0, "/v1/authorize", &body).await;
            assert!(allowed(&r), "a soft limit never refuses: {r:?}");
            overs.push(r.1["over"].clone());
        }
        assert_eq!(overs[4], Value::Null, "at the max, not over it");
        for (i, by) in [(5, 1), (6, 2), (7, 3)] {
            assert_eq!(overs[i], json!([{"limit": "account:requests:day", "by": by}]), "{overs:?}");
        }
        let (s, usage) = env.admin_get("/v1/accounts/acme/usage").await;
        assert_eq!(s, 200);
        let line = &usage["limits"][0];
        assert_eq!((line["used"].clone(), line["max"].clone()), (json!(8), json!(5)), "{usage}");
        assert_eq!((line["mode"].clone(), line["over"].clone()), (json!("soft"), json!(3)), "{usage}");
        // Raised once at each level, the 100 % one with what was used when it was raised.
        let mut alerts = Value::Null;
        for _ in 0..50 {
            let (_, a) = env.admin_get("/admin/accounts/acme/alerts").await;
            if a["alerts"].as_array().is_some_and(|l| l.iter().any(|x| x["level"] == 100)) {
                alerts = a;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let list = alerts["alerts"].as_array().unwrap_or_else(|| panic!("no alerts: {alerts}"));
        let full: Vec<&Value> = list.iter().filter(|a| a["level"] == 100).collect();
        assert_eq!(full.len(), 1, "{alerts}");
        assert_eq!(full[0]["name"], "account:requests:day");
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, 8);
        // The ledger keeps each request's decision, its overage with it.
        let recorded = env
            .sql_i64(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND CAST(result AS TEXT) LIKE '%\"over\"%'",
                "acme",
            )
            .await;
        assert_eq!(recorded, 3);
    }

    async fn a_shadow_limit_passes_names_itself_and_counts_as_if_enforced(backend: Backend) {
        let env = env(backend, 1).await;
        let key = env.account("acme", "shadow", "UTC").await;
        let mut shadows = Vec::new();
        for i in 0..6 {
            let body = authorize_body(&key, &format!("h-{i}"), json!({"requests": 1}));
            let r = env.post_to(0, "/v1/authorize", &body).await;
            assert!(allowed(&r), "a shadow limit never refuses: {r:?}");
            shadows.push(r.1["shadow"].clone());
        }
        // The tests' clock stands still (noon): all six are in one minute.
        assert!(shadows[..3].iter().all(|s| *s == Value::Null), "{shadows:?}");
        assert!(shadows[3..].iter().all(|s| *s == json!(["account:requests:minute"])), "{shadows:?}");
        // Counted as enforcement would have: the shadow minute stops at its max, the day counts all.
        assert_eq!(env.used("acme", "account:requests:day").await, 6);
        assert_eq!(env.used("acme", "account:requests:minute").await, 3);
        // A check reports it too, and changes nothing.
        let check = authorize_body(&key, "h-check", json!({"requests": 1}));
        let (s, v, _) = env.post_to(0, "/v1/check", &check).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["allowed"], true);
        assert_eq!(env.used("acme", "account:requests:day").await, 6);
        let (_, usage) = env.admin_get("/v1/accounts/acme/usage").await;
        let minute = usage["limits"].as_array().unwrap().iter().find(|l| l["name"] == "account:requests:minute").cloned();
        assert_eq!(minute.map(|m| m["mode"].clone()), Some(json!("shadow")), "{usage}");
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, 6);
    }

    async fn a_sliding_minute_holds_across_the_calendar_minute_and_frees_a_minute_after(backend: Backend) {
        let env = Env::build(backend, 1, SLIDING, &redis_url(), None).await;
        let key = env.account("acme", "sliding", "UTC").await;
        let auth = |i: &str| authorize_body(&key, i, json!({"requests": 1}));
        // Five at 12:00:59: the sixth is refused, to retry when the first five leave (60 s).
        env.clock.set(NOON + 59_000);
        for i in 0..5 {
            let (s, v, _) = env.post_to(0, "/v1/authorize", &auth(&format!("a{i}"))).await;
            assert_eq!((s, v["allowed"].clone()), (200, json!(true)), "{v}");
        }
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("a5")).await;
        assert_eq!(v["allowed"], false, "{v}");
        assert_eq!(v["limit"]["name"], "account:requests:sliding_minute");
        assert_eq!(v["retry_after_s"], 60, "{v}");
        // 12:01:00.5: a calendar minute would start again; the sliding one does not.
        env.clock.set(NOON + 60_500);
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("b0")).await;
        assert_eq!(v["allowed"], false, "{v}");
        assert_eq!(v["retry_after_s"], 59, "{v}");
        // A check (read-only) sees the same.
        let (s, v, _) = env.post_to(0, "/v1/check", &auth("b1")).await;
        assert_eq!((s, v["allowed"].clone()), (200, json!(false)), "{v}");
        assert_eq!(env.used("acme", "account:requests:sliding_minute").await, 5);
        // 12:01:59: the first five are a minute old and out; five more fit, not six.
        env.clock.set(NOON + 119_000);
        assert_eq!(env.used("acme", "account:requests:sliding_minute").await, 0);
        let (s, v, _) = env.post_to(0, "/v1/check", &auth("c-check")).await;
        assert_eq!((s, v["allowed"].clone()), (200, json!(true)), "{v}");
        for i in 0..5 {
            let (_, v, _) = env.post_to(0, "/v1/authorize", &auth(&format!("c{i}"))).await;
            assert_eq!(v["allowed"], true, "{v}");
        }
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("c5")).await;
        assert_eq!(v["allowed"], false, "{v}");
        // A consume counts too (it is charged now).
        env.clock.set(NOON + 179_000);
        let c = json!({"account": "acme", "idempotency_key": "job-1", "meters": {"requests": 5}});
        let (_, v, _) = env.post_to(0, "/v1/consume", &c).await;
        assert_eq!(v["allowed"], true, "{v}");
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("d0")).await;
        assert_eq!(v["allowed"], false, "{v}");
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, 11);
    }

    async fn a_sliding_window_settles_to_the_actual_amount_while_the_charge_is_in_it(backend: Backend) {
        let env = Env::build(backend, 1, SLIDING, &redis_url(), None).await;
        let key = env.account("acme", "slidetok", "UTC").await;
        let auth = |i: &str, t: u64| authorize_body(&key, i, json!({"tokens": t}));
        let (_, a, _) = env.post_to(0, "/v1/authorize", &auth("t1", 10)).await;
        let (_, b, _) = env.post_to(0, "/v1/authorize", &auth("t2", 10)).await;
        assert_eq!((a["allowed"].clone(), b["allowed"].clone()), (json!(true), json!(true)));
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("t3", 1)).await;
        assert_eq!(v["allowed"], false, "{v}");
        // The first used 3 of its 10; the second is released: 3 in the window.
        let (s, v) = env.post("/v1/commit", &json!({"hold_id": a["hold_id"], "meters": {"tokens": 3}})).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = env.post("/v1/release", &json!({"hold_id": b["hold_id"]})).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(env.used("acme", "account:tokens:sliding_hour").await, 3);
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("t4", 17)).await;
        assert_eq!(v["allowed"], true, "{v}");
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("t5", 1)).await;
        assert_eq!(v["allowed"], false, "{v}");
        // An hour later everything has left.
        env.clock.advance_ms(3_600_000);
        assert_eq!(env.used("acme", "account:tokens:sliding_hour").await, 0);
        let (_, v, _) = env.post_to(0, "/v1/authorize", &auth("t6", 20)).await;
        assert_eq!(v["allowed"], true, "{v}");
    }

    /// 60 a minute, sliding: requests arrive twenty at a time at 40 instants over three minutes
    /// (on two sidecars); in every 60 s span at most 60 are admitted.
    async fn sixty_a_sliding_minute_admit_at_most_sixty_in_any_sixty_seconds(backend: Backend) {
        let env = Env::build(backend, 2, SLIDING, &redis_url(), None).await;
        let key = env.account("acme", "sixty", "UTC").await;
        let mut at = NOON + 30_000;
        let mut admitted: Vec<u64> = Vec::new();
        let mut seed = 7u64;
        for step in 0..40 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            at += 1_000 + (seed >> 33) % 8_000;
            env.clock.set(at);
            let answers = join_all((0..20).map(|i| {
                let body = authorize_body(&key, &format!("s{step}-{i}"), json!({"requests": 1}));
                let env = &env;
                async move { env.post_to(i % 2, "/v1/authorize", &body).await }
            }))
            .await;
            for r in &answers {
                assert_eq!(r.0, 200, "{r:?}");
                if r.1["allowed"] == true {
                    admitted.push(at);
                }
            }
        }
        let mut worst = 0;
        for &t in &admitted {
            let span = admitted.iter().filter(|&&a| a > t.saturating_sub(60_000) && a <= t).count();
            worst = worst.max(span);
        }
        assert!(worst <= 60, "{worst} admitted within 60 s");
        assert!(admitted.len() >= 120, "only {} admitted over {} s", admitted.len(), (at - NOON) / 1000);
    }
}

//! The ledger side: Redis state lost and rebuilt from remaining amounts, Redis and PostgreSQL in
//! exact agreement after a burst, and bad input that changes nothing.

#[macro_use]
mod common;

use common::*;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use tollgate_protocol::{CommitRequest, GrantRequest, SpendRequest};

conformance! {
    /// Regression for the "re-seeded from total quota" bug (seed note 003): after Redis loses
    /// everything, the next decisions must see what is *left*, not a fresh quota, and requests that
    /// were already charged must not be charged again.
    async fn after_flushall_decisions_use_the_remaining_amounts_from_the_ledger(backend: Backend) {
        let env = Env::isolated(backend, 1).await;
        let key = env.account("acme", "monthly", "UTC").await; // 1000 tokens a month
        env.grant("acme", "g1", 500, json!({})).await;
        let spend = |idem: &str, tokens: u64| json!({"api_key": key, "idempotency_key": idem, "route": "paid", "meters": {"tokens": tokens}});
        // 600 tokens cost 600 credits: more than the 500 granted.
        let (_, a) = env.post("/v1/authorize", &spend("r1", 600)).await;
        assert_eq!(
            (a["allowed"].clone(), a["status"].clone()),
            (json!(false), json!(402))
        );
        let (_, a) = env.post("/v1/consume", &spend("r1", 300)).await;
        assert_eq!(
            (a["allowed"].clone(), a["balance"].clone()),
            (json!(true), json!(200))
        );
        let (_, held) = env.post("/v1/authorize", &spend("r2", 100)).await;
        assert_eq!(held["balance"], 100);
        env.sync().await;
        let rows_before = env.ledger_rows("acme").await;

        env.flushall().await;

        // The same request ids again: answered from the ledger, charged nothing.
        let (_, again) = env.post("/v1/consume", &spend("r1", 300)).await;
        assert_eq!(again, a);
        let (s, again, replay) = env.post_to(0, "/v1/authorize", &spend("r2", 100)).await;
        assert_eq!((s, replay), (200, true));
        assert_eq!(again, held);
        // 400 of 1000 tokens used (300 consumed + 100 held): 700 more must be refused, 600 allowed.
        assert_eq!(env.used("acme", "account:tokens:month").await, 400);
        assert_eq!(env.balance("acme").await, 100);
        let (_, v) = env
            .post(
                "/v1/authorize",
                &json!({"api_key": key, "idempotency_key": "r3", "meters": {"tokens": 700}}),
            )
            .await;
        assert_eq!(
            (v["status"].clone(), v["limit"]["remaining"].clone()),
            (json!(429), json!(600))
        );
        // The open hold came back too and can be committed.
        let (s, c) = env
            .post(
                "/v1/commit",
                &json!({"hold_id": "acme/r2", "route": "paid", "meters": {"tokens": 50}}),
            )
            .await;
        assert_eq!((s, c["credits"].clone()), (200, json!(50)));
        assert_eq!(env.balance("acme").await, 150);
        assert_eq!(env.used("acme", "account:tokens:month").await, 350);
        env.sync().await;
        assert_eq!(
            env.ledger_rows("acme").await,
            rows_before + 1,
            "only the commit is new"
        );
        let used = env
            .sql_i64(
                "SELECT CAST(sum(used) AS BIGINT) FROM usage WHERE account_id = $1",
                "acme",
            )
            .await;
        assert_eq!(used, 350);
    }

    /// Concurrent cold loads of one account load it once.
    async fn concurrent_loaders_do_not_double_load(backend: Backend) {
        let env = Env::isolated(backend, 2).await;
        let key = env.account("acme", "basic", "UTC").await;
        for i in 0..30 {
            env.post(
                "/v1/authorize",
                &authorize_body(&key, &format!("a{i}"), json!({"requests": 1})),
            )
            .await;
        }
        env.sync().await;
        env.flushall().await;
        let calls = (0..40).map(|i| {
            let body = authorize_body(&key, &format!("b{i}"), json!({"requests": 1}));
            let env = &env;
            async move { env.post_to(i, "/v1/authorize", &body).await }
        });
        let results = futures::future::join_all(calls).await;
        assert!(results
            .iter()
            .all(|(s, v, _)| *s == 200 && v["allowed"] == true));
        assert_eq!(env.used("acme", "account:requests:day").await, 70);
    }

    /// 10,000 mixed operations from many tasks on two sidecars, then Redis and PostgreSQL compared
    /// for every account: counters, grant remainders and open holds must be equal.
    async fn after_a_burst_of_mixed_operations_the_ledger_equals_redis(backend: Backend) {
        let mut env = Env::on(backend, 1).await;
        env.add_sidecar().await;
        let accounts: Vec<String> = (0..12).map(|i| format!("acct{i}")).collect();
        for (i, a) in accounts.iter().enumerate() {
            let plan = ["tokens", "monthly", "basic"][i % 3];
            env.account(a, plan, ["UTC", "Asia/Shanghai", "America/New_York"][i % 3])
                .await;
            env.grant(a, "start", 20_000, json!({})).await;
        }
        let engines: Vec<_> = env.sidecars.iter().map(|s| s.engine.clone()).collect();
        let accounts = Arc::new(accounts);
        let tasks = 16;
        let per_task = 10_000 / tasks;
        let mut handles = Vec::new();
        for t in 0..tasks {
            let engine = engines[t % engines.len()].clone();
            let accounts = accounts.clone();
            handles.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let mut open: Vec<String> = Vec::new();
                let mut ops = 0;
                for i in 0..per_task {
                    let acct = accounts[rng.random_range(0..accounts.len())].clone();
                    let spend = SpendRequest {
                        account: Some(acct.clone()),
                        idempotency_key: format!("t{t}-{i}"),
                        route: if rng.random_bool(0.5) {
                            "paid".into()
                        } else {
                            "default".into()
                        },
                        meters: [
                            ("requests".to_string(), 1),
                            ("tokens".to_string(), rng.random_range(0..20)),
                        ]
                        .into_iter()
                        .collect(),
                        ..Default::default()
                    };
                    match rng.random_range(0..10) {
                        0..=3 => {
                            let (d, _) = engine.authorize(spend).await.expect("authorize");
                            if let Some(h) = d.hold_id {
                                open.push(h);
                            }
                        }
                        4..=5 if !open.is_empty() => {
                            let hold_id = open.swap_remove(rng.random_range(0..open.len()));
                            let c = CommitRequest {
                                hold_id,
                                // Priced with the hold's own route (a commit may not name another).
                                route: None,
                                meters: [("tokens".to_string(), rng.random_range(0..40))]
                                    .into_iter()
                                    .collect(),
                                ..Default::default()
                            };
                            engine.commit(c).await.expect("commit");
                        }
                        6 if !open.is_empty() => {
                            let hold_id = open.swap_remove(rng.random_range(0..open.len()));
                            engine.release(&hold_id).await.expect("release");
                        }
                        7 => {
                            let g = GrantRequest {
                                grant_id: format!("g{t}-{i}"),
                                amount: rng.random_range(1..500),
                                priority: rng.random_range(0..3),
                                expires_at_ms: None,
                                source: "promotion".into(),
                            };
                            engine.grant(&acct, g).await.expect("grant");
                        }
                        _ => {
                            engine.consume(spend).await.expect("consume");
                        }
                    }
                    ops += 1;
                }
                ops
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        assert_eq!(total, per_task * tasks);
        env.sync().await;

        let e = env.engine();
        let mut conn = e.store.conn();
        let mut compared = 0;
        for a in accounts.iter() {
            let usage = e.ledger.usage_of(a).await.unwrap();
            assert!(!usage.is_empty());
            for (scope, meter, period, used, _) in usage {
                let r: Option<i64> = conn
                    .get(e.store.keys.counter(a, &scope, &meter, &period))
                    .await
                    .unwrap();
                assert_eq!(r.unwrap_or(0), used, "{a} {scope} {meter} {period}");
                compared += 1;
            }
            let grants: Vec<(String, i64)> = e
                .ledger
                .grants_of(a)
                .await
                .unwrap()
                .into_iter()
                .map(|g| (g.grant_id, g.remaining))
                .collect();
            let in_redis: BTreeMap<String, i64> =
                conn.hgetall(e.store.keys.grant_remaining(a)).await.unwrap();
            for (gid, rem) in &grants {
                assert_eq!(
                    in_redis.get(gid).copied().unwrap_or(0),
                    *rem,
                    "{a} grant {gid}"
                );
                compared += 1;
            }
            assert_eq!(
                in_redis.values().filter(|v| **v > 0).count(),
                grants.iter().filter(|g| g.1 > 0).count()
            );
            let open_pg = env
                .sql_i64(
                    "SELECT count(*) FROM holds WHERE account_id = $1 AND status = 'open'",
                    a,
                )
                .await;
            let open_redis: Vec<String> = conn
                .zrange(e.store.keys.holds(e.store.keys.shard_of(a)), 0, -1)
                .await
                .unwrap();
            let open_redis = open_redis
                .iter()
                .filter(|h| h.starts_with(&format!("{a}/")))
                .count() as i64;
            assert_eq!(open_pg, open_redis, "{a} open holds");
            // Conservation: granted = remaining + net spent, per the ledger.
            let granted = env
                .sql_i64(
                    "SELECT CAST(sum(amount) AS BIGINT) FROM grants WHERE account_id = $1",
                    a,
                )
                .await;
            let remaining = env
                .sql_i64(
                    "SELECT CAST(sum(remaining) AS BIGINT) FROM grants WHERE account_id = $1",
                    a,
                )
                .await;
            let spent = env
                .sql_i64(
                    "SELECT CAST(COALESCE(sum(credit) FILTER (WHERE kind IN ('consume', 'commit')), 0)
                     + COALESCE((SELECT sum(credit) FROM holds WHERE account_id = $1 AND status = 'open'), 0)
                     AS BIGINT) FROM ledger WHERE account_id = $1",
                    a,
                )
                .await;
            assert_eq!(granted, remaining + spent, "{a}: conservation");
            assert_eq!(e.balance(a).await.unwrap() as i64, remaining);
        }
        println!(
            "compared {compared} counters and grants over {} accounts after {total} operations",
            accounts.len()
        );
        assert!(compared > 100);
    }

    async fn bad_input_gets_a_clear_4xx_and_changes_nothing(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await;
        env.grant("acme", "g1", 100, json!({})).await;
        let (_, v) = env
            .post(
                "/v1/authorize",
                &authorize_body(&key, "ok", json!({"requests": 1})),
            )
            .await;
        assert_eq!(v["allowed"], true);
        env.sync().await;
        let rows = env.ledger_rows("acme").await;

        let cases: Vec<(&str, String, Option<&str>, u16)> = vec![
            ("/v1/authorize", "{not json".into(), None, 400),
            (
                "/v1/authorize",
                format!(r#"{{"api_key":"{key}","idempotency_key":"n","meters":{{"requests":-1}}}}"#),
                None,
                400,
            ),
            (
                "/v1/authorize",
                format!(
                    r#"{{"api_key":"{key}","idempotency_key":"n","meters":{{"requests":18446744073709551616}}}}"#
                ),
                None,
                400,
            ),
            (
                "/v1/authorize",
                format!(
                    r#"{{"api_key":"{key}","idempotency_key":"n","meters":{{"requests":1000000000001}}}}"#
                ),
                None,
                400,
            ),
            (
                "/v1/authorize",
                format!(r#"{{"api_key":"{key}","idempotency_key":"n","meters":{{"requestz":1}}}}"#),
                None,
                400,
            ),
            (
                "/v1/authorize",
                format!(
                    r#"{{"api_key":"{key}","idempotency_key":"has space","meters":{{"requests":1}}}}"#
                ),
                None,
                400,
            ),
            (
                "/v1/authorize",
                format!(r#"{{"api_key":"{key}","meters":{{"requests":1}}}}"#),
                None,
                400,
            ),
            (
                "/v1/authorize",
                format!(
                    r#"{{"api_key":"{key}","idempotency_key":"n","route":"nope","meters":{{"requests":1}}}}"#
                ),
                None,
                200,
            ),
            (
                "/v1/consume",
                r#"{"account":"ghost","idempotency_key":"n","meters":{"requests":1}}"#.into(),
                None,
                404,
            ),
            (
                "/v1/commit",
                r#"{"hold_id":"acme/never","meters":{"tokens":1}}"#.into(),
                None,
                404,
            ),
            (
                "/v1/commit",
                r#"{"hold_id":"ghost/x","meters":{"tokens":1}}"#.into(),
                None,
                404,
            ),
            (
                "/v1/commit",
                r#"{"hold_id":"nohold","meters":{"tokens":1}}"#.into(),
                None,
                400,
            ),
            (
                "/v1/release",
                r#"{"hold_id":"acme/ok","extra":1}"#.into(),
                None,
                400,
            ),
            (
                "/admin/accounts",
                r#"{"id":"x","plan":"basic"}"#.into(),
                Some("wrong-token"),
                401,
            ),
            (
                "/admin/accounts",
                r#"{"id":"x","plan":"basic"}"#.into(),
                None,
                401,
            ),
            (
                "/admin/accounts",
                r#"{"id":"x","plan":"gold"}"#.into(),
                Some(ADMIN),
                400,
            ),
            (
                "/admin/accounts",
                r#"{"id":"x","plan":"basic","timezone":"Mars/Base"}"#.into(),
                Some(ADMIN),
                400,
            ),
            (
                "/admin/accounts/acme/grants",
                r#"{"grant_id":"g2","amount":-5}"#.into(),
                Some(ADMIN),
                400,
            ),
            (
                "/admin/accounts/acme/grants",
                r#"{"grant_id":"g2","amount":0}"#.into(),
                Some(ADMIN),
                400,
            ),
            (
                "/admin/accounts/acme/grants",
                r#"{"grant_id":"g1","amount":7}"#.into(),
                Some(ADMIN),
                409,
            ),
            (
                "/admin/accounts/ghost/grants",
                r#"{"grant_id":"g2","amount":5}"#.into(),
                Some(ADMIN),
                404,
            ),
        ];
        for (path, body, token, want) in cases {
            let (s, v) = env.post_raw(path, &body, token).await;
            if want == 200 {
                // `prices` declares `default`, so an unknown route falls back to it: a real decision.
                assert_eq!(s, 200, "{path} {body}: {v}");
                continue;
            }
            assert_eq!(s, want, "{path} {body}: {v}");
            assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "{v}"
            );
            assert!(
                !v.to_string().contains(&key),
                "the key leaks into an error: {v}"
            );
        }
        let big = "x".repeat(70_000);
        let (s, _) = env.post_raw("/v1/authorize", &big, None).await;
        assert_eq!(s, 400);

        // Nothing changed but the one allowed fallback-route request.
        assert_eq!(env.used("acme", "account:requests:day").await, 2);
        assert_eq!(env.balance("acme").await, 100);
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, rows + 1);
        let accounts = env
            .sql_i64("SELECT count(*) FROM accounts WHERE id <> $1", "acme")
            .await;
        assert_eq!(accounts, 0);
    }

    async fn health_readiness_metrics_and_ledger_history(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let key = env.account("acme", "basic", "UTC").await;
        for i in 0..5 {
            env.post(
                "/v1/authorize",
                &authorize_body(&key, &format!("m{i}"), json!({"requests": 1})),
            )
            .await;
        }
        env.post(
            "/v1/authorize",
            &authorize_body(&key, "m0", json!({"requests": 1})),
        )
        .await;
        env.sync().await;
        let get = |p: &'static str| {
            let env = &env;
            async move {
                env.http
                    .get(format!("{}{p}", env.base(0)))
                    .send()
                    .await
                    .unwrap()
            }
        };
        assert_eq!(get("/healthz").await.status(), 200);
        // Ready once Redis and the ledger answer and the tokenizers are built (at start, on the
        // blocking pool: 503 with `"tokenizers": "loading"` until then).
        let mut ready = Value::Null;
        for _ in 0..200 {
            let r = get("/readyz").await;
            let status = r.status();
            ready = r.json().await.unwrap();
            if status == 200 {
                break;
            }
            assert_eq!((status, &ready["tokenizers"]), (reqwest::StatusCode::SERVICE_UNAVAILABLE, &json!("loading")), "{ready}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!((&ready["tokenizers"], &ready["mode"]), (&json!("ok"), &json!("normal")), "{ready}");
        let m = get("/metrics").await.text().await.unwrap();
        assert!(
            m.contains("tollgate_decisions_total{result=\"allowed\"} 5"),
            "{m}"
        );
        assert!(m.contains("tollgate_idempotent_replays_total 1"));
        assert!(m.contains("tollgate_sync_events_total 5"));
        let (s, page) = env.admin_get("/v1/accounts/acme/ledger?limit=3").await;
        assert_eq!(s, 200);
        assert_eq!(page["entries"].as_array().unwrap().len(), 3);
        let next = page["next"].as_i64().unwrap();
        let (_, page2) = env
            .admin_get(&format!("/v1/accounts/acme/ledger?limit=3&after={next}"))
            .await;
        assert_eq!(page2["entries"].as_array().unwrap().len(), 2);
        assert!(page2["next"].is_null());
        assert_eq!(page2["entries"][1]["idempotency_key"], "m4");
        let (s, _) = env.admin_get("/v1/accounts/acme/ledger?limit=0").await;
        assert_eq!(s, 400);
    }

    /// A writer outside the sync worker's locks (alerts, accounts, keys are single statements)
    /// commits while sync passes run: no pass fails. Regression: on SQLite a pass that read its
    /// cursor before its first write failed at once with "database is locked" when another
    /// connection committed in between (CI saw it twice).
    async fn a_concurrent_writer_never_fails_a_sync_pass(backend: Backend) {
        let env = Env::on(backend, 1).await;
        let _ = env.account("acme", "monthly", "UTC").await;
        env.sync().await;
        let rows_before = env.ledger_rows("acme").await;
        let ledger = env.engine().ledger.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let row = tollgate_sidecar::ledger::billing::AlertRow {
                        account_id: "acme".into(),
                        scope: "account".into(),
                        meter: "tokens".into(),
                        period: format!("p{n}"),
                        level: 80,
                        name: "w".into(),
                        used: n,
                        max: 100,
                        at_ms: n,
                        delivered_at_ms: None,
                        attempts: 0,
                        last_error: None,
                    };
                    ledger.insert_alert(&row).await.expect("the other writer");
                    n += 1;
                }
                n
            })
        };
        let e = env.engine();
        for i in 0..150 {
            let (s, v) = env
                .post(
                    "/v1/consume",
                    &json!({"account": "acme", "idempotency_key": format!("w{i}"), "meters": {"tokens": 1}}),
                )
                .await;
            assert_eq!(s, 200, "{v}");
            e.sync.sync_all().await.expect("a sync pass beside another writer");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.await.unwrap();
        assert!(written > 0, "the other writer ran");
        env.sync().await;
        assert_eq!(env.ledger_rows("acme").await, rows_before + 150);
    }

    /// Two sidecars whose sync workers both run while traffic flows: every change reaches the ledger
    /// exactly once (a double apply would double the usage rows, which are sums).
    async fn two_sync_workers_apply_every_change_exactly_once(backend: Backend) {
        let env = Env::on(backend, 2).await;
        let _ = env.account("acme", "basic", "UTC").await; // 100 requests a day
        let _ = env.account("beta", "monthly", "UTC").await;
        let workers: Vec<_> = env
            .sidecars
            .iter()
            .flat_map(|s| tollgate_sidecar::spawn_background(&s.engine))
            .collect();
        let calls = (0..600).map(|i| {
            let acct = if i % 2 == 0 { "acme" } else { "beta" };
            let body = json!({"account": acct, "idempotency_key": format!("c{i}"), "meters": {"requests": 1, "tokens": 3}});
            let env = &env;
            async move { env.post_to(i, "/v1/consume", &body).await }
        });
        let results = futures::future::join_all(calls).await;
        let allowed = results
            .iter()
            .filter(|(_, v, _)| v["allowed"] == true)
            .count();
        let odd: Vec<_> = results.iter().filter(|(s, _, _)| *s != 200).collect();
        assert_eq!(
            allowed, 400,
            "acme stops at 100 of its 300; beta takes all 300; not 200: {odd:?}"
        );
        // Wait for quiescence: both workers drain the outboxes.
        let mut rows = 0;
        for _ in 0..200 {
            rows = env
                .sql_i64(
                    "SELECT count(*) FROM ledger WHERE kind = 'consume' AND account_id <> $1",
                    "-",
                )
                .await;
            if rows == 400 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        for w in workers {
            w.abort();
        }
        assert_eq!(rows, 400);
        assert_eq!(
            env.sql_i64(
                "SELECT CAST(sum(used) AS BIGINT) FROM usage WHERE account_id = $1",
                "acme"
            )
            .await,
            100
        );
        assert_eq!(
            env.sql_i64(
                "SELECT CAST(sum(used) AS BIGINT) FROM usage WHERE account_id = $1",
                "beta"
            )
            .await,
            900
        );
        assert_eq!(env.used("acme", "account:requests:day").await, 100);
        assert_eq!(env.used("beta", "account:tokens:month").await, 900);
    }

    /// A correlation id (the client's x-request-id) reaches the ledger on the hold, its commit
    /// and a consume, is returned by the history and the export only where present, survives a
    /// cold load (the hold's record comes back from the ledger) and is no part of the request:
    /// the same idempotency key with another correlation id is a replay, charged once.
    async fn correlation_ids_reach_the_ledger_and_are_no_part_of_the_request(backend: Backend) {
        let env = Env::isolated(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await; // 10 requests, 100 tokens a day
        env.grant("acme", "g1", 1000, json!({})).await;
        // Printable ASCII may hold quotes, backslashes and braces: the scripts splice the id as
        // JSON, so it must come back byte for byte.
        let cid1 = r#"0f8fad5b-d9cb-469f-a165-70867728950e/"q"\{x}"#;
        let spend = |idem: &str, cid: Option<&str>| {
            let mut b = json!({"api_key": key, "idempotency_key": idem, "route": "paid",
                               "meters": {"requests": 1, "tokens": 10}});
            if let Some(c) = cid {
                b["correlation_id"] = json!(c);
            }
            b
        };
        let (s, first, replay) = env.post_to(0, "/v1/authorize", &spend("h1", Some(cid1))).await;
        assert_eq!((s, replay, first["allowed"].clone()), (200, false, json!(true)), "{first}");
        // Same key, another correlation id (or none): the same request.
        for other in [Some("another-id"), None] {
            let (s, again, replay) = env.post_to(0, "/v1/authorize", &spend("h1", other)).await;
            assert_eq!((s, replay), (200, true), "{again}");
            assert_eq!(again, first);
        }
        assert_eq!(env.used("acme", "account:requests:day").await, 1);
        assert_eq!(env.balance("acme").await, 1000 - 20);
        // A bad correlation id is refused by name and changes nothing.
        for bad in [json!("has space"), json!("é"), json!("x".repeat(129)), json!(""), json!(7)] {
            let mut b = spend("h9", None);
            b["correlation_id"] = bad.clone();
            let (s, v) = env.post("/v1/authorize", &b).await;
            assert_eq!(s, 400, "{bad}: {v}");
            if bad.is_string() {
                assert!(v["error"]["message"].as_str().unwrap().contains("correlation_id"), "{v}");
            }
        }
        let (s, v) = env
            .post("/v1/commit", &json!({"hold_id": "acme/h1", "meters": {"requests": 1, "tokens": 4}}))
            .await;
        assert_eq!((s, v["status"].clone()), (200, json!("committed")), "{v}");
        let (s, v) = env
            .post("/v1/consume", &spend("c1", Some("consume-7")))
            .await;
        assert_eq!((s, v["allowed"].clone()), (200, json!(true)), "{v}");
        let (_, v) = env.post("/v1/authorize", &spend("h2", Some("second-hold"))).await;
        assert_eq!(v["allowed"], true, "{v}");
        let (_, v) = env.post("/v1/authorize", &spend("h3", None)).await;
        assert_eq!(v["allowed"], true, "{v}");
        env.sync().await;

        // Redis loses everything: h2's record comes back from the ledger, its id with it.
        env.flushall().await;
        let (s, v) = env
            .post("/v1/commit", &json!({"hold_id": "acme/h2", "meters": {"requests": 1, "tokens": 1}}))
            .await;
        assert_eq!((s, v["status"].clone()), (200, json!("committed")), "{v}");
        let (s, _, replay) = env.post_to(0, "/v1/authorize", &spend("h2", Some("yet-another"))).await;
        assert_eq!((s, replay), (200, true));
        env.sync().await;

        let (s, page) = env.admin_get("/v1/accounts/acme/ledger?limit=100").await;
        assert_eq!(s, 200, "{page}");
        let entries: Vec<_> = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] != "grant")
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_string(),
                    e["idempotency_key"].as_str().or(e["hold_id"].as_str()).unwrap().to_string(),
                    e.get("correlation_id").cloned(),
                )
            })
            .collect();
        let some = |c: &str| Some(json!(c));
        assert_eq!(
            entries,
            vec![
                ("hold".into(), "h1".into(), some(cid1)),
                ("commit".into(), "acme/h1".into(), some(cid1)),
                ("consume".into(), "c1".into(), some("consume-7")),
                ("hold".into(), "h2".into(), some("second-hold")),
                ("hold".into(), "h3".into(), None),
                ("commit".into(), "acme/h2".into(), some("second-hold")),
            ],
            "{page}"
        );
        // Charged once: one hold of h1 in the ledger, 2 + 1 + 1 + 1 requests.
        assert_eq!(
            env.sql_i64(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'hold' AND idem_key = 'h1'",
                "acme"
            )
            .await,
            1
        );
        assert_eq!(env.used("acme", "account:requests:day").await, 4);

        // The export: JSON only where present, CSV as the last column (quoted as needed).
        let (s, v) = env.admin_get("/admin/export?account=acme&format=json").await;
        assert_eq!(s, 200, "{v}");
        let rows = v["entries"].as_array().unwrap();
        let with: Vec<_> = rows.iter().filter_map(|r| r["correlation_id"].as_str()).collect();
        assert_eq!(with, [cid1, cid1, "consume-7", "second-hold", "second-hold"]);
        assert!(rows.iter().any(|r| r["kind"] == "grant" && r.get("correlation_id").is_none()));
        let csv = env
            .http
            .get(format!("{}/admin/export?account=acme&format=csv", env.base(0)))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(csv.starts_with("seq,account_id,kind,") && csv.lines().next().unwrap().ends_with(",at_ms,correlation_id"), "{csv}");
        let quoted = format!("\"{}\"", cid1.replace('"', "\"\""));
        assert!(csv.lines().any(|l| l.contains(",hold,") && l.ends_with(&quoted)), "{csv}");
    }
}

/// Deciding from PostgreSQL while Redis is down (engine/degraded.rs) runs the same scripts on a
/// private key space loaded from the ledger: a correlation id reaches the ledger there too, a
/// hold's commit carries the id its record in the ledger has, and a repeat with another id is a
/// replay. (Redis + PostgreSQL only: the only pair with that mode.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_ids_reach_the_ledger_when_deciding_from_postgresql() {
    let mut env = Env::isolated(Backend::RedisPostgres, 1).await;
    let key = env.account("acme", "tokens", "UTC").await;
    env.grant("acme", "g1", 1000, json!({})).await;
    let spend = |idem: &str, cid: &str| {
        json!({"api_key": key, "idempotency_key": idem, "route": "paid", "correlation_id": cid,
               "meters": {"requests": 1, "tokens": 10}})
    };
    let (_, v) = env
        .post("/v1/authorize", &spend("h1", "before-the-cut"))
        .await;
    assert_eq!(v["allowed"], true, "{v}");
    env.sync().await;

    env.private_redis.as_mut().unwrap().stop();
    // The breaker opens after three failed round trips; decisions then come from PostgreSQL.
    let mut decided = None;
    for i in 0..50 {
        let idem = format!("d{i}");
        let (s, v) = env
            .post("/v1/authorize", &spend(&idem, "during-the-cut"))
            .await;
        if s == 200 && v["allowed"] == true {
            decided = Some(idem);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let d = decided.expect("a decision from PostgreSQL");
    assert!(!env.engine().store.breaker.closed());
    let (s, _, replay) = env
        .post_to(0, "/v1/authorize", &spend(&d, "a-different-one"))
        .await;
    assert_eq!((s, replay), (200, true));
    let (s, v) = env
        .post(
            "/v1/commit",
            &json!({"hold_id": "acme/h1", "meters": {"requests": 1, "tokens": 3}}),
        )
        .await;
    assert_eq!((s, v["status"].clone()), (200, json!("committed")), "{v}");

    // Those decisions wrote the ledger in their own transactions.
    let (s, page) = env.admin_get("/v1/accounts/acme/ledger?limit=100").await;
    assert_eq!(s, 200, "{page}");
    let got: Vec<(String, Value)> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] != "grant")
        .map(|e| {
            (
                format!(
                    "{} {}",
                    e["kind"].as_str().unwrap(),
                    e["idempotency_key"]
                        .as_str()
                        .or(e["hold_id"].as_str())
                        .unwrap()
                ),
                e["correlation_id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("hold h1".to_string(), json!("before-the-cut")),
            (format!("hold {d}"), json!("during-the-cut")),
            ("commit acme/h1".to_string(), json!("before-the-cut")),
        ],
        "{page}"
    );
}

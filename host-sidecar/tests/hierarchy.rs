//! Hierarchy (organization > team > account): a spend checks and charges every level's limits in
//! one script, every account of a tree in its root's shard (one Redis Cluster slot). Every test
//! runs on every store (Redis + PostgreSQL, Redis Cluster, embedded).

#[macro_use]
mod common;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use tollgate_sidecar::store::keys::Keyspace;

const PLANS: &str = r#"
[plans.org]
limits = [{ meter = "requests", window = "day", max = 1000 }]
[plans.team]
limits = [{ meter = "requests", window = "day", max = 100 }]
[plans.member]
limits = [{ meter = "requests", window = "day", max = 100000 }]
"#;

/// An environment whose store `flushall` may wipe (a private Redis for Redis + PostgreSQL).
async fn env(backend: Backend, instances: usize) -> Env {
    Env::isolated_with(backend, instances, PLANS).await
}

async fn create(env: &Env, id: &str, plan: &str, parent: Option<&str>) -> (u16, Value) {
    let mut body = json!({"id": id, "plan": plan});
    if let Some(p) = parent {
        body["parent"] = json!(p);
    }
    env.admin_post("/admin/accounts", &body).await
}

/// acme (org, 1,000 a day) > eng (team, 100 a day) > alice, bob; returns their keys.
async fn tree(env: &Env) -> (String, String) {
    // Ids whose own shards differ: only the tree puts them in one.
    let ks = Keyspace::new("x", env.cfg.server.shards);
    let shards: Vec<u32> = ["acme", "eng", "alice", "bob"]
        .iter()
        .map(|a| ks.shard_of(a))
        .collect();
    assert!(
        shards.iter().any(|s| *s != shards[0]),
        "pick ids in several shards: {shards:?}"
    );
    assert_eq!(create(env, "acme", "org", None).await.0, 201);
    assert_eq!(create(env, "eng", "team", Some("acme")).await.0, 201);
    let mut keys = Vec::new();
    for who in ["alice", "bob"] {
        let (s, v) = create(env, who, "member", Some("eng")).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["parent"], "eng", "{v}");
        let (s, v) = env
            .admin_post(&format!("/admin/accounts/{who}/keys"), &json!({}))
            .await;
        assert_eq!(s, 201, "{v}");
        env.grant(who, "pack", 1_000_000, json!({})).await;
        keys.push(v["api_key"].as_str().unwrap().to_string());
    }
    (keys.remove(0), keys.remove(0))
}

fn allowed(r: &(u16, Value, bool)) -> bool {
    r.0 == 200 && r.1["allowed"] == true
}

/// acme (1,000 credits) > eng (100, draws on acme) > alice (30, draws on eng), bob (20, does
/// not); returns the keys of alice and bob.
async fn wallets(env: &Env) -> (String, String) {
    let mk = |id: &'static str, parent: Option<&'static str>, draws: bool| {
        let mut b = json!({"id": id, "plan": "member", "draw_from_parents": draws});
        if let Some(p) = parent {
            b["parent"] = json!(p);
        }
        b
    };
    let mut keys = Vec::new();
    for (body, credit) in [
        (mk("acme", None, false), 1000),
        (mk("eng", Some("acme"), true), 100),
        (mk("alice", Some("eng"), true), 30),
        (mk("bob", Some("eng"), false), 20),
    ] {
        let id = body["id"].as_str().unwrap().to_string();
        let (s, v) = env.admin_post("/admin/accounts", &body).await;
        assert_eq!(s, 201, "{v}");
        env.grant(&id, "pack", credit, json!({})).await;
        let (_, v) = env
            .admin_post(&format!("/admin/accounts/{id}/keys"), &json!({}))
            .await;
        keys.push(v["api_key"].as_str().unwrap().to_string());
    }
    (keys.remove(2), keys.remove(2))
}

/// A paid request (10 credits + 1 a token).
fn paid(key: &str, idem: &str, tokens: u64) -> Value {
    json!({"api_key": key, "idempotency_key": idem, "route": "paid",
           "meters": {"requests": 1, "tokens": tokens}})
}

/// Each grant's remaining amount in the ledger.
async fn ledger_left(env: &Env, acct: &str) -> i64 {
    env.sql_i64(
        "SELECT CAST(COALESCE(SUM(remaining), 0) AS BIGINT) FROM grants WHERE account_id = $1",
        acct,
    )
    .await
}

conformance! {
    async fn credit_is_drawn_from_the_account_then_its_parents_and_given_back_to_each(backend: Backend) {
        let env = env(backend, 2).await;
        let (alice, bob) = wallets(&env).await;
        // 50 credits: alice's 30, then 20 of eng's.
        let r = env.post_to(0, "/v1/authorize", &paid(&alice, "a1", 40)).await;
        assert!(allowed(&r), "{r:?}");
        assert_eq!(r.1["balance"], 30 + 100 + 1000 - 50, "{r:?}");
        let hold = r.1["hold_id"].as_str().unwrap().to_string();
        assert_eq!(env.balance("eng").await, 80 + 1000);
        // Committed at 20: what comes back goes to the last drawn first (eng's 20, then 10 of
        // alice's).
        let (s, v) = env.post("/v1/commit", &json!({"hold_id": hold, "meters": {"requests": 1, "tokens": 10}})).await;
        assert_eq!((s, &v["credits"]), (200, &json!(20)), "{v}");
        assert_eq!(env.balance("alice").await, 10 + 100 + 1000);
        assert_eq!(env.balance("acme").await, 1000);
        // Bob does not draw on eng: 50 credits are more than his 20.
        let r = env.post_to(1, "/v1/authorize", &paid(&bob, "b1", 40)).await;
        assert_eq!((r.1["allowed"].clone(), r.1["status"].clone()), (json!(false), json!(402)), "{r:?}");
        // Everything alice can reach, at once, on the other sidecar: hers, eng's, acme's.
        let r = env.post_to(1, "/v1/authorize", &paid(&alice, "a2", 1100)).await;
        assert!(allowed(&r), "{r:?}");
        assert_eq!(r.1["balance"], 0, "{r:?}");
        assert_eq!(env.balance("acme").await, 0);
        let r2 = env.post_to(0, "/v1/authorize", &paid(&alice, "a3", 0)).await;
        assert_eq!(r2.1["status"], 402, "{r2:?}");
        // The ledger has each account's grants as Redis has them.
        env.sync().await;
        assert_eq!(
            (ledger_left(&env, "alice").await, ledger_left(&env, "eng").await, ledger_left(&env, "acme").await),
            (0, 0, 0)
        );
        // A store that lost everything rebuilds each wallet, and the open hold's draws: its
        // release gives each account back what it gave.
        env.flushall().await;
        let hold = r.1["hold_id"].as_str().unwrap();
        let (s, v) = env.post("/v1/release", &json!({"hold_id": hold})).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(env.balance("alice").await, 10 + 100 + 1000);
        assert_eq!(env.balance("eng").await, 100 + 1000);
        env.sync().await;
        assert_eq!(
            (ledger_left(&env, "alice").await, ledger_left(&env, "eng").await, ledger_left(&env, "acme").await),
            (10, 100, 1000)
        );
    }

    async fn a_team_limit_of_100_admits_exactly_100_across_its_accounts(backend: Backend) {
        let env = env(backend, 2).await;
        let (alice, bob) = tree(&env).await;
        // A thousand at once, from both accounts, on two sidecars.
        let answers = join_all((0..1000).map(|i| {
            let key = if i % 2 == 0 { &alice } else { &bob };
            let body = authorize_body(key, &format!("r-{i}"), json!({"requests": 1}));
            let env = &env;
            async move { env.post_to(i % 2, "/v1/authorize", &body).await }
        }))
        .await;
        let held: Vec<String> = answers
            .iter()
            .filter(|r| allowed(r))
            .map(|r| r.1["hold_id"].as_str().unwrap().to_string())
            .collect();
        println!("team limit 100: {} of 1000 admitted", held.len());
        assert_eq!(held.len(), 100, "{:?}", answers.iter().find(|r| !allowed(r)));
        for r in answers.iter().filter(|r| !allowed(r)) {
            assert_eq!((r.0, &r.1["status"]), (200, &json!(429)), "{r:?}");
            assert_eq!(r.1["limit"]["name"], "parent(eng):requests:day", "{r:?}");
        }
        let (a, b) = (
            env.used("alice", "account:requests:day").await,
            env.used("bob", "account:requests:day").await,
        );
        assert_eq!(a + b, 100, "alice {a}, bob {b}");
        println!("alice {a}, bob {b}");
        assert_eq!(env.used("eng", "account:requests:day").await, 100);
        assert_eq!(env.used("acme", "account:requests:day").await, 100);

        // Settled at what was used: half of them used nothing, and give their place back.
        for (i, h) in held.iter().enumerate() {
            let used = u64::from(i % 2 == 0);
            let (s, v) = env.post("/v1/commit", &json!({"hold_id": h, "meters": {"requests": used}})).await;
            assert_eq!(s, 200, "{v}");
        }
        assert_eq!(env.used("eng", "account:requests:day").await, 50);
        let more = join_all((0..80).map(|i| {
            let body = authorize_body(&bob, &format!("more-{i}"), json!({"requests": 1}));
            let env = &env;
            async move { env.post_to(i % 2, "/v1/authorize", &body).await }
        }))
        .await;
        assert_eq!(more.iter().filter(|r| allowed(r)).count(), 50);
        assert_eq!(env.used("eng", "account:requests:day").await, 100);

        // The ledger keeps each level's usage on its own rows, and a store that lost everything
        // rebuilds them from there: the team is still full.
        env.sync().await;
        let team = env
            .sql_i64("SELECT CAST(COALESCE(SUM(used), 0) AS BIGINT) FROM usage WHERE account_id = $1 AND scope = 'a:eng'", "eng")
            .await;
        assert_eq!(team, 100);
        env.flushall().await;
        let r = env.post_to(1, "/v1/authorize", &authorize_body(&alice, "after", json!({"requests": 1}))).await;
        assert_eq!(r.1["status"], 429, "{r:?}");
        assert_eq!(r.1["limit"]["name"], "parent(eng):requests:day", "{r:?}");
        assert_eq!(env.used("eng", "account:requests:day").await, 100);
        assert_eq!(env.used("acme", "account:requests:day").await, 100);
    }

    async fn a_parents_new_limit_reaches_its_accounts_on_every_sidecar_at_once(backend: Backend) {
        let env = env(backend, 2).await;
        let (alice, _) = tree(&env).await;
        // Both sidecars have read alice and her parents.
        for i in 0..2 {
            let r = env.post_to(i, "/v1/authorize", &authorize_body(&alice, &format!("w{i}"), json!({"requests": 1}))).await;
            assert!(allowed(&r), "{r:?}");
        }
        // The team's limit drops to 2 through sidecar 0; sidecar 1 refuses the next at once.
        let s = env
            .http
            .patch(format!("{}/admin/accounts/eng", env.base(0)))
            .bearer_auth(ADMIN)
            .json(&json!({"limits": [{"meter": "requests", "window": "day", "max": 2}]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(s, 200);
        let r = env.post_to(1, "/v1/authorize", &authorize_body(&alice, "after", json!({"requests": 1}))).await;
        assert_eq!(r.1["status"], 429, "{r:?}");
        assert_eq!(r.1["limit"]["name"], "parent(eng):requests:day", "{r:?}");
        assert_eq!(r.1["limit"]["max"], 2, "{r:?}");
    }

    async fn a_tree_is_set_at_creation_at_most_three_deep_and_disabled_from_above(backend: Backend) {
        let env = env(backend, 1).await;
        let (alice, _) = tree(&env).await;
        // No such parent; a fourth level; a parent changed later.
        let (s, v) = create(&env, "carol", "member", Some("nobody")).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("parent"), "{v}");
        let (s, v) = env
            .admin_post("/admin/accounts", &json!({"id": "solo", "plan": "member", "draw_from_parents": true}))
            .await;
        assert_eq!(s, 400, "{v}");
        let (s, v) = create(&env, "intern", "member", Some("alice")).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("levels"), "{v}");
        let s = env
            .http
            .patch(format!("{}/admin/accounts/alice", env.base(0)))
            .bearer_auth(ADMIN)
            .json(&json!({"parent": "acme"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(s, 400, "a parent is not changed");
        assert_eq!(create(&env, "carol", "member", None).await.0, 201, "nothing was written");

        // A disabled team refuses everyone under it.
        let r = env.post("/v1/authorize", &authorize_body(&alice, "a1", json!({"requests": 1}))).await;
        assert_eq!(r.1["allowed"], true, "{r:?}");
        let s = env
            .http
            .patch(format!("{}/admin/accounts/eng", env.base(0)))
            .bearer_auth(ADMIN)
            .json(&json!({"disabled": true}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(s, 200);
        let r = env.post("/v1/authorize", &authorize_body(&alice, "a2", json!({"requests": 1}))).await;
        assert_eq!((r.1["allowed"].clone(), r.1["status"].clone()), (json!(false), json!(403)), "{r:?}");
    }
}

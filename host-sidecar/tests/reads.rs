//! The read paths are answered from Redis, without the ledger: the balance and the usage of an
//! account still answer while PostgreSQL is unreachable (issue 17: a balance query is a hot path,
//! 5,000/s in the points service it replaces). The grants as synced come only when asked.

#[macro_use]
mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_and_usage_answer_from_redis_while_postgres_is_cut() {
    let proxy = FaultProxy::start(5432).await;
    let env = Env::with_pg(
        1,
        "",
        &format!("postgres://postgres@127.0.0.1:{}", proxy.port),
    )
    .await;
    env.account("acme", "basic", "UTC").await;
    let (s, v) = env.grant("acme", "pack", 500, json!({})).await;
    assert!(s == 200 || s == 201, "{v}");
    // Loaded and cached once, as any request does.
    assert_eq!(env.balance("acme").await, 500);
    env.sync().await;

    proxy.cut();
    for _ in 0..20 {
        let (s, v) = env.admin_get("/v1/accounts/acme/balance").await;
        assert_eq!(s, 200, "the balance needs no PostgreSQL: {v}");
        assert_eq!(v["balance"], 500);
        assert!(v.get("grants").is_none(), "{v}");
        let (s, v) = env.admin_get("/v1/accounts/acme/usage").await;
        assert_eq!(s, 200, "the usage needs no PostgreSQL: {v}");
    }
    // The grants are the ledger's: asked for while it is cut, the answer says so.
    let (s, v) = env.admin_get("/v1/accounts/acme/balance?grants=true").await;
    assert!(s >= 500, "{s} {v}");
    proxy.restore();

    let (s, v) = env.admin_get("/v1/accounts/acme/balance?grants=true").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["grants"][0]["grant_id"], "pack", "{v}");
    assert_eq!(v["grants"][0]["remaining"], 500, "{v}");
    let (s, v) = env
        .admin_get("/v1/accounts/acme/balance?grants=perhaps")
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = env.admin_get("/v1/accounts/acme/balance?limit=3").await;
    assert_eq!(s, 400, "{v}");
}

//! Extending an open hold (`/v1/extend`): a stream that outgrows its hold asks for new totals;
//! the extension is checked against the hold's own limits and the balance, all or nothing, is
//! idempotent, and settles with the hold. Every store.

#[macro_use]
mod common;

use common::*;
use serde_json::{json, Value};

const PLANS: &str = r#"
[plans.stream]
limits = [{ meter = "output_tokens", window = "day", max = 300 }]
[plans.slide]
limits = [{ meter = "output_tokens", window = "sliding_minute", max = 30 }]
[plans.softcap]
limits = [
  { meter = "output_tokens", window = "day", max = 150, mode = "soft" },
  { meter = "output_tokens", window = "hour", max = 200 },
]
[prices.stream]
requests = 0
output_tokens = 1
"#;

async fn env(backend: Backend) -> Env {
    Env::build(backend, 1, PLANS, &redis_url(), None).await
}

fn extend(hold: &Value, tokens: u64) -> Value {
    json!({"hold_id": hold, "meters": {"output_tokens": tokens}})
}

conformance! {
    async fn a_soft_limit_never_refuses_an_extension_and_an_enforced_one_beside_it_does(backend: Backend) {
        let env = env(backend).await;
        let key = env.account("acme", "softcap", "UTC").await;
        env.grant("acme", "g1", 1000, json!({})).await;
        let auth = json!({"api_key": key, "idempotency_key": "s-1", "route": "stream",
                          "meters": {"requests": 1, "output_tokens": 100}});
        let (_, d) = env.post("/v1/authorize", &auth).await;
        let hold = d["hold_id"].clone();
        // Past the soft day limit (150), within the enforced hour (200): allowed.
        let (_, d) = env.post("/v1/extend", &extend(&hold, 180)).await;
        assert_eq!(d["allowed"], true, "{d}");
        assert_eq!(env.used("acme", "account:output_tokens:day").await, 180);
        // Past the enforced hour: refused by it, the soft one never names itself.
        let (_, d) = env.post("/v1/extend", &extend(&hold, 250)).await;
        assert_eq!((d["allowed"].clone(), d["status"].clone()), (json!(false), json!(429)), "{d}");
        assert_eq!(d["limit"]["name"], "account:output_tokens:hour", "{d}");
    }

    async fn a_hold_grows_to_new_totals_within_its_limits_and_balance_all_or_nothing(backend: Backend) {
        let env = env(backend).await;
        let key = env.account("acme", "stream", "UTC").await;
        env.grant("acme", "g1", 250, json!({})).await;
        let auth = json!({"api_key": key, "idempotency_key": "s-1", "route": "stream",
                          "meters": {"requests": 1, "output_tokens": 100}});
        let (s, d) = env.post("/v1/authorize", &auth).await;
        assert_eq!((s, d["credits"].clone(), d["balance"].clone()), (200, json!(100), json!(150)), "{d}");
        let hold = d["hold_id"].clone();

        let (s, d) = env.post("/v1/extend", &extend(&hold, 200)).await;
        assert_eq!((s, d["allowed"].clone(), d["credits"].clone(), d["balance"].clone()),
                   (200, json!(true), json!(200), json!(50)), "{d}");
        assert_eq!(env.used("acme", "account:output_tokens:day").await, 200);
        // A retry of the same totals: the same hold, nothing added.
        let (_, d) = env.post("/v1/extend", &extend(&hold, 200)).await;
        assert_eq!((d["allowed"].clone(), d["credits"].clone()), (json!(true), json!(200)), "{d}");
        assert_eq!(env.used("acme", "account:output_tokens:day").await, 200);
        assert_eq!(env.balance("acme").await, 50);
        // Past the limit: refused, nothing changes.
        let (s, d) = env.post("/v1/extend", &extend(&hold, 400)).await;
        assert_eq!((s, d["allowed"].clone(), d["status"].clone()), (200, json!(false), json!(429)), "{d}");
        assert_eq!(d["limit"]["name"], "account:output_tokens:day");
        // Within the limit, past the balance: refused for credit, nothing changes.
        let (_, d) = env.post("/v1/extend", &extend(&hold, 260)).await;
        assert_eq!((d["allowed"].clone(), d["status"].clone()), (json!(false), json!(402)), "{d}");
        assert_eq!(env.used("acme", "account:output_tokens:day").await, 200);
        assert_eq!(env.balance("acme").await, 50);
        // Exactly what is left.
        let (_, d) = env.post("/v1/extend", &extend(&hold, 250)).await;
        assert_eq!((d["allowed"].clone(), d["balance"].clone()), (json!(true), json!(0)), "{d}");

        // The commit settles the whole hold: what was used is charged, the rest comes back.
        let (s, c) = env.post("/v1/commit", &json!({"hold_id": hold, "meters": {"requests": 1, "output_tokens": 120}})).await;
        assert_eq!((s, c["credits"].clone()), (200, json!(120)), "{c}");
        assert_eq!(env.balance("acme").await, 130);
        assert_eq!(env.used("acme", "account:output_tokens:day").await, 120);
        // A settled hold, an unknown one, a bad body.
        let (s, _) = env.post("/v1/extend", &extend(&hold, 300)).await;
        assert_eq!(s, 409);
        let (s, _) = env.post("/v1/extend", &extend(&json!("acme/nope"), 300)).await;
        assert_eq!(s, 404);
        let (s, _) = env.post("/v1/extend", &json!({"hold_id": hold, "meters": {}})).await;
        assert_eq!(s, 400);
        env.sync().await;
        let extends = env
            .sql_i64("SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'extend'", "acme")
            .await;
        assert_eq!(extends, 2, "two extensions changed something");
        assert_eq!(env.balance("acme").await, 130);
    }

    async fn an_extended_hold_comes_back_extended_after_redis_lost_it(backend: Backend) {
        let env = Env::isolated(backend, 1).await;
        let key = env.account("acme", "tokens", "UTC").await;
        env.grant("acme", "g1", 1000, json!({})).await;
        // `tokens`: 10 requests and 100 tokens a day; route `paid`: 10 a request, 1 a token.
        let auth = json!({"api_key": key, "idempotency_key": "x-1", "route": "paid",
                          "meters": {"requests": 1, "tokens": 20}});
        let (_, d) = env.post("/v1/authorize", &auth).await;
        let hold = d["hold_id"].clone();
        let (_, d) = env.post("/v1/extend", &json!({"hold_id": hold, "meters": {"tokens": 60}})).await;
        assert_eq!((d["allowed"].clone(), d["credits"].clone()), (json!(true), json!(70)), "{d}");
        env.sync().await;
        env.flushall().await;
        // Rebuilt from the ledger: the hold holds 60 tokens and 70 credits.
        assert_eq!(env.used("acme", "account:tokens:day").await, 60);
        assert_eq!(env.balance("acme").await, 930);
        let (_, d) = env.post("/v1/extend", &json!({"hold_id": hold, "meters": {"tokens": 100}})).await;
        assert_eq!((d["allowed"].clone(), d["credits"].clone()), (json!(true), json!(110)), "{d}");
        let (s, c) = env.post("/v1/commit", &json!({"hold_id": hold, "meters": {"requests": 1, "tokens": 90}})).await;
        assert_eq!((s, c["credits"].clone()), (200, json!(100)), "{c}");
        assert_eq!(env.balance("acme").await, 900);
        assert_eq!(env.used("acme", "account:tokens:day").await, 90);
    }

    async fn an_extension_on_a_sliding_window_counts_only_what_is_still_in_it(backend: Backend) {
        let env = env(backend).await;
        let key = env.account("acme", "slide", "UTC").await;
        env.grant("acme", "g1", 1000, json!({})).await;
        let auth = |i: &str, t: u64| json!({"api_key": key, "idempotency_key": i, "route": "stream",
                                           "meters": {"requests": 1, "output_tokens": t}});
        env.clock.set(NOON);
        let (_, a) = env.post("/v1/authorize", &auth("w1", 20)).await;
        assert_eq!(a["allowed"], true, "{a}");
        let (s, _) = env.post("/v1/commit", &json!({"hold_id": a["hold_id"], "meters": {"requests": 1, "output_tokens": 20}})).await;
        assert_eq!(s, 200);
        // Within the minute: 20 + 10 held, an extension to 20 would make 40 > 30.
        env.clock.set(NOON + 30_000);
        let (_, b) = env.post("/v1/authorize", &auth("w2", 10)).await;
        assert_eq!(b["allowed"], true, "{b}");
        let (_, d) = env.post("/v1/extend", &extend(&b["hold_id"], 20)).await;
        assert_eq!((d["allowed"].clone(), d["status"].clone()), (json!(false), json!(429)), "{d}");
        // A minute after the first: it has left the window, the extension fits (10 + 10 <= 30).
        env.clock.set(NOON + 60_001);
        let (_, d) = env.post("/v1/extend", &extend(&b["hold_id"], 20)).await;
        assert_eq!(d["allowed"], true, "{d}");
        assert_eq!(env.used("acme", "account:output_tokens:sliding_minute").await, 20);
    }
}

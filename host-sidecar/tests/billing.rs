//! The billing side against real Redis and PostgreSQL (and, through `conformance!`, the
//! embedded store and a Redis Cluster): plan changes on the next request of every sidecar,
//! included credits once per period with two schedulers, spending order and expiry, shared
//! pools under contention, threshold alerts once per window, and billing-provider webhooks —
//! verified, applied once, ordered, and unmoved by forged or malformed deliveries.

#[macro_use]
mod common;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tollgate_sidecar::webhooks::sign_stripe;

const STRIPE_SECRET: &str = "whsec_test_secret_0123456789";
const RC_SECRET: &str = "rc_test_secret_0123456789";

const BILLING: &str = r#"
[plans.pro]
limits = [{ meter = "requests", window = "day", max = 50 }]
included_credits = 500
credits_period = "week"
[plans.free]
limits = [{ meter = "requests", window = "day", max = 5 }]
[billing]
fallback_plan = "free"
[billing.stripe]
secret = "whsec_test_secret_0123456789"
plans = { price_pro = "pro" }
packs = { pack_1000 = 1000 }
[billing.revenuecat]
secret = "rc_test_secret_0123456789"
plans = { "vip.weekly" = "pro" }
packs = { "points.200" = 200 }
"#;

async fn env_with(backend: Backend, instances: usize, extra: &str) -> Env {
    Env::build(
        backend,
        instances,
        &format!("{BILLING}\n{extra}"),
        &redis_url(),
        None,
    )
    .await
}

async fn authorize_on(env: &Env, i: usize, key: &str, idem: &str) -> Value {
    let (s, v, _) = env
        .post_to(
            i,
            "/v1/authorize",
            &authorize_body(key, idem, json!({"requests": 1})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn admin_send(env: &Env, method: &str, path: &str, body: &Value) -> (u16, Value) {
    admin_send_on(env, 0, method, path, body).await
}

async fn admin_send_on(
    env: &Env,
    i: usize,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = env
        .http
        .request(m, format!("{}{path}", env.base(i)))
        .bearer_auth(ADMIN)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

conformance! {
    async fn a_plan_change_applies_on_the_next_request_of_every_sidecar(backend: Backend) {
        let env = env_with(backend, 2, "").await;
        let key = env.account("acme", "pro", "UTC").await; // 50 requests per day
        // Sidecar 1 reads (and caches, for a minute) the account on pro.
        for i in 0..10 {
            let v = authorize_on(&env, 1, &key, &format!("a{i}")).await;
            assert_eq!(v["allowed"], true, "{v}");
        }
        // Downgrade through sidecar 0: sidecar 1's very next request sees free's 5 per day.
        let (s, v) = admin_send(&env, "PATCH", "/admin/accounts/acme", &json!({"plan": "free"})).await;
        assert_eq!(s, 200, "{v}");
        let v = authorize_on(&env, 1, &key, "after-downgrade").await;
        assert_eq!((v["allowed"].clone(), v["status"].clone()), (json!(false), json!(429)), "{v}");
        assert_eq!(v["limit"]["max"], 5);

        // Upgrade by subscription: back to pro at once, on sidecar 1 too.
        let (s, v) = admin_send(
            &env,
            "PUT",
            "/admin/accounts/acme/subscription",
            &json!({"plan": "pro", "status": "active"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!((v["plan"].clone(), v["status"].clone()), (json!("pro"), json!("active")));
        let v = authorize_on(&env, 1, &key, "after-upgrade").await;
        assert_eq!(v["allowed"], true, "{v}");
        // A canceled subscription falls back to the configured plan.
        let (s, _) = admin_send(
            &env,
            "PUT",
            "/admin/accounts/acme/subscription",
            &json!({"plan": "pro", "status": "canceled"}),
        )
        .await;
        assert_eq!(s, 200);
        let (_, a) = env.admin_get("/admin/accounts/acme").await;
        assert_eq!(a["plan"], "free");
        let v = authorize_on(&env, 1, &key, "after-cancel").await;
        assert_eq!(v["limit"]["max"], 5, "{v}");

        // A disabled key is refused on the next request of the other sidecar too.
        let (_, keys) = env.admin_get("/admin/accounts/acme/keys").await;
        let key_id = keys[0]["key_id"].as_str().unwrap().to_string();
        let (s, _) = env.admin_post(&format!("/admin/keys/{key_id}/disable"), &json!({})).await;
        assert_eq!(s, 200);
        let v = authorize_on(&env, 1, &key, "after-disable").await;
        assert_eq!(v["status"], 403, "{v}");
    }

    async fn included_credits_are_granted_once_per_period_by_two_schedulers(backend: Backend) {
        let env = env_with(backend, 2, "").await;
        env.account("acme", "pro", "UTC").await; // 500 included per week
        env.account("bob", "free", "UTC").await; // none
        let (a, b) = (env.sidecars[0].engine.clone(), env.sidecars[1].engine.clone());
        for _ in 0..3 {
            let (x, y) = tokio::join!(a.grant_included_credits(), b.grant_included_credits());
            x.unwrap();
            y.unwrap();
        }
        assert_eq!(env.balance("acme").await, 500);
        assert_eq!(env.balance("bob").await, 0);
        env.sync().await;
        let grants = |acct: &'static str| {
            let env = &env;
            async move {
                env.sql_i64("SELECT count(*) FROM grants WHERE account_id = $1 AND source = 'plan'", acct)
                    .await
            }
        };
        assert_eq!(grants("acme").await, 1);
        assert_eq!(grants("bob").await, 0);

        // Next week: one more grant; last week's allowance lapsed at its period's end.
        env.clock.advance_ms(7 * 86_400_000);
        let (x, y) = tokio::join!(a.grant_included_credits(), b.grant_included_credits());
        assert_eq!(x.unwrap() + y.unwrap(), 1, "one of the two schedulers granted");
        assert_eq!(env.balance("acme").await, 500);
        let lapsed = a.lapse_expired_credit().await.unwrap();
        env.sync().await;
        assert_eq!(lapsed, 1);
        assert_eq!(grants("acme").await, 2);
        assert_eq!(
            env.sql_i64("SELECT CAST(sum(expired) AS BIGINT) FROM grants WHERE account_id = $1", "acme").await,
            500,
            "last week's unspent allowance is recorded as expired"
        );
        assert_eq!(
            env.sql_i64("SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'lapse'", "acme").await,
            1
        );
        // Running the expiry job again records nothing more.
        assert_eq!(a.lapse_expired_credit().await.unwrap(), 0);
    }

    async fn credit_spends_by_priority_then_expiry_then_age_and_expired_credit_never(backend: Backend) {
        let env = env_with(backend, 1, "").await;
        let key = env.account("acme", "open", "UTC").await;
        let hour = 3_600_000;
        for (id, amount, extra) in [
            ("old", 100, json!({"priority": 100})),
            ("soon", 100, json!({"priority": 100, "expires_at_ms": NOON + hour})),
            ("promo", 50, json!({"priority": 10})),
            ("later", 100, json!({"priority": 100, "expires_at_ms": NOON + 2 * hour})),
        ] {
            assert_eq!(env.grant("acme", id, amount, extra).await.0, 201);
        }
        let spend = |n: u64, idem: String| {
            let body = json!({"api_key": key, "idempotency_key": idem, "route": "paid",
                "meters": {"requests": n}});
            let env = &env;
            async move { env.post("/v1/consume", &body).await }
        };
        let remaining = || async {
            env.sync().await;
            let (_, v) = env.admin_get("/admin/accounts/acme/grants").await;
            v["grants"].as_array().unwrap().iter()
                .map(|g| (g["grant_id"].as_str().unwrap().to_string(), g["remaining"].as_i64().unwrap()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        // 50 credits: the lowest priority number first.
        assert_eq!(spend(5, "s1".into()).await.1["allowed"], true);
        // 150: then the earliest expiry, then the next.
        assert_eq!(spend(15, "s2".into()).await.1["allowed"], true);
        let r = remaining().await;
        assert_eq!((r["promo"], r["soon"], r["later"], r["old"]), (0, 0, 50, 100), "{r:?}");
        // Past `later`'s expiry its 50 are never spent: 150 more needs `old`'s 100 + 50 that
        // do not exist.
        env.clock.advance_ms(3 * hour);
        let (_, v) = spend(15, "s3".into()).await;
        assert_eq!((v["allowed"].clone(), v["status"].clone()), (json!(false), json!(402)), "{v}");
        assert_eq!(v["balance"], 100);
        assert_eq!(spend(10, "s4".into()).await.1["allowed"], true);
        // Refused for credit (twice): one `balance` alert for the day, level 100.
        assert_eq!(spend(1, "s5".into()).await.1["status"], 402);
        let mut balance_alerts = Vec::new();
        for _ in 0..100 {
            let (_, v) = env.admin_get("/admin/accounts/acme/alerts").await;
            balance_alerts = v["alerts"].as_array().unwrap().iter()
                .filter(|a| a["name"] == "balance").cloned().collect();
            if !balance_alerts.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(balance_alerts.len(), 1, "{balance_alerts:?}");
        assert_eq!(balance_alerts[0]["level"], 100);
        let r = remaining().await;
        assert_eq!((r["later"], r["old"]), (0, 0), "{r:?}");
        assert_eq!(
            env.sql_i64("SELECT CAST(sum(expired) AS BIGINT) FROM grants WHERE account_id = $1", "acme").await,
            50
        );
    }

    /// `alerts.low_balance`: a spend that leaves fewer credits than the threshold warns (level
    /// 80, `low_balance`) once per account and day, before the account runs out.
    async fn a_low_balance_warns_once_a_day_before_credit_runs_out(backend: Backend) {
        let env = env_with(backend, 1, "[alerts]\nlow_balance = 100").await;
        let key = env.account("acme", "open", "UTC").await;
        assert_eq!(env.grant("acme", "g", 300, json!({})).await.0, 201);
        let spend = |n: u64, idem: &str| {
            let body = json!({"api_key": key, "idempotency_key": idem, "route": "paid",
                "meters": {"requests": n}});
            let env = &env;
            async move { env.post("/v1/consume", &body).await.1 }
        };
        let low = || async {
            let (_, v) = env.admin_get("/admin/accounts/acme/alerts").await;
            v["alerts"].as_array().unwrap().iter()
                .filter(|a| a["name"] == "low_balance").cloned().collect::<Vec<_>>()
        };
        let settle = || async {
            // Alerts are recorded off the request's path.
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        };
        assert_eq!(spend(15, "a").await["balance"], 150);
        settle().await;
        assert!(low().await.is_empty(), "150 left is above the threshold");
        assert_eq!(spend(6, "b").await["balance"], 90);
        assert_eq!(spend(3, "c").await["balance"], 60);
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen = low().await;
            if !seen.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        settle().await;
        let seen_now = low().await;
        assert_eq!(seen_now.len(), 1, "once for the day: {seen_now:?}");
        assert_eq!(seen.len(), 1);
        let a = &seen_now[0];
        assert_eq!((a["level"].clone(), a["used"].clone(), a["max"].clone()), (json!(80), json!(90), json!(100)), "{a}");
        // The next day, still low: one more.
        env.clock.advance_ms(24 * 3_600_000);
        assert_eq!(spend(1, "d").await["balance"], 50);
        let mut n = 0;
        for _ in 0..100 {
            n = low().await.len();
            if n == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(n, 2);
    }

    async fn five_hundred_accounts_claiming_a_pool_of_one_hundred_get_exactly_one_hundred(backend: Backend) {
        let env = env_with(backend, 2, "").await;
        // A pool is the pseudo-account `pool:<id>`: no account may take such an id.
        let (s, v) = env.admin_post("/admin/accounts", &json!({"id": "pool:trial", "plan": "basic"})).await;
        assert_eq!(s, 400, "{v}");
        let ids: Vec<String> = (0..500).map(|i| format!("u{i:03}")).collect();
        for chunk in ids.chunks(50) {
            join_all(chunk.iter().map(|id| {
                let env = &env;
                async move {
                    let (s, v) = env.admin_post("/admin/accounts", &json!({"id": id, "plan": "free"})).await;
                    assert_eq!(s, 201, "{v}");
                }
            }))
            .await;
        }
        let (s, v) = env.admin_post("/admin/pools", &json!({"id": "coupon", "stock": 100})).await;
        assert_eq!(s, 201, "{v}");
        // Every account claims once, the first 100 twice, spread over both sidecars.
        let claims = ids.iter().chain(ids.iter().take(100)).enumerate().map(|(i, id)| {
            let env = &env;
            async move {
                let (s, v, replay) = env
                    .post_to_admin(i, "/admin/pools/coupon/claims", &json!({"account": id}))
                    .await;
                assert!(s == 200 || s == 201, "{s} {v}");
                (id.clone(), s, v["claimed"] == true, replay)
            }
        });
        let results = join_all(claims).await;
        let new: Vec<_> = results.iter().filter(|r| r.1 == 201).collect();
        assert_eq!(new.len(), 100, "exactly the stock was claimed");
        let mut winners: Vec<_> = new.iter().map(|r| r.0.clone()).collect();
        winners.sort();
        winners.dedup();
        assert_eq!(winners.len(), 100, "no account claimed twice");
        // A second claim by a winner is a replay, never a second unit.
        assert!(results.iter().filter(|r| r.3).all(|r| r.2 && winners.contains(&r.0)));
        let (_, p) = env.admin_get("/admin/pools/coupon").await;
        assert_eq!((p["claimed"].clone(), p["remaining"].clone()), (json!(100), json!(0)), "{p}");
        env.sync().await;
        assert_eq!(
            env.sql_i64("SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'consume'", "pool:coupon").await,
            100
        );
        assert_eq!(
            env.sql_i64("SELECT count(DISTINCT idem_key) FROM ledger WHERE account_id = $1", "pool:coupon").await,
            100
        );
    }

    async fn each_alert_threshold_fires_exactly_once_per_window(backend: Backend) {
        let hook = Hook::start().await;
        let extra = format!(
            "[alerts]\nthresholds = [80, 95, 100]\nwebhook_url = \"{}\"\nwebhook_secret = \"alert-secret-0123456789\"",
            hook.url
        );
        let env = env_with(backend, 2, &extra).await;
        let key = env.account("acme", "basic", "UTC").await; // 100 requests per day
        let calls = (0..130).map(|i| {
            let env = &env;
            let key = key.clone();
            async move { authorize_on(env, i, &key, &format!("r{i}")).await }
        });
        let allowed = join_all(calls).await.iter().filter(|v| v["allowed"] == true).count();
        assert_eq!(allowed, 100);
        // Replays raise nothing new.
        for i in 0..20 {
            authorize_on(&env, i, &key, &format!("r{i}")).await;
        }
        let levels = hook.wait_for(3).await;
        assert_eq!(levels, vec![80, 95, 100], "each level once, delivered");
        let (_, v) = env.admin_get("/admin/accounts/acme/alerts").await;
        let mut recorded: Vec<i64> = v["alerts"].as_array().unwrap().iter()
            .map(|a| a["level"].as_i64().unwrap()).collect();
        recorded.sort();
        assert_eq!(recorded, vec![80, 95, 100], "{v}");
        assert!(v["alerts"].as_array().unwrap().iter().all(|a| a["delivered_at_ms"].is_i64()), "{v}");

        // A new day is a new window: 80 % fires again, once.
        env.clock.advance_ms(86_400_000);
        for i in 0..85 {
            authorize_on(&env, i, &key, &format!("d2-{i}")).await;
        }
        let levels = hook.wait_for(4).await;
        assert_eq!(levels, vec![80, 80, 95, 100]);
        let metrics = env.http.get(format!("{}/metrics", env.base(0))).send().await.unwrap()
            .text().await.unwrap();
        assert!(metrics.contains("tollgate_alerts_total{level=\"warning\"}"), "{metrics}");
    }
}

/// A local alert webhook receiver: records each delivery's level after checking its signature.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hook {
    async fn start() -> Hook {
        let got: Arc<Mutex<Vec<Value>>> = Arc::default();
        let g = got.clone();
        let app = axum::Router::new().route(
            "/alerts",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let g = g.clone();
                    async move {
                        let sig = headers
                            .get("tollgate-signature")
                            .and_then(|v| v.to_str().ok());
                        let t = (NOON / 1000) as i64;
                        if tollgate_sidecar::webhooks::verify_stripe(
                            &body,
                            sig,
                            "alert-secret-0123456789",
                            t,
                            3 * 86_400,
                        )
                        .is_err()
                        {
                            return axum::http::StatusCode::UNAUTHORIZED;
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                            g.lock().unwrap().push(v);
                        }
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hook { url, got, task }
    }

    /// The delivered levels, sorted, once at least `n` arrived (or after 10 s).
    async fn wait_for(&self, n: usize) -> Vec<i64> {
        for _ in 0..200 {
            if self.got.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Give a duplicate the chance to show up.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut v: Vec<i64> = self
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|a| a["level"].as_i64().unwrap())
            .collect();
        v.sort();
        v
    }
}

/// POSTs a webhook body with the given headers; returns status and body.
async fn deliver(env: &Env, path: &str, body: &[u8], headers: &[(&str, String)]) -> (u16, Value) {
    let mut r = env
        .http
        .post(format!("{}{path}", env.base(0)))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn now_s() -> i64 {
    (NOON / 1000) as i64
}

async fn stripe(env: &Env, body: &Value) -> (u16, Value) {
    let raw = serde_json::to_vec(body).unwrap();
    let sig = sign_stripe(&raw, STRIPE_SECRET, now_s());
    deliver(env, "/webhooks/stripe", &raw, &[("stripe-signature", sig)]).await
}

fn subscription_event(id: &str, kind: &str, created_s: i64, status: &str, price: &str) -> Value {
    subscription_event_of("sub_1", id, kind, created_s, status, price)
}

/// A Stripe subscription event about subscription `sub` of acme.
fn subscription_event_of(
    sub: &str,
    id: &str,
    kind: &str,
    created_s: i64,
    status: &str,
    price: &str,
) -> Value {
    json!({
        "id": id, "type": kind, "created": created_s,
        "data": {"object": {
            "id": sub, "status": status,
            "current_period_start": created_s, "current_period_end": created_s + 30 * 86_400,
            "metadata": {"tollgate_account": "acme"},
            "items": {"data": [{"price": {"id": price, "lookup_key": null}}]}
        }}
    })
}

async fn plan_and_version(env: &Env) -> (String, i64) {
    let a = env.engine().ledger.account("acme").await.unwrap().unwrap();
    (a.plan, a.version)
}

async fn events(env: &Env) -> i64 {
    env.sql_i64("SELECT count(*) FROM billing_events WHERE $1 = $1", "")
        .await
}

/// A RevenueCat event of acme about subscription (original transaction) `otx`, from
/// `environment` (`PRODUCTION` or `SANDBOX`).
fn rc_event(id: &str, kind: &str, product: &str, ts: u64, otx: &str, environment: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"api_version": "1.0", "event": {
        "id": id, "type": kind, "app_user_id": "acme", "product_id": product,
        "event_timestamp_ms": ts, "purchased_at_ms": ts, "expiration_at_ms": ts + 7 * 86_400_000,
        "transaction_id": format!("tx_{id}"), "original_transaction_id": otx,
        "period_type": "NORMAL", "environment": environment
    }}))
    .unwrap()
}

async fn revenuecat(env: &Env, body: &[u8]) -> (u16, Value) {
    deliver(
        env,
        "/webhooks/revenuecat",
        body,
        &[("authorization", format!("Bearer {RC_SECRET}"))],
    )
    .await
}

/// Outcome of a delivery that must answer 200.
fn outcome((s, v): (u16, Value)) -> String {
    assert_eq!(s, 200, "{v}");
    v["outcome"].as_str().unwrap_or_default().to_string()
}

/// The outcome recorded for each of acme's events, by event id.
async fn recorded(env: &Env) -> std::collections::BTreeMap<String, String> {
    let (s, list) = env.admin_get("/admin/accounts/acme/billing-events").await;
    assert_eq!(s, 200, "{list}");
    list["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The billing configuration with `billing.accept_test_events` on, one sidecar.
async fn env_accepting_test_events(backend: Backend) -> Env {
    let mut env = Env::build(backend, 0, BILLING, &redis_url(), None).await;
    env.cfg.billing.accept_test_events = true;
    env.add_sidecar().await;
    env
}

/// Stripe `livemode: false` and RevenueCat `SANDBOX` events: a subscription, a pack purchase.
fn test_mode_events(t: i64) -> (Value, Value, Vec<u8>, Vec<u8>) {
    let mut sub = subscription_event(
        "evt_t1",
        "customer.subscription.created",
        t - 300,
        "active",
        "price_pro",
    );
    sub["livemode"] = json!(false);
    let pack = json!({"id": "evt_t2", "type": "checkout.session.completed", "created": t - 200,
        "livemode": false,
        "data": {"object": {"id": "cs_test_1", "payment_status": "paid",
            "metadata": {"tollgate_account": "acme", "tollgate_pack": "pack_1000"}}}});
    let ms = NOON - 100_000;
    let rc_sub = rc_event(
        "rc_t1",
        "INITIAL_PURCHASE",
        "vip.weekly",
        ms,
        "otx_t",
        "SANDBOX",
    );
    let rc_pack = rc_event(
        "rc_t2",
        "NON_RENEWING_PURCHASE",
        "points.200",
        ms + 1,
        "otx_p",
        "SANDBOX",
    );
    (sub, pack, rc_sub, rc_pack)
}

/// Billing-provider events on every backend: what a test event and an event about another
/// subscription do (the ledger transaction decides).
mod webhook_events {
    use super::*;

    conformance! {
        /// Test-mode events are remembered (a replay is a duplicate, and they show in the account's
        /// and the installation's event lists as `ignored_test_event`) but grant nothing and change
        /// no plan — unless `billing.accept_test_events` is on.
        async fn test_mode_events_are_recorded_and_change_nothing(backend: Backend) {
            let env = env_with(backend, 1, "").await;
            env.account("acme", "free", "UTC").await;
            let before = plan_and_version(&env).await;
            let (sub, pack, rc_sub, rc_pack) = test_mode_events(now_s());
            assert_eq!(outcome(stripe(&env, &sub).await), "ignored_test_event");
            assert_eq!(outcome(stripe(&env, &pack).await), "ignored_test_event");
            assert_eq!(outcome(revenuecat(&env, &rc_sub).await), "ignored_test_event");
            assert_eq!(outcome(revenuecat(&env, &rc_pack).await), "ignored_test_event");
            // A replay is a duplicate of the recorded event.
            let (_, v) = stripe(&env, &sub).await;
            assert_eq!((v["outcome"].as_str(), v["detail"].as_str()),
                (Some("duplicate"), Some("first delivery: ignored_test_event")), "{v}");
            assert_eq!(outcome(revenuecat(&env, &rc_pack).await), "duplicate");
            assert_eq!(plan_and_version(&env).await, before, "no plan change");
            assert_eq!(env.balance("acme").await, 0, "no grant");
            assert!(env.engine().ledger.subscription("acme").await.unwrap().is_none());
            let seen = recorded(&env).await;
            assert_eq!(seen.len(), 4, "{seen:?}");
            assert!(seen.values().all(|o| o == "ignored_test_event"), "{seen:?}");
            let (_, all) = env.admin_get("/admin/billing-events").await;
            assert_eq!(all["events"].as_array().unwrap().len(), 4, "{all}");
            // A live event still applies.
            let live = subscription_event("evt_live", "customer.subscription.created", now_s() - 100, "active", "price_pro");
            assert_eq!(outcome(stripe(&env, &live).await), "applied");
            assert_eq!(plan_and_version(&env).await.0, "pro");

            // With billing.accept_test_events, the same events apply.
            let env = env_accepting_test_events(backend).await;
            env.account("acme", "free", "UTC").await;
            let (sub, pack, rc_sub, rc_pack) = test_mode_events(now_s());
            assert_eq!(outcome(stripe(&env, &sub).await), "applied");
            assert_eq!(plan_and_version(&env).await.0, "pro");
            assert_eq!(env.balance("acme").await, 500, "pro's included credits");
            assert_eq!(outcome(stripe(&env, &pack).await), "applied");
            assert_eq!(env.balance("acme").await, 1500);
            // The RevenueCat subscription is another one, starting: it takes over.
            assert_eq!(outcome(revenuecat(&env, &rc_sub).await), "applied");
            assert_eq!(outcome(revenuecat(&env, &rc_pack).await), "applied");
            assert_eq!(env.balance("acme").await, 1700);
        }

        /// A subscription event changes an account only if it is about the subscription on record
        /// (provider and subscription id), or if it starts a new one; an event about another one is
        /// recorded `ignored_other_subscription`. Credit packs are not subscriptions.
        async fn only_the_subscription_on_record_changes_the_account(backend: Backend) {
            let env = env_with(backend, 1, "").await;
            env.account("acme", "free", "UTC").await;
            let t = now_s();
            let ms = |s: i64| (s * 1000) as u64;
            // On a Stripe subscription: pro.
            let start = subscription_event_of("sub_A", "evt_a1", "customer.subscription.created", t - 900, "active", "price_pro");
            assert_eq!(outcome(stripe(&env, &start).await), "applied");
            let on_pro = plan_and_version(&env).await;
            assert_eq!(on_pro.0, "pro");
            // A RevenueCat subscription of the same user ends or fails: not the one on record.
            for (id, kind) in [("rc_x1", "EXPIRATION"), ("rc_x2", "CANCELLATION"), ("rc_x3", "BILLING_ISSUE")] {
                let body = rc_event(id, kind, "vip.weekly", ms(t - 800), "otx_B", "PRODUCTION");
                let (s, v) = revenuecat(&env, &body).await;
                assert_eq!((s, v["outcome"].as_str()), (200, Some("ignored_other_subscription")), "{kind}: {v}");
                assert_eq!(v["detail"], "the account's subscription on record is stripe sub_A", "{v}");
            }
            // A Stripe deletion of another subscription id.
            let other = subscription_event_of("sub_Z", "evt_z", "customer.subscription.deleted", t - 700, "canceled", "price_pro");
            assert_eq!(outcome(stripe(&env, &other).await), "ignored_other_subscription");
            // An update of another one that does not start it (past due) neither.
            let other = subscription_event_of("sub_Z", "evt_z2", "customer.subscription.updated", t - 690, "past_due", "price_pro");
            assert_eq!(outcome(stripe(&env, &other).await), "ignored_other_subscription");
            assert_eq!(plan_and_version(&env).await, on_pro, "the plan is left");
            let sub = env.engine().ledger.subscription("acme").await.unwrap().unwrap();
            assert_eq!((sub.provider.as_str(), sub.subject.as_deref(), sub.status.as_str()),
                ("stripe", Some("sub_A"), "active"));
            // A pack bought meanwhile is granted: packs are not subscriptions.
            let pack = rc_event("rc_p", "NON_RENEWING_PURCHASE", "points.200", ms(t - 650), "otx_P", "PRODUCTION");
            assert_eq!(outcome(revenuecat(&env, &pack).await), "applied");
            assert_eq!(env.balance("acme").await, 700);

            // The subscription on record ends: applied.
            let end = subscription_event_of("sub_A", "evt_a2", "customer.subscription.deleted", t - 600, "canceled", "price_pro");
            assert_eq!(outcome(stripe(&env, &end).await), "applied");
            assert_eq!(plan_and_version(&env).await.0, "free");
            // A new subscription that starts replaces the ended one on record...
            let rc_start = rc_event("rc_b1", "INITIAL_PURCHASE", "vip.weekly", ms(t - 500), "otx_B", "PRODUCTION");
            assert_eq!(outcome(revenuecat(&env, &rc_start).await), "applied");
            assert_eq!(plan_and_version(&env).await.0, "pro");
            // ...and from then on the old one's events are the other subscription's.
            let late = subscription_event_of("sub_A", "evt_a3", "customer.subscription.updated", t - 400, "past_due", "price_pro");
            assert_eq!(outcome(stripe(&env, &late).await), "ignored_other_subscription");
            assert_eq!(plan_and_version(&env).await.0, "pro");
            let rc_end = rc_event("rc_b2", "EXPIRATION", "vip.weekly", ms(t - 300), "otx_B", "PRODUCTION");
            assert_eq!(outcome(revenuecat(&env, &rc_end).await), "applied");
            assert_eq!(plan_and_version(&env).await.0, "free");

            let seen = recorded(&env).await;
            let ignored: Vec<_> = seen.iter().filter(|(_, o)| *o == "ignored_other_subscription").map(|(id, _)| id.as_str()).collect();
            assert_eq!(ignored, ["evt_a3", "evt_z", "evt_z2", "rc_x1", "rc_x2", "rc_x3"], "{seen:?}");
            // A replay of an ignored one is a duplicate, still changing nothing.
            let body = rc_event("rc_x1", "EXPIRATION", "vip.weekly", ms(t - 800), "otx_B", "PRODUCTION");
            assert_eq!(outcome(revenuecat(&env, &body).await), "duplicate");
            // The operator's subscription replaces any: and then a provider's ending changes nothing.
            let (s, v) = admin_send(&env, "PUT", "/admin/accounts/acme/subscription",
                &json!({"plan": "pro", "status": "active"})).await;
            assert_eq!(s, 200, "{v}");
            let gone = subscription_event_of("sub_A", "evt_a4", "customer.subscription.deleted", t - 10, "canceled", "price_pro");
            let (_, v) = stripe(&env, &gone).await;
            assert_eq!(v["outcome"], "ignored_other_subscription", "{v}");
            assert_eq!(plan_and_version(&env).await.0, "pro");
        }
    }
}

/// Webhook bodies up to 256 KiB, past `server.max_body_bytes` (64 KiB); larger ones are refused
/// and change nothing. Other routes keep `max_body_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_up_to_256_kib_are_accepted() {
    let env = env_with(Backend::RedisPostgres, 1, "").await;
    env.account("acme", "free", "UTC").await;
    let t = now_s();
    let padded = |id: &str, bytes: usize| {
        let mut v = subscription_event(
            id,
            "customer.subscription.created",
            t - 100,
            "active",
            "price_pro",
        );
        v["data"]["object"]["description"] = json!("x".repeat(bytes));
        serde_json::to_vec(&v).unwrap()
    };
    let signed = |raw: &[u8]| vec![("stripe-signature", sign_stripe(raw, STRIPE_SECRET, t))];

    let big = padded("evt_big", 300_000);
    assert!(big.len() > 256 * 1024);
    let (s, v) = deliver(&env, "/webhooks/stripe", &big, &signed(&big)).await;
    assert!(s == 413 || s == 400, "{s} {v}");
    assert_eq!(events(&env).await, 0);
    assert_eq!(plan_and_version(&env).await.0, "free");

    let large = padded("evt_large", 70_000);
    assert!(large.len() > 70_000 && large.len() > env.cfg.server.max_body_bytes);
    let (s, v) = deliver(&env, "/webhooks/stripe", &large, &signed(&large)).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("applied")), "{v}");
    assert_eq!(plan_and_version(&env).await.0, "pro");

    // The admin API keeps its limit (a valid body, padded with whitespace).
    let body = format!(
        "{}{}",
        json!({"id": "bob", "plan": "free"}),
        " ".repeat(70_000)
    );
    let (s, v) = env.post_raw("/admin/accounts", &body, Some(ADMIN)).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{v}"
    );
}

/// `server.webhook_listen`: the webhooks (and /healthz) answer on their own listener, and only
/// there; the decision and admin API is not served on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_answer_on_their_own_listener_only() {
    let mut env = Env::build(Backend::RedisPostgres, 0, BILLING, &redis_url(), None).await;
    env.cfg.server.webhook_listen = Some("127.0.0.1:0".into());
    env.add_sidecar().await;
    let key = env.account("acme", "free", "UTC").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hooks = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(tollgate_sidecar::serve_webhooks(
        env.engine().clone(),
        listener,
    ));

    let ev = subscription_event(
        "evt_1",
        "customer.subscription.created",
        now_s() - 100,
        "active",
        "price_pro",
    );
    let raw = serde_json::to_vec(&ev).unwrap();
    let post = |base: String, path: &'static str, token: Option<&'static str>| {
        let mut r = env.http.post(format!("{base}{path}")).body(raw.clone());
        if path == "/webhooks/stripe" {
            r = r.header(
                "stripe-signature",
                sign_stripe(&raw, STRIPE_SECRET, now_s()),
            );
        }
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // Not on the main listener any more: 404 like any unknown route, nothing recorded.
    let (s, v) = post(env.base(0).to_string(), "/webhooks/stripe", None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let rc = rc_event(
        "rc1",
        "INITIAL_PURCHASE",
        "vip.weekly",
        NOON,
        "otx_1",
        "PRODUCTION",
    );
    let (s, _) = revenuecat(&env, &rc).await;
    assert_eq!(s, 404);
    assert_eq!(events(&env).await, 0);
    assert_eq!(plan_and_version(&env).await.0, "free");
    // On the webhook listener.
    let (s, v) = post(hooks.clone(), "/webhooks/stripe", None).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("applied")), "{v}");
    assert_eq!(plan_and_version(&env).await.0, "pro");
    let health = env
        .http
        .get(format!("{hooks}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // The decision and admin API are not served there, whatever the token.
    for (path, token) in [
        ("/v1/authorize", Some(SERVICE)),
        ("/v1/consume", None),
        ("/admin/accounts", Some(ADMIN)),
    ] {
        let (s, v) = post(hooks.clone(), path, token).await;
        assert_eq!(s, 404, "{path}: {v}");
    }
    let r = env
        .http
        .get(format!("{hooks}/admin/accounts/acme"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = env
        .http
        .get(format!("{hooks}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // ...and still are on the main one.
    assert_eq!(authorize_on(&env, 0, &key, "r1").await["allowed"], true);
    server.abort();

    // The address is validated like `listen`.
    let base = "meters = [\"requests\"]\n[server]\n";
    for (value, ok) in [
        ("0.0.0.0:8701", true),
        ("[::1]:8701", true),
        ("localhost:8701", false),
        ("8701", false),
        ("127.0.0.1:8700", false), // the main listener's (default) address
    ] {
        let r = tollgate_sidecar::config::Config::from_toml(&format!(
            "{base}webhook_listen = \"{value}\"\n"
        ));
        match r {
            Ok(_) => assert!(ok, "{value} accepted"),
            Err(e) => {
                assert!(!ok, "{value}: {e}");
                assert!(e.to_string().contains("server.webhook_listen"), "{e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_webhooks_are_verified_applied_once_and_in_event_order() {
    let env = env_with(Backend::RedisPostgres, 1, "").await;
    let key = env.account("acme", "free", "UTC").await;
    let t = now_s();

    // A subscription starts: acme moves to pro.
    let e1 = subscription_event(
        "evt_1",
        "customer.subscription.created",
        t - 300,
        "active",
        "price_pro",
    );
    let (s, v) = stripe(&env, &e1).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("applied")), "{v}");
    let (plan, version) = plan_and_version(&env).await;
    assert_eq!(plan, "pro");
    assert_eq!(authorize_on(&env, 0, &key, "r1").await["limit"]["max"], 50);

    // The same delivery again: acknowledged, nothing changes.
    let (s, v) = stripe(&env, &e1).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("duplicate")), "{v}");
    assert_eq!(plan_and_version(&env).await.1, version);

    // Forged, tampered, stale or unsigned: 401, nothing recorded, nothing changed.
    let before = events(&env).await;
    let forged = subscription_event(
        "evt_x",
        "customer.subscription.deleted",
        t,
        "canceled",
        "price_pro",
    );
    let raw = serde_json::to_vec(&forged).unwrap();
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, String)>);
    let cases: Vec<Case> = vec![
        (
            "wrong secret",
            raw.clone(),
            vec![(
                "stripe-signature",
                sign_stripe(&raw, "whsec_not_the_secret_000", t),
            )],
        ),
        (
            "tampered body",
            [&raw[..], b" "].concat(),
            vec![("stripe-signature", sign_stripe(&raw, STRIPE_SECRET, t))],
        ),
        (
            "stale timestamp",
            raw.clone(),
            vec![(
                "stripe-signature",
                sign_stripe(&raw, STRIPE_SECRET, t - 3600),
            )],
        ),
        ("no signature", raw.clone(), vec![]),
        (
            "garbage header",
            raw.clone(),
            vec![("stripe-signature", "t=abc,v1=zz".to_string())],
        ),
    ];
    for (what, body, headers) in cases {
        let (s, v) = deliver(&env, "/webhooks/stripe", &body, &headers).await;
        assert_eq!(s, 401, "{what}: {v}");
        assert_eq!(v["error"]["code"], "bad_signature", "{what}");
    }
    assert_eq!(events(&env).await, before);
    assert_eq!(plan_and_version(&env).await, ("pro".to_string(), version));

    // Out of order: the cancellation (newer) arrives before an update (older).
    let e3 = subscription_event(
        "evt_3",
        "customer.subscription.deleted",
        t - 100,
        "canceled",
        "price_pro",
    );
    let e2 = subscription_event(
        "evt_2",
        "customer.subscription.updated",
        t - 200,
        "active",
        "price_pro",
    );
    assert_eq!(stripe(&env, &e3).await.1["outcome"], "applied");
    assert_eq!(plan_and_version(&env).await.0, "free");
    let (s, v) = stripe(&env, &e2).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("stale")), "{v}");
    assert_eq!(
        plan_and_version(&env).await.0,
        "free",
        "an older event never undoes a newer one"
    );
    assert_eq!(authorize_on(&env, 0, &key, "r2").await["limit"]["max"], 5);

    // An event type we do not handle: acknowledged and recorded.
    let unknown = json!({"id": "evt_u", "type": "customer.tax_id.created", "created": t, "data": {"object": {}}});
    let (s, v) = stripe(&env, &unknown).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("unknown")), "{v}");

    // A pack purchase grants once, whichever of its deliveries arrives (same session).
    let purchase = |id: &str| {
        json!({"id": id, "type": "checkout.session.completed", "created": t,
        "data": {"object": {"id": "cs_123", "payment_status": "paid",
            "metadata": {"tollgate_account": "acme", "tollgate_pack": "pack_1000"}}}})
    };
    // (500 are there already: pro's weekly allowance, granted when the subscription started.)
    assert_eq!(env.balance("acme").await, 500);
    assert_eq!(
        stripe(&env, &purchase("evt_p1")).await.1["outcome"],
        "applied"
    );
    assert_eq!(
        stripe(&env, &purchase("evt_p2")).await.1["outcome"],
        "applied"
    );
    assert_eq!(env.balance("acme").await, 1500);
    // Its refund revokes what is left of it.
    let refund = json!({"id": "evt_r", "type": "charge.refunded", "created": t,
        "data": {"object": {"id": "ch_1", "metadata": {"tollgate_account": "acme", "tollgate_grant": "stripe.cs_123"}}}});
    let (s, v) = stripe(&env, &refund).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("applied")), "{v}");
    assert_eq!(env.balance("acme").await, 500);
    env.sync().await;
    assert_eq!(
        env.sql_i64(
            "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'revoke'",
            "acme"
        )
        .await,
        1
    );
    let (_, list) = env.admin_get("/admin/accounts/acme/billing-events").await;
    assert_eq!(list["events"].as_array().unwrap().len(), 6, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revenuecat_webhooks_need_the_shared_secret_and_apply_once() {
    let env = env_with(Backend::RedisPostgres, 1, "").await;
    env.account("acme", "free", "UTC").await;
    let ev = |id: &str, kind: &str, product: &str, ts: u64| {
        serde_json::to_vec(&json!({"api_version": "1.0", "event": {
            "id": id, "type": kind, "app_user_id": "acme", "product_id": product,
            "event_timestamp_ms": ts, "purchased_at_ms": ts, "expiration_at_ms": ts + 7 * 86_400_000,
            "transaction_id": format!("tx_{id}"), "original_transaction_id": "otx_1", "period_type": "NORMAL"
        }}))
        .unwrap()
    };
    let auth = |s: &str| vec![("authorization", format!("Bearer {s}"))];
    let body = ev("rc1", "INITIAL_PURCHASE", "vip.weekly", NOON - 1000);
    let (s, _) = deliver(
        &env,
        "/webhooks/revenuecat",
        &body,
        &auth("wrong-secret-000000000"),
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = deliver(&env, "/webhooks/revenuecat", &body, &[]).await;
    assert_eq!(s, 401);
    assert_eq!(plan_and_version(&env).await.0, "free");
    let (s, v) = deliver(&env, "/webhooks/revenuecat", &body, &auth(RC_SECRET)).await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("applied")), "{v}");
    assert_eq!(plan_and_version(&env).await.0, "pro");
    // The VIP tier's weekly reward came with it, once.
    assert_eq!(env.balance("acme").await, 500);
    let (_, v) = deliver(&env, "/webhooks/revenuecat", &body, &auth(RC_SECRET)).await;
    assert_eq!(v["outcome"], "duplicate");

    // Points pack: granted once per transaction.
    let pack = ev("rc2", "NON_RENEWING_PURCHASE", "points.200", NOON);
    assert_eq!(
        deliver(&env, "/webhooks/revenuecat", &pack, &auth(RC_SECRET))
            .await
            .1["outcome"],
        "applied"
    );
    assert_eq!(env.balance("acme").await, 700);
    // Expiration: back to the fallback plan.
    let exp = ev("rc3", "EXPIRATION", "vip.weekly", NOON + 1000);
    assert_eq!(
        deliver(&env, "/webhooks/revenuecat", &exp, &auth(RC_SECRET))
            .await
            .1["outcome"],
        "applied"
    );
    assert_eq!(plan_and_version(&env).await.0, "free");
    // Unknown product: recorded as unmapped, nothing changes.
    let odd = ev("rc4", "INITIAL_PURCHASE", "mystery.product", NOON + 2000);
    assert_eq!(
        deliver(&env, "/webhooks/revenuecat", &odd, &auth(RC_SECRET))
            .await
            .1["outcome"],
        "unmapped"
    );
    assert_eq!(plan_and_version(&env).await.0, "free");
}

mod fuzz {
    use super::*;
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    /// Any bytes, correctly signed or not, to both webhooks: a 4xx, never a 5xx, and an error
    /// changes nothing (no event recorded, the account untouched). 150 generated cases.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn webhook_payloads_never_panic_and_change_nothing_on_error() {
        let env = env_with(Backend::RedisPostgres, 1, "").await;
        env.account("acme", "free", "UTC").await;
        let strategy = (
            proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            "\\{\"id\":\"[a-z_]{0,8}\",\"type\":\"[a-z.]{0,30}\",\"created\":[0-9]{0,12}(,\"data\":\\{\\})?\\}",
            proptest::bool::ANY,
            0usize..3,
        );
        let mut runner = TestRunner::deterministic();
        let (mut rejected, mut accepted) = (0, 0);
        for _ in 0..150 {
            let (body, json_like, signed, which) =
                strategy.new_tree(&mut runner).unwrap().current();
            let payload = match which {
                0 => body.clone(),
                1 => json_like.into_bytes(),
                _ => [&b"{\"id\":"[..], &body[..]].concat(),
            };
            // A header value must be visible ASCII to be sent at all.
            let noise: String = body
                .iter()
                .take(40)
                .map(|b| (b % 94 + 33) as char)
                .collect();
            let stripe_sig = if signed {
                sign_stripe(&payload, STRIPE_SECRET, now_s())
            } else {
                noise.clone()
            };
            let rc_auth = if signed { RC_SECRET.to_string() } else { noise };
            for (path, header, value) in [
                ("/webhooks/stripe", "stripe-signature", stripe_sig),
                ("/webhooks/revenuecat", "authorization", rc_auth),
            ] {
                let before = (events(&env).await, plan_and_version(&env).await);
                let (s, v) = deliver(&env, path, &payload, &[(header, value)]).await;
                assert!(s < 500, "{path}: {s} {v}");
                if s >= 400 {
                    rejected += 1;
                    assert_eq!(
                        (events(&env).await, plan_and_version(&env).await),
                        before,
                        "{path}: {v}"
                    );
                } else {
                    accepted += 1;
                }
            }
        }
        println!("webhook fuzz: 300 deliveries, {rejected} rejected with 4xx and no change, {accepted} acknowledged");
        assert!(rejected > 0);
    }
}

/// A commit larger than its hold takes a limit past a threshold with no request after it: the
/// commit raises the alert itself (an LLM response's tokens are known only at commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_crossed_at_commit_is_raised_by_the_commit() {
    let env = env_with(Backend::RedisPostgres, 1, "").await;
    let key = env.account("acme", "tokens", "UTC").await; // 100 tokens per day
    let body = |idem: &str, tokens: u64| json!({"api_key": key, "idempotency_key": idem, "meters": {"requests": 1, "tokens": tokens}});
    let commit = |hold: &str, tokens: u64| {
        let env = &env;
        let body = json!({"hold_id": hold, "meters": {"requests": 1, "tokens": tokens}});
        async move { env.post("/v1/commit", &body).await.0 }
    };
    let alerts = || async {
        let (_, v) = env.admin_get("/admin/accounts/acme/alerts").await;
        let mut got = v["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["meter"] == "tokens")
            .map(|a| (a["level"].as_i64().unwrap(), a["used"].as_i64().unwrap()))
            .collect::<Vec<_>>();
        got.sort();
        got
    };
    let wait_for = |n: usize| async move {
        for _ in 0..100 {
            if alerts().await.len() >= n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        alerts().await
    };
    for (idem, est) in [("a1", 10), ("a2", 5)] {
        let (_, v) = env.post("/v1/authorize", &body(idem, est)).await;
        assert_eq!(v["allowed"], true, "{v}");
    }
    assert_eq!(wait_for(0).await, vec![], "15 of 100 held: nothing yet");
    assert_eq!(commit("acme/a1", 85).await, 200);
    assert_eq!(wait_for(1).await, vec![(80, 90)], "85 + the other hold's 5");
    // A replay of the commit raises nothing again; the second commit crosses 95.
    assert_eq!(commit("acme/a1", 85).await, 200);
    assert_eq!(commit("acme/a2", 12).await, 200);
    assert_eq!(wait_for(2).await, vec![(80, 90), (95, 97)]);
}

/// Plans written through the API, on every backend.
mod written_plans {
    use super::*;

    conformance! {
        async fn a_plan_written_through_the_api_applies_on_the_next_request_of_every_sidecar(backend: Backend) {
            let env = env_with(backend, 2, "").await;
            let put = |body: Value| {
                let env = &env;
                async move { admin_send(env, "PUT", "/admin/plans/team", &body).await }
            };
            let (s, v) = put(json!({"limits": [{"meter": "requests", "window": "day", "max": 3}]})).await;
            assert_eq!((s, v["accounts"].clone()), (200, json!(0)), "{v}");
            let key = env.account("acme", "team", "UTC").await;
            // bob is on the plan too, but sidecar 1 meets him only after the change.
            let bob = env.account("bob", "team", "UTC").await;
            for i in 0..3 {
                assert_eq!(authorize_on(&env, 1, &key, &format!("a{i}")).await["allowed"], true);
            }
            assert_eq!(authorize_on(&env, 1, &key, "a3").await["status"], 429);
            // Raised through sidecar 0: sidecar 1's next request has the new limit.
            let (s, v) = put(json!({"limits": [{"meter": "requests", "window": "day", "max": 10}]})).await;
            assert_eq!((s, v["accounts"].clone()), (200, json!(2)), "{v}");
            // An account sidecar 1 had not cached reads its plan's new version too (first, before
            // any account it had cached makes it re-read the plan).
            assert_eq!(authorize_on(&env, 1, &bob, "b1").await["limit"]["max"], 10);
            let v = authorize_on(&env, 1, &key, "a4").await;
            assert_eq!((v["allowed"].clone(), v["limit"]["max"].clone()), (json!(true), json!(10)), "{v}");
            // A bad plan is refused and changes nothing.
            let (s, v) = put(json!({"limits": [{"meter": "requests", "window": "fortnight", "max": 1}]})).await;
            assert_eq!(s, 400, "{v}");
            let (s, v) = put(json!({"limits": [{"meter": "nonsense", "window": "day", "max": 1}]})).await;
            assert_eq!(s, 400, "{v}");
            assert_eq!(authorize_on(&env, 1, &key, "a5").await["limit"]["max"], 10);
            // A sidecar started later knows the plan from the ledger.
            let mut env = env;
            env.add_sidecar().await;
            assert_eq!(authorize_on(&env, 2, &key, "a6").await["limit"]["max"], 10);
            let (_, list) = env.admin_get("/admin/plans").await;
            assert!(list["plans"].as_array().unwrap().iter().any(|p| p["name"] == "team"), "{list}");
        }

        /// DELETE /admin/plans/{name}: refused while accounts are on a written plan; once
        /// deleted, no sidecar puts an account on it (also one that had it in memory); written
        /// again it applies afresh; deleting an override of a configured plan gives its accounts
        /// the configured limits again on every sidecar.
        async fn a_written_plan_is_deleted_once_no_account_is_on_it(backend: Backend) {
            let env = env_with(backend, 2, "").await;
            let on = |i: usize, method: &'static str, path: &'static str, body: Value| {
                let env = &env;
                async move { admin_send_on(env, i, method, path, &body).await }
            };
            let limit = |max: u64| json!({"limits": [{"meter": "requests", "window": "day", "max": max}]});
            assert_eq!(on(0, "PUT", "/admin/plans/team", limit(3)).await.0, 200);
            assert_eq!(on(1, "GET", "/admin/plans/team", json!(null)).await.0, 200, "sidecar 1 knows it");
            env.account("acme", "team", "UTC").await;
            let (s, v) = on(0, "DELETE", "/admin/plans/team", json!(null)).await;
            assert_eq!(s, 409, "acme is on it: {v}");
            assert_eq!(on(1, "GET", "/admin/plans/team", json!(null)).await.0, 200, "still there");
            assert_eq!(admin_send(&env, "PATCH", "/admin/accounts/acme", &json!({"plan": "basic"})).await.0, 200);
            let (s, v) = on(0, "DELETE", "/admin/plans/team", json!(null)).await;
            assert_eq!((s, v["accounts"].clone(), v["reverted_to_config"].clone()), (200, json!(0), json!(false)), "{v}");
            assert_eq!(on(0, "DELETE", "/admin/plans/team", json!(null)).await.0, 404, "deleted already");
            // Sidecar 1 had it in memory: it still refuses to put an account on it.
            let (s, v) = on(1, "POST", "/admin/accounts", json!({"id": "beta", "plan": "team"})).await;
            assert_eq!(s, 400, "{v}");
            assert_eq!(on(1, "GET", "/admin/plans/team", json!(null)).await.0, 404);
            let (_, list) = env.admin_get("/admin/plans").await;
            assert!(!list["plans"].as_array().unwrap().iter().any(|p| p["name"] == "team"), "{list}");
            // Written again: the new limits, on the sidecar that knew the old ones too.
            assert_eq!(on(0, "PUT", "/admin/plans/team", limit(2)).await.0, 200);
            assert_eq!(on(1, "POST", "/admin/accounts", json!({"id": "gamma", "plan": "team"})).await.0, 201);
            let (_, keys) = on(1, "POST", "/admin/accounts/gamma/keys", json!({"name": "k"})).await;
            let gamma = keys["api_key"].as_str().unwrap().to_string();
            let allowed = [
                authorize_on(&env, 1, &gamma, "g1").await["allowed"].clone(),
                authorize_on(&env, 1, &gamma, "g2").await["allowed"].clone(),
                authorize_on(&env, 1, &gamma, "g3").await["allowed"].clone(),
            ];
            assert_eq!(allowed, [json!(true), json!(true), json!(false)]);
            // A plan only in the configuration is not deleted here.
            assert_eq!(on(0, "DELETE", "/admin/plans/free", json!(null)).await.0, 409);
            // An override of a configured plan: deleting it brings the configured one back.
            let key = env.account("dan", "free", "UTC").await; // 5 a day
            assert_eq!(on(0, "PUT", "/admin/plans/free", limit(1)).await.0, 200);
            assert_eq!(authorize_on(&env, 1, &key, "d1").await["limit"]["max"], 1);
            let (s, v) = on(0, "DELETE", "/admin/plans/free", json!(null)).await;
            assert_eq!((s, v["accounts"].clone(), v["reverted_to_config"].clone()), (200, json!(1), json!(true)), "{v}");
            let v = authorize_on(&env, 1, &key, "d2").await;
            assert_eq!((v["allowed"].clone(), v["limit"]["max"].clone()), (json!(true), json!(5)), "{v}");
            let (_, p) = on(1, "GET", "/admin/plans/free", json!(null)).await;
            assert_eq!(p["limits"][0]["max"], 5, "{p}");
        }
    }
}

//! docs/openapi.json against the server: it documents exactly the routes the router serves
//! (read from the router's source), and every documented operation, called on a running
//! sidecar, answers a documented status with a body that has the documented required fields;
//! every operation that requires the admin token refuses a call without it.

#[macro_use]
mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const DOC: &str = include_str!("../../docs/openapi.json");
const ROUTER_SOURCES: [&str; 2] = [
    include_str!("../src/api.rs"),
    include_str!("../src/api_billing.rs"),
];
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// (METHOD, path) of every `.route("path", get(..).post(..))` in the router's source.
fn served_routes() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for src in ROUTER_SOURCES {
        for chunk in src.split(".route(").skip(1) {
            let Some(rest) = chunk.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((path, after)) = rest.split_once('"') else {
                continue;
            };
            // The method router is everything up to the parenthesis closing `.route(`.
            let mut depth = 1;
            let mut end = after.len();
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let methods = &after[..end];
            for m in METHODS {
                let called = methods
                    .match_indices(&format!("{m}("))
                    .any(|(i, _)| i == 0 || !methods.as_bytes()[i - 1].is_ascii_alphanumeric());
                if called {
                    out.insert((m.to_uppercase(), path.to_string()));
                }
            }
        }
    }
    out
}

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is JSON")
}

fn documented_routes(d: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in d["paths"].as_object().unwrap() {
        for m in METHODS {
            if ops.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_routes_the_router_serves() {
    let d = doc();
    assert_eq!(
        d["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let served = served_routes();
    assert!(served.len() > 30, "router source parsed: {served:?}");
    let documented = documented_routes(&d);
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not served: {extra:?}");
}

/// Follows a `$ref` into the document.
fn resolve<'a>(d: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = d;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(d, cur)
        }
        None => v,
    }
}

/// A body that gets past validation where the route needs one.
fn body_for(method: &str, path: &str) -> Option<Value> {
    Some(match (method, path) {
        ("POST", "/v1/authorize") | ("POST", "/v1/consume") | ("POST", "/v1/check") => {
            json!({"account": "acme", "idempotency_key": "oa-1", "meters": {"requests": 1}})
        }
        ("POST", "/v1/commit") => json!({"hold_id": "acme/oa-1", "meters": {"requests": 1}}),
        ("POST", "/v1/release") => json!({"hold_id": "acme/oa-1"}),
        ("POST", "/v1/extend") => json!({"hold_id": "acme/oa-1", "meters": {"requests": 2}}),
        ("POST", "/v1/commit/batch") => json!({"commits": []}),
        ("POST", "/v1/authorize/batch") => json!({"requests": []}),
        ("POST", "/admin/accounts") => json!({"id": "oa-new", "plan": "basic"}),
        ("PATCH", "/admin/accounts/{id}") => json!({"timezone": "UTC"}),
        ("POST", "/admin/accounts/{id}/keys") => json!({"name": "doc"}),
        ("POST", "/admin/accounts/{id}/grants") => json!({"grant_id": "oa-g", "amount": 5}),
        ("PUT", "/admin/accounts/{id}/subscription") => {
            json!({"plan": "basic", "status": "active"})
        }
        ("POST", "/admin/pools") => json!({"id": "oa-pool", "stock": 3}),
        ("PUT", "/admin/plans/{name}") => {
            json!({"limits": [{"meter": "requests", "window": "day", "max": 7}]})
        }
        ("POST", "/admin/pools/{id}/claims") => json!({"account": "acme"}),
        ("POST", "/webhooks/stripe") | ("POST", "/webhooks/revenuecat") => json!({"id": "x"}),
        _ => return None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let extra = r#"
[billing]
fallback_plan = "basic"
[billing.stripe]
secret = "whsec_test_secret_0123456789"
[billing.revenuecat]
secret = "rc_test_secret_0123456789"
"#;
    let env = Env::build(Backend::RedisPostgres, 1, extra, &redis_url(), None).await;
    env.account("acme", "basic", "UTC").await;
    let (_, keys) = env.admin_get("/admin/accounts/acme/keys").await;
    let key_id = keys[0]["key_id"].as_str().unwrap().to_string();
    assert_eq!(
        env.admin_post("/admin/pools", &json!({"id": "coupon", "stock": 2}))
            .await
            .0,
        201
    );
    let d = doc();
    let mut checked = 0;
    for (method, path) in documented_routes(&d) {
        let op = &d["paths"][&path][method.to_lowercase()];
        let concrete = path
            .replace("/keys/{id}/", &format!("/keys/{key_id}/"))
            .replace("/keys/{key}/", &format!("/keys/{key_id}/"))
            .replace("/pools/{id}", "/pools/coupon")
            .replace("{name}", "basic")
            .replace("{id}", "acme");
        let query = match path.as_str() {
            "/admin/top" => "?meter=requests&window=day",
            _ => "",
        };
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        let send = |token: bool| {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut r = env
                .http
                .request(m, format!("{}{concrete}{query}", env.base(0)));
            if token {
                r = r.bearer_auth(ADMIN);
            }
            if let Some(b) = body_for(&method, &path) {
                r = r.json(&b);
            }
            r.send()
        };
        let resp = send(true).await.unwrap();
        let status = resp.status().as_u16().to_string();
        let text = resp.text().await.unwrap();
        let documented = &op["responses"];
        assert!(
            documented.get(&status).is_some(),
            "{method} {path} answered {status}, documented {:?}: {text}",
            documented.as_object().map(|o| o.keys().collect::<Vec<_>>())
        );
        // The body has the documented required fields.
        let schema = resolve(&d, &documented[&status]);
        let schema = &resolve(&d, schema)["content"]["application/json"]["schema"];
        if let (Some(required), Ok(body)) = (
            resolve(&d, schema)["required"].as_array(),
            serde_json::from_str::<Value>(&text),
        ) {
            for field in required {
                let f = field.as_str().unwrap();
                assert!(
                    body.get(f).is_some(),
                    "{method} {path} {status}: no {f:?} in {text}"
                );
            }
        }
        if secured {
            let s = send(false).await.unwrap().status().as_u16();
            assert_eq!(s, 401, "{method} {path} without the admin token");
        }
        checked += 1;
    }
    println!("openapi: {checked} documented operations called, each answered as documented");
    assert!(checked > 30);
}

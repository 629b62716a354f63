//! The billing side of the HTTP API: plans, subscriptions, grants, pools, alerts, billing
//! webhooks and the operator's reports (export, top consumers, reconciliation, jobs). Every
//! route except the webhooks needs the admin token; webhooks authenticate with the provider's
//! signature or shared secret. Documented in docs/openapi.json.
//!
//! The webhooks are served on the main listener, or — with `server.webhook_listen` — by
//! [`webhook_router`] on a listener of their own, and then nowhere else.

use crate::engine::{Engine, NewPool, SubscriptionChange};
use crate::error::ApiError;
use crate::handler::{fresh, parse, require_admin, respond, Body, St};
use crate::webhooks::Provider;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The billing routes of the main listener; the webhooks among them only when they have no
/// listener of their own (`server.webhook_listen`).
pub fn routes(webhooks_apart: bool) -> Router<Arc<Engine>> {
    let admin = Router::new()
        .route("/admin/plans", get(plans))
        .route(
            "/admin/plans/{name}",
            get(get_plan).put(put_plan).delete(delete_plan),
        )
        .route(
            "/admin/accounts/{id}/subscription",
            get(get_subscription).put(put_subscription),
        )
        .route("/admin/accounts/{id}/alerts", get(alerts))
        .route("/admin/accounts/{id}/billing-events", get(account_events))
        .route("/admin/billing-events", get(events))
        .route("/admin/pools", post(create_pool).get(list_pools))
        .route("/admin/pools/{id}", get(pool))
        .route("/admin/pools/{id}/claims", post(claim))
        .route("/admin/export", get(export))
        .route("/admin/top", get(top))
        .route("/admin/reconcile", get(reconcile))
        .route("/admin/jobs/run", post(run_jobs));
    if webhooks_apart {
        admin
    } else {
        admin.merge(webhook_routes())
    }
}

/// Largest webhook body: providers' events outgrow `server.max_body_bytes` (a Stripe
/// subscription with many items, a checkout session with line items and metadata).
pub const WEBHOOK_MAX_BODY_BYTES: usize = 256 * 1024;

/// The webhook routes, each taking bodies up to [`WEBHOOK_MAX_BODY_BYTES`] (the innermost body
/// limit is the one that applies).
fn webhook_routes() -> Router<Arc<Engine>> {
    Router::new()
        .route(
            "/webhooks/stripe",
            post(stripe).layer(DefaultBodyLimit::max(WEBHOOK_MAX_BODY_BYTES)),
        )
        .route(
            "/webhooks/revenuecat",
            post(revenuecat).layer(DefaultBodyLimit::max(WEBHOOK_MAX_BODY_BYTES)),
        )
}

/// What the webhook listener (`server.webhook_listen`) serves: the webhooks and `/healthz`,
/// nothing else (every other path is 404), so it may face the internet while the decision and
/// admin API stay on `server.listen`.
pub fn webhook_router(engine: Arc<Engine>) -> Router {
    Router::new()
        .merge(webhook_routes())
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(engine)
}

/// A plan as answered: its name, its fields as in the configuration, and (after a write) how
/// many accounts are on it.
#[derive(Serialize)]
struct PlanBody<'a> {
    name: &'a str,
    #[serde(flatten)]
    plan: &'a crate::config::Plan,
    #[serde(skip_serializing_if = "Option::is_none")]
    accounts: Option<usize>,
}

impl<'a> PlanBody<'a> {
    fn new(name: &'a str, plan: &'a crate::config::Plan) -> Self {
        PlanBody {
            name,
            plan,
            accounts: None,
        }
    }
}

async fn plans(State(e): St, headers: HeaderMap) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let plans = e.plan_list();
        Ok(serde_json::json!({
            "fallback_plan": e.cfg.billing.fallback_plan,
            "plans": plans.iter().map(|(name, p)| PlanBody::new(name, p)).collect::<Vec<_>>(),
        }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn get_plan(State(e): St, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        tollgate_protocol::validate_id("name", &name)?;
        e.reload_plan(&name).await?;
        let plan = e
            .plan(&name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown plan {name:?}")))?;
        serde_json::to_value(PlanBody::new(&name, &plan))
            .map_err(|err| ApiError::Internal(err.to_string()))
    }
    .await;
    respond(&e, fresh(r), false)
}

/// Creates or replaces a plan; accounts on it get the new limits on their next request.
async fn put_plan(
    State(e): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let plan = parse::<crate::config::Plan>(body)?;
        let (plan, accounts) = e.put_plan(&name, plan).await?;
        serde_json::to_value(PlanBody {
            accounts: Some(accounts),
            ..PlanBody::new(&name, &plan)
        })
        .map_err(|err| ApiError::Internal(err.to_string()))
    }
    .await;
    respond(&e, fresh(r), false)
}

/// Deletes a plan written through the API (409 while accounts are on it, unless the
/// configuration has a plan of that name to fall back to).
async fn delete_plan(State(e): St, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let accounts = e.delete_plan(&name).await?;
        // The configuration's plan of that name, if any, applies again.
        Ok(serde_json::json!({
            "name": name,
            "deleted": true,
            "accounts": accounts,
            "reverted_to_config": e.cfg.plans.contains_key(&name),
        }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn get_subscription(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.subscription(&id).await
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn put_subscription(
    State(e): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.set_subscription(&id, parse::<SubscriptionChange>(body)?)
            .await
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Limit {
    #[serde(default = "hundred")]
    limit: i64,
}

fn hundred() -> i64 {
    100
}

fn check_limit(l: i64) -> Result<i64, ApiError> {
    if (1..=1000).contains(&l) {
        Ok(l)
    } else {
        Err(ApiError::Invalid("limit: must be 1..=1000".into()))
    }
}

async fn alerts(
    State(e): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<Limit>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let Query(q) = q.map_err(|err| ApiError::Invalid(err.body_text()))?;
        let rows = e.ledger.alerts_of(&id, check_limit(q.limit)?).await?;
        Ok(serde_json::json!({ "account": id, "alerts": rows }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn account_events(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let rows = e.ledger.billing_events(Some(&id), 100).await?;
        Ok(serde_json::json!({ "events": rows }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn events(
    State(e): St,
    headers: HeaderMap,
    q: Result<Query<Limit>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let Query(q) = q.map_err(|err| ApiError::Invalid(err.body_text()))?;
        let rows = e.ledger.billing_events(None, check_limit(q.limit)?).await?;
        Ok(serde_json::json!({ "events": rows }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn create_pool(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.create_pool(parse::<NewPool>(body)?).await
    }
    .await;
    respond(&e, fresh(r), true)
}

async fn list_pools(State(e): St, headers: HeaderMap) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        Ok(serde_json::json!({ "pools": e.ledger.pools().await? }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn pool(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.pool_state(&id).await
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    account: String,
}

async fn claim(State(e): St, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let b = parse::<ClaimBody>(body)?;
        e.claim(&id, &b.account).await
    }
    .await;
    // 201 for a new claim, 200 for a replay or an empty pool (see `claimed`).
    let created = matches!(&r, Ok((c, false)) if c.claimed);
    respond(&e, r, created)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    after: i64,
    #[serde(default = "thousand")]
    limit: i64,
    #[serde(default = "json_format")]
    format: String,
}

fn thousand() -> i64 {
    1000
}
fn json_format() -> String {
    "json".into()
}

/// One CSV field, quoted when it needs to be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

async fn export(
    State(e): St,
    headers: HeaderMap,
    q: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let Query(q) = q.map_err(|err| ApiError::Invalid(err.body_text()))?;
        if !(1..=10_000).contains(&q.limit) || q.after < 0 {
            return Err(ApiError::Invalid(
                "limit: must be 1..=10000 (and after >= 0)".into(),
            ));
        }
        if let Some(a) = &q.account {
            tollgate_protocol::validate_id("account", a)?;
        }
        let rows = e
            .ledger
            .export(q.account.as_deref(), q.after, q.limit)
            .await?;
        let next = (rows.len() as i64 == q.limit)
            .then(|| rows.last().map(|r| r.seq))
            .flatten();
        match q.format.as_str() {
            "json" => Ok(axum::Json(serde_json::json!({ "entries": rows, "next": next }))
                .into_response()),
            "csv" => {
                let mut out = String::from(
                    "seq,account_id,kind,key_id,idempotency_key,hold_id,credit,shortfall,meters,route,model,at_ms,correlation_id\n",
                );
                for r in &rows {
                    let cells = [
                        r.seq.to_string(),
                        r.account_id.clone(),
                        r.kind.clone(),
                        r.key_id.clone().unwrap_or_default(),
                        r.idempotency_key.clone().unwrap_or_default(),
                        r.hold_id.clone().unwrap_or_default(),
                        r.credit.to_string(),
                        r.shortfall.to_string(),
                        r.meters.clone().unwrap_or_default(),
                        r.route.clone().unwrap_or_default(),
                        r.model.clone().unwrap_or_default(),
                        r.at_ms.to_string(),
                        r.correlation_id.clone().unwrap_or_default(),
                    ];
                    let line: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
                    out.push_str(&line.join(","));
                    out.push('\n');
                }
                let mut resp = ([(header::CONTENT_TYPE, "text/csv")], out).into_response();
                if let Some(n) = next {
                    if let Ok(v) = n.to_string().parse() {
                        resp.headers_mut().insert("x-tollgate-next", v);
                    }
                }
                Ok(resp)
            }
            other => Err(ApiError::Invalid(format!(
                "format: {other:?} is not json or csv"
            ))),
        }
    }
    .await;
    match r {
        Ok(resp) => resp,
        Err(err) => respond::<()>(&e, Err(err), false),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    meter: String,
    #[serde(default)]
    window: Option<crate::windows::Window>,
    #[serde(default)]
    period: Option<String>,
    #[serde(default = "ten")]
    limit: i64,
}

fn ten() -> i64 {
    10
}

async fn top(
    State(e): St,
    headers: HeaderMap,
    q: Result<Query<TopQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let Query(q) = q.map_err(|err| ApiError::Invalid(err.body_text()))?;
        let (period, rows) = e
            .top(&q.meter, q.window, q.period.as_deref(), q.limit)
            .await?;
        Ok(serde_json::json!({ "meter": q.meter, "period": period, "top": rows }))
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountQuery {
    #[serde(default)]
    account: Option<String>,
}

async fn reconcile(
    State(e): St,
    headers: HeaderMap,
    q: Result<Query<AccountQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let Query(q) = q.map_err(|err| ApiError::Invalid(err.body_text()))?;
        e.reconcile(q.account.as_deref()).await
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn run_jobs(State(e): St, headers: HeaderMap) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let granted = e.grant_included_credits().await?;
        let lapsed = e.lapse_expired_credit().await?;
        e.deliver_alerts().await;
        Ok(serde_json::json!({ "included_grants": granted, "lapsed_accounts": lapsed }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn webhook(e: Arc<Engine>, p: Provider, sig: Option<&str>, body: Body) -> Response {
    let r = async {
        let bytes: Bytes =
            body.map_err(|_| ApiError::Invalid("body: too large or unreadable".into()))?;
        e.webhook(p, sig, &bytes).await
    }
    .await;
    match r {
        Ok(out) => (StatusCode::OK, axum::Json(out)).into_response(),
        Err(err) => respond::<()>(&e, Err(err), false),
    }
}

async fn stripe(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let sig = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    webhook(e, Provider::Stripe, sig.as_deref(), body).await
}

async fn revenuecat(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let sig = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    webhook(e, Provider::RevenueCat, sig.as_deref(), body).await
}

//! The HTTP API (axum). Decisions answer 200 with a decision body, allowed or not; 4xx is a bad
//! request that changed nothing; 5xx is reserved for "the sidecar is broken", which the filter
//! treats like "unreachable". Routes are listed in docs/API.md and docs/openapi.json.

use crate::engine::{AccountPatch, Engine, NewAccount, NewKey};
use crate::error::ApiError;
use crate::handler::{
    fresh, parse, require_admin, require_decision, require_reader, respond, Body, St,
};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tollgate_protocol::{CommitRequest, GrantRequest, ReleaseRequest, SpendRequest};

pub fn router(engine: Arc<Engine>) -> Router {
    let limit = engine.cfg.server.max_body_bytes;
    // Commits may carry the response's text (up to MAX_OUTPUT_TEXT per item) and the filter
    // batches them: their routes take larger bodies than every other route. The innermost
    // limit is the one that applies.
    let commit_limit = engine.cfg.server.max_commit_body_bytes;
    Router::new()
        .route("/v1/authorize", post(authorize))
        .route(
            "/v1/commit",
            post(commit).layer(DefaultBodyLimit::max(commit_limit)),
        )
        .route(
            "/v1/commit/batch",
            post(crate::api_batch::commit_batch).layer(DefaultBodyLimit::max(commit_limit)),
        )
        .route(
            "/v1/authorize/batch",
            post(crate::api_batch::authorize_batch).layer(DefaultBodyLimit::max(commit_limit)),
        )
        .route("/v1/release", post(release))
        .route("/v1/extend", post(extend))
        .route("/v1/cancel", post(cancel))
        .route("/v1/consume", post(consume))
        .route("/v1/check", post(check))
        .route("/v1/accounts/{id}/usage", get(account_usage))
        .route("/v1/accounts/{id}/balance", get(account_balance))
        .route("/v1/accounts/{id}/ledger", get(account_ledger))
        .route("/v1/accounts/{id}/keys/{key}/usage", get(key_usage))
        .route("/admin/accounts", post(create_account))
        .route(
            "/admin/accounts/{id}",
            get(get_account).patch(patch_account),
        )
        .route("/admin/accounts/{id}/keys", post(create_key).get(list_keys))
        .route("/admin/accounts/{id}/grants", post(grant).get(list_grants))
        .route("/admin/keys/{id}/disable", post(disable_key))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::api_billing::routes(
            engine.cfg.server.webhook_listen.is_some(),
        ))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn(refuse_control_characters))
        .layer(DefaultBodyLimit::max(limit))
        .layer(guards(&engine.cfg.server))
        .with_state(engine)
}

/// What every listener puts in front of its routes: a request that takes longer than
/// `server.request_timeout_ms` is answered 503 (a decision the filter waits for is then failed by
/// its own deadline long before), and at most `server.max_concurrent_requests` are served at once
/// (the rest wait for a slot), so a flood cannot exhaust memory or PostgreSQL connections.
pub fn guards(
    s: &crate::config::ServerConfig,
) -> tower::layer::util::Stack<
    tower::limit::GlobalConcurrencyLimitLayer,
    tower_http::timeout::TimeoutLayer,
> {
    tower::layer::util::Stack::new(
        tower::limit::GlobalConcurrencyLimitLayer::new(s.max_concurrent_requests),
        tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            std::time::Duration::from_millis(s.request_timeout_ms),
        ),
    )
}

/// Path parameters (account, key, pool ids) reach the ledger: one with a control character once
/// percent-decoded (a NUL, which PostgreSQL text cannot hold) is refused here with a 400.
async fn refuse_control_characters(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().as_bytes();
    let mut i = 0;
    while i < path.len() {
        let b = match (path[i], path.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                i += 2;
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .unwrap_or(b'%')
            }
            (b, _) => b,
        };
        if b < 0x20 || b == 0x7f {
            return ApiError::Invalid("path: control characters are not allowed".into())
                .into_response();
        }
        i += 1;
    }
    next.run(req).await
}

/// A spend request, once its caller may make it (see [`require_decision`]).
fn spend_request(e: &Engine, headers: &HeaderMap, body: Body) -> Result<SpendRequest, ApiError> {
    require_decision(e, headers, false)?;
    let req = parse::<SpendRequest>(body)?;
    if req.account.is_some() {
        require_decision(e, headers, true)?;
    }
    Ok(req)
}

async fn authorize(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async { e.authorize(spend_request(&e, &headers, body)?).await }.await;
    respond(&e, r, false)
}

async fn consume(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async { e.consume(spend_request(&e, &headers, body)?).await }.await;
    respond(&e, r, false)
}

async fn check(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async { e.check(spend_request(&e, &headers, body)?).await }.await;
    respond(&e, fresh(r), false)
}

async fn commit(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        require_decision(&e, &headers, false)?;
        e.commit(parse::<CommitRequest>(body)?).await
    }
    .await;
    respond(&e, r, false)
}

async fn extend(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        require_decision(&e, &headers, false)?;
        let d = e
            .extend(parse::<tollgate_protocol::ExtendRequest>(body)?)
            .await?;
        Ok((d, false))
    }
    .await;
    respond(&e, r, false)
}

async fn cancel(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        require_decision(&e, &headers, false)?;
        e.cancel(parse::<tollgate_protocol::CancelRequest>(body)?)
            .await
    }
    .await;
    respond(&e, r, false)
}

async fn release(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        require_decision(&e, &headers, false)?;
        e.release(&parse::<ReleaseRequest>(body)?.hold_id).await
    }
    .await;
    respond(&e, r, false)
}

#[derive(Serialize)]
struct UsageBody {
    account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    limits: Vec<crate::engine::UsageLine>,
}

async fn account_usage(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_reader(&e, &headers)?;
        let limits = e.usage(&id, None).await?;
        Ok(UsageBody {
            account: id,
            key_id: None,
            limits,
        })
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn key_usage(
    State(e): St,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
) -> Response {
    let r = async {
        require_reader(&e, &headers)?;
        let limits = e.usage(&id, Some(&key)).await?;
        Ok(UsageBody {
            account: id,
            key_id: Some(key),
            limits,
        })
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Serialize)]
struct BalanceBody {
    account: String,
    /// Spendable now (Redis).
    balance: u64,
    /// Grants as synced to the ledger: only when asked (`?grants=true`), since it is a
    /// PostgreSQL read and the balance is a hot path.
    #[serde(skip_serializing_if = "Option::is_none")]
    grants: Option<Vec<crate::ledger::GrantRow>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceQuery {
    #[serde(default)]
    grants: bool,
}

/// The balance from Redis alone (the check script, read-only); the ledger only when the caller
/// asks for the grants.
async fn account_balance(
    State(e): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<BalanceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_reader(&e, &headers)?;
        let Query(q) = q.map_err(|err| ApiError::Invalid(format!("query: {}", err.body_text())))?;
        let balance = e.balance(&id).await?;
        let grants = if q.grants {
            Some(e.ledger.grants_of(&id).await?)
        } else {
            None
        };
        Ok(BalanceBody {
            account: id,
            balance,
            grants,
        })
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    after: i64,
    #[serde(default = "page_size")]
    limit: i64,
}

fn page_size() -> i64 {
    100
}

#[derive(Serialize)]
struct LedgerPage {
    entries: Vec<crate::ledger::LedgerEntry>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
}

async fn account_ledger(
    State(e): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let r = async {
        require_reader(&e, &headers)?;
        let Query(page) =
            page.map_err(|err| ApiError::Invalid(format!("query: {}", err.body_text())))?;
        if !(1..=1000).contains(&page.limit) || page.after < 0 {
            return Err(ApiError::Invalid(
                "limit: must be 1..=1000 (and after >= 0)".into(),
            ));
        }
        e.get_account(&id).await?;
        let entries = e.ledger.history(&id, page.after, page.limit).await?;
        let next = (entries.len() as i64 == page.limit)
            .then(|| entries.last().map(|x| x.seq))
            .flatten();
        Ok(LedgerPage { entries, next })
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Serialize)]
struct AccountBody {
    id: String,
    plan: String,
    timezone: String,
    billing_anchor_day: i16,
    limits: Vec<crate::config::LimitSpec>,
    disabled: bool,
    /// The account above it (organization > team > account), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    /// Its spending draws on its parents' credit once its own is spent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    draw_from_parents: bool,
}

impl From<crate::ledger::AccountRow> for AccountBody {
    fn from(a: crate::ledger::AccountRow) -> Self {
        Self {
            id: a.id,
            plan: a.plan,
            timezone: a.timezone,
            billing_anchor_day: a.billing_anchor_day,
            limits: a.limits,
            disabled: a.disabled,
            parent: a.parent,
            draw_from_parents: a.draw_from_parents,
        }
    }
}

async fn create_account(State(e): St, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        Ok(AccountBody::from(
            e.create_account(parse::<NewAccount>(body)?).await?,
        ))
    }
    .await;
    respond(&e, fresh(r), true)
}

async fn get_account(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        Ok(AccountBody::from(e.get_account(&id).await?))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn patch_account(
    State(e): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        Ok(AccountBody::from(
            e.patch_account(&id, parse::<AccountPatch>(body)?).await?,
        ))
    }
    .await;
    respond(&e, fresh(r), false)
}

#[derive(Serialize)]
struct KeyBody {
    key_id: String,
    account: String,
    masked: String,
    name: String,
    limits: Vec<crate::config::LimitSpec>,
    disabled: bool,
    /// Only in the answer that created the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
}

impl KeyBody {
    fn new(k: crate::ledger::KeyRow, api_key: Option<String>) -> Self {
        Self {
            key_id: k.id,
            account: k.account_id,
            masked: k.masked,
            name: k.name,
            limits: k.limits,
            disabled: k.disabled,
            api_key,
        }
    }
}

async fn create_key(
    State(e): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let (row, plain) = e.create_key(&id, parse::<NewKey>(body)?).await?;
        Ok(KeyBody::new(row, Some(plain)))
    }
    .await;
    respond(&e, fresh(r), true)
}

async fn list_keys(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.get_account(&id).await?;
        let keys = e.ledger.keys_of(&id).await?;
        Ok(keys
            .into_iter()
            .map(|k| KeyBody::new(k, None))
            .collect::<Vec<_>>())
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn disable_key(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.set_key_disabled(&id, true).await?;
        Ok(serde_json::json!({ "key_id": id, "disabled": true }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn grant(State(e): St, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        e.grant(&id, parse::<GrantRequest>(body)?).await
    }
    .await;
    respond(&e, r, true)
}

async fn list_grants(State(e): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        require_admin(&e, &headers)?;
        let grants = e.ledger.grants_of(&id).await?;
        Ok(serde_json::json!({ "account": id, "grants": grants }))
    }
    .await;
    respond(&e, fresh(r), false)
}

async fn readyz(State(e): St) -> Response {
    let mut conn = e.store.conn();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok();
    let ledger_ok = e.ledger.ping().await.is_ok();
    let backlog = e
        .metrics
        .outbox_backlog
        .load(std::sync::atomic::Ordering::Relaxed);
    // Built at start on the blocking pool (tokens::preload): until then a commit carrying text
    // would build them on the request path.
    let tokenizers_ok = crate::tokens::loaded();
    let status = if redis_ok && ledger_ok && tokenizers_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "down" };
    (
        status,
        Json(serde_json::json!({
            "mode": if !redis_ok || !e.store.breaker.closed() {
                "redis_down"
            } else if backlog > e.cfg.sync.backlog_alert {
                "ledger_behind"
            } else {
                "normal"
            },
            "store": e.store.kind(),
            "redis": word(redis_ok),
            "ledger": e.ledger.kind(),
            "postgres": word(ledger_ok),
            "outbox_backlog": backlog,
            "ledger_behind": backlog > e.cfg.sync.backlog_alert,
            "tokenizers": if tokenizers_ok { "ok" } else { "loading" },
        })),
    )
        .into_response()
}

async fn metrics(State(e): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], {
        let mut text = e.metrics.render_with(e.cfg.sync.backlog_alert);
        let b = &e.store.breaker;
        text.push_str(&format!(
            "# HELP tollgate_redis_up 1 while Redis answers (the circuit breaker is closed).\n\
                 # TYPE tollgate_redis_up gauge\ntollgate_redis_up {}\n\
                 # HELP tollgate_redis_breaker_trips_total Times Redis was found unreachable.\n\
                 # TYPE tollgate_redis_breaker_trips_total counter\n\
                 tollgate_redis_breaker_trips_total {}\n",
            u8::from(b.closed()),
            b.trips.load(std::sync::atomic::Ordering::Relaxed)
        ));
        let d = &e.directory;
        text.push_str(&format!(
            "# HELP tollgate_key_lookups_total API keys looked up in the ledger (not cached).\n\
                 # TYPE tollgate_key_lookups_total counter\ntollgate_key_lookups_total {}\n\
                 # HELP tollgate_keys_refused_total Presented keys that cannot be keys of this installation (shape or check), refused before any lookup.\n\
                 # TYPE tollgate_keys_refused_total counter\ntollgate_keys_refused_total {}\n",
            d.key_lookups.load(std::sync::atomic::Ordering::Relaxed),
            d.keys_refused.load(std::sync::atomic::Ordering::Relaxed)
        ));
        text
    })
        .into_response()
}

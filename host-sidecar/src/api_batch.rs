//! The batch routes: commits the filter settles together, and authorizes of requests that waited
//! in the filter's root context while a callout was in flight. Every item is parsed and decided
//! on its own — a bad item fails alone, with the error it would have had in a call of its own —
//! and the answers come in order.

use crate::engine::Engine;
use crate::error::ApiError;
use crate::handler::{bytes_of, fresh, require_decision, respond, Body, St};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::value::RawValue;
use tollgate_protocol::{
    AuthorizeBatchResult, AuthorizeOutcome, CommitBatchResult, CommitOutcome, CommitRequest,
    ErrorDetail, SpendRequest, MAX_AUTHORIZE_BATCH, MAX_BATCH,
};

/// Commits of one batch in flight at once (see [`each`]).
const COMMIT_CONCURRENCY: usize = 8;

/// A commit batch as it arrives: the items are split off unparsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommits<'a> {
    #[serde(borrow)]
    commits: Vec<&'a RawValue>,
}

/// An authorize batch as it arrives: the items are split off unparsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorizes<'a> {
    #[serde(borrow)]
    requests: Vec<&'a RawValue>,
}

/// An item's error as its batch reports it (counted as a single call's would be).
fn failed(e: &Engine, err: &ApiError) -> ErrorDetail {
    if err.status().is_server_error() {
        e.metrics.internal_errors.inc();
    } else {
        e.metrics.bad_requests.inc();
    }
    ErrorDetail {
        code: err.code().to_string(),
        message: err.to_string(),
    }
}

/// Decides every item concurrently; each is answered with its outcome, or with the error it
/// would have had alone.
///
/// At most `concurrency` are in flight at once: a commit batch of a hundred items sent to Redis
/// at once would hold every authorize that arrives meanwhile behind a hundred scripts (Redis
/// runs one client's pipelined commands before the next client's). Authorize batches, whose
/// answers requests wait for, go all at once.
async fn each<'a, T, O, Fut>(
    e: &Engine,
    list: &[&'a RawValue],
    concurrency: usize,
    decide: impl Fn(usize, &'a RawValue) -> Fut,
    ok: impl Fn(T) -> O,
    fail: impl Fn(u16, ErrorDetail) -> O,
) -> Vec<O>
where
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    use futures::StreamExt;
    let decisions: Vec<Fut> = list
        .iter()
        .enumerate()
        .map(|(i, raw)| decide(i, raw))
        .collect();
    let outcomes: Vec<Result<T, ApiError>> = futures::stream::iter(decisions)
        .buffered(concurrency.max(1))
        .collect()
        .await;
    outcomes
        .into_iter()
        .map(|o| match o {
            Ok(v) => ok(v),
            Err(err) => fail(err.status().as_u16(), failed(e, &err)),
        })
        .collect()
}

fn items<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    max: usize,
    name: &str,
    of: impl FnOnce(T) -> Vec<&'a RawValue>,
) -> Result<Vec<&'a RawValue>, ApiError> {
    let batch: T = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Invalid(format!("invalid JSON body: {e}")))?;
    let list = of(batch);
    if list.is_empty() || list.len() > max {
        return Err(ApiError::Invalid(format!("{name}: 1..={max} items")));
    }
    Ok(list)
}

pub(crate) async fn commit_batch(
    axum::extract::State(e): St,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        require_decision(&e, &headers, false)?;
        let bytes = bytes_of(body)?;
        let list = items(&bytes, MAX_BATCH, "commits", |b: RawCommits| b.commits)?;
        let results = each(
            &e,
            &list,
            COMMIT_CONCURRENCY,
            |i, raw| {
                let item = serde_json::from_str::<CommitRequest>(raw.get()).map_err(|err| {
                    ApiError::Invalid(format!("commits[{i}]: invalid commit: {err}"))
                });
                let e = &e;
                async move { e.commit(item?).await }
            },
            |(s, _)| CommitOutcome::Settled(s),
            |status, error| CommitOutcome::Failed { status, error },
        )
        .await;
        Ok(CommitBatchResult { results })
    }
    .await;
    respond(&e, fresh(r), false)
}

/// `POST /v1/authorize/batch`: each request is one authorize — its limits and balance checked and
/// held all or nothing, idempotent by its own key — decided concurrently with the others (the
/// store pipelines their scripts on one connection). An item naming an `account` needs the
/// service or admin token, as it would alone.
pub(crate) async fn authorize_batch(
    axum::extract::State(e): St,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        require_decision(&e, &headers, false)?;
        let bytes = bytes_of(body)?;
        let list = items(
            &bytes,
            MAX_AUTHORIZE_BATCH,
            "requests",
            |b: RawAuthorizes| b.requests,
        )?;
        e.metrics.authorize_batches.inc();
        e.metrics.authorize_batched.add(list.len() as u64);
        let results = each(
            &e,
            &list,
            MAX_AUTHORIZE_BATCH,
            |i, raw| {
                let (e, headers) = (&e, &headers);
                async move {
                    let req = serde_json::from_str::<SpendRequest>(raw.get()).map_err(|err| {
                        ApiError::Invalid(format!("requests[{i}]: invalid request: {err}"))
                    })?;
                    if req.account.is_some() {
                        require_decision(e, headers, true)?;
                    }
                    e.authorize(req).await
                }
            },
            |(decision, replayed)| AuthorizeOutcome::Decided { decision, replayed },
            |status, error| AuthorizeOutcome::Failed { status, error },
        )
        .await;
        Ok(AuthorizeBatchResult { results })
    }
    .await;
    respond(&e, fresh(r), false)
}

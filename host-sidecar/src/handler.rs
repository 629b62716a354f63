//! What every HTTP handler shares: the state and body extractor types, JSON body parsing with a
//! clear 400, the admin-token check, and turning a result into a response. Both API modules
//! (`api`, `api_billing`) use these; neither imports the other's handlers, so they form no cycle.

use crate::engine::Engine;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use subtle::ConstantTimeEq;

pub(crate) type St = State<Arc<Engine>>;
pub(crate) type Body = Result<Bytes, BytesRejection>;

pub(crate) fn parse<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = bytes_of(body)?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::Invalid(format!("invalid JSON body: {e}")))
}

pub(crate) fn bytes_of(body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => {
            ApiError::Invalid("body: too large or unreadable".into())
        }
        other => ApiError::Invalid(format!("body: {}", other.body_text())),
    })
}

/// Who a request's bearer token says the caller is. Every configured token is compared, each in
/// constant time, so the answer's timing does not tell which one was close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// No `authorization: Bearer` header.
    Anonymous,
    /// A bearer token that is none of ours.
    Unknown,
    /// The filter (`server.decision_token`).
    Filter,
    /// A trusted server-side caller (`server.service_token`).
    Service,
    Admin,
}

pub(crate) fn caller(e: &Engine, headers: &HeaderMap) -> Caller {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Caller::Anonymous;
    };
    let s = &e.cfg.server;
    let is = |t: &Option<String>| {
        t.as_deref()
            .is_some_and(|t| bool::from(given.as_bytes().ct_eq(t.as_bytes())))
    };
    let (admin, service, filter) = (
        is(&s.admin_token),
        is(&s.service_token),
        is(&s.decision_token),
    );
    if admin {
        Caller::Admin
    } else if service {
        Caller::Service
    } else if filter {
        Caller::Filter
    } else {
        Caller::Unknown
    }
}

pub(crate) fn require_admin(e: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    match caller(e, headers) {
        Caller::Admin => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The account read routes: the admin or a trusted service.
pub(crate) fn require_reader(e: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    match caller(e, headers) {
        Caller::Admin | Caller::Service => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The decision routes. Calls that name an API key need the filter's token (or a trusted
/// caller's); calls for a bare `account` — spending an account's money with no key — need the
/// service or admin token. A sidecar with no decision token (allowed on loopback only, checked at
/// start) takes decisions from anyone who can reach its port.
pub(crate) fn require_decision(
    e: &Engine,
    headers: &HeaderMap,
    for_account: bool,
) -> Result<(), ApiError> {
    let open = e.cfg.server.decision_token.is_none();
    match (caller(e, headers), for_account) {
        (Caller::Admin | Caller::Service, _) => Ok(()),
        (Caller::Filter, false) => Ok(()),
        (Caller::Filter, true) => Err(ApiError::Forbidden(
            "account: acting for a bare account needs the service or admin token; the decision token may only name an api_key".into(),
        )),
        (Caller::Anonymous, _) if open => Ok(()),
        (Caller::Anonymous | Caller::Unknown, _) => Err(ApiError::NoDecisionToken),
    }
}

/// Turns a result into a response, counting errors. `replayed` adds `x-tollgate-replayed: true`.
pub(crate) fn respond<T: Serialize>(
    e: &Engine,
    r: Result<(T, bool), ApiError>,
    created: bool,
) -> Response {
    match r {
        Ok((body, replayed)) => {
            let status = if created && !replayed {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut resp = (status, Json(body)).into_response();
            if replayed {
                resp.headers_mut()
                    .insert("x-tollgate-replayed", HeaderValue::from_static("true"));
            }
            resp
        }
        Err(err) => {
            if err.status().is_server_error() {
                e.metrics.internal_errors.inc();
                tracing::error!(error = %err, "request failed");
            } else {
                e.metrics.bad_requests.inc();
            }
            err.into_response()
        }
    }
}

pub(crate) fn fresh<T>(r: Result<T, ApiError>) -> Result<(T, bool), ApiError> {
    r.map(|v| (v, false))
}

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

pub(crate) fn require_admin(e: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = e
        .cfg
        .server
        .admin_token
        .as_deref()
        .ok_or(ApiError::Unauthorized)?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
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

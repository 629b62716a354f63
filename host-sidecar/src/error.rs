//! Errors at the edge of the API: every one becomes a JSON body with a stable code. 4xx means the
//! request was wrong and nothing changed; 5xx means the sidecar itself is broken (the filter then
//! applies its failure mode).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tollgate_protocol::{ErrorBody, ErrorDetail, InvalidField};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("missing or wrong admin token")]
    Unauthorized,
    /// A decision route called without the filter's (or a trusted caller's) token.
    #[error("missing or wrong decision token")]
    NoDecisionToken,
    /// A valid token, but not of the scope the call needs.
    #[error("{0}")]
    Forbidden(String),
    /// A webhook whose signature or shared secret does not verify.
    #[error("webhook not authenticated: {0}")]
    BadSignature(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<InvalidField> for ApiError {
    fn from(e: InvalidField) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Unavailable(format!("postgres: {e}"))
    }
}

impl From<crate::ledger::sync::SyncError> for ApiError {
    fn from(e: crate::ledger::sync::SyncError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized | ApiError::NoDecisionToken | ApiError::BadSignature(_) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized | ApiError::NoDecisionToken => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadSignature(_) => "bad_signature",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        };
        (self.status(), axum::Json(body)).into_response()
    }
}

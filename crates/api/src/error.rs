//! The API's one error type, mapped to HTTP statuses in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_domain::{GraphError, InputError};
use herald_storage::StorageError;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{1}")]
    Unprocessable(&'static str, String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::Unprocessable("validation_failed", message.into())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(code, _) => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, code),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Unprocessable(code, _) => (StatusCode::UNPROCESSABLE_ENTITY, code),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        metrics::counter!("herald_http_errors_total", "code" => code).increment(1);
        let mut res = (
            status,
            axum::Json(json!({"error": {"code": code, "message": message}})),
        )
            .into_response();
        if matches!(self, ApiError::Unavailable(_)) {
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_S),
            );
        }
        res
    }
}

/// Seconds a client waits before retrying a 503: a primary restart or failover takes
/// a few.
pub const RETRY_AFTER_S: &str = "2";

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            return ApiError::Unavailable("the database is unavailable; retry shortly".into());
        }
        // The edge validates input; this catches what it missed, as a 422, not a 500.
        if e.is_bad_data() {
            tracing::warn!(error = %e, "the database refused a value");
            return ApiError::Unprocessable(
                "invalid_value",
                "a value in the request cannot be stored (NUL character, or a number out of range)"
                    .into(),
            );
        }
        match e {
            StorageError::NotFound(what) => ApiError::NotFound(what),
            StorageError::Conflict(msg) => ApiError::Conflict("conflict", msg),
            StorageError::Transition(t) => ApiError::Conflict("invalid_transition", t.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        StorageError::from(e).into()
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl From<GraphError> for ApiError {
    fn from(e: GraphError) -> Self {
        ApiError::Unprocessable("invalid_build", e.to_string())
    }
}

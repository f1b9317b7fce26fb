//! Every error Herald sends carries the contract's body `{"error": {"code", "message"}}`,
//! including those written by the framework (extractor rejections, a panic caught by the
//! panic layer): this middleware rewrites any error response that is not JSON.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error response with the contract's body.
pub fn body(status: StatusCode, code: &str, message: &str) -> Response {
    metrics::counter!("herald_http_errors_total", "code" => code.to_owned()).increment(1);
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The code and default message of a status the framework answered with.
fn code_for(status: StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("bad_request", "the request is malformed"),
        401 => ("unauthorized", "missing or invalid bearer token"),
        403 => ("forbidden", "this token may not do that"),
        404 => ("not_found", "route not found"),
        405 => (
            "method_not_allowed",
            "this method is not allowed on this path",
        ),
        408 => ("request_timeout", "the request took too long to arrive"),
        413 => ("payload_too_large", "the request body is too large"),
        415 => ("unsupported_media_type", "the body must be JSON"),
        422 => ("invalid_body", "the request body has the wrong shape"),
        429 => ("rate_limited", "too many requests"),
        503 => ("unavailable", "a dependency is unavailable; retry shortly"),
        s if s >= 500 => ("internal_error", "internal error"),
        _ => ("error", "the request failed"),
    }
}

pub async fn rewrite(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (parts, original) = res.into_parts();
    let (code, default) = code_for(status);
    // The framework's text says what was wrong (`Invalid URL: ...`): keep it, except
    // for a 5xx, whose detail is for the log.
    let text = axum::body::to_bytes(original, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() || status.is_server_error() {
        if status.is_server_error() {
            tracing::error!(%status, detail = %text, "error response from the framework");
        }
        default.to_owned()
    } else {
        text
    };
    let mut out = body(status, code, &message);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    if status == StatusCode::SERVICE_UNAVAILABLE && !out.headers().contains_key(header::RETRY_AFTER)
    {
        out.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(crate::error::RETRY_AFTER_S),
        );
    }
    out
}

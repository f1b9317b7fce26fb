use crate::error::ApiError;
use crate::readiness::Health;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "health")]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when every dependency of this process's roles answers and every role's loop
/// runs, 503 otherwise; both name each check, `"ok"` or what is wrong.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "health")]
pub async fn readyz(State(health): State<Arc<Health>>) -> Response {
    let (ready, checks) = health.check().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "checks": checks}))).into_response()
}

#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "health")]
pub async fn metrics(State(health): State<Arc<Health>>) -> Response {
    let body = health
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "health")]
pub async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

pub async fn method_not_allowed() -> Response {
    crate::json_errors::body(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this method is not allowed on this path",
    )
}

/// Request count and latency per route.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::histogram!("herald_http_request_seconds", "route" => route.clone(), "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("herald_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    res
}

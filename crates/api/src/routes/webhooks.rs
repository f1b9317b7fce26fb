use super::{list_response, page};
use crate::error::ApiError;
use crate::extract::{parse_id, ApiJson, Org};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use herald_domain::{line, valid_pattern, Slug};
use herald_storage::notify as store;
use herald_storage::StorageError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    pipeline: Option<String>,
}

/// The webhook object: `id, url, events, pipeline, enabled, disabled, disabled_reason,
/// rate_per_s, created_at` (the secret only once, on create).
fn view(w: &store::WebhookView) -> Value {
    json!(w)
}

pub async fn create(
    State(state): State<AppState>,
    Org(org): Org,
    ApiJson(body): ApiJson<CreateWebhook>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if body.events.is_empty() || body.events.len() > 50 {
        return Err(ApiError::invalid(
            "events: list 1 to 50 event types or `prefix.*` patterns",
        ));
    }
    if let Some(bad) = body.events.iter().find(|e| !valid_pattern(e)) {
        return Err(ApiError::invalid(format!(
            "events: `{bad}` is not an event type or a `prefix.*` pattern"
        )));
    }
    line("url", &body.url, 2048)?;
    let pipeline = match &body.pipeline {
        Some(p) => Some(
            Slug::parse("pipeline", p)
                .map_err(|_| ApiError::invalid("pipeline: no such pipeline"))?
                .into_inner(),
        ),
        None => None,
    };
    // The SSRF guard: refused here, and again at connect time.
    let url = herald_notify::webhook::check_url(&body.url, state.settings.allow_private_networks)
        .await
        .map_err(|e| ApiError::Unprocessable("invalid_url", e.to_string()))?;
    let secret = herald_notify::webhook::generate_secret();
    let mut tx = state.router.primary().begin().await?;
    let hook = store::create_webhook(
        &mut tx,
        org,
        url.as_str(),
        &body.events,
        pipeline.as_deref(),
        &secret,
    )
    .await
    .map_err(|e| match e {
        StorageError::NotFound(_) => ApiError::invalid("pipeline: no such pipeline"),
        other => other.into(),
    })?;
    tx.commit().await?;
    state.router.note_write().await;
    let mut v = view(&hook);
    v["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(
    get,
    path = "/v1/webhooks",
    operation_id = "listWebhooks",
    tag = "webhooks"
)]
pub async fn list(
    State(state): State<AppState>,
    Org(org): Org,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let p = page(&q)?;
    let mut conn = state.router.primary().acquire().await?;
    let rows = store::list_webhooks(&mut conn, org, p.before, p.limit).await?;
    let rows: Vec<Value> = rows.iter().map(view).collect();
    Ok(Json(list_response(rows, p.limit, |v| {
        v["id"]
            .as_str()
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
            .unwrap_or_default()
    })))
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    operation_id = "getWebhook",
    tag = "webhooks"
)]
pub async fn get(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let mut conn = state.router.primary().acquire().await?;
    Ok(Json(view(&store::get_webhook(&mut conn, org, id).await?)))
}

#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    operation_id = "deleteWebhook",
    tag = "webhooks"
)]
pub async fn delete(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let mut tx = state.router.primary().begin().await?;
    store::delete_webhook(&mut tx, org, id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/deliveries/{id}/redeliver",
    operation_id = "redeliver",
    tag = "webhooks"
)]
pub async fn redeliver(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id, "delivery")?;
    let mut tx = state.router.primary().begin().await?;
    store::redeliver(&mut tx, org, id).await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": "pending"})),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutGithub {
    #[serde(default = "default_api_url")]
    api_url: String,
    token: String,
    #[serde(default)]
    job_statuses: bool,
}

fn default_api_url() -> String {
    "https://api.github.com".into()
}

#[utoipa::path(
    put,
    path = "/v1/pipelines/{slug}/github",
    operation_id = "putGithubIntegration", request_body = PutGithub,
    tag = "pipelines"
)]
pub async fn put_github(
    State(state): State<AppState>,
    Org(org): Org,
    Path(slug): Path<String>,
    ApiJson(body): ApiJson<PutGithub>,
) -> Result<Json<store::GithubIntegration>, ApiError> {
    let slug = super::path_slug(&slug)?;
    let url = reqwest_like_parse(&body.api_url)?;
    line("token", body.token.trim(), 1024)?;
    let mut tx = state.router.primary().begin().await?;
    let g = store::put_github(
        &mut tx,
        org,
        &slug,
        &url,
        body.token.trim(),
        body.job_statuses,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(g))
}

fn reqwest_like_parse(s: &str) -> Result<String, ApiError> {
    let ok = (s.starts_with("https://") || s.starts_with("http://"))
        && s.len() <= 2048
        && !s.contains(|c: char| c.is_whitespace() || c.is_control());
    if ok {
        Ok(s.trim_end_matches('/').to_owned())
    } else {
        Err(ApiError::invalid("api_url: must be an http(s) URL"))
    }
}

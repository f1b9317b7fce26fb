//! What a receiver's owner does with an endpoint after creating it (contract v1.1):
//! update it, rotate its secret, re-enable it, recover what failed by time window,
//! search its deliveries, read one delivery's attempts, and the event catalog.

use super::{list_response, page};
use crate::error::ApiError;
use crate::extract::{parse_id, ApiJson, Org};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use herald_domain::{valid_pattern, EventType};
use herald_storage::notify as store;
use herald_storage::StorageError;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The largest `rate_per_s` an endpoint can ask for.
const MAX_RATE_PER_S: f64 = 1_000_000.0;
/// `old_secret_valid_s`: at most 7 days, 1 day unless told.
const MAX_OLD_SECRET_VALID_S: i64 = 604_800;
const DEFAULT_OLD_SECRET_VALID_S: i64 = 86_400;

/// Present-but-null (`Some(None)`) apart from absent (`None`).
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// 1 to 50 event types or `prefix.*` patterns.
pub fn check_events(events: &[String]) -> Result<(), ApiError> {
    if events.is_empty() || events.len() > 50 {
        return Err(ApiError::invalid(
            "events: list 1 to 50 event types or `prefix.*` patterns",
        ));
    }
    if let Some(bad) = events.iter().find(|e| !valid_pattern(e)) {
        return Err(ApiError::invalid(format!(
            "events: `{bad}` is not an event type or a `prefix.*` pattern"
        )));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchWebhook {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pipeline: Option<Option<String>>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    rate_per_s: Option<Option<f64>>,
}

#[utoipa::path(
    patch,
    path = "/v1/webhooks/{id}",
    operation_id = "updateWebhook", request_body = PatchWebhook,
    tag = "webhooks"
)]
pub async fn patch(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PatchWebhook>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    if let Some(events) = &body.events {
        check_events(events)?;
    }
    if let Some(Some(rate)) = body.rate_per_s {
        if !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE_PER_S) {
            return Err(ApiError::invalid(format!(
                "rate_per_s: a number above 0 and at most {MAX_RATE_PER_S}, or null for the global per-endpoint limit"
            )));
        }
    }
    // The same SSRF guard as on create (and again at connect time).
    let url = match &body.url {
        None => None,
        Some(u) => Some(
            herald_notify::webhook::check_url(u, state.settings.allow_private_networks)
                .await
                .map_err(|e| ApiError::Unprocessable("invalid_url", e.to_string()))?
                .to_string(),
        ),
    };
    let patch = store::WebhookPatch {
        url,
        events: body.events,
        pipeline: body.pipeline,
        enabled: body.enabled,
        rate_per_s: body.rate_per_s,
    };
    let mut tx = state.router.primary().begin().await?;
    let (hook, disabled) = match store::update_webhook(&mut tx, org, id, &patch).await {
        Ok(r) => r,
        Err(StorageError::NotFound("pipeline")) => {
            return Err(ApiError::invalid("pipeline: no such pipeline"))
        }
        Err(e) => return Err(e.into()),
    };
    tx.commit().await?;
    state.router.note_write().await;
    if disabled {
        metrics::counter!("herald_webhooks_disabled_total", "reason" => store::reasons::MANUAL)
            .increment(1);
    }
    Ok(Json(json!(hook)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    #[serde(default)]
    old_secret_valid_s: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/rotate-secret",
    operation_id = "rotateSecret", request_body = RotateSecret,
    tag = "webhooks"
)]
pub async fn rotate_secret(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RotateSecret>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let valid_s = body
        .old_secret_valid_s
        .unwrap_or(DEFAULT_OLD_SECRET_VALID_S);
    if !(0..=MAX_OLD_SECRET_VALID_S).contains(&valid_s) {
        return Err(ApiError::invalid(format!(
            "old_secret_valid_s: an integer from 0 to {MAX_OLD_SECRET_VALID_S}"
        )));
    }
    let secret = herald_notify::webhook::generate_secret();
    let mut tx = state.router.primary().begin().await?;
    let until = store::rotate_secret(&mut tx, org, id, &secret, valid_s).await?;
    tx.commit().await?;
    state.router.note_write().await;
    Ok(Json(
        json!({"secret": secret, "old_secret_expires_at": until}),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recover {
    since: DateTime<Utc>,
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/recover",
    operation_id = "recoverWebhook", request_body = Recover,
    tag = "webhooks"
)]
pub async fn recover(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Recover>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id, "webhook")?;
    let now = Utc::now();
    let until = body.until.unwrap_or(now);
    if until <= body.since {
        return Err(ApiError::invalid("until: must be later than since"));
    }
    let kept = chrono::Duration::milliseconds((state.settings.history_retention_s * 1000.0) as i64);
    if body.since < now - kept {
        return Err(ApiError::Unprocessable(
            "since_out_of_history",
            format!(
                "since: deliveries are kept for {} s (notify.history_retention_s); the oldest a recover can reach is {}",
                state.settings.history_retention_s,
                (now - kept).to_rfc3339()
            ),
        ));
    }
    let mut tx = state.router.primary().begin().await?;
    let hook = store::get_webhook(&mut tx, org, id).await?;
    if !hook.enabled {
        return Err(ApiError::Conflict(
            "webhook_disabled",
            "the endpoint is disabled; enable it (PATCH {\"enabled\": true}) before recovering"
                .into(),
        ));
    }
    let queued = store::start_recovery(&mut tx, id, body.since, until).await?;
    tx.commit().await?;
    state.router.note_write().await;
    Ok((StatusCode::ACCEPTED, Json(json!({"queued": queued}))))
}

const STATUSES: [&str; 5] = ["pending", "succeeded", "failed", "dead", "skipped"];

fn time_param(q: &HashMap<String, String>, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    q.get(name)
        .filter(|v| !v.is_empty())
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::invalid(format!("{name}: an RFC 3339 time, got `{v}`")))
        })
        .transpose()
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    operation_id = "listDeliveries",
    tag = "webhooks"
)]
pub async fn deliveries(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let p = page(&q)?;
    let status = q.get("status").filter(|v| !v.is_empty()).cloned();
    if let Some(s) = status.as_deref().filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError::invalid(format!(
            "status: one of {}, got `{s}`",
            STATUSES.join(", ")
        )));
    }
    let event_type = q.get("event_type").filter(|v| !v.is_empty()).cloned();
    if let Some(t) = event_type.as_deref() {
        t.parse::<EventType>()
            .map_err(|e| ApiError::invalid(format!("event_type: {e}")))?;
    }
    let filter = store::DeliveryFilter {
        status,
        event_type,
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        before: p.before,
    };
    let rows = read_or_primary!(state, |conn| store::list_deliveries(
        conn, org, id, &filter, p.limit
    ))?;
    Ok(Json(list_response(rows, p.limit, |d| d.id)))
}

#[utoipa::path(
    get,
    path = "/v1/deliveries/{id}",
    operation_id = "getDelivery",
    tag = "webhooks"
)]
pub async fn get_delivery(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "delivery")?;
    let (d, attempts) = read_or_primary!(state, |conn| store::get_delivery(conn, org, id))?;
    let mut v = json!(d);
    v["attempts_made"] = v["attempts"].clone();
    v["attempts"] = json!(attempts);
    Ok(Json(v))
}

#[utoipa::path(
    get,
    path = "/v1/event-types",
    operation_id = "listEventTypes",
    tag = "webhooks"
)]
pub async fn event_types(Org(_org): Org) -> Json<Value> {
    Json(json!({"items": crate::event_types::catalog()}))
}

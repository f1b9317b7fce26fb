use crate::error::ApiError;
use crate::extract::{Admin, ApiJson};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use herald_domain::note;
use herald_storage::notify::{self as store, TYPES};
use serde::Deserialize;
use serde_json::{json, Value};

#[utoipa::path(
    get,
    path = "/v1/ops/notification-types",
    operation_id = "listNotificationTypes",
    tag = "operator"
)]
pub async fn list_types(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let mut conn = state.router.primary().acquire().await?;
    Ok(Json(
        json!({"items": store::notification_types(&mut conn).await?}),
    ))
}

/// The documented range of `rate_per_s` (notifications per second).
pub const MIN_RATE: f64 = 0.001;
pub const MAX_RATE: f64 = 1_000_000.0;
/// The documented range of `burst` is 1 to this.
pub const MAX_BURST: i32 = 1_000_000;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutType {
    mode: String,
    #[serde(default)]
    rate_per_s: Option<f64>,
    #[serde(default)]
    burst: Option<i64>,
    reason: String,
}

#[utoipa::path(
    put,
    path = "/v1/ops/notification-types/{type}",
    operation_id = "putNotificationType", request_body = PutType,
    tag = "operator"
)]
pub async fn put_type(
    State(state): State<AppState>,
    admin: Admin,
    Path(kind): Path<String>,
    ApiJson(body): ApiJson<PutType>,
) -> Result<Json<store::NotificationType>, ApiError> {
    if !TYPES.contains(&kind.as_str()) {
        return Err(ApiError::NotFound("notification type"));
    }
    if !["enabled", "paused", "disabled"].contains(&body.mode.as_str()) {
        return Err(ApiError::invalid(
            "mode: must be enabled, paused or disabled",
        ));
    }
    if body
        .rate_per_s
        .is_some_and(|r| !(MIN_RATE..=MAX_RATE).contains(&r))
    {
        return Err(ApiError::invalid(format!(
            "rate_per_s: must be a number from {MIN_RATE} to {MAX_RATE}"
        )));
    }
    let burst = match body.burst {
        None => None,
        Some(b) if (1..=i64::from(MAX_BURST)).contains(&b) => i32::try_from(b).ok(),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "burst: must be an integer from 1 to {MAX_BURST}"
            )))
        }
    };
    let reason = note("reason", &body.reason, 1000)?;
    let mut tx = state.router.primary().begin().await?;
    let t = store::set_notification_type(
        &mut tx,
        &kind,
        &body.mode,
        body.rate_per_s,
        burst,
        reason,
        &format!("admin:{}", admin.fingerprint),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(kind, mode = %t.mode, rate = t.rate_per_s, burst = t.burst, reason, "notification type changed");
    Ok(Json(t))
}

#[utoipa::path(
    get,
    path = "/v1/ops/queues",
    operation_id = "listQueues",
    tag = "operator"
)]
pub async fn queues(State(state): State<AppState>, _admin: Admin) -> Result<Json<Value>, ApiError> {
    // Counting backlogs scans them: the replica does it, so an operator polling this
    // during an incident does not load the primary that dispatch needs.
    let stats = read_or_primary!(state, |conn| store::queue_stats(conn))?;
    let mut items: Vec<Value> = stats.into_iter().map(|q| json!(q)).collect();
    if let Some(broker) = &state.broker_queues {
        items.extend(broker().await);
    }
    Ok(Json(json!({"items": items})))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/v1/ops/dead-letters/replay",
    operation_id = "replayDeadLetters", request_body = Replay,
    tag = "operator"
)]
pub async fn replay(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(body): ApiJson<Replay>,
) -> Result<Json<Value>, ApiError> {
    if let Some(k) = &body.kind {
        if !TYPES.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                "type: must be webhook or github_commit_status",
            ));
        }
    }
    let limit = body.limit.unwrap_or(1000);
    if !(1..=100_000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit: must be an integer from 1 to 100000",
        ));
    }
    let mut tx = state.router.primary().begin().await?;
    let n = store::replay_dead(&mut tx, body.kind.as_deref(), limit).await?;
    tx.commit().await?;
    Ok(Json(json!({"replayed": n})))
}

use crate::error::ApiError;
use crate::extract::{Admin, ApiJson};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use herald_storage::notify::{self as store, TYPES};
use serde::Deserialize;
use serde_json::{json, Value};

pub async fn list_types(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let mut conn = state.router.primary().acquire().await?;
    Ok(Json(
        json!({"items": store::notification_types(&mut conn).await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutType {
    mode: String,
    #[serde(default)]
    rate_per_s: Option<f64>,
    #[serde(default)]
    burst: Option<i64>,
    reason: String,
}

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
        .is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= 1_000_000.0))
    {
        return Err(ApiError::invalid(
            "rate_per_s: must be a number above 0 and at most 1000000",
        ));
    }
    let burst = match body.burst {
        None => None,
        Some(b) if (1..=1_000_000).contains(&b) => i32::try_from(b).ok(),
        Some(_) => {
            return Err(ApiError::invalid(
                "burst: must be an integer from 1 to 1000000",
            ))
        }
    };
    let reason = body.reason.trim();
    if reason.is_empty() || reason.len() > 1000 {
        return Err(ApiError::invalid("reason: say why, in 1-1000 characters"));
    }
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

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

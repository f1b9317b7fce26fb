//! `GET /v1/ops/overview`: everything the on-call page shows, in one call. The API
//! runs no dispatch or notification work itself, so the figures of those roles come
//! from the database: `ops_stats` rows their processes write every few seconds, and
//! delivery attempts counted over the last minute, read on the replica.

use crate::error::ApiError;
use crate::extract::Admin;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use herald_storage::notify::{self as store, NotificationType, QueueStat};
use herald_storage::ops_stats::{self, kinds, DisabledEndpoint, Stat};
use herald_storage::StorageError;
use serde_json::{json, Value};
use sqlx::PgConnection;

/// Dispatch's p99 target (runnable → assigned), the one `docs/BENCHMARKS.md` measures
/// and `config/prometheus/alerts.yml` alerts on.
pub const DISPATCH_P99_TARGET_MS: f64 = 25.0;
/// Deliveries per second are counted over this window.
const RATE_WINDOW_S: f64 = 60.0;
/// "Endpoints disabled in the last day".
const DISABLED_WINDOW_S: f64 = 86_400.0;
const DISABLED_LIMIT: i64 = 100;

struct Figures {
    queues: Vec<QueueStat>,
    dispatch: Vec<Stat>,
    throttle: Vec<Stat>,
    attempts: (i64, i64),
    dead: (i64, i64),
    disabled: Vec<DisabledEndpoint>,
}

async fn figures(conn: &mut PgConnection) -> Result<Figures, StorageError> {
    Ok(Figures {
        queues: store::queue_stats(conn).await?,
        dispatch: ops_stats::fresh(conn, kinds::DISPATCH).await?,
        throttle: ops_stats::fresh(conn, kinds::THROTTLE).await?,
        attempts: ops_stats::webhook_attempts(conn, RATE_WINDOW_S).await?,
        dead: ops_stats::dead_letters(conn).await?,
        disabled: ops_stats::disabled_endpoints(conn, DISABLED_WINDOW_S, DISABLED_LIMIT).await?,
    })
}

#[utoipa::path(
    get,
    path = "/v1/ops/overview",
    operation_id = "opsOverview",
    tag = "operator"
)]
pub async fn overview(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    // The switches from the primary, as GET /v1/ops/notification-types: a change the
    // page just made shows at once. Everything else scans, so the replica does it.
    let types: Vec<NotificationType> = {
        let mut conn = state.router.primary().acquire().await?;
        store::notification_types(&mut conn).await?
    };
    let f = read_or_primary!(state, |conn| figures(conn))?;
    let mut queues: Vec<Value> = f.queues.into_iter().map(|q| json!(q)).collect();
    if let Some(broker) = &state.broker_queues {
        queues.extend(broker().await);
    }
    let (ok, failed) = f.attempts;
    let per_s = |n: i64| ((n as f64 / RATE_WINDOW_S) * 100.0).round() / 100.0;
    Ok(Json(json!({
        "generated_at": chrono::Utc::now(),
        "dispatch": dispatch(&f.dispatch),
        "queues": queues,
        "notification_types": types,
        "throttle": throttle(&f.throttle),
        "webhooks": {
            "window_s": RATE_WINDOW_S,
            "deliveries_per_s": per_s(ok),
            "failures_per_s": per_s(failed),
            "dead_letters": f.dead.0,
        },
        "dead_letters": {"webhook": f.dead.0, "github_commit_status": f.dead.1},
        "disabled_endpoints": f.disabled,
    })))
}

/// The dispatchers of every process together: the worst p99, and the p50 weighted by
/// how many jobs each assigned (an approximation; each process keeps its own window).
fn dispatch(rows: &[Stat]) -> Value {
    let num = |s: &Stat, k: &str| s.value.get(k).and_then(Value::as_f64);
    let assigned: f64 = rows
        .iter()
        .filter_map(|s| num(s, "assigned"))
        .fold(0.0, |a, b| a + b);
    let p99 = rows
        .iter()
        .filter_map(|s| num(s, "p99_ms"))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let p50 = if assigned > 0.0 {
        let weighted: f64 = rows
            .iter()
            .filter_map(|s| Some(num(s, "p50_ms")? * num(s, "assigned")?))
            .fold(0.0, |a, b| a + b);
        Some((weighted / assigned * 10.0).round() / 10.0)
    } else {
        None
    };
    json!({
        "healthy": p99.is_none_or(|p| p <= DISPATCH_P99_TARGET_MS),
        "p50_ms": p50,
        "p99_ms": p99,
        "target_p99_ms": DISPATCH_P99_TARGET_MS,
        "assigned_last_minute": assigned as u64,
        "window_s": 60,
        "dispatchers": rows.len(),
    })
}

/// The most throttled process speaks for all: it is the one holding notifications back.
fn throttle(rows: &[Stat]) -> Value {
    let factor = |s: &Stat| s.value.get("factor").and_then(Value::as_f64);
    let worst = rows.iter().filter(|s| factor(s).is_some()).min_by(|a, b| {
        factor(a)
            .unwrap_or(1.0)
            .total_cmp(&factor(b).unwrap_or(1.0))
    });
    let processes: Vec<Value> = rows
        .iter()
        .map(|s| json!({"process": s.process, "updated_at": s.updated_at, "factor": factor(s), "signals": s.value.get("signals")}))
        .collect();
    json!({
        "factor": worst.and_then(factor),
        "engaged": worst.and_then(factor).is_some_and(|f| f < 1.0),
        "signals": worst.and_then(|s| s.value.get("signals").cloned()),
        "processes": processes,
    })
}

//! Cross-process figures for the on-call page: each process upserts what it measures
//! (its dispatcher's latency, its throttle's factor) into `ops_stats`, and the API of
//! any process reads the fresh rows. A row is rewritten only when its value changed or
//! it is about to look stale, so an idle installation writes almost nothing.

use crate::error::StorageError;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use std::sync::OnceLock;

/// A row unchanged this long is rewritten anyway, so that readers can tell a live
/// process from a dead one. Every refresh is a commit of an idle installation (whose
/// budget is 1 a second in all), so a minute.
pub const REFRESH_S: f64 = 60.0;
/// Rows older than this belong to a process that stopped or died (a clean stop
/// removes its rows at once).
pub const FRESH_S: f64 = 150.0;

pub mod kinds {
    pub const DISPATCH: &str = "dispatch";
    pub const THROTTLE: &str = "throttle";
}

/// This process's name in `ops_stats`: host-independent, unique per start.
pub fn process() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let id = uuid::Uuid::new_v4().simple().to_string();
        format!("{}-{}", std::process::id(), &id[..8])
    })
}

/// What a process last wrote of one kind, so that it sends nothing while the value is
/// unchanged and the row is not yet due for its refresh: a statement that updates no
/// row is still a transaction, and two kinds every 2 s doubled an idle installation's
/// commits.
#[derive(Debug, Default)]
pub struct LastWritten {
    last: Option<(serde_json::Value, std::time::Instant)>,
}

impl LastWritten {
    /// Whether `value` must be written now.
    pub fn due(&self, value: &serde_json::Value) -> bool {
        match &self.last {
            Some((v, at)) => v != value || at.elapsed().as_secs_f64() >= REFRESH_S,
            None => true,
        }
    }

    /// Records a successful write.
    pub fn wrote(&mut self, value: serde_json::Value) {
        self.last = Some((value, std::time::Instant::now()));
    }
}

/// Upserts this process's figure of `kind`; returns whether a row was written.
pub async fn publish(
    conn: &mut PgConnection,
    kind: &str,
    value: &serde_json::Value,
) -> Result<bool, StorageError> {
    let n = sqlx::query(
        "INSERT INTO ops_stats (kind, process, value) VALUES ($1, $2, $3) \
         ON CONFLICT (kind, process) DO UPDATE SET value = EXCLUDED.value, updated_at = now() \
         WHERE ops_stats.value IS DISTINCT FROM EXCLUDED.value \
            OR ops_stats.updated_at < now() - make_interval(secs => $4)",
    )
    .bind(kind)
    .bind(process())
    .bind(value)
    .bind(REFRESH_S)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Removes this process's row of `kind` (at a clean stop) and rows of processes long
/// gone.
pub async fn retire(conn: &mut PgConnection, kind: &str) -> Result<(), StorageError> {
    sqlx::query(
        "DELETE FROM ops_stats WHERE (kind = $1 AND process = $2) \
            OR updated_at < now() - interval '1 day'",
    )
    .bind(kind)
    .bind(process())
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Stat {
    pub process: String,
    pub value: serde_json::Value,
    pub updated_at: DateTime<Utc>,
}

/// The fresh rows of `kind`, newest first.
pub async fn fresh(conn: &mut PgConnection, kind: &str) -> Result<Vec<Stat>, StorageError> {
    let rows = sqlx::query(
        "SELECT process, value, updated_at FROM ops_stats \
         WHERE kind = $1 AND updated_at > now() - make_interval(secs => $2) \
         ORDER BY updated_at DESC",
    )
    .bind(kind)
    .bind(FRESH_S)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Stat {
                process: r.try_get("process")?,
                value: r.try_get("value")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StorageError::from)
}

// ---------------------------------------------------------------- overview reads

/// Webhook attempts of the last `window_s` seconds: (succeeded, failed).
pub async fn webhook_attempts(
    conn: &mut PgConnection,
    window_s: f64,
) -> Result<(i64, i64), StorageError> {
    let r = sqlx::query(
        "SELECT count(*) FILTER (WHERE status_code BETWEEN 200 AND 299) AS ok, \
                count(*) FILTER (WHERE status_code IS NULL OR status_code NOT BETWEEN 200 AND 299) AS failed \
         FROM delivery_attempts WHERE attempted_at > now() - make_interval(secs => $1)",
    )
    .bind(window_s)
    .fetch_one(conn)
    .await?;
    Ok((r.try_get("ok")?, r.try_get("failed")?))
}

/// Dead letters by type.
pub async fn dead_letters(conn: &mut PgConnection) -> Result<(i64, i64), StorageError> {
    let r = sqlx::query(
        "SELECT (SELECT count(*) FROM deliveries WHERE status = 'dead') AS webhook, \
                (SELECT count(*) FROM commit_statuses WHERE status = 'dead') AS github",
    )
    .fetch_one(conn)
    .await?;
    Ok((r.try_get("webhook")?, r.try_get("github")?))
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DisabledEndpoint {
    pub id: uuid::Uuid,
    pub org: String,
    pub url: String,
    pub reason: Option<String>,
    pub disabled_at: DateTime<Utc>,
}

/// Webhook endpoints disabled in the last `window_s` seconds, newest first. Reads the
/// webhooks table as 0002 made it (`disabled_at`, `disabled_reason`); kept alone here
/// so that a schema change of the disable state touches this one query.
pub async fn disabled_endpoints(
    conn: &mut PgConnection,
    window_s: f64,
    limit: i64,
) -> Result<Vec<DisabledEndpoint>, StorageError> {
    let rows = sqlx::query(
        "SELECT w.id, o.slug, w.url, w.disabled_reason, w.disabled_at FROM webhooks w \
         JOIN orgs o ON o.id = w.org_id \
         WHERE w.deleted_at IS NULL AND w.disabled_at > now() - make_interval(secs => $1) \
         ORDER BY w.disabled_at DESC LIMIT $2",
    )
    .bind(window_s)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DisabledEndpoint {
                id: r.try_get("id")?,
                org: r.try_get("slug")?,
                url: r.try_get("url")?,
                reason: r.try_get("disabled_reason")?,
                disabled_at: r.try_get("disabled_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StorageError::from)
}

/// The streaming replicas' replay lag as the primary sees it, in seconds (0 when
/// caught up or when there is none; `None` when this session may not read it).
pub async fn replica_lag_s(conn: &mut PgConnection) -> Result<Option<f64>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication",
    )
    .fetch_one(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unchanged_value_is_not_written_again_until_its_refresh() {
        let mut w = LastWritten::default();
        assert!(w.due(&json!({"p99_ms": 1.0})));
        w.wrote(json!({"p99_ms": 1.0}));
        assert!(!w.due(&json!({"p99_ms": 1.0})));
        assert!(w.due(&json!({"p99_ms": 2.0})));
        w.last = Some((
            json!({"p99_ms": 1.0}),
            std::time::Instant::now() - std::time::Duration::from_secs_f64(REFRESH_S),
        ));
        assert!(w.due(&json!({"p99_ms": 1.0})));
    }
}

//! Gauges of the whole installation that the alert rules (`config/prometheus/alerts.yml`)
//! read: every backlog's depth and oldest age (the ones of `GET /v1/ops/queues` that
//! live in PostgreSQL, the outbox among them) and the replicas' replay lag. Exported by
//! the maintenance leader alone, so each is measured once however many processes run.

use herald_storage::{notify, ops_stats, StorageError};
use sqlx::PgConnection;
use std::time::{Duration, Instant};

/// Counting backlogs scans them: not at every sweep.
pub const EVERY: Duration = Duration::from_secs(15);

pub async fn export(conn: &mut PgConnection) -> Result<(), StorageError> {
    for q in notify::queue_stats(conn).await? {
        metrics::gauge!("herald_queue_depth", "queue" => q.name.clone()).set(q.depth as f64);
        metrics::gauge!("herald_queue_oldest_age_seconds", "queue" => q.name)
            .set(q.oldest_age_s.unwrap_or(0.0).max(0.0));
    }
    // A session that may not read pg_stat_replication sees no rows: lag 0.
    if let Some(lag) = ops_stats::replica_lag_s(conn).await? {
        metrics::gauge!("herald_replica_lag_seconds").set(lag);
    }
    Ok(())
}

/// Exports at most every [`EVERY`]; `last` is when it last did.
pub async fn maybe_export(
    conn: &mut PgConnection,
    last: &mut Option<Instant>,
) -> Result<(), StorageError> {
    if last.is_none_or(|t| t.elapsed() >= EVERY) {
        *last = Some(Instant::now());
        export(conn).await?;
    }
    Ok(())
}

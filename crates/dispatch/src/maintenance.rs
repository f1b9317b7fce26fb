//! Single-instance sweeps, elected with a PostgreSQL advisory lock held by a dedicated
//! session: the lost-agent sweep, the assignment-timeout sweep, job timeouts, the
//! cancel grace, outbox and idempotency-key expiry and the vacuum of hot tables. The
//! sweeps run on the leader's own session, so if that session dies the leader stops
//! acting at once, and another process's blocked `pg_advisory_lock` returns.

use crate::{DispatchSettings, JobsSettings, MaintenanceSettings};
use herald_storage::maintenance::{self, keys};
use herald_storage::{agents, idempotency, jobs, lifecycle, outbox, StorageError};
use sqlx::{Connection, PgConnection};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct SweepSettings {
    pub maintenance: MaintenanceSettings,
    pub dispatch: DispatchSettings,
    pub lost_after_s: f64,
    pub jobs: JobsSettings,
}

/// Jobs timed out or canceled after the grace, per sweep: small batches, so a sweep
/// never holds many builds' locks at once.
const END_BATCH: i64 = 100;

pub async fn run(url: String, settings: SweepSettings, cancel: CancellationToken) {
    // A standby says so: `sum by (role) (herald_leader) < 1` is a role with no leader.
    metrics::gauge!("herald_leader", "role" => "maintenance").set(0.0);
    let mut backoff = Duration::from_millis(200);
    while !cancel.is_cancelled() {
        match lead(&url, &settings, &cancel).await {
            Ok(()) => break,
            Err(e) => {
                metrics::gauge!("herald_maintenance_leader").set(0.0);
                metrics::gauge!("herald_leader", "role" => "maintenance").set(0.0);
                tracing::warn!(error = %e, "maintenance session ended; standing for election again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics::gauge!("herald_maintenance_leader").set(0.0);
    metrics::gauge!("herald_leader", "role" => "maintenance").set(0.0);
}

async fn lead(
    url: &str,
    s: &SweepSettings,
    cancel: &CancellationToken,
) -> Result<(), StorageError> {
    let mut conn =
        maintenance::leader_session(url, &format!("herald-maintenance-{}", std::process::id()))
            .await?;
    tokio::select! {
        r = maintenance::acquire(&mut conn, keys::MAINTENANCE) => r?,
        // Dropping the session releases the wait; nothing is held yet.
        _ = cancel.cancelled() => return Ok(()),
    }
    tracing::info!("elected maintenance leader");
    metrics::gauge!("herald_maintenance_leader").set(1.0);
    metrics::gauge!("herald_leader", "role" => "maintenance").set(1.0);
    let every = Duration::from_secs_f64(s.maintenance.interval_s.max(0.1));
    let mut exported = None;
    loop {
        sweep(&mut conn, s, &mut exported).await?;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => {
                let _ = maintenance::release(&mut conn, keys::MAINTENANCE).await;
                let _ = conn.close().await;
                return Ok(());
            }
        }
    }
}

/// One pass, in one transaction: a handful of statements every few seconds, however
/// many agents are parked. The installation's gauges, when due (`exported`: when they
/// last were), are read first in the same transaction: a transaction of their own
/// every 15 s was a sixth of an idle installation's commits, and read before the
/// sweep's updates they hold no lock.
pub async fn sweep(
    conn: &mut PgConnection,
    s: &SweepSettings,
    exported: &mut Option<std::time::Instant>,
) -> Result<(), StorageError> {
    let mut tx = conn.begin().await?;
    crate::gauges::maybe_export(&mut tx, exported).await?;
    let lost = agents::sweep_lost(&mut tx, s.lost_after_s).await?;
    let expired = jobs::expire_assignments(&mut tx, s.dispatch.accept_timeout_s).await?;
    let timed_out = lifecycle::sweep_timeouts(&mut tx, END_BATCH).await?;
    let graced = lifecycle::sweep_cancel_grace(&mut tx, s.jobs.cancel_grace_s, END_BATCH).await?;
    let keys_expired = idempotency::expire(&mut tx, s.maintenance.expire_batch).await?;
    let deleted = outbox::expire(
        &mut tx,
        s.maintenance.outbox_retention_s,
        s.maintenance.expire_batch,
    )
    .await?;
    let to_vacuum =
        maintenance::tables_to_vacuum(&mut tx, s.maintenance.vacuum_min_dead_rows).await?;
    tx.commit().await?;
    if lost + expired + timed_out.ended + graced.ended > 0 || deleted + keys_expired > 0 {
        tracing::info!(
            lost,
            expired,
            deleted,
            timed_out = timed_out.ended,
            cancel_grace = graced.ended,
            retried = timed_out.retried,
            keys_expired,
            "maintenance sweep"
        );
    }
    for target in &to_vacuum {
        let started = std::time::Instant::now();
        maintenance::vacuum(conn, target).await?;
        tracing::debug!(table = %target.table, analyze = target.analyze, ms = started.elapsed().as_millis() as u64, "vacuumed");
        metrics::counter!("herald_vacuums_total", "table" => target.table.clone()).increment(1);
    }
    metrics::counter!("herald_agents_lost_total").increment(lost as u64);
    metrics::counter!("herald_assignments_expired_total").increment(expired as u64);
    metrics::counter!("herald_outbox_expired_total").increment(deleted);
    metrics::counter!("herald_jobs_timed_out_total").increment(timed_out.ended as u64);
    metrics::counter!("herald_jobs_cancel_grace_total").increment(graced.ended as u64);
    metrics::counter!("herald_jobs_retried_total", "by" => "timeout")
        .increment(timed_out.retried as u64);
    Ok(())
}

//! The delivery scheduler: hands deliveries that wait in PostgreSQL (retries, held rows
//! of a resumed type, replays) to the broker when they fall due, in batches, and
//! expires old history in small batches. Single-instance, elected with an advisory
//! lock; it sleeps until the next row is due or a notification wakes it.

use crate::controls::Mode;
use crate::{DeliveryBatch, Notifier, StatusMsg};
use chrono::Utc;
use herald_storage::maintenance::{self, keys};
use herald_storage::notify::{self as store, AttemptRecord};
use herald_storage::StorageError;
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub async fn run(url: String, n: Arc<Notifier>, due: Arc<Notify>, cancel: CancellationToken) {
    metrics::gauge!("herald_leader", "role" => "scheduler").set(0.0);
    let mut backoff = Duration::from_millis(200);
    while !cancel.is_cancelled() {
        match lead(&url, &n, &due, &cancel).await {
            Ok(()) => break,
            Err(e) => {
                metrics::gauge!("herald_leader", "role" => "scheduler").set(0.0);
                tracing::warn!(error = %e, "delivery scheduler session ended; standing for election again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn lead(
    url: &str,
    n: &Notifier,
    due: &Notify,
    cancel: &CancellationToken,
) -> Result<(), StorageError> {
    let name = format!("herald-notify-scheduler-{}", std::process::id());
    let mut session = maintenance::leader_session(url, &name).await?;
    tokio::select! {
        r = maintenance::acquire(&mut session, keys::NOTIFY_SCHEDULER) => r?,
        _ = cancel.cancelled() => return Ok(()),
    }
    tracing::info!("elected delivery scheduler");
    metrics::gauge!("herald_leader", "role" => "scheduler").set(1.0);
    // An election follows every restart of the database (it ends the old leader's
    // session): claims from before it get time for their holders to reconnect.
    let grace = Duration::from_secs_f64(n.settings.claim_restart_grace_s.clamp(0.0, 1e9));
    let honoured =
        store::honour_claims_across_restart(&mut session, crate::deliver::LEASE, grace).await?;
    if honoured > 0 {
        tracing::info!(
            honoured,
            grace_s = grace.as_secs_f64(),
            "delivery claims taken before the database restarted are honoured a while longer"
        );
    }
    let mut last_expiry = Instant::now();
    loop {
        // A recover that waits for room in the webhook queue looks again soon.
        let mut recover_waits = false;
        let mut busy = pass(&mut session, n, &mut recover_waits).await?;
        while busy {
            busy = pass(&mut session, n, &mut recover_waits).await?;
        }
        if last_expiry.elapsed() > Duration::from_secs(60) {
            let gone =
                store::expire_history(&mut session, n.settings.history_retention_s, 1000).await?;
            if gone > 0 {
                tracing::info!(gone, "expired notification history");
            }
            last_expiry = Instant::now();
        }
        let sleep = match store::next_due(&mut session).await? {
            Some(at) => (at - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(50)),
            None => Duration::from_secs(30),
        }
        .min(if recover_waits {
            RECOVER_RECHECK
        } else {
            Duration::from_secs(30)
        });
        tokio::select! {
            _ = due.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = cancel.cancelled() => {
                metrics::gauge!("herald_leader", "role" => "scheduler").set(0.0);
                let _ = maintenance::release(&mut session, keys::NOTIFY_SCHEDULER).await;
                let _ = session.close().await;
                return Ok(());
            }
        }
    }
}

/// How long a delivery handed to the broker waits for a worker's claim before the
/// scheduler publishes it again (a copy is dropped by the claim; a row whose publish was
/// lost is sent).
const REPUBLISH_AFTER: Duration = Duration::from_secs(30);

/// How soon a recover waiting for room in the webhook queue looks again.
const RECOVER_RECHECK: Duration = Duration::from_millis(250);

/// One batch of each type, and one step of an open recover when the queue has room;
/// true if a batch was full or a recover moved (more may be due).
async fn pass(
    session: &mut PgConnection,
    n: &Notifier,
    recover_waits: &mut bool,
) -> Result<bool, StorageError> {
    let batch = n.settings.scheduler_batch;
    let mut busy = false;
    match n.controls.mode("webhook") {
        Mode::Paused => {}
        mode => {
            let rows = store::due_deliveries(session, batch).await?;
            busy |= rows.len() as i64 >= batch;
            if mode == Mode::Disabled {
                let skipped: Vec<AttemptRecord> = rows
                    .iter()
                    .map(|(w, _)| AttemptRecord {
                        delivery_id: w.id,
                        webhook_id: w.webhook_id,
                        status: "skipped".into(),
                        attempted: false,
                        attempts_before: w.attempts,
                        next_attempt_at: None,
                        status_code: None,
                        error: Some("notification type disabled".into()),
                        response_body: None,
                        duration_ms: 0,
                    })
                    .collect();
                store::record_attempts(session, &skipped).await?;
            } else if !rows.is_empty() {
                // Marked before they are published, so a message never finds its row
                // still due (a worker's claim takes it from there); marked rows that
                // are not published come due again after REPUBLISH_AFTER.
                let marks: Vec<_> = rows.iter().map(|(w, at)| (w.id, *at)).collect();
                let (marked, until) =
                    store::mark_enqueued(session, &marks, REPUBLISH_AFTER).await?;
                let marked: std::collections::HashSet<_> = marked.into_iter().collect();
                let queue = n.names.delivery_queue("webhook");
                let work: Vec<_> = rows
                    .iter()
                    .map(|(w, _)| w)
                    .filter(|w| marked.contains(&w.id))
                    .collect();
                let msgs: Vec<_> = DeliveryBatch::from_work(&work)
                    .iter()
                    .map(|b| b.to_message(&queue))
                    .collect();
                if let Err(e) = n.publisher.publish_batch("", &msgs).await {
                    tracing::warn!(error = %e, "cannot hand due deliveries to the broker");
                    if let Some(until) = until {
                        let ids: Vec<_> = marked.into_iter().collect();
                        store::unmark_enqueued(session, &ids, until).await?;
                    }
                    return Ok(false);
                }
                crate::fanout::published_deliveries(n, msgs.len(), work.len());
                metrics::counter!("herald_notify_scheduled_total", "type" => "webhook")
                    .increment(work.len() as u64);
            }
        }
    }
    if !busy && n.controls.mode("webhook") == Mode::Enabled {
        if room_to_recover(n).await {
            busy |= recover(session, batch).await?;
        } else {
            *recover_waits |= store::recovery_open(session).await?;
        }
    }
    if n.controls.mode("github_commit_status") != Mode::Paused {
        let rows = store::due_statuses(session, batch).await?;
        busy |= rows.len() as i64 >= batch;
        if !rows.is_empty() {
            let queue = n.names.delivery_queue("github_commit_status");
            let msgs: Vec<_> = rows
                .iter()
                .map(|(r, s, c, _)| {
                    StatusMsg {
                        repository: r.clone(),
                        sha: s.clone(),
                        context: c.clone(),
                    }
                    .to_message(&queue)
                })
                .collect();
            if let Err(e) = n.publisher.publish_batch("", &msgs).await {
                tracing::warn!(error = %e, "cannot hand due commit statuses to the broker");
                return Ok(false);
            }
            store::mark_statuses_enqueued(session, &rows).await?;
        }
    }
    Ok(busy)
}

/// Recovered deliveries are marked only while the webhook queue has room (the
/// fan-out's allowed backlog, scaled by the throttle): a recover of millions waits in
/// PostgreSQL as rows, not in the broker, and never outruns the senders.
async fn room_to_recover(n: &Notifier) -> bool {
    let limit = (f64::from(n.settings.fanout_max_backlog) * n.throttle.factor()).max(100.0);
    match crate::fanout::webhook_backlog(n).await {
        Some(depth) => f64::from(depth) < limit,
        None => false,
    }
}

/// One short transaction of the oldest open recover (see `store::recover_step`); true
/// when it marked rows (the next pass hands them to the broker, then looks again).
async fn recover(session: &mut PgConnection, batch: i64) -> Result<bool, StorageError> {
    let mut tx = session.begin().await?;
    let marked = store::recover_step(&mut tx, batch).await?;
    tx.commit().await?;
    match marked {
        Some(m) if m > 0 => {
            metrics::counter!("herald_webhook_recovered_total").increment(m);
            Ok(true)
        }
        // A finished or stopped recover: look at the next one at once.
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

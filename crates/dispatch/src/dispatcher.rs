//! The dispatcher: wakes on `herald_dispatch` notifications (coalesced, so a burst of
//! them costs one round), assigns in rounds of short transactions, and polls only as
//! a backstop. Any number may run; `SKIP LOCKED` keeps them out of each other's way.

use crate::DispatchSettings;
use herald_storage::{channels, dispatch, StorageError, Waker};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub async fn run(
    pool: PgPool,
    waker: Waker,
    settings: DispatchSettings,
    cancel: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(listen(pool.clone(), wake.clone(), cancel.clone()));
    let backstop = Duration::from_secs_f64(settings.backstop_poll_s.max(0.1));
    tracing::info!("dispatcher started");
    loop {
        let mut more = true;
        while more && !cancel.is_cancelled() {
            more = match round(&pool, &waker, settings.batch_agents).await {
                Ok(r) if r.assigned == 0 && r.deferred > 0 => {
                    // Only agents someone else held briefly: look again in a moment
                    // rather than spin on them.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    true
                }
                Ok(r) => r.assigned > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "assignment round failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = cancel.cancelled() => {}
                    }
                    false
                }
            };
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(backstop) => {}
            _ = cancel.cancelled() => break,
        }
    }
    listener.abort();
    tracing::info!("dispatcher stopped");
}

/// What one round did.
#[derive(Debug, Clone, Copy)]
pub struct RoundOutcome {
    pub assigned: usize,
    pub deferred: usize,
}

/// One transaction. After commit it tells the parked pings (in any process) and wakes
/// the relay; see `herald_storage::wake` for why not from inside the transaction.
pub async fn round(
    pool: &PgPool,
    waker: &Waker,
    batch_agents: i64,
) -> Result<RoundOutcome, StorageError> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    metrics::histogram!("herald_db_pool_acquire_seconds", "pool" => "dispatch")
        .record(started.elapsed().as_secs_f64());
    let round = match dispatch::assign_round(&mut tx, batch_agents).await {
        Ok(r) => r,
        // Two dispatchers raced for one agent; the unique index stopped the second.
        Err(StorageError::Database(e)) if StorageError::is_unique_violation(&e) => {
            tx.rollback().await?;
            return Ok(RoundOutcome {
                assigned: 0,
                deferred: 1,
            });
        }
        Err(e) => return Err(e),
    };
    let assigned = round.assigned;
    tx.commit().await?;
    if !assigned.is_empty() {
        for a in &assigned {
            waker.send(channels::ASSIGNED, format!("{} {}", a.agent_id, a.job_id));
        }
        waker.wake(channels::OUTBOX);
    }
    let now = chrono::Utc::now();
    for a in &assigned {
        if let Some(at) = a.scheduled_at {
            let s = (now - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!("herald_dispatch_assign_seconds").record(s);
        }
    }
    metrics::histogram!("herald_dispatch_round_seconds").record(started.elapsed().as_secs_f64());
    health::observe(started.elapsed());
    metrics::counter!("herald_jobs_assigned_total").increment(assigned.len() as u64);
    Ok(RoundOutcome {
        assigned: assigned.len(),
        deferred: round.deferred,
    })
}

async fn listen(pool: PgPool, wake: Arc<Notify>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "dispatch listener cannot connect");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if listener.listen(channels::DISPATCH).await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything may have happened while we were not listening.
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => wake.notify_one(),
                Ok(None) => wake.notify_one(),
                Err(_) => break,
            }
        }
    }
}

/// The dispatcher's recent round time, for whoever throttles lower-priority work in
/// this process. An exponentially weighted average; stale after a few seconds.
pub mod health {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    static EWMA_US: AtomicU64 = AtomicU64::new(0);
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<Instant> = OnceLock::new();

    fn now_ms() -> u64 {
        u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn observe(d: Duration) {
        let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let old = EWMA_US.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 4 + sample) / 5
        };
        EWMA_US.store(new, Ordering::Relaxed);
        LAST_MS.store(now_ms(), Ordering::Relaxed);
    }

    pub fn recent_round() -> Option<Duration> {
        let last = LAST_MS.load(Ordering::Relaxed);
        if last == 0 || now_ms().saturating_sub(last) > 5_000 {
            return None;
        }
        Some(Duration::from_micros(EWMA_US.load(Ordering::Relaxed)))
    }
}

//! Consumes `job.finished` from the dispatch queue and propagates it: dependents become
//! runnable or skipped, and the build's state follows. Off the request path, and
//! idempotent because it recomputes from the rows, so redeliveries are harmless.

use herald_bus::{ConsumerSpec, Incoming, Outcome};
use herald_storage::propagate::{self, Propagation};
use herald_storage::{channels, Waker};
use rand::Rng;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

pub const BINDINGS: &[&str] = herald_bus::DISPATCH_BINDINGS;

pub fn spec(queue: String, prefetch: u16, concurrency: usize) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(queue, BINDINGS);
    spec.prefetch = prefetch;
    spec.concurrency = concurrency.max(1);
    spec
}

fn build_id(msg: &Incoming) -> Option<Uuid> {
    let v: serde_json::Value = serde_json::from_slice(&msg.body).ok()?;
    let id = v.pointer("/data/build/id")?.as_str()?;
    Uuid::parse_str(id).ok()
}

pub async fn handle(pool: PgPool, waker: Waker, msg: Incoming) -> Outcome {
    let Some(build) = build_id(&msg) else {
        tracing::warn!(routing_key = %msg.routing_key, "event without a build id; dead-lettering");
        return Outcome::DeadLetter;
    };
    // The build row is locked by another propagation: skip, back off briefly, retry.
    // No transaction is held while waiting.
    for attempt in 0..50u32 {
        match propagate_once(&pool, &waker, build).await {
            Ok(Propagation::Done { .. }) => return Outcome::Ack,
            Ok(Propagation::Busy) => {
                metrics::counter!("herald_propagation_busy_total").increment(1);
                let ms = rand::thread_rng().gen_range(2..10) * u64::from(attempt.min(10) + 1);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, %build, "propagation failed; requeueing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Outcome::Requeue;
            }
        }
    }
    Outcome::Requeue
}

async fn propagate_once(
    pool: &PgPool,
    waker: &Waker,
    build: Uuid,
) -> Result<Propagation, herald_storage::StorageError> {
    let mut tx = pool.begin().await?;
    let result = propagate::propagate_build(&mut tx, build).await?;
    tx.commit().await?;
    if let Propagation::Done {
        scheduled,
        skipped,
        wrote_events,
        ..
    } = &result
    {
        if *wrote_events {
            waker.wake(channels::OUTBOX);
        }
        if *scheduled > 0 {
            waker.wake(channels::DISPATCH);
        }
        metrics::counter!("herald_jobs_unblocked_total").increment(*scheduled as u64);
        metrics::counter!("herald_jobs_skipped_total").increment(*skipped as u64);
    }
    Ok(result)
}

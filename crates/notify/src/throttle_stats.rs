//! The throttle's factor and the signals it last saw, for the on-call page: kept here
//! by the throttle of this process and written to `ops_stats` every 2 s (only when
//! they changed), where the API of any process reads them.

use crate::limits::Health;
use herald_storage::ops_stats::{self, kinds};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    factor: Option<f64>,
    enabled: bool,
    health: Option<Health>,
}

static SEEN: Mutex<Seen> = Mutex::new(Seen {
    factor: None,
    enabled: false,
    health: None,
});

/// The signals of the throttle's latest sample.
pub fn signals(h: &Health) {
    SEEN.lock().unwrap_or_else(PoisonError::into_inner).health = Some(*h);
}

/// The factor the throttle set.
pub fn factor(f: f64, enabled: bool) {
    let mut s = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    s.factor = Some(f);
    s.enabled = enabled;
}

/// To 0.1 ms: finer would make every write a change.
fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0)
}

fn value() -> Option<Value> {
    let s = *SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let factor = s.factor?;
    let h = s.health.unwrap_or_default();
    Some(json!({
        "factor": (factor * 1000.0).round() / 1000.0,
        "enabled": s.enabled,
        "signals": {
            "dispatch_latency_ms": ms(h.dispatch_p99),
            "query_latency_ms": ms(h.query_latency),
            "lock_waiters": h.lock_waiters,
        },
    }))
}

/// Writes this process's throttle figures to `ops_stats` until `cancel`, then removes
/// its row.
pub async fn publish(pool: PgPool, cancel: CancellationToken) {
    let mut last = ops_stats::LastWritten::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = cancel.cancelled() => break,
        }
        let Some(v) = value() else { continue };
        if !last.due(&v) {
            continue;
        }
        let written = match pool.acquire().await {
            Ok(mut c) => ops_stats::publish(&mut c, kinds::THROTTLE, &v).await,
            Err(e) => Err(e.into()),
        };
        match written {
            Ok(_) => last.wrote(v),
            Err(e) => {
                tracing::debug!(error = %e, "cannot write throttle figures for /ops");
            }
        }
    }
    if let Ok(mut c) = pool.acquire().await {
        let _ = ops_stats::retire(&mut c, kinds::THROTTLE).await;
    }
}

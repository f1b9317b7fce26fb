//! Automatic throttling: samples the health of the high-priority path and sets the
//! notification pools' concurrency and rate from it (AIMD: halve at once when dispatch
//! degrades, recover a step at a time while it is healthy).

use crate::limits::Health;
use crate::{DispatchHealth, Notifier};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The dispatchers' assignment latency as they broadcast it on
/// `herald_storage::channels::HEALTH`, from any process. The worst report since the
/// throttle last looked wins; without a report, dispatch is idle (or quiet) and this
/// signal says nothing.
#[derive(Debug, Default)]
pub struct RemoteHealth {
    worst: Mutex<Option<Duration>>,
}

impl RemoteHealth {
    /// Records one report; a payload that is not a number of microseconds is ignored.
    pub fn report(&self, payload: &str) {
        let Ok(us) = payload.trim().parse::<u64>() else {
            return;
        };
        let d = Duration::from_micros(us);
        let mut w = self.worst.lock().unwrap_or_else(PoisonError::into_inner);
        *w = Some(w.map_or(d, |old| old.max(d)));
    }

    /// The worst report since the last call.
    pub fn take(&self) -> Option<Duration> {
        self.worst
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

pub async fn run(n: Arc<Notifier>, dispatch: Option<DispatchHealth>, cancel: CancellationToken) {
    let every = Duration::from_millis(n.settings.throttle.interval_ms.max(100));
    let mut applied = (f64::NAN, 0usize);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => return,
        }
        // Rates follow the switches even when throttling is off.
        let active = n.activity.swap(0, std::sync::atomic::Ordering::Relaxed) > 0;
        let remote = n.remote_health.take();
        let factor = if n.settings.throttle.enabled && active {
            let health = sample(&n, dispatch.as_ref(), remote).await;
            crate::throttle_stats::signals(&health);
            n.throttle.observe(health)
        } else if n.settings.throttle.enabled {
            // Nothing to throttle: recover without asking the database anything.
            n.throttle.observe(Health {
                dispatch_p99: None,
                db_acquire_wait: None,
                query_latency: None,
                lock_waiters: 0,
            })
        } else {
            1.0
        };
        crate::throttle_stats::factor(factor, n.settings.throttle.enabled);
        let status_factor = factor.max(n.settings.throttle.commit_status_min_factor.min(1.0));
        for (kind, limiter, f) in [
            ("webhook", &n.webhook_rate, factor),
            ("github_commit_status", &n.github_rate, status_factor),
        ] {
            if let Some(t) = n.controls.get(kind) {
                limiter.set(t.rate_per_s, u32::try_from(t.burst).unwrap_or(1));
            }
            limiter.set_factor(f);
            metrics::gauge!("herald_notify_rate_limit", "type" => kind)
                .set(limiter.effective_rate());
        }
        let web = n.throttle.concurrency(n.settings.webhook_concurrency);
        let gh = crate::limits::scaled_concurrency(n.settings.github_concurrency, status_factor);
        let fan = n.throttle.concurrency(n.settings.fanout_concurrency);
        if applied != (factor, web) {
            n.webhook_slots.set_limit(web);
            n.github_slots.set_limit(gh);
            n.fanout_slots.set_limit(fan);
            applied = (factor, web);
        }
        metrics::gauge!("herald_notify_concurrency_limit", "type" => "webhook").set(web as f64);
        metrics::gauge!("herald_notify_concurrency_limit", "type" => "github_commit_status")
            .set(gh as f64);
        metrics::gauge!("herald_notify_concurrency_limit", "type" => "fanout").set(fan as f64);
    }
}

/// Query latency and lock waits of dispatch's connections, seen from this pool, plus
/// the dispatcher's own latency when it runs in this process.
async fn sample(
    n: &Notifier,
    dispatch: Option<&DispatchHealth>,
    remote: Option<Duration>,
) -> Health {
    let started = Instant::now();
    let conn = n.pool.acquire().await;
    let acquire = started.elapsed();
    let mut lock_waiters = 0;
    let mut query_latency = None;
    if let Ok(mut conn) = conn {
        let q = Instant::now();
        let waiters: Result<i64, _> = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND application_name LIKE 'herald-dispatch%'",
        )
        .fetch_one(&mut *conn)
        .await;
        query_latency = Some(q.elapsed());
        lock_waiters = u32::try_from(waiters.unwrap_or(0)).unwrap_or(u32::MAX);
    }
    // The wait for a connection of this (notify's own) pool says how busy
    // notifications are, not how healthy dispatch is: backing off on it made the
    // throttle chase its own load. Dispatch's pool wait is inside its round time.
    metrics::histogram!("herald_db_pool_acquire_seconds", "pool" => "notify")
        .record(acquire.as_secs_f64());
    let dispatch_p99 = dispatch.and_then(|f| f()).max(remote);
    // What the throttle saw, for operators (and for the test that dispatch's reports
    // from other processes arrive).
    for (signal, value) in [
        ("dispatch_latency", dispatch_p99),
        ("query_latency", query_latency),
    ] {
        if let Some(v) = value {
            metrics::gauge!("herald_notify_throttle_signal_seconds", "signal" => signal)
                .set(v.as_secs_f64());
        }
    }
    Health {
        dispatch_p99,
        db_acquire_wait: None,
        query_latency,
        lock_waiters,
    }
}

//! The dispatcher: wakes on `herald_dispatch` notifications, and on `herald_agent_free`
//! while jobs wait for agents (coalesced, so a burst of
//! them costs one round), assigns in rounds of short transactions, and polls only as
//! a backstop. Any number may run; `SKIP LOCKED` keeps them out of each other's way.

use crate::DispatchSettings;
use herald_storage::{channels, dispatch, wake, LocalWakes, StorageError, Waker};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let wake = Arc::new(Wake::default());
    let listening = cancel.child_token();
    tokio::spawn(listen(
        pool.clone(),
        waker.local().clone(),
        wake.clone(),
        listening.clone(),
    ));
    let stats = tokio::spawn(crate::stats::publish(pool.clone(), cancel.clone()));
    let backstop = Duration::from_secs_f64(settings.backstop_poll_s.max(0.1));
    let mut report = HealthReport::default();
    // Until a round says otherwise, assume jobs wait for agents; and look at once.
    let mut starved = true;
    wake.jobs.store(true, Ordering::Release);
    tracing::info!("dispatcher started");
    loop {
        // A freed agent alone is no reason to look when the last round left no
        // runnable job behind: anything runnable since then sent its own wake-up.
        let mut more = wake.jobs.swap(false, Ordering::AcqRel)
            || (wake.agents.swap(false, Ordering::AcqRel) && starved);
        if !more {
            metrics::counter!("herald_dispatch_wakes_skipped_total").increment(1);
        }
        while more && !cancel.is_cancelled() {
            // Wake-ups up to here are covered by this round.
            wake.jobs.store(false, Ordering::Release);
            wake.agents.store(false, Ordering::Release);
            let since = report.round_started();
            let outcome = round(&pool, &waker, settings.batch_agents, since).await;
            starved = outcome.as_ref().map_or(true, |r| r.starved);
            if let Ok(r) = &outcome {
                report.record(r.latency, &waker);
            }
            more = match outcome {
                Ok(r) if r.assigned == 0 && r.deferred > 0 => {
                    // Only agents someone else held briefly: look again in a moment
                    // rather than spin on them.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    true
                }
                // A full or crowded round may have left work behind; anything else
                // that arrived since it began has woken us (the wake is kept until
                // we wait).
                Ok(r) => r.deferred > 0 || r.assigned as i64 >= settings.batch_agents,
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
            _ = wake.notify.notified() => {}
            _ = tokio::time::sleep(backstop) => wake.jobs.store(true, Ordering::Release),
            _ = cancel.cancelled() => break,
        }
    }
    listening.cancel();
    let _ = stats.await;
    tracing::info!("dispatcher stopped");
}

/// What one round did.
#[derive(Debug, Clone, Copy)]
pub struct RoundOutcome {
    pub assigned: usize,
    pub deferred: usize,
    /// Runnable jobs were left for lack of a free agent.
    pub starved: bool,
    /// The longest runnable → committed time among the jobs this round assigned that
    /// became runnable after the previous round began. Older jobs waited for an agent,
    /// which says nothing about dispatch's own health.
    pub latency: Option<Duration>,
}

/// How often a busy dispatcher tells other processes its latency.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// Sends the worst recent assignment latency on [`channels::HEALTH`] at most every
/// [`HEALTH_EVERY`], and only while rounds assign jobs: an idle dispatcher sends nothing.
#[derive(Default)]
struct HealthReport {
    previous_start: Option<chrono::DateTime<chrono::Utc>>,
    worst: Option<Duration>,
    sent_at: Option<Instant>,
}

impl HealthReport {
    /// Called as a round begins; returns when the previous one began.
    fn round_started(&mut self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.previous_start.replace(chrono::Utc::now())
    }

    fn record(&mut self, latency: Option<Duration>, waker: &Waker) {
        if let Some(l) = latency {
            self.worst = Some(self.worst.map_or(l, |w| w.max(l)));
        }
        let due = self.sent_at.is_none_or(|t| t.elapsed() >= HEALTH_EVERY);
        if let (true, Some(worst)) = (due, self.worst) {
            health::observe_latency(worst);
            waker.send(channels::HEALTH, worst.as_micros().to_string());
            self.worst = None;
            self.sent_at = Some(Instant::now());
        }
    }
}

/// One round (two statements, each committing on its own). After the assignment
/// commits it tells the parked pings (in any process) and wakes the relay; see
/// `herald_storage::wake` for why not from inside the transaction.
pub async fn round(
    pool: &PgPool,
    waker: &Waker,
    batch_agents: i64,
    fresh_since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<RoundOutcome, StorageError> {
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    metrics::histogram!("herald_db_pool_acquire_seconds", "pool" => "dispatch")
        .record(started.elapsed().as_secs_f64());
    let round = match dispatch::assign_round(&mut conn, batch_agents).await {
        Ok(r) => r,
        // Two dispatchers raced for one agent; the unique index stopped the second
        // (its statement rolled back on its own).
        Err(StorageError::Database(e)) if StorageError::is_unique_violation(&e) => {
            return Ok(RoundOutcome {
                assigned: 0,
                deferred: 1,
                starved: true,
                latency: None,
            });
        }
        Err(e) => return Err(e),
    };
    drop(conn);
    let assigned = round.assigned;
    if !assigned.is_empty() {
        for a in &assigned {
            // Other processes read the job when their ping wakes; a ping parked in
            // this one gets it along.
            let ids = format!("{} {}", a.agent_id, a.job_id);
            let full = match serde_json::to_string(&a.job) {
                Ok(job) => format!("{ids} {job}"),
                Err(_) => ids.clone(),
            };
            waker.send_split(channels::ASSIGNED, ids, full);
        }
        waker.wake(channels::OUTBOX);
    }
    let now = chrono::Utc::now();
    let mut latency: Option<Duration> = None;
    for a in &assigned {
        if let Some(at) = a.scheduled_at {
            let waited = (now - at).to_std().unwrap_or_default();
            metrics::histogram!("herald_dispatch_assign_seconds").record(waited.as_secs_f64());
            if fresh_since.is_none_or(|since| at >= since) {
                crate::stats::record(waited);
                latency = Some(latency.map_or(waited, |l| l.max(waited)));
            }
        }
    }
    metrics::histogram!("herald_dispatch_round_seconds").record(started.elapsed().as_secs_f64());
    health::observe(started.elapsed());
    metrics::counter!("herald_jobs_assigned_total").increment(assigned.len() as u64);
    Ok(RoundOutcome {
        assigned: assigned.len(),
        deferred: round.deferred,
        starved: round.starved,
        latency,
    })
}

/// Why the dispatcher was woken, kept until it looks.
#[derive(Default)]
struct Wake {
    notify: Notify,
    /// Jobs may have become runnable (or agents joined, or a resync: anything may
    /// have happened meanwhile).
    jobs: AtomicBool,
    /// An agent finished its job.
    agents: AtomicBool,
}

async fn listen(pool: PgPool, local: LocalWakes, wake: Arc<Wake>, cancel: CancellationToken) {
    let mut heard = wake::listen(
        pool,
        &local,
        &[channels::DISPATCH, channels::AGENT_FREE],
        cancel,
    );
    while let Some(h) = heard.recv().await {
        match h {
            wake::Heard::Notice { channel, .. } if channel == channels::AGENT_FREE => {
                wake.agents.store(true, Ordering::Release)
            }
            _ => wake.jobs.store(true, Ordering::Release),
        }
        wake.notify.notify_one();
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
    static LATENCY_US: AtomicU64 = AtomicU64::new(0);
    static LATENCY_MS: AtomicU64 = AtomicU64::new(0);
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

    /// The worst fresh assignment latency of the last report window.
    pub fn observe_latency(d: Duration) {
        LATENCY_US.store(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        LATENCY_MS.store(now_ms(), Ordering::Relaxed);
    }

    /// The dispatcher's recent health in this process: the larger of its round time
    /// and its assignment latency, each while fresh.
    pub fn recent() -> Option<Duration> {
        let fresh = |at: u64| at != 0 && now_ms().saturating_sub(at) <= 2_000;
        let latency = fresh(LATENCY_MS.load(Ordering::Relaxed))
            .then(|| Duration::from_micros(LATENCY_US.load(Ordering::Relaxed)));
        recent_round().max(latency)
    }

    pub fn recent_round() -> Option<Duration> {
        let last = LAST_MS.load(Ordering::Relaxed);
        if last == 0 || now_ms().saturating_sub(last) > 5_000 {
            return None;
        }
        Some(Duration::from_micros(EWMA_US.load(Ordering::Relaxed)))
    }
}

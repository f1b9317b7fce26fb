//! The per-type senders. Each consumes its own queue with its own prefetch and its own
//! concurrency (adjusted at runtime by the throttle), waits for the type's and the
//! destination's rate limits, makes one HTTP attempt outside any transaction, and
//! hands the result to a batch writer before acking.

use crate::commit_status::GithubOutcome;
use crate::controls::Mode;
use crate::webhook::{self, Outcome as HttpOutcome};
use crate::{BatchedDelivery, DeliveryBatch, Notifier, StatusMsg};
use chrono::Utc;
use herald_bus::{Incoming, Outcome};
use herald_storage::notify::{self as store, AttemptRecord, StatusResult};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

type Pending = (AttemptRecord, oneshot::Sender<bool>);

/// Writes attempt results in batches: one transaction for many deliveries.
#[derive(Clone)]
pub struct AttemptWriter {
    tx: mpsc::Sender<Pending>,
}

/// When an endpoint is disabled for failing: every attempt failed for `after` and
/// there were at least `min_failures` of them.
#[derive(Debug, Clone, Copy)]
pub struct DisablePolicy {
    pub after: chrono::Duration,
    pub min_failures: i32,
}

impl DisablePolicy {
    pub fn new(after_s: f64, min_failures: u32) -> Self {
        DisablePolicy {
            after: chrono::Duration::milliseconds((after_s.max(0.0) * 1000.0) as i64),
            min_failures: i32::try_from(min_failures).unwrap_or(i32::MAX),
        }
    }

    fn due(&self, s: &store::FailureStreak, now: chrono::DateTime<Utc>) -> bool {
        s.failures >= self.min_failures && now - s.since >= self.after
    }
}

/// Counts one disable in `herald_webhooks_disabled_total{reason}`.
pub fn count_disabled(reason: &'static str) {
    metrics::counter!("herald_webhooks_disabled_total", "reason" => reason).increment(1);
}

impl AttemptWriter {
    pub fn spawn(
        pool: PgPool,
        policy: DisablePolicy,
        cache: Arc<crate::controls::SubscriptionCache>,
        cancel: CancellationToken,
    ) -> (AttemptWriter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let handle = tokio::spawn(write_loop(pool, rx, policy, cache, cancel));
        (AttemptWriter { tx }, handle)
    }

    /// Resolves once all the records are committed; false if any could not be.
    pub async fn record_all(&self, recs: Vec<AttemptRecord>) -> bool {
        let mut waits = Vec::with_capacity(recs.len());
        for rec in recs {
            let (done, wait) = oneshot::channel();
            if self.tx.send((rec, done)).await.is_err() {
                return false;
            }
            waits.push(wait);
        }
        for wait in waits {
            if !wait.await.unwrap_or(false) {
                return false;
            }
        }
        true
    }
}

async fn write_loop(
    pool: PgPool,
    mut rx: mpsc::Receiver<Pending>,
    policy: DisablePolicy,
    cache: Arc<crate::controls::SubscriptionCache>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = cancel.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        // Gather what arrives within a few milliseconds.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(5);
        while batch.len() < 1000 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        let records: Vec<AttemptRecord> = batch.iter().map(|(r, _)| r.clone()).collect();
        let ok = async {
            let mut tx = pool.begin().await?;
            let streaks = store::record_attempts(&mut tx, &records).await?;
            // Auto-disable commits with the attempt that crossed the line, its event too.
            let now = Utc::now();
            let mut disabled = Vec::new();
            for s in streaks.iter().filter(|s| policy.due(s, now)) {
                if let Some(hook) =
                    store::disable_webhook(&mut tx, s.webhook_id, store::reasons::FAILING).await?
                {
                    disabled.push(hook);
                }
            }
            tx.commit().await?;
            for hook in disabled {
                tracing::warn!(webhook = %hook.id, failures = ?streaks.iter().find(|s| s.webhook_id == hook.id).map(|s| s.failures), "webhook disabled: failing");
                count_disabled(store::reasons::FAILING);
                cache.invalidate(hook.org_id);
            }
            Ok::<_, herald_storage::StorageError>(())
        }
        .await;
        if let Err(e) = &ok {
            tracing::warn!(error = %e, n = records.len(), "cannot record delivery attempts");
        }
        metrics::histogram!("herald_notify_attempt_batch_size").record(records.len() as f64);
        for (_, done) in batch {
            let _ = done.send(ok.is_ok());
        }
    }
}

fn record(d: &BatchedDelivery, status: &str) -> AttemptRecord {
    AttemptRecord {
        delivery_id: d.delivery_id,
        webhook_id: d.webhook_id,
        status: status.to_owned(),
        attempted: false,
        attempts_before: d.attempts,
        next_attempt_at: None,
        status_code: None,
        error: None,
        response_body: None,
        duration_ms: 0,
    }
}

/// How long a delivery waits in PostgreSQL when it could not be tried (its webhook
/// could not be read): the scheduler hands it back then.
const NOT_TRIED_DELAY: chrono::Duration = chrono::Duration::seconds(2);

/// How long a claim keeps other copies of a message from sending its deliveries,
/// renewed every [`RENEW_EVERY`] while the attempts run. A worker killed holding one
/// delays its deliveries by that much (the row comes due when it ends); a holder whose
/// renewals stall longer (the database slow or away) may see another copy sent. 5 s
/// was too short for a loaded database in the chaos run (renewals 4-8 s apart).
pub(crate) const LEASE: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// One message: an event's deliveries, each sent on its own (within the type's
/// concurrency and the rate limits), all results committed before the ack.
///
/// Any message may be a copy (the relay, the fan-out and the broker are
/// at-least-once): only the worker that claims a delivery sends it. A delivery another
/// worker holds, or that was attempted already, is dropped from the message: its holder
/// records it, or, if the holder died, its claim runs out and the scheduler sends it.
pub async fn webhook(n: Arc<Notifier>, msg: Incoming) -> Outcome {
    let Some(mut batch) = DeliveryBatch::parse(&msg.body) else {
        return Outcome::DeadLetter;
    };
    let items: Vec<(Uuid, i32)> = batch
        .deliveries
        .iter()
        .map(|d| (d.delivery_id, d.attempts))
        .collect();
    let claimed = async {
        let mut conn = n.pool.acquire().await?;
        store::claim_deliveries(&mut conn, &items, LEASE).await
    };
    let mine = match claimed.await {
        Ok(mine) => mine,
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim deliveries; requeueing");
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Outcome::Requeue;
        }
    };
    if mine.len() < items.len() {
        metrics::counter!("herald_notify_copies_dropped_total", "type" => "webhook")
            .increment((items.len() - mine.len()) as u64);
    }
    batch.deliveries.retain(|d| mine.contains(&d.delivery_id));
    if batch.deliveries.is_empty() {
        return Outcome::Ack;
    }
    let parent = herald_trace::from_headers(&msg.headers);
    tokio::select! {
        out = attempt_and_record(&n, &batch, parent) => out,
        () = keep_claimed(&n, &mine) => Outcome::Requeue,
    }
}

/// Renews the claims on `ids` until dropped (when their results are recorded).
async fn keep_claimed(n: &Notifier, ids: &[Uuid]) {
    let mut wait = RENEW_EVERY;
    loop {
        tokio::time::sleep(wait).await;
        let renewed = async {
            let mut conn = n.pool.acquire().await?;
            store::renew_claims(&mut conn, ids, LEASE).await
        };
        wait = match renewed.await {
            Ok(_) => RENEW_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew delivery claims; trying again");
                Duration::from_millis(250)
            }
        };
    }
}

/// Sends the claimed deliveries of `batch` and records their results. A write that
/// fails is tried again while the claim is renewed: requeued, the message's results
/// would be lost and the delivery sent again after its 2xx.
async fn attempt_and_record(
    n: &Arc<Notifier>,
    batch: &DeliveryBatch,
    parent: Option<&str>,
) -> Outcome {
    let records: Vec<AttemptRecord> = match n.controls.mode("webhook") {
        Mode::Disabled => {
            metrics::counter!("herald_notify_skipped_total", "type" => "webhook")
                .increment(batch.deliveries.len() as u64);
            batch
                .deliveries
                .iter()
                .map(|d| record(d, "skipped"))
                .collect()
        }
        // Held in PostgreSQL, due at once: the scheduler sends them after resume.
        Mode::Paused => batch
            .deliveries
            .iter()
            .map(|d| AttemptRecord {
                next_attempt_at: Some(Utc::now()),
                ..record(d, "pending")
            })
            .collect(),
        Mode::Enabled => {
            let b = &batch;
            futures::future::join_all(b.deliveries.iter().map(|d| {
                let n = &n;
                let span = attempt_span(b, d, parent);
                async move {
                    match attempt(n, b, d).instrument(span).await {
                        Ok(rec) => rec,
                        Err(e) => {
                            tracing::warn!(error = %e, delivery = %d.delivery_id, "delivery failed before sending; retrying soon");
                            AttemptRecord {
                                next_attempt_at: Some(Utc::now() + NOT_TRIED_DELAY),
                                error: Some(format!("not tried: {e}")),
                                ..record(d, "pending")
                            }
                        }
                    }
                }
            }))
            .await
        }
    };
    loop {
        if n.writer.record_all(records.clone()).await {
            return Outcome::Ack;
        }
        // Stopping: the claim runs out and the scheduler sends these again.
        if n.stopping.is_cancelled() {
            return Outcome::Requeue;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One delivery attempt's span, a child of the fan-out's when the message carried its
/// context; its status code is recorded once the receiver answered.
fn attempt_span(b: &DeliveryBatch, d: &BatchedDelivery, parent: Option<&str>) -> tracing::Span {
    let span = herald_trace::span(|| {
        tracing::info_span!("webhook delivery attempt", otel.kind = "client",
            event.id = %b.event_id, webhook.id = %d.webhook_id, delivery.id = %d.delivery_id,
            attempt = d.attempts + 1, http.response.status_code = tracing::field::Empty)
    });
    herald_trace::set_parent(&span, parent);
    span
}

async fn attempt(
    n: &Notifier,
    b: &DeliveryBatch,
    d: &BatchedDelivery,
) -> Result<AttemptRecord, herald_storage::StorageError> {
    let Some(hook) = n.cache.webhook(&n.pool, d.webhook_id).await? else {
        return Ok(AttemptRecord {
            error: Some("webhook not found".into()),
            ..record(d, "skipped")
        });
    };
    let (hook, deleted) = (&hook.0, hook.1);
    if deleted || hook.disabled {
        let why = if deleted {
            "webhook deleted"
        } else {
            "endpoint disabled"
        };
        return Ok(AttemptRecord {
            error: Some(why.into()),
            ..record(d, "skipped")
        });
    }
    let host = reqwest::Url::parse(&hook.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let _slot = n.webhook_slots.acquire().await;
    n.webhook_rate.acquire().await;
    n.destinations
        .acquire_with(&hook.id.to_string(), &host, hook.rate_per_s)
        .await;
    let a = n
        .sender
        .send_signed(
            &hook.url,
            &hook.secret,
            hook.old_secret_at(Utc::now()),
            &d.delivery_id.to_string(),
            b.payload.get().as_bytes(),
        )
        .await;
    let made = u32::try_from(d.attempts.max(0)).unwrap_or(0) + 1;
    if let Some(code) = a.status_code {
        tracing::Span::current().record("http.response.status_code", code);
    }
    let (status, next) = match &a.outcome {
        HttpOutcome::Success => ("succeeded", None),
        HttpOutcome::Gone => {
            let mut tx = n.pool.begin().await?;
            let disabled = store::disable_webhook(&mut tx, hook.id, store::reasons::GONE).await?;
            tx.commit().await?;
            if disabled.is_some() {
                count_disabled(store::reasons::GONE);
            }
            n.cache.invalidate(hook.org_id);
            ("dead", None)
        }
        HttpOutcome::RetryAfter(d) if webhook::next_retry_delay(made).is_some() => {
            ("failed", Some(*d))
        }
        _ => match webhook::next_retry_delay(made) {
            Some(d) => ("failed", Some(d.mul_f64(n.settings.retry_scale.max(0.0)))),
            None => ("dead", None),
        },
    };
    metrics::counter!("herald_notify_deliveries_total", "type" => "webhook", "status" => status)
        .increment(1);
    Ok(AttemptRecord {
        delivery_id: d.delivery_id,
        webhook_id: d.webhook_id,
        status: status.to_owned(),
        attempted: true,
        attempts_before: d.attempts,
        next_attempt_at: next
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| Utc::now() + d),
        status_code: a.status_code.map(i32::from),
        error: a.error.clone(),
        response_body: a.response_body.clone(),
        duration_ms: i32::try_from(a.duration.as_millis()).unwrap_or(i32::MAX),
    })
}

/// The longest a worker waits for a token's budget before parking the status in
/// PostgreSQL instead.
const MAX_BUDGET_WAIT: Duration = Duration::from_secs(20);

pub async fn commit_status(n: Arc<Notifier>, msg: Incoming) -> Outcome {
    let Ok(m) = serde_json::from_slice::<StatusMsg>(&msg.body) else {
        return Outcome::DeadLetter;
    };
    match status_attempt(&n, &m).await {
        Ok(()) => Outcome::Ack,
        Err(e) => {
            tracing::warn!(error = %e, "commit status failed before sending; requeueing");
            tokio::time::sleep(Duration::from_millis(200)).await;
            Outcome::Requeue
        }
    }
}

async fn status_attempt(n: &Notifier, m: &StatusMsg) -> Result<(), herald_storage::StorageError> {
    let load = || async {
        let mut conn = n.pool.acquire().await?;
        store::status_work(&mut conn, &m.repository, &m.sha, &m.context).await
    };
    let Some(w) = load().await? else {
        return Ok(());
    };
    // Coalescing: a newer version was sent already, or this one is.
    if w.version <= w.sent_version {
        metrics::counter!("herald_github_coalesced_total").increment(1);
        return Ok(());
    }
    let mut conn = n.pool.acquire().await?;
    match n.controls.mode("github_commit_status") {
        Mode::Disabled => {
            return store::status_result(
                &mut conn,
                &w,
                StatusResult {
                    status: "skipped",
                    sent: true,
                    ..Default::default()
                },
            )
            .await;
        }
        Mode::Paused => {
            let held = StatusResult {
                status: "pending",
                next_attempt_at: Some(Utc::now()),
                ..Default::default()
            };
            return store::status_result(&mut conn, &w, held).await;
        }
        Mode::Enabled => {}
    }
    drop(conn);
    let _slot = n.github_slots.acquire().await;
    n.github_rate.acquire().await;
    if tokio::time::timeout(MAX_BUDGET_WAIT, n.github.wait_for_budget(&w.token))
        .await
        .is_err()
    {
        let mut conn = n.pool.acquire().await?;
        let at = Utc::now() + chrono::Duration::seconds(30);
        return store::status_result(
            &mut conn,
            &w,
            StatusResult {
                status: "pending",
                next_attempt_at: Some(at),
                error: Some("token budget exhausted; waiting"),
                ..Default::default()
            },
        )
        .await;
    }
    // Claim the newest wanted state, read after waiting: what arrived meanwhile
    // coalesces here, and no other worker sends this status until the claim ends.
    let claimed = {
        let mut conn = n.pool.acquire().await?;
        let lease = n.github.timeout() * 2 + Duration::from_secs(5);
        store::claim_status(&mut conn, &m.repository, &m.sha, &m.context, lease).await?
    };
    let Some(w) = claimed else {
        metrics::counter!("herald_github_coalesced_total").increment(1);
        return Ok(());
    };
    let req = crate::commit_status::StatusRequest {
        api_url: w.api_url.clone(),
        token: w.token.clone(),
        repository: w.repository.clone(),
        sha: w.sha.clone(),
        state: w.state.clone(),
        target_url: w.target_url.clone(),
        description: w.description.clone(),
        context: w.context.clone(),
    };
    let outcome = n.github.post_status(&req).await;
    let mut conn = n.pool.acquire().await?;
    let made = u32::try_from(w.attempts.max(0)).unwrap_or(0) + 1;
    match outcome {
        GithubOutcome::Success => {
            store::status_result(
                &mut conn,
                &w,
                StatusResult {
                    status: "succeeded",
                    sent: true,
                    attempted: true,
                    code: Some(201),
                    ..Default::default()
                },
            )
            .await
        }
        GithubOutcome::RateLimited { retry_at } => {
            let wait = retry_at.saturating_duration_since(std::time::Instant::now());
            let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            store::status_result(
                &mut conn,
                &w,
                StatusResult {
                    status: "failed",
                    attempted: true,
                    next_attempt_at: Some(at),
                    code: Some(403),
                    error: Some("rate limited"),
                    ..Default::default()
                },
            )
            .await
        }
        GithubOutcome::Retry(e) => match webhook::next_retry_delay(made) {
            Some(d) => {
                let d = d.mul_f64(n.settings.retry_scale.max(0.0));
                let at = Utc::now() + chrono::Duration::from_std(d).unwrap_or_default();
                store::status_result(
                    &mut conn,
                    &w,
                    StatusResult {
                        status: "failed",
                        attempted: true,
                        next_attempt_at: Some(at),
                        error: Some(&e),
                        ..Default::default()
                    },
                )
                .await
            }
            None => {
                store::status_result(
                    &mut conn,
                    &w,
                    StatusResult {
                        status: "dead",
                        attempted: true,
                        error: Some(&e),
                        ..Default::default()
                    },
                )
                .await
            }
        },
        GithubOutcome::Fatal(e) => {
            store::status_result(
                &mut conn,
                &w,
                StatusResult {
                    status: "dead",
                    attempted: true,
                    error: Some(&e),
                    ..Default::default()
                },
            )
            .await
        }
    }
}

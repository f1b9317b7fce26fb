//! Fan-out: one event in, its deliveries out. Two consumers of the same events:
//! `{prefix}.notify` records webhook deliveries (waiting while the webhook queue is
//! full), `{prefix}.notify.commit_status` records the commit status a build wants.
//! Each resolves subscriptions through the cache and records its work once (unique keys
//! make a redelivered event harmless), then hands new work to the per-type queues after
//! commit. They share no queue and no slot, so a webhook backlog never holds a commit
//! status back.

use crate::commit_status;
use crate::controls::Mode;
use crate::{DeliveryBatch, Notifier, StatusMsg};
use herald_bus::{Incoming, Outcome, OutgoingMessage};
use herald_domain::{pattern_matches, EventType};
use herald_storage::notify::{self as store, WantedStatus};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use uuid::Uuid;

/// The fields every event carries, or why the message is dead-lettered.
fn parse(msg: &Incoming) -> Result<(Value, Uuid, Uuid, EventType), Outcome> {
    let Ok(event) = serde_json::from_slice::<Value>(&msg.body) else {
        return Err(Outcome::DeadLetter);
    };
    let field = |name: &str| event.get(name).and_then(Value::as_str);
    let parsed = (
        field("id").and_then(|s| Uuid::parse_str(s).ok()),
        field("org_id").and_then(|s| Uuid::parse_str(s).ok()),
        field("type").and_then(|s| s.parse::<EventType>().ok()),
    );
    let (Some(event_id), Some(org), Some(kind)) = parsed else {
        tracing::warn!(routing_key = %msg.routing_key, "malformed event; dead-lettering");
        return Err(Outcome::DeadLetter);
    };
    Ok((event, event_id, org, kind))
}

/// What a fan-out's result means for the message.
fn outcome(result: anyhow::Result<bool>, event_id: Uuid, what: &str) -> Outcome {
    match result {
        // Stopping while waiting for room: hand the event back untouched.
        Ok(false) => Outcome::Requeue,
        Ok(true) => Outcome::Ack,
        Err(e) => {
            tracing::warn!(error = %e, %event_id, "{what} failed; requeueing");
            Outcome::Requeue
        }
    }
}

/// `{prefix}.notify`: the event's webhook deliveries.
pub async fn handle(n: Arc<Notifier>, msg: Incoming) -> Outcome {
    let (event, event_id, org, kind) = match parse(&msg) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let _slot = n.fanout_slots.acquire().await;
    let span = herald_trace::span(|| {
        tracing::info_span!("fanout", otel.kind = "consumer", event.id = %event_id,
            event.r#type = kind.as_str())
    });
    herald_trace::set_parent(&span, herald_trace::from_headers(&msg.headers));
    let result = fan_out_webhooks(&n, &event, event_id, org, kind)
        .instrument(span)
        .await;
    let out = outcome(result, event_id, "fan-out");
    match out {
        Outcome::Ack => metrics::counter!("herald_notify_events_total").increment(1),
        Outcome::Requeue => tokio::time::sleep(Duration::from_millis(200)).await,
        _ => {}
    }
    out
}

/// `{prefix}.notify.commit_status`: the commit status the event asks for, if any.
pub async fn handle_status(n: Arc<Notifier>, msg: Incoming) -> Outcome {
    let (event, event_id, org, kind) = match parse(&msg) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let out = outcome(
        fan_out_status(&n, &event, org, kind).await.map(|()| true),
        event_id,
        "commit-status fan-out",
    );
    if out == Outcome::Requeue {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out
}

/// How often the fan-out reads the webhook queue's depth.
const BACKLOG_READ_EVERY: Duration = Duration::from_millis(250);

/// Waits while the webhook queue holds more than the allowed backlog. Creating
/// deliveries faster than they are sent only moves the backlog into PostgreSQL (rows,
/// WAL, index entries) and the broker; left as events in `{prefix}.notify` it costs
/// nothing until the senders catch up. False when the role is stopping.
async fn room_for_deliveries(n: &Notifier) -> bool {
    loop {
        if n.stopping.is_cancelled() {
            return false;
        }
        let limit = (f64::from(n.settings.fanout_max_backlog) * n.throttle.factor()).max(100.0);
        match webhook_backlog(n).await {
            Some(depth) if f64::from(depth) > limit => {
                metrics::counter!("herald_notify_fanout_paused_total").increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(BACKLOG_READ_EVERY) => {}
                    _ = n.stopping.cancelled() => return false,
                }
            }
            // Room, or the depth cannot be read: a broker that cannot answer cannot
            // take the messages either, and publishing reports that.
            _ => return true,
        }
    }
}

/// Deliveries waiting in the webhook queue: its depth in messages as last read (at
/// most [`BACKLOG_READ_EVERY`] ago) times the deliveries per message this process
/// published, plus the deliveries published since: a burst between two reads counts
/// at once.
pub(crate) async fn webhook_backlog(n: &Notifier) -> Option<u32> {
    let cached = *lock_backlog(n);
    if let Some(b) = cached {
        if b.read_at
            .is_some_and(|at| at.elapsed() < BACKLOG_READ_EVERY)
        {
            return Some(b.estimate());
        }
    }
    let depth = n
        .publisher
        .queue_depth(&n.names.delivery_queue("webhook"))
        .await
        .ok()
        .map(|(messages, _)| messages)?;
    metrics::gauge!("herald_notify_webhook_backlog_messages").set(f64::from(depth));
    let mut b = lock_backlog(n);
    let b = b.get_or_insert_with(Backlog::default);
    b.messages = depth;
    b.read_at = Some(std::time::Instant::now());
    b.added = 0;
    let estimate = b.estimate();
    metrics::gauge!("herald_notify_webhook_backlog").set(f64::from(estimate));
    Some(estimate)
}

pub(crate) fn published_deliveries(n: &Notifier, messages: usize, deliveries: usize) {
    let mut b = lock_backlog(n);
    let b = b.get_or_insert_with(Backlog::default);
    b.added = b.added.saturating_add(deliveries as u64);
    b.total_messages = b.total_messages.saturating_add(messages as u64);
    b.total_deliveries = b.total_deliveries.saturating_add(deliveries as u64);
}

fn lock_backlog(n: &Notifier) -> std::sync::MutexGuard<'_, Option<Backlog>> {
    n.webhook_backlog
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the fan-out knows of the webhook queue's backlog.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    /// The queue's depth in messages, as last read.
    messages: u32,
    /// When; never read yet if `None`.
    read_at: Option<std::time::Instant>,
    /// Deliveries published since that read.
    added: u64,
    total_messages: u64,
    total_deliveries: u64,
}

impl Backlog {
    fn estimate(&self) -> u32 {
        let per_message = if self.total_messages == 0 {
            1.0
        } else {
            self.total_deliveries as f64 / self.total_messages as f64
        };
        let d = f64::from(self.messages) * per_message + self.added as f64;
        d.min(f64::from(u32::MAX)) as u32
    }
}

async fn fan_out_webhooks(
    n: &Notifier,
    event: &Value,
    event_id: Uuid,
    org: Uuid,
    kind: EventType,
) -> anyhow::Result<bool> {
    let subs = n.cache.org(&n.pool, org).await?;
    let pipeline = event
        .pointer("/data/build/pipeline")
        .and_then(Value::as_str);

    // A disabled endpoint's deliveries are recorded, as skipped: a recover can send
    // them once it is enabled again.
    let mut hooks: Vec<Uuid> = Vec::new();
    let mut disabled: Vec<Uuid> = Vec::new();
    for w in subs
        .webhooks
        .iter()
        .filter(|w| w.pipeline.is_none() || w.pipeline.as_deref() == pipeline)
        .filter(|w| w.events.iter().any(|p| pattern_matches(p, kind)))
    {
        hooks.push(w.id);
        if w.disabled {
            disabled.push(w.id);
        }
    }
    if !hooks.is_empty() {
        if !room_for_deliveries(n).await {
            return Ok(false);
        }
        let body = json!({
            "type": kind.as_str(),
            "timestamp": event.get("timestamp").cloned().unwrap_or(Value::Null),
            "data": event.get("data").cloned().unwrap_or(Value::Null),
        });
        let mode = n.controls.mode("webhook");
        let (status, held) = match mode {
            Mode::Enabled => ("pending", false),
            Mode::Paused => ("pending", true),
            Mode::Disabled => ("skipped", false),
        };
        let raw = crate::raw_body(&body);
        let mut conn = n.pool.acquire().await?;
        let work = store::record_deliveries(
            &mut conn,
            store::NewDeliveries {
                org_id: org,
                event_id,
                event_type: kind.as_str(),
                payload: &body,
                webhook_ids: &hooks,
                disabled: &disabled,
                status,
                held,
            },
        )
        .await?;
        drop(conn);
        if mode == Mode::Disabled {
            metrics::counter!("herald_notify_skipped_total", "type" => "webhook")
                .increment(hooks.len() as u64);
        }
        if !work.is_empty() {
            let queue = n.names.delivery_queue("webhook");
            let msgs: Vec<OutgoingMessage> =
                DeliveryBatch::for_event(event_id, kind.as_str(), &raw, &work)
                    .iter()
                    .map(|b| {
                        let mut m = b.to_message(&queue);
                        herald_trace::inject(&mut m.headers);
                        m
                    })
                    .collect();
            n.publisher.publish_batch("", &msgs).await?;
            published_deliveries(n, msgs.len(), work.len());
            metrics::counter!("herald_notify_deliveries_created_total", "type" => "webhook")
                .increment(work.len() as u64);
        }
    }

    Ok(true)
}

async fn fan_out_status(
    n: &Notifier,
    event: &Value,
    org: Uuid,
    kind: EventType,
) -> anyhow::Result<()> {
    let Some(pipeline) = event
        .pointer("/data/build/pipeline")
        .and_then(Value::as_str)
    else {
        return Ok(());
    };
    let subs = n.cache.org(&n.pool, org).await?;
    let Some(g) = subs.github.iter().find(|g| g.pipeline == pipeline) else {
        return Ok(());
    };
    let Some(wanted) = wanted_status(n, event, kind, org, g) else {
        return Ok(());
    };
    let mode = n.controls.mode("github_commit_status");
    let mut conn = n.pool.acquire().await?;
    let changed = store::want_status(
        &mut conn,
        &wanted,
        mode == Mode::Disabled,
        mode == Mode::Paused,
    )
    .await?;
    drop(conn);
    if changed && mode == Mode::Enabled {
        let m = StatusMsg {
            repository: wanted.repository,
            sha: wanted.sha,
            context: wanted.context,
        };
        n.publisher
            .publish_batch(
                "",
                &[m.to_message(&n.names.delivery_queue("github_commit_status"))],
            )
            .await?;
    }
    Ok(())
}

/// Job attempts within one finish of its build, for ordering rounds.
const JOB_ROUNDS_PER_FINISH: i64 = 1000;

/// The events [`wanted_status`] makes a status of; `herald_bus::COMMIT_STATUS_BINDINGS`
/// routes exactly these to the commit-status fan-out (a test holds them together).
pub(crate) const STATUS_EVENTS: &[EventType] = &[
    EventType::BuildScheduled,
    EventType::BuildRunning,
    EventType::BuildFinished,
    EventType::JobScheduled,
    EventType::JobStarted,
    EventType::JobFinished,
];

fn wanted_status(
    n: &Notifier,
    event: &Value,
    kind: EventType,
    org: Uuid,
    g: &store::GithubIntegration,
) -> Option<WantedStatus> {
    if !STATUS_EVENTS.contains(&kind) {
        return None;
    }
    let build = event.pointer("/data/build")?;
    let build_id = build
        .get("id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())?;
    let sha = build.get("commit").and_then(Value::as_str)?;
    let number = build.get("number").and_then(Value::as_i64).unwrap_or(0);
    // Rounds: a build's `attempt` counts its finishes, so a final state belongs to
    // round attempt - 1 and a pending one (reopened by a retry) to round attempt. A
    // job's round follows the build's finishes, then its own attempt: a job skipped in
    // one finish runs again after a retry reopened the build.
    let build_finishes = build.get("attempt").and_then(Value::as_i64).unwrap_or(0);
    let (herald_state, subject, job_key, round) = match kind {
        EventType::BuildScheduled | EventType::BuildRunning | EventType::BuildFinished => {
            let state = build.get("state").and_then(Value::as_str)?;
            let final_state =
                commit_status::github_state(state).is_some_and(|g| commit_status::rank(g) > 0);
            let round = if final_state {
                build_finishes - 1
            } else {
                build_finishes
            };
            (state, format!("Build #{number}"), None, round.max(0))
        }
        EventType::JobScheduled | EventType::JobStarted | EventType::JobFinished
            if g.job_statuses =>
        {
            let job = event.pointer("/data/job")?;
            let key = job.get("key").and_then(Value::as_str)?;
            let attempt = job.get("attempt").and_then(Value::as_i64).unwrap_or(1);
            (
                job.get("state").and_then(Value::as_str)?,
                format!("Job {key} of build #{number}"),
                Some(key),
                build_finishes * JOB_ROUNDS_PER_FINISH + attempt - 1,
            )
        }
        _ => return None,
    };
    let state = commit_status::github_state(herald_state)?;
    Some(WantedStatus {
        repository: g.repository.clone(),
        sha: sha.to_owned(),
        context: commit_status::context(&g.pipeline, job_key),
        org_id: org,
        pipeline_id: g.pipeline_id,
        build_id,
        state: state.to_owned(),
        rank: i16::from(commit_status::rank(state)),
        round: i32::try_from(round).unwrap_or(0),
        description: commit_status::describe(&subject, herald_state),
        target_url: format!(
            "{}/builds/{build_id}",
            n.settings.target_base_url.trim_end_matches('/')
        ),
    })
}

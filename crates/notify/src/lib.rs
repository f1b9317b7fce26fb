//! Notification fan-out: signed webhooks and GitHub commit statuses, rate-limited,
//! switchable per type at runtime, and throttled by the health of dispatch.
//!
//! Owns its own RabbitMQ queues (`{prefix}.notify`, `{prefix}.notify.commit_status`,
//! `{prefix}.deliver.webhook`, `{prefix}.deliver.github_commit_status`), its own worker
//! pools and its own database pool, capped below dispatch's. Must never import `herald-dispatch`, share its queue,
//! workers or pool, nor hold a transaction open across an HTTP call to a receiver.

pub mod commit_status;
pub mod controls;
pub mod deliver;
pub mod fanout;
pub mod limits;
pub mod scheduler;
pub mod throttle;
pub mod throttle_stats;
pub mod webhook;

use controls::{SubscriptionCache, TypeControls};
use deliver::AttemptWriter;
use herald_bus::{BusConfig, ConsumerSpec, Names, OutgoingMessage, Publisher};
use herald_storage::notify::DeliveryWork;
use limits::{AdjustableSemaphore, DestinationLimiter, Throttle, ThrottleSettings, TypeLimiter};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, Deserialize)]
pub struct NotifySettings {
    /// The role runs on a runtime of its own, with this many threads, at this CPU
    /// niceness (0 = as the rest of the process).
    pub worker_threads: usize,
    pub nice: i32,
    pub fanout_prefetch: u16,
    pub fanout_concurrency: usize,
    /// Webhook deliveries allowed to wait in the broker before the fan-out pauses
    /// (scaled by the throttle factor, at least 100).
    pub fanout_max_backlog: u32,
    pub webhook_prefetch: u16,
    pub webhook_concurrency: usize,
    pub github_prefetch: u16,
    pub github_concurrency: usize,
    pub per_endpoint_rate_per_s: f64,
    pub per_endpoint_burst: u32,
    pub per_host_rate_per_s: f64,
    pub per_host_burst: u32,
    pub per_host_concurrency: usize,
    pub webhook_timeout_s: f64,
    pub github_per_token_per_minute: u32,
    /// Commit statuses link to `{target_base_url}/builds/{id}`.
    pub target_base_url: String,
    pub history_retention_s: f64,
    pub scheduler_batch: i64,
    /// How long after a restart of the database server a delivery claim renewed
    /// before it still holds (see `herald_storage::notify::honour_claims_across_restart`).
    pub claim_restart_grace_s: f64,
    /// Multiplies the retry schedule (1.0 = the contract's 5 s, 30 s, 2 min, …).
    pub retry_scale: f64,
    pub throttle: ThrottleConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ThrottleConfig {
    pub enabled: bool,
    pub interval_ms: u64,
    pub latency_target_ms: f64,
    pub acquire_target_ms: f64,
    pub min_factor: f64,
    /// Commit statuses are scaled no lower than this: one request per build state,
    /// coalesced, is too little load to matter to dispatch, and a build's status is
    /// what its developers wait for.
    pub commit_status_min_factor: f64,
    pub decrease: f64,
    pub increase: f64,
}

/// Deliveries of one event on their way to the webhook pool: one broker message for
/// up to [`MAX_BATCH`] of its endpoints, not one per endpoint. The broker's cost is
/// per message (publish, confirm, deliver, ack), and an event's endpoints share the
/// body anyway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryBatch {
    pub event_id: Uuid,
    pub event_type: String,
    /// The exact body to sign and send: kept as text, never parsed into a map and
    /// written out again for each of an event's endpoints.
    pub payload: Box<serde_json::value::RawValue>,
    pub deliveries: Vec<BatchedDelivery>,
}

/// One delivery of a [`DeliveryBatch`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BatchedDelivery {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    /// Attempts made before this one: a copy of the message whose row counts more was
    /// attempted already.
    pub attempts: i32,
}

/// The most deliveries one message carries.
pub const MAX_BATCH: usize = 100;

/// The message of one delivery, as versions before batching published it. Messages
/// of that shape may still wait in a queue after an upgrade; they are read as a batch
/// of one.
#[derive(Debug, Deserialize)]
struct SingleDelivery {
    delivery_id: Uuid,
    webhook_id: Uuid,
    event_id: Uuid,
    event_type: String,
    attempts: i32,
    payload: Box<serde_json::value::RawValue>,
}

/// A JSON value as the text of its body.
pub fn raw_body(v: &serde_json::Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(v)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
}

impl DeliveryBatch {
    /// Messages for one event's rows `work`, which share the body `payload`.
    pub fn for_event(
        event_id: Uuid,
        event_type: &str,
        payload: &serde_json::value::RawValue,
        work: &[DeliveryWork],
    ) -> Vec<DeliveryBatch> {
        work.chunks(MAX_BATCH)
            .map(|chunk| DeliveryBatch {
                event_id,
                event_type: event_type.to_owned(),
                payload: payload.to_owned(),
                deliveries: chunk
                    .iter()
                    .map(|w| BatchedDelivery {
                        delivery_id: w.id,
                        webhook_id: w.webhook_id,
                        attempts: w.attempts,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Messages for rows read back from PostgreSQL, grouped by event, each event's
    /// stored body serialized once.
    pub fn from_work(rows: &[&DeliveryWork]) -> Vec<DeliveryBatch> {
        let mut index = std::collections::HashMap::new();
        let mut by_event: Vec<(Uuid, Vec<DeliveryWork>)> = Vec::new();
        for w in rows {
            let i = *index.entry(w.event_id).or_insert_with(|| {
                by_event.push((w.event_id, Vec::new()));
                by_event.len() - 1
            });
            by_event[i].1.push((*w).clone());
        }
        by_event
            .into_iter()
            .flat_map(|(event_id, work)| {
                let body = raw_body(&work[0].payload);
                DeliveryBatch::for_event(event_id, &work[0].event_type, &body, &work)
            })
            .collect()
    }

    /// Reads a message body: a batch, or a single delivery of an older version.
    pub fn parse(body: &[u8]) -> Option<DeliveryBatch> {
        if let Ok(b) = serde_json::from_slice::<DeliveryBatch>(body) {
            return Some(b);
        }
        let one = serde_json::from_slice::<SingleDelivery>(body).ok()?;
        Some(DeliveryBatch {
            event_id: one.event_id,
            event_type: one.event_type,
            payload: one.payload,
            deliveries: vec![BatchedDelivery {
                delivery_id: one.delivery_id,
                webhook_id: one.webhook_id,
                attempts: one.attempts,
            }],
        })
    }

    pub fn to_message(&self, queue: &str) -> OutgoingMessage {
        let first = self.deliveries.first();
        OutgoingMessage {
            routing_key: queue.to_owned(),
            message_id: format!(
                "{}:{}:{}",
                self.event_id,
                first.map(|d| d.delivery_id).unwrap_or_default(),
                first.map(|d| d.attempts).unwrap_or_default()
            ),
            body: serde_json::to_vec(self).unwrap_or_default(),
            headers: Vec::new(),
        }
    }
}

/// A commit status to (re)consider; the row holds the newest wanted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusMsg {
    pub repository: String,
    pub sha: String,
    pub context: String,
}

impl StatusMsg {
    pub fn to_message(&self, queue: &str) -> OutgoingMessage {
        OutgoingMessage {
            routing_key: queue.to_owned(),
            message_id: format!("{}:{}:{}", self.repository, self.sha, self.context),
            body: serde_json::to_vec(self).unwrap_or_default(),
            headers: Vec::new(),
        }
    }
}

/// Everything the notify role's workers share.
pub struct Notifier {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub names: Names,
    pub settings: NotifySettings,
    pub controls: Arc<TypeControls>,
    pub cache: Arc<SubscriptionCache>,
    pub sender: webhook::WebhookSender,
    pub github: commit_status::GithubClient,
    pub webhook_rate: TypeLimiter,
    pub github_rate: TypeLimiter,
    pub destinations: DestinationLimiter,
    pub webhook_slots: AdjustableSemaphore,
    pub github_slots: AdjustableSemaphore,
    /// The fan-out is notification work too: the throttle scales it with the senders,
    /// so a backlog waits in the broker instead of in PostgreSQL.
    pub fanout_slots: AdjustableSemaphore,
    pub throttle: Throttle,
    pub remote_health: Arc<throttle::RemoteHealth>,
    /// The webhook queue's depth as last read, when, and what this process has
    /// published to it since (see `fanout::webhook_backlog`).
    pub webhook_backlog: std::sync::Mutex<Option<fanout::Backlog>>,
    /// Fires when the role stops: waits give up and hand their message back.
    pub stopping: CancellationToken,
    pub writer: AttemptWriter,
    /// Messages handled since the throttle last looked; an idle pool costs no sample.
    pub activity: std::sync::atomic::AtomicU64,
}

/// A source of dispatch health for the throttle (the dispatcher's recent latency, when
/// it runs in this process).
pub type DispatchHealth = Arc<dyn Fn() -> Option<Duration> + Send + Sync>;

pub struct NotifyRole {
    pub pool: PgPool,
    pub primary_url: String,
    pub bus: BusConfig,
    pub settings: NotifySettings,
    pub allow_private_networks: bool,
    /// Auto-disable of endpoints that keep failing.
    pub disable: deliver::DisablePolicy,
    pub dispatch_health: Option<DispatchHealth>,
    /// This process's in-memory wake-ups (see `herald_storage::wake`).
    pub local: herald_storage::LocalWakes,
}

/// Starts the fan-out consumer, both sender pools, the scheduler, the switch listener
/// and the throttle. Returns their tasks; all stop on `cancel`.
pub async fn start(
    role: NotifyRole,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let s = role.settings.clone();
    let publisher = Arc::new(Publisher::lazy(role.bus.clone()));
    let names = role.bus.names();
    let mut tasks = Vec::new();
    // The writer and the publisher outlive the workers that use them: they stop once
    // those have drained (see the end of this function).
    let writer_stop = CancellationToken::new();
    let cache: Arc<SubscriptionCache> = Arc::default();
    let (writer, writer_task) = AttemptWriter::spawn(
        role.pool.clone(),
        role.disable,
        cache.clone(),
        writer_stop.clone(),
    );
    let mut workers = Vec::new();
    let controls = Arc::new(TypeControls::default());
    if let Err(e) = controls.reload(&role.pool).await {
        tracing::warn!(error = %e, "cannot read notification switches yet; assuming enabled until the listener does");
    }
    let rate = |kind: &str, default: (f64, u32)| {
        controls
            .get(kind)
            .map(|t| (t.rate_per_s, u32::try_from(t.burst).unwrap_or(1)))
            .unwrap_or(default)
    };
    let (wr, wb) = rate("webhook", (10_000.0, 10_000));
    let (gr, gb) = rate("github_commit_status", (100.0, 100));
    let sender = webhook::WebhookSender::new(webhook::WebhookSettings {
        allow_private_networks: role.allow_private_networks,
        timeout: Duration::from_secs_f64(s.webhook_timeout_s),
        per_host_concurrency: s.per_host_concurrency,
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("cannot build the webhook client: {e}"))?;
    let github = commit_status::GithubClient::new(commit_status::GithubSettings {
        per_token_per_minute: s.github_per_token_per_minute,
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("cannot build the GitHub client: {e}"))?;
    let n = Arc::new(Notifier {
        pool: role.pool.clone(),
        publisher: publisher.clone(),
        names: names.clone(),
        controls: controls.clone(),
        cache,
        sender,
        github,
        webhook_rate: TypeLimiter::new(wr, wb),
        github_rate: TypeLimiter::new(gr, gb),
        destinations: DestinationLimiter::new(
            s.per_endpoint_rate_per_s,
            s.per_endpoint_burst,
            s.per_host_rate_per_s,
            s.per_host_burst,
        ),
        webhook_slots: AdjustableSemaphore::new(s.webhook_concurrency),
        github_slots: AdjustableSemaphore::new(s.github_concurrency),
        fanout_slots: AdjustableSemaphore::new(s.fanout_concurrency),
        remote_health: Arc::default(),
        webhook_backlog: Default::default(),
        stopping: cancel.clone(),
        throttle: Throttle::new(ThrottleSettings {
            enabled: s.throttle.enabled,
            min_factor: s.throttle.min_factor,
            max_factor: 1.0,
            decrease: s.throttle.decrease,
            increase: s.throttle.increase,
            latency_target: Duration::from_secs_f64(s.throttle.latency_target_ms / 1000.0),
            acquire_target: Duration::from_secs_f64(s.throttle.acquire_target_ms / 1000.0),
        }),
        writer,
        settings: s.clone(),
        activity: Default::default(),
    });

    let due = Arc::new(Notify::new());
    tasks.push(tokio::spawn(controls::listen(
        role.pool.clone(),
        role.local.clone(),
        controls.clone(),
        n.cache.clone(),
        n.remote_health.clone(),
        due.clone(),
        cancel.clone(),
    )));
    workers.push(tokio::spawn(scheduler::run(
        role.primary_url.clone(),
        n.clone(),
        due,
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(throttle_stats::publish(
        role.pool.clone(),
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(throttle::run(
        n.clone(),
        role.dispatch_health.clone(),
        cancel.clone(),
    )));

    let consumers: [(String, Vec<&str>, u16, usize, Handler); 4] = [
        (
            names.notify_queue(),
            vec!["#"],
            s.fanout_prefetch,
            s.fanout_concurrency,
            Handler::Fanout,
        ),
        // Commit statuses fan out from a queue of their own: the webhook fan-out waits
        // for room in the webhook queue, and a build's status must not wait with it.
        (
            names.commit_status_queue(),
            herald_bus::COMMIT_STATUS_BINDINGS.to_vec(),
            s.github_prefetch,
            s.github_concurrency,
            Handler::StatusFanout,
        ),
        (
            names.delivery_queue("webhook"),
            vec![],
            s.webhook_prefetch,
            s.webhook_concurrency,
            Handler::Webhook,
        ),
        (
            names.delivery_queue("github_commit_status"),
            vec![],
            s.github_prefetch,
            s.github_concurrency,
            Handler::Github,
        ),
    ];
    for (queue, bindings, prefetch, concurrency, handler) in consumers {
        let mut spec = ConsumerSpec::new(queue, &bindings);
        spec.prefetch = prefetch;
        spec.concurrency = concurrency.max(1);
        let n = n.clone();
        let bus = role.bus.clone();
        let c = cancel.clone();
        workers.push(tokio::spawn(async move {
            let result = herald_bus::run_consumer(bus, spec, c, move |msg| {
                let n = n.clone();
                async move {
                    n.activity
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match handler {
                        Handler::Fanout => fanout::handle(n, msg).await,
                        Handler::StatusFanout => fanout::handle_status(n, msg).await,
                        Handler::Webhook => deliver::webhook(n, msg).await,
                        Handler::Github => deliver::commit_status(n, msg).await,
                    }
                }
            })
            .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "notification consumer failed");
            }
        }));
    }
    // The batch writer and the publisher stop after the consumers and the scheduler
    // drained, so what they finish is recorded and published, not handed back.
    tasks.push(tokio::spawn(async move {
        futures::future::join_all(workers).await;
        writer_stop.cancel();
        let _ = writer_task.await;
        publisher.close().await;
    }));
    Ok(tasks)
}

#[derive(Clone, Copy)]
enum Handler {
    Fanout,
    StatusFanout,
    Webhook,
    Github,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_status_queue_gets_exactly_the_events_a_status_follows() {
        for &e in herald_domain::EventType::ALL {
            let routed = herald_bus::COMMIT_STATUS_BINDINGS
                .iter()
                .any(|p| herald_domain::events::pattern_matches(p, e));
            assert_eq!(
                routed,
                fanout::STATUS_EVENTS.contains(&e),
                "{e:?}: routed to the commit-status queue {routed}"
            );
        }
    }

    fn work(event: Uuid, n: usize) -> Vec<DeliveryWork> {
        (0..n)
            .map(|i| DeliveryWork {
                id: Uuid::now_v7(),
                webhook_id: Uuid::now_v7(),
                event_id: event,
                event_type: "job.finished".into(),
                payload: serde_json::json!({"n": i}),
                attempts: i32::try_from(i % 3).unwrap_or(0),
            })
            .collect()
    }

    #[test]
    fn an_event_with_many_endpoints_travels_in_messages_of_at_most_max_batch() {
        let event = Uuid::now_v7();
        let w = work(event, MAX_BATCH * 2 + 1);
        let body = raw_body(&serde_json::json!({"type": "job.finished"}));
        let batches = DeliveryBatch::for_event(event, "job.finished", &body, &w);
        let sizes: Vec<usize> = batches.iter().map(|b| b.deliveries.len()).collect();
        assert_eq!(sizes, vec![MAX_BATCH, MAX_BATCH, 1]);
        let ids: Vec<Uuid> = batches
            .iter()
            .flat_map(|b| b.deliveries.iter().map(|d| d.delivery_id))
            .collect();
        assert_eq!(ids, w.iter().map(|x| x.id).collect::<Vec<_>>());
        // The message round-trips with the body untouched.
        let m = batches[2].to_message("q");
        let back = DeliveryBatch::parse(&m.body).expect("parse");
        assert_eq!(back.payload.get(), body.get());
        assert_eq!(back.deliveries[0].attempts, w[MAX_BATCH * 2].attempts);
    }

    #[test]
    fn rows_read_back_are_grouped_by_event_with_each_event_s_body() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut rows = work(a, 2);
        rows.extend(work(b, 1));
        rows.extend(work(a, 1));
        let refs: Vec<&DeliveryWork> = rows.iter().collect();
        let batches = DeliveryBatch::from_work(&refs);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].event_id, a);
        assert_eq!(batches[0].deliveries.len(), 3);
        assert_eq!(batches[0].payload.get(), r#"{"n":0}"#);
        assert_eq!(batches[1].event_id, b);
        assert_eq!(batches[1].deliveries.len(), 1);
    }

    #[test]
    fn a_single_delivery_message_of_an_older_version_reads_as_a_batch_of_one() {
        let (d, w, e) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let old = serde_json::json!({
            "delivery_id": d, "webhook_id": w, "event_id": e,
            "event_type": "build.finished", "attempts": 2, "payload": {"x": 1}
        });
        let b = DeliveryBatch::parse(old.to_string().as_bytes()).expect("legacy message");
        assert_eq!(b.event_id, e);
        assert_eq!(b.deliveries.len(), 1);
        assert_eq!(b.deliveries[0].delivery_id, d);
        assert_eq!(b.deliveries[0].webhook_id, w);
        assert_eq!(b.deliveries[0].attempts, 2);
        assert_eq!(b.payload.get(), r#"{"x":1}"#);
        assert!(DeliveryBatch::parse(b"{\"nope\": true}").is_none());
    }
}

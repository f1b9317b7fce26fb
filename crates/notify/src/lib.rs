//! Notification fan-out: signed webhooks and GitHub commit statuses, rate-limited,
//! switchable per type at runtime, and throttled by the health of dispatch.
//!
//! Owns its own RabbitMQ queues (`{prefix}.notify`, `{prefix}.deliver.webhook`,
//! `{prefix}.deliver.github_commit_status`), its own worker pools and its own database
//! pool, capped below dispatch's. Must never import `herald-dispatch`, share its queue,
//! workers or pool, nor hold a transaction open across an HTTP call to a receiver.

pub mod commit_status;
pub mod controls;
pub mod deliver;
pub mod fanout;
pub mod limits;
pub mod scheduler;
pub mod throttle;
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
    pub decrease: f64,
    pub increase: f64,
}

/// A delivery on its way to the webhook pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryMsg {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub attempts: i32,
    /// The exact body to sign and send: kept as text, never parsed into a map and
    /// written out again for each of an event's endpoints.
    pub payload: Box<serde_json::value::RawValue>,
}

/// A JSON value as the text of its body.
pub fn raw_body(v: &serde_json::Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(v)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
}

impl DeliveryMsg {
    /// A message for `w` with the body `payload` (one event's endpoints share it).
    pub fn new(w: &DeliveryWork, payload: Box<serde_json::value::RawValue>) -> Self {
        DeliveryMsg {
            delivery_id: w.id,
            webhook_id: w.webhook_id,
            event_id: w.event_id,
            event_type: w.event_type.clone(),
            attempts: w.attempts,
            payload,
        }
    }

    /// A message for a row read back from PostgreSQL, with its stored body.
    pub fn from_work(w: &DeliveryWork) -> Self {
        DeliveryMsg::new(w, raw_body(&w.payload))
    }

    pub fn to_message(&self, queue: &str) -> OutgoingMessage {
        OutgoingMessage {
            routing_key: queue.to_owned(),
            message_id: format!("{}:{}", self.delivery_id, self.attempts),
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
    /// published to it since.
    pub webhook_backlog: std::sync::Mutex<Option<(u32, std::time::Instant, u32)>>,
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
    let (writer, writer_task) = AttemptWriter::spawn(role.pool.clone(), cancel.child_token());
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
        cache: Arc::default(),
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
    tasks.push(tokio::spawn(scheduler::run(
        role.primary_url.clone(),
        n.clone(),
        due,
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(throttle::run(
        n.clone(),
        role.dispatch_health.clone(),
        cancel.clone(),
    )));

    let consumers: [(String, Vec<&str>, u16, usize, Handler); 3] = [
        (
            names.notify_queue(),
            vec!["#"],
            s.fanout_prefetch,
            s.fanout_concurrency,
            Handler::Fanout,
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
        tasks.push(tokio::spawn(async move {
            let result = herald_bus::run_consumer(bus, spec, c, move |msg| {
                let n = n.clone();
                async move {
                    n.activity
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match handler {
                        Handler::Fanout => fanout::handle(n, msg).await,
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
    // The batch writer stops after the consumers drained.
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        c.cancelled().await;
        let _ = writer_task.await;
        publisher.close().await;
    }));
    Ok(tasks)
}

#[derive(Clone, Copy)]
enum Handler {
    Fanout,
    Webhook,
    Github,
}

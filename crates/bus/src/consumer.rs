use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::{AMQPValue, FieldTable},
    Channel, Connection,
};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{connect_named, declare_queue, declare_topology, BusConfig, BusError, Names};

/// First delay before reconnecting.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Cap of the reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long in-flight handlers may run after cancellation before they are aborted
/// (their messages then return to the queue).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on connecting + declaring + `basic.consume`.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each step of the shutdown handshake (cancel, close).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do with a delivery once its handler is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// `basic.ack`: done with it.
    Ack,
    /// `basic.nack(requeue=true)`: deliver it again (with `redelivered=true`). After 20
    /// deliveries the quorum queue dead-letters it.
    Requeue,
    /// `basic.reject(requeue=false)`: route it to the dead-letter exchange `{p}.dlx`.
    DeadLetter,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Requeue => "requeue",
            Outcome::DeadLetter => "dead_letter",
        }
    }
}

/// A delivery handed to a consumer's handler.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub body: Vec<u8>,
    /// True when the broker delivered this message before (requeued or unacked on a lost
    /// connection): the handler may have run already.
    pub redelivered: bool,
    /// AMQP headers with scalar values, as strings (e.g. `x-delivery-count` on quorum queues).
    pub headers: Vec<(String, String)>,
}

impl Incoming {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What [`run_consumer`] consumes and how.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    /// Queue to declare (quorum, DLX `{p}.dlx`, delivery limit 20) and consume.
    pub queue: String,
    /// Routing-key patterns binding the queue to `{p}.events`.
    pub bindings: Vec<String>,
    /// `basic.qos` prefetch count (0 = unlimited, not recommended).
    pub prefetch: u16,
    /// Maximum number of handlers running at once (at least 1).
    pub concurrency: usize,
    /// Consumer tag (unique per channel); empty means a generated one.
    pub consumer_tag: String,
}

impl ConsumerSpec {
    /// A spec with prefetch 32, concurrency 8 and a unique consumer tag.
    pub fn new(queue: impl Into<String>, bindings: &[&str]) -> Self {
        let queue = queue.into();
        Self {
            consumer_tag: format!("herald-{}-{}", queue, uuid::Uuid::new_v4().simple()),
            queue,
            bindings: bindings.iter().map(|b| b.to_string()).collect(),
            prefetch: 32,
            concurrency: 8,
        }
    }
}

enum SessionEnd {
    /// The cancellation token fired and the session shut down gracefully.
    Cancelled,
    /// The session was lost; `consumed` tells whether it got as far as consuming.
    Lost { consumed: bool, error: BusError },
}

/// Consumes `spec.queue` until `cancel` fires.
///
/// (Re)connects with capped exponential backoff (100 ms .. 5 s) forever while the broker is
/// down or after it closes the connection; re-declares the topology and the queue on every
/// (re)connect; sets `basic.qos(prefetch)`; consumes with manual acks; runs `handler` for up to
/// `concurrency` deliveries at once and acks / nacks / rejects per its [`Outcome`]. A panicking
/// handler counts as [`Outcome::Requeue`].
///
/// On cancel: `basic.cancel`, lets in-flight handlers finish (at most [`DRAIN_TIMEOUT`]) and
/// settles their deliveries, closes the channel and connection, returns `Ok(())`.
/// Prefetched deliveries no handler started return to the queue.
///
/// Returns `Err` only for an invalid spec (e.g. an empty queue name).
pub async fn run_consumer<F, Fut>(
    cfg: BusConfig,
    spec: ConsumerSpec,
    cancel: CancellationToken,
    handler: F,
) -> Result<(), BusError>
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    if spec.queue.is_empty() {
        return Err(BusError::Invalid("consumer queue name is empty".into()));
    }
    let mut spec = spec;
    if spec.consumer_tag.is_empty() {
        spec.consumer_tag = format!("herald-{}-{}", spec.queue, uuid::Uuid::new_v4().simple());
    }
    let names = cfg.names();
    let handler = Arc::new(handler);
    // Shared across sessions so that handlers still running from a lost session count
    // against the concurrency limit of the next one.
    let permits = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = MIN_BACKOFF;

    loop {
        if cancel.is_cancelled() {
            break;
        }
        let end = session(&cfg, &names, &spec, &cancel, &handler, &permits, &mut tasks).await;
        match end {
            SessionEnd::Cancelled => return Ok(()),
            SessionEnd::Lost { consumed, error } => {
                if consumed {
                    backoff = MIN_BACKOFF;
                }
                if cancel.is_cancelled() {
                    break;
                }
                warn!(
                    queue = %spec.queue,
                    error = %error,
                    retry_in_ms = backoff.as_millis() as u64,
                    "bus consumer disconnected; reconnecting"
                );
            }
        }
        metrics::counter!("herald_bus_reconnects_total", "role" => "consumer").increment(1);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    // Cancelled while disconnected: handlers of the lost session cannot settle their
    // deliveries any more (the broker redelivers them), but let them finish their work.
    drain(&mut tasks, &spec.queue).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn session<F, Fut>(
    cfg: &BusConfig,
    names: &Names,
    spec: &ConsumerSpec,
    cancel: &CancellationToken,
    handler: &Arc<F>,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
) -> SessionEnd
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let setup = tokio::select! {
        _ = cancel.cancelled() => return SessionEnd::Cancelled,
        res = tokio::time::timeout(SETUP_TIMEOUT, setup(cfg, names, spec)) => res,
    };
    let (connection, channel, mut consumer) = match setup {
        Ok(Ok(parts)) => parts,
        Ok(Err(error)) => {
            return SessionEnd::Lost {
                consumed: false,
                error,
            }
        }
        Err(_) => {
            return SessionEnd::Lost {
                consumed: false,
                error: BusError::Timeout("setting up the consumer"),
            }
        }
    };
    info!(queue = %spec.queue, tag = %spec.consumer_tag, "bus consumer started");

    let error = loop {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break None,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => break None,
            },
        };
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => break None,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => break Some(BusError::from(e)),
            None => {
                break Some(BusError::Amqp(lapin::Error::InvalidChannelState(
                    channel.status().state(),
                )))
            }
        };
        let handler = handler.clone();
        let queue = spec.queue.clone();
        tasks.spawn(async move {
            let _permit = permit;
            handle(delivery, handler, &queue).await;
        });
        while let Some(res) = tasks.try_join_next() {
            log_join(res, &spec.queue);
        }
    };

    match error {
        Some(error) => {
            // Lost: in-flight handlers keep running (their acks will fail and the broker
            // redelivers); do not wait for them before reconnecting.
            drop(consumer);
            close_quietly(&channel, &connection).await;
            SessionEnd::Lost {
                consumed: true,
                error,
            }
        }
        None => {
            debug!(queue = %spec.queue, "bus consumer stopping");
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.basic_cancel(&spec.consumer_tag, BasicCancelOptions::default()),
            )
            .await;
            drain(tasks, &spec.queue).await;
            drop(consumer);
            close_quietly(&channel, &connection).await;
            info!(queue = %spec.queue, "bus consumer stopped");
            SessionEnd::Cancelled
        }
    }
}

async fn setup(
    cfg: &BusConfig,
    names: &Names,
    spec: &ConsumerSpec,
) -> Result<(Connection, Channel, lapin::Consumer), BusError> {
    let connection = connect_named(cfg, &format!("herald consumer {}", spec.queue)).await?;
    let parts = async {
        let channel = connection.create_channel().await?;
        declare_topology(&channel, names).await?;
        let bindings: Vec<&str> = spec.bindings.iter().map(String::as_str).collect();
        declare_queue(&channel, names, &spec.queue, &bindings).await?;
        channel
            .basic_qos(spec.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                &spec.queue,
                &spec.consumer_tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, BusError>((channel, consumer))
    }
    .await;
    match parts {
        Ok((channel, consumer)) => Ok((connection, channel, consumer)),
        Err(e) => {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "setup failed")).await;
            Err(e)
        }
    }
}

async fn handle<F, Fut>(delivery: Delivery, handler: Arc<F>, queue: &str)
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let incoming = to_incoming(&delivery);
    let message_id = incoming.message_id.clone();
    let outcome = match AssertUnwindSafe(async move { handler(incoming).await })
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            error!(queue, ?message_id, panic = %what, "bus handler panicked; requeueing");
            Outcome::Requeue
        }
    };
    let res = match outcome {
        Outcome::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Outcome::Requeue => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
        Outcome::DeadLetter => {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
        }
    };
    match res {
        Ok(()) => {
            metrics::counter!(
                "herald_bus_consumed_total",
                "queue" => queue.to_string(),
                "outcome" => outcome.as_str()
            )
            .increment(1);
        }
        Err(e) => {
            warn!(queue, ?message_id, outcome = outcome.as_str(), error = %e,
                "bus could not settle a delivery; the broker will redeliver it");
        }
    }
}

fn to_incoming(delivery: &Delivery) -> Incoming {
    let props = &delivery.properties;
    let headers = props
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| header_value(v).map(|v| (k.as_str().to_string(), v)))
                .collect()
        })
        .unwrap_or_default();
    Incoming {
        routing_key: delivery.routing_key.as_str().to_string(),
        message_id: props.message_id().as_ref().map(|m| m.as_str().to_string()),
        body: delivery.data.clone(),
        redelivered: delivery.redelivered,
        headers,
    }
}

fn header_value(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

async fn drain(tasks: &mut JoinSet<()>, queue: &str) {
    if tasks.is_empty() {
        return;
    }
    debug!(
        queue,
        in_flight = tasks.len(),
        "bus consumer draining handlers"
    );
    let finished = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(res) = tasks.join_next().await {
            log_join(res, queue);
        }
    })
    .await;
    if finished.is_err() {
        warn!(
            queue,
            in_flight = tasks.len(),
            "bus handlers still running after the drain timeout; aborting them (their messages return to the queue)"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

fn log_join(res: Result<(), tokio::task::JoinError>, queue: &str) {
    if let Err(e) = res {
        if e.is_panic() {
            error!(queue, "bus delivery task panicked");
        }
    }
}

async fn close_quietly(channel: &Channel, connection: &Connection) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "bye")).await;
    }
    if connection.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "bye")).await;
    }
}

use lapin::{
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    Channel, ExchangeKind,
};

use crate::BusError;

/// Redeliveries after which a quorum queue dead-letters a message.
pub const DELIVERY_LIMIT: i32 = 20;

/// Routing keys the dispatch queue listens to by default.
pub const DISPATCH_BINDINGS: &[&str] = &["job.finished"];

/// The events a commit status follows, bound on `{p}.status`: builds', and the three
/// of a job that per-job statuses show. Not `job.*`: `job.assigned` and
/// `job.canceling` change no status, and every message routed here is a write to a
/// quorum queue and a delivery and an ack for nothing.
pub const COMMIT_STATUS_BINDINGS: &[&str] =
    &["build.*", "job.scheduled", "job.started", "job.finished"];

/// Exchange and queue names derived from the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{p}.events`: topic exchange every domain event is published to.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// `{p}.status`: topic exchange the relay publishes a second copy of an event to
    /// when its build's pipeline has a GitHub integration; only the commit-status
    /// queue is bound to it.
    pub fn status_exchange(&self) -> String {
        format!("{}.status", self.prefix)
    }

    /// `{p}.dlx`: topic exchange dead-lettered messages go to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// `{p}.dead`: queue bound to the dead-letter exchange with `#`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// `{p}.dispatch`
    pub fn dispatch_queue(&self) -> String {
        format!("{}.dispatch", self.prefix)
    }

    /// `{p}.notify`
    pub fn notify_queue(&self) -> String {
        format!("{}.notify", self.prefix)
    }

    /// `{p}.notify.commit_status`: the same events as `{p}.notify`, for the commit-status
    /// fan-out alone, so that a webhook backlog never holds a commit status back.
    pub fn commit_status_queue(&self) -> String {
        format!("{}.notify.commit_status", self.prefix)
    }

    /// `{p}.deliver.{kind}`
    pub fn delivery_queue(&self, kind: &str) -> String {
        format!("{}.deliver.{}", self.prefix, kind)
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn quorum_args(dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    if let Some(dlx) = dead_letter_exchange {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(dlx)),
        );
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        );
    }
    args
}

/// Idempotently declares the shared topology:
///
/// * topic exchanges `{p}.events` and `{p}.dlx` (durable);
/// * quorum queue `{p}.dead` bound to `{p}.dlx` with `#`;
/// * quorum queue `{p}.dispatch` (DLX `{p}.dlx`, delivery limit 20) bound to `{p}.events` with
///   [`DISPATCH_BINDINGS`];
/// * quorum queue `{p}.notify` (DLX `{p}.dlx`, delivery limit 20) bound to `{p}.events` with `#`;
/// * topic exchange `{p}.status`, and quorum queue `{p}.notify.commit_status` (likewise)
///   bound to it with [`COMMIT_STATUS_BINDINGS`]: the relay sends it only the events of
///   builds whose pipeline has a GitHub integration, so an installation without one
///   pays nothing for commit statuses;
/// * quorum queues `{p}.deliver.webhook` and `{p}.deliver.github_commit_status`, unbound.
///
/// A declaration that conflicts with an existing entity closes the channel (406).
pub async fn declare_topology(channel: &Channel, names: &Names) -> Result<(), BusError> {
    let events = names.events_exchange();
    let dlx = names.dead_letter_exchange();
    let dead = names.dead_letter_queue();
    let status = names.status_exchange();
    for exchange in [&events, &dlx, &status] {
        channel
            .exchange_declare(
                exchange,
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .queue_declare(&dead, durable_queue(), quorum_args(None))
        .await?;
    channel
        .queue_bind(
            &dead,
            &dlx,
            "#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    declare_queue(channel, names, &names.dispatch_queue(), DISPATCH_BINDINGS).await?;
    declare_queue(channel, names, &names.notify_queue(), &["#"]).await?;
    declare_queue_on(
        channel,
        names,
        &names.commit_status_queue(),
        &status,
        COMMIT_STATUS_BINDINGS,
    )
    .await?;
    // The notification pools' own queues take messages by name through the default
    // exchange: they must exist before anything is published to them.
    for kind in DELIVERY_KINDS {
        declare_queue(channel, names, &names.delivery_queue(kind), &[]).await?;
    }
    Ok(())
}

/// The per-type delivery queues `{p}.deliver.{kind}`.
pub const DELIVERY_KINDS: &[&str] = &["webhook", "github_commit_status"];

/// Idempotently declares a durable quorum queue with dead-letter exchange `{p}.dlx` and delivery
/// limit 20, and binds it to `{p}.events` with each of `bindings` (topic patterns). The events
/// exchange must exist (see [`declare_topology`]). Bindings are only ever added, never removed.
pub async fn declare_queue(
    channel: &Channel,
    names: &Names,
    queue: &str,
    bindings: &[&str],
) -> Result<(), BusError> {
    declare_queue_on(channel, names, queue, &names.events_exchange(), bindings).await
}

/// [`declare_queue`], bound to `exchange` instead of `{p}.events`.
pub async fn declare_queue_on(
    channel: &Channel,
    names: &Names,
    queue: &str,
    events: &str,
    bindings: &[&str],
) -> Result<(), BusError> {
    if queue.is_empty() {
        return Err(BusError::Invalid("empty queue name".into()));
    }
    let dlx = names.dead_letter_exchange();
    channel
        .queue_declare(queue, durable_queue(), quorum_args(Some(&dlx)))
        .await?;
    for key in bindings {
        channel
            .queue_bind(
                queue,
                events,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Queue depth for operators: passive declare, returns `(message_count, consumer_count)`.
///
/// A missing queue yields [`BusError::QueueNotFound`]; note that the broker then closes
/// `channel`, so use a dedicated channel (or [`crate::Publisher::queue_depth`]).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<(u32, u32), BusError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue, options, FieldTable::default())
        .await
    {
        Ok(q) => Ok((q.message_count(), q.consumer_count())),
        Err(e) => {
            let err = BusError::from(e);
            if err.is_not_found() {
                Err(BusError::QueueNotFound(queue.to_string()))
            } else {
                Err(err)
            }
        }
    }
}

/// Deletes the queues of [`declare_topology`], the `extra_queues`, and both exchanges.
/// Meant for tests and uninstalls; a missing entity is not an error.
pub async fn delete_topology(
    channel: &Channel,
    names: &Names,
    extra_queues: &[&str],
) -> Result<(), BusError> {
    let mut queues = vec![
        names.dispatch_queue(),
        names.notify_queue(),
        names.commit_status_queue(),
        names.dead_letter_queue(),
    ];
    queues.extend(DELIVERY_KINDS.iter().map(|k| names.delivery_queue(k)));
    queues.extend(extra_queues.iter().map(|q| q.to_string()));
    for q in &queues {
        channel
            .queue_delete(q, QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [
        names.events_exchange(),
        names.dead_letter_exchange(),
        names.status_exchange(),
    ] {
        channel
            .exchange_delete(&exchange, ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

//! `herald-bus`: owns the RabbitMQ topology, the confirmed publisher and resilient consumers;
//! knows nothing of PostgreSQL or HTTP.
//!
//! * [`Names`] derives every exchange and queue name from one prefix, so that several
//!   installations can share a broker.
//! * [`declare_topology`] / [`declare_queue`] idempotently declare the exchanges and the
//!   quorum queues (with a dead-letter exchange and a delivery limit).
//! * [`Publisher`] publishes persistent messages with publisher confirms and reconnects
//!   lazily after a failure.
//! * [`run_consumer`] consumes a queue with manual acknowledgements, bounded concurrency and a
//!   reconnect loop with capped exponential backoff, until its cancellation token fires.
//!
//! Metrics (through the `metrics` facade): `herald_bus_published_total`,
//! `herald_bus_consumed_total{queue,outcome}`, `herald_bus_reconnects_total{role=publisher|consumer}` (one per reconnect attempt).

mod consumer;
mod error;
mod publisher;
mod topology;

use std::time::Duration;

use lapin::{types::LongString, Connection, ConnectionProperties};

pub use consumer::{
    run_consumer, ConsumerSpec, Incoming, Outcome, DRAIN_TIMEOUT, MAX_BACKOFF, MIN_BACKOFF,
};
pub use error::BusError;
pub use publisher::{OutgoingMessage, Publisher, PUBLISH_TIMEOUT};
pub use topology::{
    declare_queue, declare_topology, delete_topology, queue_depth, Names, COMMIT_STATUS_BINDINGS,
    DELIVERY_LIMIT, DISPATCH_BINDINGS,
};

/// Re-export of the AMQP client, so that callers need not depend on it directly.
pub use lapin;

/// How long establishing a connection (TCP + AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the broker is and which prefix every name carries.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// AMQP URI, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Prefix of every exchange and queue name (`herald` by default in the application).
    pub prefix: String,
}

impl BusConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
        }
    }

    /// The names derived from this configuration's prefix.
    pub fn names(&self) -> Names {
        Names::new(&self.prefix)
    }
}

/// Opens a connection named `herald` on the tokio executor/reactor.
pub async fn connect(cfg: &BusConfig) -> Result<Connection, BusError> {
    connect_named(cfg, "herald").await
}

/// Opens a connection with the given `connection_name` (shown in the management UI) on the
/// tokio executor/reactor. Fails with [`BusError::Timeout`] after [`CONNECT_TIMEOUT`].
pub async fn connect_named(cfg: &BusConfig, connection_name: &str) -> Result<Connection, BusError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| BusError::NoRuntime)?;
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name.to_string()))
        .with_executor(tokio_executor_trait::Tokio::default().with_handle(handle))
        .with_reactor(tokio_reactor_trait::Tokio);
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&cfg.url, props)).await {
        Ok(res) => Ok(res?),
        Err(_) => Err(BusError::Timeout("connecting to the broker")),
    }
}

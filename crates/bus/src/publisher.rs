use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex as StdMutex,
    },
    time::Duration,
};

use futures::future::join_all;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    publisher_confirm::Confirmation,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Connection,
};
use tracing::{debug, info, warn};

use crate::{connect_named, declare_topology, queue_depth, BusConfig, BusError, Names};

/// Default bound on one `publish_batch` call (publishing + every confirm).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A message to publish.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    pub routing_key: String,
    /// Set as the AMQP `message_id` property; consumers use it for deduplication.
    pub message_id: String,
    pub body: Vec<u8>,
    /// Sent as AMQP headers (long strings).
    pub headers: Vec<(String, String)>,
}

struct Session {
    generation: u64,
    connection: Connection,
    channel: Channel,
}

impl Session {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

#[derive(Default)]
struct State {
    current: Option<Arc<Session>>,
    generation: u64,
    ever_connected: bool,
}

/// Publishes to `{p}.events` (or any exchange) with publisher confirms: persistent
/// (delivery mode 2), `content_type: application/json`, `message_id` set.
///
/// Keeps one connection and one confirm channel; after a failure it drops them and
/// reconnects lazily on the next call. Cheap to share behind an `Arc`; concurrent calls
/// share the channel.
pub struct Publisher {
    cfg: BusConfig,
    names: Names,
    timeout: Duration,
    state: StdMutex<State>,
    connect_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.cfg.prefix)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Publisher {
    /// Connects, opens a confirm channel and declares the topology.
    pub async fn new(cfg: BusConfig) -> Result<Self, BusError> {
        let publisher = Self::lazy(cfg);
        publisher.session().await?;
        Ok(publisher)
    }

    /// A publisher that connects on its first use (useful when the broker may be down at
    /// start-up).
    pub fn lazy(cfg: BusConfig) -> Self {
        Self {
            names: cfg.names(),
            cfg,
            timeout: PUBLISH_TIMEOUT,
            state: StdMutex::new(State::default()),
            connect_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Changes the bound on one `publish_batch` call (default [`PUBLISH_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn config(&self) -> &BusConfig {
        &self.cfg
    }

    /// True while the current connection and channel are open (for readiness probes).
    pub fn is_connected(&self) -> bool {
        self.lock_state()
            .current
            .as_ref()
            .is_some_and(|s| s.usable())
    }

    /// Connects now if not connected (readiness probes may call this).
    pub async fn ensure_connected(&self) -> Result<(), BusError> {
        self.session().await.map(|_| ())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding it; the state
        // (an Option<Arc<_>> and counters) is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current_usable(&self) -> Option<Arc<Session>> {
        self.lock_state()
            .current
            .as_ref()
            .filter(|s| s.usable())
            .cloned()
    }

    async fn session(&self) -> Result<Arc<Session>, BusError> {
        if let Some(s) = self.current_usable() {
            return Ok(s);
        }
        let _guard = self.connect_lock.lock().await;
        if let Some(s) = self.current_usable() {
            return Ok(s);
        }
        let stale = self.lock_state().current.take();
        if let Some(stale) = stale {
            close_session_in_background(stale);
        }
        let connection =
            connect_named(&self.cfg, &format!("herald publisher {}", self.cfg.prefix)).await?;
        let setup = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare_topology(&channel, &self.names).await?;
            Ok::<_, BusError>(channel)
        };
        let channel = match tokio::time::timeout(self.timeout, setup).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let _ = connection.close(200, "setup failed").await;
                return Err(e);
            }
            Err(_) => {
                close_connection_in_background(connection);
                return Err(BusError::Timeout("setting up the publisher channel"));
            }
        };
        let mut state = self.lock_state();
        state.generation += 1;
        if state.ever_connected {
            metrics::counter!("herald_bus_reconnects_total", "role" => "publisher").increment(1);
            info!(prefix = %self.cfg.prefix, "bus publisher reconnected");
        } else {
            debug!(prefix = %self.cfg.prefix, "bus publisher connected");
        }
        state.ever_connected = true;
        let session = Arc::new(Session {
            generation: state.generation,
            connection,
            channel,
        });
        state.current = Some(session.clone());
        Ok(session)
    }

    /// Forgets the session of `generation` (if still current) so the next call reconnects.
    fn invalidate(&self, generation: u64) {
        let stale = {
            let mut state = self.lock_state();
            match &state.current {
                Some(s) if s.generation == generation => state.current.take(),
                _ => None,
            }
        };
        if let Some(stale) = stale {
            close_session_in_background(stale);
        }
    }

    /// Publishes every message to `exchange`, then awaits every confirm. `Ok` only if the
    /// broker acked all of them. Bounded by the publisher timeout ([`PUBLISH_TIMEOUT`]).
    ///
    /// On `Err` some messages may nevertheless have been routed: callers must retry the
    /// whole batch and consumers must deduplicate by `message_id`.
    pub async fn publish_batch(
        &self,
        exchange: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<(), BusError> {
        if msgs.is_empty() {
            return Ok(());
        }
        // Generation of the session used, so that a timeout invalidates that one only.
        let used = AtomicU64::new(0);
        let work = async {
            let session = self.session().await?;
            used.store(session.generation, Ordering::Relaxed);
            let res = publish_on(&session.channel, exchange, msgs).await;
            if let Err(e) = &res {
                if !matches!(e, BusError::Nacked { .. }) {
                    warn!(error = %e, exchange, "bus publish failed; will reconnect");
                    self.invalidate(session.generation);
                }
            }
            res
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(())) => {
                metrics::counter!("herald_bus_published_total").increment(msgs.len() as u64);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                warn!(
                    exchange,
                    count = msgs.len(),
                    "bus publish timed out; will reconnect"
                );
                // Confirms of this channel can no longer be trusted: start afresh.
                let generation = used.load(Ordering::Relaxed);
                if generation != 0 {
                    self.invalidate(generation);
                }
                Err(BusError::Timeout("awaiting publisher confirms"))
            }
        }
    }

    /// [`Publisher::publish_batch`] to the events exchange `{p}.events`.
    pub async fn publish_events(&self, msgs: &[OutgoingMessage]) -> Result<(), BusError> {
        let exchange = self.names.events_exchange();
        self.publish_batch(&exchange, msgs).await
    }

    /// Publishes copies of events that commit statuses follow to `{prefix}.status`,
    /// with confirms, like [`Publisher::publish_events`].
    pub async fn publish_status_events(&self, msgs: &[OutgoingMessage]) -> Result<(), BusError> {
        let exchange = self.names.status_exchange();
        self.publish_batch(&exchange, msgs).await
    }

    /// `(message_count, consumer_count)` of `queue`, on a short-lived channel of the
    /// publisher's connection (a missing queue closes only that channel).
    pub async fn queue_depth(&self, queue: &str) -> Result<(u32, u32), BusError> {
        let work = async {
            let session = self.session().await?;
            let channel = session.connection.create_channel().await?;
            let res = queue_depth(&channel, queue).await;
            if channel.status().connected() {
                let _ = channel.close(200, "done").await;
            }
            res
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| BusError::Timeout("reading the queue depth"))?
    }

    /// Opens a fresh channel on the publisher's connection (for ad-hoc operations such as
    /// `basic_get` on the dead-letter queue). The caller should close it.
    pub async fn open_channel(&self) -> Result<Channel, BusError> {
        let session = self.session().await?;
        Ok(session.connection.create_channel().await?)
    }

    /// Closes the connection; a later call reconnects.
    pub async fn close(&self) {
        let current = self.lock_state().current.take();
        if let Some(s) = current {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = s.channel.close(200, "bye").await;
                let _ = s.connection.close(200, "bye").await;
            })
            .await;
        }
    }
}

async fn publish_on(
    channel: &Channel,
    exchange: &str,
    msgs: &[OutgoingMessage],
) -> Result<(), BusError> {
    let mut confirms = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let confirm = channel
            .basic_publish(
                exchange,
                &msg.routing_key,
                BasicPublishOptions::default(),
                &msg.body,
                properties(msg),
            )
            .await?;
        confirms.push(confirm);
    }
    let mut nacked = 0;
    let mut first_err = None;
    for res in join_all(confirms).await {
        match res {
            Ok(Confirmation::Ack(_)) => {}
            // Only possible on a channel without confirms; ours always has them.
            Ok(Confirmation::NotRequested) => {}
            Ok(Confirmation::Nack(_)) => nacked += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }
    if nacked > 0 {
        return Err(BusError::Nacked {
            nacked,
            total: msgs.len(),
        });
    }
    Ok(())
}

fn properties(msg: &OutgoingMessage) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(msg.message_id.as_str()));
    if !msg.headers.is_empty() {
        let mut table = FieldTable::default();
        for (k, v) in &msg.headers {
            table.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        props = props.with_headers(table);
    }
    props
}

fn close_session_in_background(session: Arc<Session>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                if session.connection.status().connected() {
                    let _ = session.connection.close(200, "reconnecting").await;
                }
            })
            .await;
        });
    }
}

fn close_connection_in_background(connection: Connection) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), connection.close(200, "bye")).await;
        });
    }
}

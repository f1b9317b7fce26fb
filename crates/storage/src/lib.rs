//! Herald's PostgreSQL storage: migrations, pools (primary, replica and one pool per
//! role), and plain `async fn`s over a `&mut PgConnection` for every state change.
//!
//! Owns the schema and the transactional outbox: a state change and its event always
//! commit together here. Must not touch RabbitMQ or HTTP, and must never hold a
//! transaction open across a network call to anything but PostgreSQL.
//!
//! Lock order, everywhere: pipeline → build → jobs (by id) → agents. Code that cannot
//! keep that order (the dispatcher, the sweeps) uses `SKIP LOCKED` so it never waits.

pub mod agents;
pub mod builds;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod jobs;
pub mod lifecycle;
pub mod maintenance;
pub mod notify;
pub mod ops_stats;
pub mod orgs;
pub mod outbox;
pub mod pool;
pub mod propagate;
pub mod tokens;
pub mod views;
pub mod wake;

pub use error::StorageError;
pub use pool::{connect_pool, live_connection, PoolSettings, ReadRouter};
pub use wake::{Heard, LocalWakes, Waker};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// NOTIFY channels. Payloads are small; the rows hold the truth.
pub mod channels {
    /// Something became runnable, or an agent joined: the dispatcher should look.
    pub const DISPATCH: &str = "herald_dispatch";
    /// An agent finished its job. Worth a round only while runnable jobs wait for an
    /// agent, which the dispatcher knows from its last round; at 100 finishes a
    /// second, most would otherwise be rounds that find nothing to do.
    pub const AGENT_FREE: &str = "herald_agent_free";
    /// Payload `"{agent_id} {job_id}"`: a job was assigned to an agent.
    pub const ASSIGNED: &str = "herald_assigned";
    /// Payload `"{agent_id}"`: the agent was lost or disconnected; drop cached auth.
    pub const AGENT_GONE: &str = "herald_agent_gone";
    /// A transaction committed outbox rows: the relay should publish.
    pub const OUTBOX: &str = "herald_outbox";
    /// A job of some agent must stop (canceling, or ended by Herald): the API
    /// processes re-read their heartbeat cancel lists.
    pub const CANCEL: &str = "herald_cancel";
    /// Payload `"{microseconds}"`: the dispatchers' recent assignment latency, sent a few
    /// times a second while they assign and never when idle. The notification
    /// throttle of every process reads it.
    pub const HEALTH: &str = "herald_dispatch_health";
}

/// Apply migrations. Idempotent; safe to run from several processes at once
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), StorageError> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StorageError::Migration(e.to_string()))
}

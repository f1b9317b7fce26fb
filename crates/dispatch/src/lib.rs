//! The high-priority half of Herald: assigning jobs to agents, propagating finished
//! jobs to their dependents, and the maintenance sweeps that keep both honest.
//!
//! Owns its own database pool and its own RabbitMQ queue (`{prefix}.dispatch`). Must
//! never import the notification crate, share its queue, its workers or its pool, nor
//! run slow work inline: everything here is a short transaction on PostgreSQL.

pub mod dispatcher;
pub mod gauges;
pub mod maintenance;
pub mod propagation;
pub mod stats;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct DispatchSettings {
    /// An assignment not accepted within this many seconds goes back to `scheduled`.
    pub accept_timeout_s: f64,
    /// The dispatcher wakes on NOTIFY; this poll is only a backstop.
    pub backstop_poll_s: f64,
    /// Free agents considered per assignment round.
    pub batch_agents: i64,
    pub propagation_prefetch: u16,
    pub propagation_concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MaintenanceSettings {
    pub interval_s: f64,
    pub outbox_retention_s: f64,
    pub expire_batch: i64,
    /// Vacuum a hot table (jobs, agents, outbox, builds) once it has this many dead
    /// rows; 0 leaves it all to autovacuum.
    pub vacuum_min_dead_rows: i64,
}

/// `[jobs]`: the life cycle of a job once an agent holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct JobsSettings {
    /// `timeout_s` of a job that names none.
    pub default_timeout_s: i32,
    /// A `canceling` job still unfinished this long after the cancel becomes `canceled`.
    pub cancel_grace_s: f64,
}

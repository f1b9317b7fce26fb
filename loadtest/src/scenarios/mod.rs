//! One module per scenario of `--scenario`; each exposes `run`, which returns the
//! summary text.

pub mod ceilings;
pub mod chaos;
pub mod dispatch;
pub mod incident;
pub mod incident_fakes;
pub mod storm;
pub mod webhooks;

//! The `herald` binary's library: configuration, role wiring and the demo. It is the
//! top of the stack, the one place that knows every crate, so it opens every pool
//! and hands each role its own.

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod ops;
pub mod telemetry;

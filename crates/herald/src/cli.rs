//! The command line: `herald migrate | serve | demo | ops ...`. In the library so that
//! tests can check what the runbooks tell operators to type against it
//! (`clap::CommandFactory`).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Job dispatch and notification fan-out for CI"
)]
pub struct Cli {
    /// Config file layered over config/default.toml (also HERALD_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply database migrations to the primary (idempotent).
    Migrate,
    /// Run the listed roles in this process (all roles without the flag).
    Serve {
        /// Comma-separated: api,relay,dispatch,notify,maintenance
        #[arg(long)]
        roles: Option<String>,
    },
    /// Migrate, start every role, and drive it with in-process agents and builds.
    Demo(crate::demo::DemoArgs),
    /// Operator commands, through the HTTP API.
    Ops {
        #[command(subcommand)]
        command: crate::ops::OpsCommand,
    },
}

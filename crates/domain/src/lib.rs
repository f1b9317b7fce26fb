//! Herald's domain: states, transitions, events and validated input types.
//!
//! Owns the rules (which transitions are legal, how a build's state follows from its
//! jobs, which jobs a finished job unblocks). Must not touch I/O: no database, no
//! broker, no HTTP. Everything here is pure and unit-tested.

pub mod build;
pub mod events;
pub mod graph;
pub mod input;
pub mod retry;
pub mod states;

pub use build::{derive_build_state, plan_propagation, PropagationJob};
pub use events::{pattern_matches, valid_pattern, EventType};
pub use graph::{validate_jobs, GraphError, JobSpec, RawJob, MAX_JOBS_PER_BUILD};
pub use input::{
    line, note, parse_repository, text, Branch, CommitSha, InputError, JobKey, QueueName, Slug,
};
pub use states::{AgentAction, AgentState, BuildState, JobAction, JobState, TransitionError};

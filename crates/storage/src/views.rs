//! Rows as the API and events show them. One shape for both, so a webhook receiver
//! and an API client see the same build.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize)]
pub struct BuildView {
    pub id: Uuid,
    pub number: i32,
    pub state: String,
    pub commit: String,
    pub branch: String,
    pub message: Option<String>,
    pub pipeline: String,
    pub repository: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub canceled: bool,
    /// How many times the build has finished (a retry reopens a finished build).
    pub attempt: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<JobView>>,
    #[serde(skip)]
    pub org_id: Uuid,
}

/// Columns for [`BuildView`]; the query must join `pipelines p` to `builds b`.
pub const BUILD_COLUMNS: &str =
    "b.id, b.org_id, b.number, b.state, b.commit_sha, b.branch, b.message, \
     p.slug AS pipeline, p.repository, b.created_at, b.started_at, b.finished_at, \
     b.cancel_requested_at IS NOT NULL AS canceled, b.finish_count AS attempt";

/// [`BUILD_COLUMNS`] named `b_…`, for a row that also carries a job's columns.
pub const BUILD_COLUMNS_AS_B: &str =
    "b.id AS b_id, b.org_id AS b_org_id, b.number AS b_number, b.state AS b_state, \
     b.commit_sha AS b_commit_sha, b.branch AS b_branch, b.message AS b_message, \
     p.slug AS b_pipeline, p.repository AS b_repository, b.created_at AS b_created_at, \
     b.started_at AS b_started_at, b.finished_at AS b_finished_at, \
     b.cancel_requested_at IS NOT NULL AS b_canceled, b.finish_count AS b_attempt";

impl BuildView {
    /// Reads the columns of [`BUILD_COLUMNS`] (prefix `""`) or [`BUILD_COLUMNS_AS_B`]
    /// (prefix `"b_"`).
    pub fn from_row_prefixed(r: &PgRow, prefix: &str) -> Result<Self, sqlx::Error> {
        let c = |name: &str| -> String { format!("{prefix}{name}") };
        Ok(BuildView {
            id: r.try_get(c("id").as_str())?,
            org_id: r.try_get(c("org_id").as_str())?,
            number: r.try_get(c("number").as_str())?,
            state: r.try_get(c("state").as_str())?,
            commit: r.try_get(c("commit_sha").as_str())?,
            branch: r.try_get(c("branch").as_str())?,
            message: r.try_get(c("message").as_str())?,
            pipeline: r.try_get(c("pipeline").as_str())?,
            repository: r.try_get(c("repository").as_str())?,
            created_at: r.try_get(c("created_at").as_str())?,
            started_at: r.try_get(c("started_at").as_str())?,
            finished_at: r.try_get(c("finished_at").as_str())?,
            canceled: r.try_get(c("canceled").as_str())?,
            attempt: r.try_get(c("attempt").as_str())?,
            jobs: None,
        })
    }
}

impl FromRow<'_, PgRow> for BuildView {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        BuildView::from_row_prefixed(r, "")
    }
}

/// Also read back (`Deserialize`): the dispatcher hands the job it just assigned to a
/// parked ping in its own process, so the ping need not read it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub id: Uuid,
    pub build_id: Uuid,
    pub key: String,
    pub label: Option<String>,
    pub command: String,
    pub queue: String,
    pub priority: i32,
    pub state: String,
    pub depends_on: serde_json::Value,
    pub agent_id: Option<Uuid>,
    pub exit_status: Option<i32>,
    pub env: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// 1 for the first run; a retry counts up.
    #[serde(default = "first_attempt")]
    pub attempt: i32,
    #[serde(default)]
    pub retry_of: Option<Uuid>,
    #[serde(default)]
    pub retried_by: Option<Uuid>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub timeout_s: i32,
    #[serde(skip)]
    pub org_id: Uuid,
    /// Herald ended the job (timeout, cancel grace, lost agent), not its agent.
    #[serde(skip)]
    pub herald_ended: bool,
}

fn first_attempt() -> i32 {
    1
}

pub const JOB_COLUMNS: &str =
    "j.id, j.build_id, j.org_id, j.key, j.label, j.command, j.queue, j.priority, \
     j.state, j.depends_on, j.agent_id, j.exit_status, j.env, j.created_at, j.scheduled_at, \
     j.assigned_at, j.accepted_at, j.started_at, j.finished_at, j.attempt, j.retry_of, \
     j.retried_by, j.timed_out, j.timeout_s, j.herald_ended";

impl FromRow<'_, PgRow> for JobView {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(JobView {
            id: r.try_get("id")?,
            build_id: r.try_get("build_id")?,
            org_id: r.try_get("org_id")?,
            key: r.try_get("key")?,
            label: r.try_get("label")?,
            command: r.try_get("command")?,
            queue: r.try_get("queue")?,
            priority: r.try_get("priority")?,
            state: r.try_get("state")?,
            depends_on: r.try_get("depends_on")?,
            agent_id: r.try_get("agent_id")?,
            exit_status: r.try_get("exit_status")?,
            env: r.try_get("env")?,
            created_at: r.try_get("created_at")?,
            scheduled_at: r.try_get("scheduled_at")?,
            assigned_at: r.try_get("assigned_at")?,
            accepted_at: r.try_get("accepted_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            attempt: r.try_get("attempt")?,
            retry_of: r.try_get("retry_of")?,
            retried_by: r.try_get("retried_by")?,
            timed_out: r.try_get("timed_out")?,
            timeout_s: r.try_get("timeout_s")?,
            herald_ended: r.try_get("herald_ended")?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub id: Uuid,
    pub name: String,
    pub queues: Vec<String>,
    pub state: String,
    pub connected_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    #[serde(skip)]
    pub org_id: Uuid,
}

pub const AGENT_COLUMNS: &str =
    "a.id, a.org_id, a.name, a.queues, a.state, a.connected_at, a.last_heartbeat_at";

impl FromRow<'_, PgRow> for AgentView {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(AgentView {
            id: r.try_get("id")?,
            org_id: r.try_get("org_id")?,
            name: r.try_get("name")?,
            queues: r.try_get("queues")?,
            state: r.try_get("state")?,
            connected_at: r.try_get("connected_at")?,
            last_heartbeat_at: r.try_get("last_heartbeat_at")?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineView {
    pub id: Uuid,
    pub slug: String,
    pub repository: String,
    pub created_at: DateTime<Utc>,
}

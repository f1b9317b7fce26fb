//! An agent's calls on its job: accept, start, finish. Each is idempotent: repeating a
//! call that already took effect returns the job as it is.

use crate::channels;
use crate::error::StorageError;
use crate::events;
use crate::propagate::move_build_quiet;
use crate::views::{JobView, JOB_COLUMNS};
use herald_domain::{BuildState, EventType, JobAction, JobState};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
pub enum AgentCall {
    Accept,
    Start,
    Finish { exit_status: i32 },
}

/// The job as its agent may see it; other agents' jobs are not found.
pub async fn job_for_agent(
    conn: &mut PgConnection,
    agent_id: Uuid,
    job_id: Uuid,
) -> Result<JobView, StorageError> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 AND j.agent_id = $2"
    ))
    .bind(job_id)
    .bind(agent_id)
    .fetch_optional(conn)
    .await?
    .ok_or(StorageError::NotFound("job"))
}

/// What an agent's call did.
#[derive(Debug)]
pub struct Applied {
    pub job: JobView,
    /// Events were written: the caller wakes `herald_outbox` after commit.
    pub wrote_events: bool,
    /// The agent became free: the caller wakes `herald_dispatch` after commit.
    pub freed_agent: bool,
}

/// Applies an agent's call in the caller's transaction. Sends no `NOTIFY`; see
/// [`Applied`] for what the caller wakes after commit.
pub async fn apply(
    conn: &mut PgConnection,
    agent_id: Uuid,
    job_id: Uuid,
    call: AgentCall,
) -> Result<Applied, StorageError> {
    let unchanged = |job| Applied {
        job,
        wrote_events: false,
        freed_agent: false,
    };
    // Lock order is build → job. Only the first accept of a build needs the build row.
    let mut lock_build = None;
    if matches!(call, AgentCall::Accept) {
        let row = sqlx::query(
            "SELECT j.build_id, b.state AS build_state FROM jobs j JOIN builds b ON b.id = j.build_id \
             WHERE j.id = $1 AND j.agent_id = $2",
        )
        .bind(job_id)
        .bind(agent_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StorageError::NotFound("job"))?;
        let build_state: String = row.try_get("build_state")?;
        if build_state == "scheduled" {
            let build_id: Uuid = row.try_get("build_id")?;
            sqlx::query("SELECT 1 FROM builds WHERE id = $1 FOR UPDATE")
                .bind(build_id)
                .execute(&mut *conn)
                .await?;
            lock_build = Some(build_id);
        }
    }
    let job: JobView = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 AND j.agent_id = $2 FOR UPDATE"
    ))
    .bind(job_id)
    .bind(agent_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("job"))?;
    let state: JobState = job.state.parse().map_err(StorageError::Conflict)?;

    // Retries after a timeout are safe.
    match call {
        AgentCall::Accept if job.accepted_at.is_some() => return Ok(unchanged(job)),
        AgentCall::Start if job.started_at.is_some() => return Ok(unchanged(job)),
        AgentCall::Finish { exit_status } if job.finished_at.is_some() => {
            return if job.exit_status == Some(exit_status) || state == JobState::Canceled {
                Ok(unchanged(job))
            } else {
                Err(StorageError::Conflict(format!(
                    "job already finished with exit status {}",
                    job.exit_status.map_or("none".into(), |s| s.to_string())
                )))
            };
        }
        _ => {}
    }
    let action = match call {
        AgentCall::Accept => JobAction::Accept,
        AgentCall::Start => JobAction::Start,
        AgentCall::Finish { exit_status } => JobAction::Finish { exit_status },
    };
    let next = state.transition(action)?;
    let set = match call {
        AgentCall::Accept => "state = 'accepted', accepted_at = now()",
        AgentCall::Start => "state = 'running', started_at = now()",
        AgentCall::Finish { .. } => "state = $3, exit_status = $4, finished_at = now()",
    };
    let sql = format!(
        "UPDATE jobs AS j SET {set}, updated_at = now() WHERE j.id = $1 AND j.agent_id = $2 \
         RETURNING {JOB_COLUMNS}"
    );
    let mut update = sqlx::query_as::<_, JobView>(&sql)
        .bind(job_id)
        .bind(agent_id);
    if let AgentCall::Finish { exit_status } = call {
        update = update.bind(next.as_str()).bind(exit_status);
    }
    let job = update.fetch_one(&mut *conn).await?;
    let mut wrote_events = true;
    match call {
        AgentCall::Accept => {
            wrote_events = match lock_build {
                Some(build_id) => {
                    move_build_quiet(conn, build_id, BuildState::Scheduled, BuildState::Running)
                        .await?
                }
                None => false,
            };
        }
        AgentCall::Start => {
            events::emit_jobs(conn, EventType::JobStarted, std::slice::from_ref(&job)).await?;
        }
        AgentCall::Finish { .. } => {
            events::emit_jobs(conn, EventType::JobFinished, std::slice::from_ref(&job)).await?;
        }
    }
    Ok(Applied {
        job,
        wrote_events,
        freed_agent: matches!(call, AgentCall::Finish { .. }),
    })
}

/// Assignments older than `timeout_s` go back to `scheduled`. Skips locked rows and
/// works in batches; returns how many jobs it returned to the queue.
pub async fn expire_assignments(
    conn: &mut PgConnection,
    timeout_s: f64,
) -> Result<usize, StorageError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "WITH expired AS ( \
             SELECT id FROM jobs WHERE state = 'assigned' \
               AND assigned_at < now() - make_interval(secs => $1) \
             ORDER BY assigned_at LIMIT 500 FOR UPDATE SKIP LOCKED) \
         UPDATE jobs j SET state = 'scheduled', agent_id = NULL, assigned_at = NULL, updated_at = now() \
         FROM expired WHERE j.id = expired.id RETURNING j.id",
    )
    .bind(timeout_s)
    .fetch_all(&mut *conn)
    .await?;
    if !ids.is_empty() {
        events::emit_for_jobs(conn, EventType::JobScheduled, &ids).await?;
        events::notify(conn, channels::DISPATCH, "").await?;
    }
    Ok(ids.len())
}

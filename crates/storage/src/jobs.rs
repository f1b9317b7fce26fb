//! An agent's calls on its job: accept, start, finish. Each is idempotent: repeating a
//! call that already took effect returns the job as it is.

use crate::channels;
use crate::error::StorageError;
use crate::events;
use crate::propagate::set_build_state;
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

pub async fn apply(
    conn: &mut PgConnection,
    agent_id: Uuid,
    job_id: Uuid,
    call: AgentCall,
) -> Result<JobView, StorageError> {
    let row = sqlx::query(
        "SELECT j.build_id, b.state AS build_state FROM jobs j JOIN builds b ON b.id = j.build_id \
         WHERE j.id = $1 AND j.agent_id = $2",
    )
    .bind(job_id)
    .bind(agent_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("job"))?;
    let build_id: Uuid = row.try_get("build_id")?;
    let build_state: String = row.try_get("build_state")?;
    // Lock order is build → job. Only the first accept of a build needs the build row.
    let lock_build = matches!(call, AgentCall::Accept) && build_state == "scheduled";
    if lock_build {
        sqlx::query("SELECT 1 FROM builds WHERE id = $1 FOR UPDATE")
            .bind(build_id)
            .execute(&mut *conn)
            .await?;
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
        AgentCall::Accept if job.accepted_at.is_some() => return Ok(job),
        AgentCall::Start if job.started_at.is_some() => return Ok(job),
        AgentCall::Finish { exit_status } if job.finished_at.is_some() => {
            return if job.exit_status == Some(exit_status) || state == JobState::Canceled {
                Ok(job)
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
    match call {
        AgentCall::Accept => {
            sqlx::query(
                "UPDATE jobs SET state = 'accepted', accepted_at = now(), updated_at = now() WHERE id = $1",
            )
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            if lock_build {
                set_build_state(conn, build_id, BuildState::Scheduled, BuildState::Running).await?;
            }
        }
        AgentCall::Start => {
            sqlx::query(
                "UPDATE jobs SET state = 'running', started_at = now(), updated_at = now() WHERE id = $1",
            )
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            events::emit_for_jobs(conn, EventType::JobStarted, &[job_id]).await?;
        }
        AgentCall::Finish { exit_status } => {
            sqlx::query(
                "UPDATE jobs SET state = $2, exit_status = $3, finished_at = now(), updated_at = now() \
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(next.as_str())
            .bind(exit_status)
            .execute(&mut *conn)
            .await?;
            events::emit_for_jobs(conn, EventType::JobFinished, &[job_id]).await?;
            // The agent is free again.
            events::notify(conn, channels::DISPATCH, "").await?;
        }
    }
    job_for_agent(conn, agent_id, job_id).await
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

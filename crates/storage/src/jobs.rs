//! An agent's calls on its job: accept, start, finish. Each is idempotent: repeating a
//! call that already took effect returns the job as it is.

use crate::channels;
use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::lifecycle;
use crate::propagate::move_build_quiet;
use crate::views::{BuildView, JobView, BUILD_COLUMNS_AS_B, JOB_COLUMNS};
use chrono::{DateTime, SubsecRound, Utc};
use herald_domain::retry::{retry_rule, RetryPolicy};
use herald_domain::{BuildState, EventType, JobAction, JobState};
use sqlx::{FromRow, PgConnection, Row};
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
    /// The agent became free: the caller wakes `herald_agent_free` after commit.
    pub freed_agent: bool,
    /// An automatic retry became runnable: the caller wakes `herald_dispatch`.
    pub scheduled: bool,
    /// The agent finished a job Herald had ended, which left its cancel list: the
    /// caller wakes `herald_cancel`.
    pub stopped: bool,
}

/// The state an agent's call moves `job` to; `None` when the call already took effect
/// (retries after a timeout are safe).
fn decide(job: &JobView, call: AgentCall) -> Result<Option<JobState>, StorageError> {
    let state: JobState = job.state.parse().map_err(StorageError::Conflict)?;
    match call {
        AgentCall::Accept if job.accepted_at.is_some() => return Ok(None),
        AgentCall::Start if job.started_at.is_some() => return Ok(None),
        AgentCall::Finish { exit_status } if job.finished_at.is_some() => {
            // Herald ended it (timeout, cancel grace, lost agent): the agent's finish
            // comes late and changes nothing.
            return if job.exit_status == Some(exit_status)
                || state == JobState::Canceled
                || job.herald_ended
            {
                Ok(None)
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
    Ok(Some(state.transition(action)?))
}

/// How often a call retries when its job changed between its read and its write.
const CALL_ATTEMPTS: usize = 5;

/// Applies an agent's call outside any transaction: one read, then one statement that
/// changes the job only if it is still in the state that was read and writes its
/// event with it (compare-and-set; another change in between makes it read again).
/// Two round trips instead of six, and no lock held between them. The first accept of
/// a build also moves the build, under its lock: that one runs in a transaction of
/// its own ([`accept_first`]).
pub async fn apply_call(
    conn: &mut PgConnection,
    agent_id: Uuid,
    job_id: Uuid,
    call: AgentCall,
) -> Result<Applied, StorageError> {
    for _ in 0..CALL_ATTEMPTS {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, {BUILD_COLUMNS_AS_B}, clock_timestamp() AS db_now, \
                    j.retry_rules AS x_retry_rules, j.retry_counts AS x_retry_counts \
             FROM jobs j JOIN builds b ON b.id = j.build_id JOIN pipelines p ON p.id = b.pipeline_id \
             WHERE j.id = $1 AND j.agent_id = $2"
        ))
        .bind(job_id)
        .bind(agent_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StorageError::NotFound("job"))?;
        let read_at = std::time::Instant::now();
        let job = JobView::from_row(&row)?;
        let build = BuildView::from_row_prefixed(&row, "b_")?;
        let Some(next) = decide(&job, call)? else {
            let stopped = matches!(call, AgentCall::Finish { .. })
                && job.herald_ended
                && lifecycle::stopped(conn, agent_id, job_id).await?;
            return Ok(Applied {
                job,
                wrote_events: false,
                freed_agent: false,
                scheduled: false,
                stopped,
            });
        };
        if let AgentCall::Finish { exit_status } = call {
            let rules: serde_json::Value = row.try_get("x_retry_rules")?;
            let counts: Vec<i32> = row.try_get("x_retry_counts")?;
            let rules = RetryPolicy::rules_from_json(&rules);
            if next == JobState::Failed && retry_rule(&rules, &counts, exit_status).is_some() {
                match finish_with_retry(conn, &job, exit_status).await? {
                    Some(applied) => return Ok(applied),
                    None => continue,
                }
            }
        }
        if matches!(call, AgentCall::Accept) && build.state == BuildState::Scheduled.as_str() {
            match accept_first(conn, agent_id, &job).await? {
                Some(applied) => return Ok(applied),
                None => continue,
            }
        }
        let db_now: DateTime<Utc> = row.try_get("db_now")?;
        // The database's clock, in microseconds as it keeps them.
        let at = (db_now + chrono::Duration::from_std(read_at.elapsed()).unwrap_or_default())
            .trunc_subsecs(6);
        let mut after = JobView {
            state: next.as_str().to_owned(),
            ..job.clone()
        };
        let (set, event) = match call {
            AgentCall::Accept => {
                after.accepted_at = Some(at);
                (
                    "accepted_at = $4, deadline_at = $4 + make_interval(secs => j.timeout_s)",
                    None,
                )
            }
            AgentCall::Start => {
                after.started_at = Some(at);
                ("started_at = $4", Some(EventType::JobStarted))
            }
            AgentCall::Finish { exit_status } => {
                after.finished_at = Some(at);
                after.exit_status = Some(exit_status);
                (
                    "finished_at = $4, exit_status = $10",
                    Some(EventType::JobFinished),
                )
            }
        };
        let evs: Vec<NewEvent> = event
            .map(|e| NewEvent::job(e, &build, &after))
            .into_iter()
            .collect();
        let ev = events::outbox_rows(evs);
        let sql = format!(
            "WITH upd AS ( \
                 UPDATE jobs AS j SET state = $9, {set}, updated_at = $4 \
                 WHERE j.id = $1 AND j.agent_id = $2 AND j.state = $3 RETURNING j.id), \
             ev AS ( \
                 INSERT INTO outbox (event_id, event_type, org_id, build_id, payload, traceparent) \
                 SELECT u.*, $12::text FROM unnest($5::uuid[], $6::text[], $7::uuid[], $8::uuid[], $11::jsonb[]) u \
                 WHERE EXISTS (SELECT 1 FROM upd)) \
             SELECT count(*) AS n FROM upd"
        );
        // $5-$8, $11 and $12 are the event's columns: ids, types, orgs, builds,
        // payloads and the agent's request's traceparent.
        let changed: i64 = sqlx::query(&sql)
            .bind(job_id)
            .bind(agent_id)
            .bind(&job.state)
            .bind(at)
            .bind(&ev.ids)
            .bind(&ev.types)
            .bind(&ev.orgs)
            .bind(&ev.builds)
            .bind(next.as_str())
            .bind(match call {
                AgentCall::Finish { exit_status } => Some(exit_status),
                _ => None,
            })
            .bind(&ev.payloads)
            .bind(ev.trace.as_deref())
            .fetch_one(&mut *conn)
            .await?
            .try_get("n")?;
        if changed == 1 {
            return Ok(Applied {
                job: after,
                wrote_events: event.is_some(),
                freed_agent: matches!(call, AgentCall::Finish { .. }),
                scheduled: false,
                // A canceling job left its agent's cancel list.
                stopped: job.state == JobState::Canceling.as_str(),
            });
        }
        // Changed in between (a cancel, a sweep): read it again and decide anew.
    }
    Err(StorageError::Conflict(
        "the job kept changing; try again".into(),
    ))
}

/// The first accept of a build also moves the build to `running`, so it runs in a
/// transaction that locks the build, then the job (the global order). The job changes
/// only if it is still in the state that was read; `None` when it was not (nothing
/// was written: read again and decide anew).
async fn accept_first(
    conn: &mut PgConnection,
    agent_id: Uuid,
    read: &JobView,
) -> Result<Option<Applied>, StorageError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let build_state: String =
        sqlx::query_scalar("SELECT state FROM builds WHERE id = $1 FOR UPDATE")
            .bind(read.build_id)
            .fetch_one(&mut *tx)
            .await?;
    let job: Option<JobView> = sqlx::query_as(&format!(
        "UPDATE jobs AS j SET state = 'accepted', accepted_at = now(), updated_at = now(), \
             deadline_at = now() + make_interval(secs => j.timeout_s) \
         WHERE j.id = $1 AND j.agent_id = $2 AND j.state = $3 RETURNING {JOB_COLUMNS}"
    ))
    .bind(read.id)
    .bind(agent_id)
    .bind(&read.state)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = job else {
        tx.rollback().await?;
        return Ok(None);
    };
    // Another accept of the build may have moved it since the read.
    let wrote_events = build_state == BuildState::Scheduled.as_str()
        && move_build_quiet(
            &mut tx,
            read.build_id,
            BuildState::Scheduled,
            BuildState::Running,
        )
        .await?;
    tx.commit().await?;
    Ok(Some(Applied {
        job,
        wrote_events,
        freed_agent: false,
        scheduled: false,
        stopped: false,
    }))
}

/// A failure that a retry rule retries: the retry is created in the same transaction,
/// which locks the build, then the job (the global order). `None` when the job
/// changed since it was read (nothing written: read again and decide anew).
async fn finish_with_retry(
    conn: &mut PgConnection,
    read: &JobView,
    exit_status: i32,
) -> Result<Option<Applied>, StorageError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SELECT 1 FROM builds WHERE id = $1 FOR UPDATE")
        .bind(read.build_id)
        .execute(&mut *tx)
        .await?;
    let ended = lifecycle::end_jobs(
        &mut tx,
        &[lifecycle::End {
            id: read.id,
            from: read.state.clone(),
            to: JobState::Failed,
            exit_status,
            timed_out: false,
            herald_ended: false,
            stop_pending: false,
        }],
    )
    .await?;
    let Some(job) = ended.jobs.into_iter().next() else {
        tx.rollback().await?;
        return Ok(None);
    };
    tx.commit().await?;
    Ok(Some(Applied {
        job,
        wrote_events: true,
        freed_agent: true,
        scheduled: !ended.retries.is_empty(),
        stopped: false,
    }))
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

//! Propagation: a finished job releases or skips its dependents, and the build's state
//! follows from its jobs. Runs off the request path (the dispatch role consumes
//! `job.finished`), recomputes from the rows each time, and is therefore idempotent.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::{channels, views::BuildView};
use herald_domain::{
    derive_build_state, plan_propagation, BuildState, EventType, JobState, PropagationJob,
};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Debug, PartialEq, Eq)]
pub enum Propagation {
    /// Another transaction holds the build: try again shortly, nothing was done.
    Busy,
    Done {
        scheduled: usize,
        skipped: usize,
        build_state: Option<BuildState>,
    },
}

pub async fn propagate_build(
    conn: &mut PgConnection,
    build_id: Uuid,
) -> Result<Propagation, StorageError> {
    // Skip a locked build rather than queue behind it; the caller retries.
    let Some(row) = sqlx::query(
        "SELECT state, cancel_requested_at IS NOT NULL AS canceled FROM builds \
         WHERE id = $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(build_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM builds WHERE id = $1)")
            .bind(build_id)
            .fetch_one(&mut *conn)
            .await?;
        return Ok(if exists {
            Propagation::Busy
        } else {
            Propagation::Done {
                scheduled: 0,
                skipped: 0,
                build_state: None,
            }
        });
    };
    let build_state: String = row.try_get("state")?;
    let build_state: BuildState = build_state.parse().map_err(StorageError::Conflict)?;
    let cancel_requested: bool = row.try_get("canceled")?;

    let rows = sqlx::query("SELECT id, state FROM jobs WHERE build_id = $1 ORDER BY id")
        .bind(build_id)
        .fetch_all(&mut *conn)
        .await?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut jobs = Vec::with_capacity(rows.len());
    for r in &rows {
        let s: String = r.try_get("state")?;
        ids.push(r.try_get::<Uuid, _>("id")?);
        jobs.push(PropagationJob {
            state: s.parse().map_err(StorageError::Conflict)?,
            depends_on: Vec::new(),
        });
    }
    let index: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let edges = sqlx::query(
        "SELECT d.job_id, d.depends_on_id FROM job_dependencies d \
         JOIN jobs j ON j.id = d.job_id WHERE j.build_id = $1",
    )
    .bind(build_id)
    .fetch_all(&mut *conn)
    .await?;
    for e in &edges {
        let (a, b): (Uuid, Uuid) = (e.try_get("job_id")?, e.try_get("depends_on_id")?);
        if let (Some(&a), Some(&b)) = (index.get(&a), index.get(&b)) {
            jobs[a].depends_on.push(b);
        }
    }

    let plan = plan_propagation(&jobs);
    let mut scheduled = Vec::new();
    let mut skipped = Vec::new();
    for &(i, state) in &plan {
        jobs[i].state = state;
        if state == JobState::Scheduled {
            scheduled.push(ids[i]);
        } else {
            skipped.push(ids[i]);
        }
    }
    // Only rows still waiting change: never write a row to the value it has.
    sqlx::query(
        "UPDATE jobs SET state = 'scheduled', scheduled_at = now(), updated_at = now() \
         WHERE id = ANY($1) AND state = 'waiting'",
    )
    .bind(&scheduled)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE jobs SET state = 'skipped', finished_at = now(), updated_at = now() \
         WHERE id = ANY($1) AND state = 'waiting'",
    )
    .bind(&skipped)
    .execute(&mut *conn)
    .await?;
    events::emit_for_jobs(conn, EventType::JobScheduled, &scheduled).await?;
    events::emit_for_jobs(conn, EventType::JobFinished, &skipped).await?;

    let next = derive_build_state(build_state, cancel_requested, jobs.iter().map(|j| j.state));
    let changed = set_build_state(conn, build_id, build_state, next).await?;
    if !scheduled.is_empty() {
        events::notify(conn, channels::DISPATCH, "").await?;
    }
    Ok(Propagation::Done {
        scheduled: scheduled.len(),
        skipped: skipped.len(),
        build_state: changed.then_some(next),
    })
}

/// Moves a build from `from` to `to` and emits its event; a no-op when they are equal.
pub async fn set_build_state(
    conn: &mut PgConnection,
    build_id: Uuid,
    from: BuildState,
    to: BuildState,
) -> Result<bool, StorageError> {
    if from == to || !from.can_become(to) {
        return Ok(false);
    }
    let updated = sqlx::query(
        "UPDATE builds SET state = $2, updated_at = now(), \
             started_at = CASE WHEN $2 = 'running' THEN coalesce(started_at, now()) ELSE started_at END, \
             finished_at = CASE WHEN $2 IN ('passed', 'failed', 'canceled') THEN now() ELSE finished_at END \
         WHERE id = $1 AND state = $3",
    )
    .bind(build_id)
    .bind(to.as_str())
    .bind(from.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    let builds = events::load_builds(conn, &[build_id]).await?;
    if let Some(build) = builds.get(&build_id) {
        let event_type = if to == BuildState::Running {
            EventType::BuildRunning
        } else {
            EventType::BuildFinished
        };
        events::insert(conn, vec![NewEvent::build(event_type, build)]).await?;
    }
    Ok(true)
}

/// For tests and ops: the build as the primary sees it.
pub async fn build_state(
    conn: &mut PgConnection,
    build_id: Uuid,
) -> Result<BuildView, StorageError> {
    let builds = events::load_builds(conn, &[build_id]).await?;
    builds
        .into_values()
        .next()
        .ok_or(StorageError::NotFound("build"))
}

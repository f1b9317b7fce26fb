//! Propagation: a finished job releases or skips its dependents, and the build's state
//! follows from its jobs. Runs off the request path (the dispatch role consumes
//! `job.finished`), recomputes from the rows each time, and is therefore idempotent.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::views::{BuildView, JobView, BUILD_COLUMNS, JOB_COLUMNS};
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
    /// Sends no `NOTIFY`: the caller wakes `herald_outbox` when `wrote_events` and
    /// `herald_dispatch` when `scheduled > 0`, after commit.
    Done {
        scheduled: usize,
        skipped: usize,
        build_state: Option<BuildState>,
        wrote_events: bool,
    },
}

pub async fn propagate_build(
    conn: &mut PgConnection,
    build_id: Uuid,
) -> Result<Propagation, StorageError> {
    // Skip a locked build rather than queue behind it; the caller retries.
    let locked: Option<BuildView> = sqlx::query_as(&format!(
        "SELECT {BUILD_COLUMNS} FROM builds b JOIN pipelines p ON p.id = b.pipeline_id \
         WHERE b.id = $1 FOR UPDATE OF b SKIP LOCKED"
    ))
    .bind(build_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(build) = locked else {
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
                wrote_events: false,
            }
        });
    };
    let build_state: BuildState = build.state.parse().map_err(StorageError::Conflict)?;
    let cancel_requested = build.canceled;

    // Edges come from the jobs' own `depends_on` keys: one read for the whole graph.
    let rows = sqlx::query(
        "SELECT id, key, state, depends_on FROM jobs WHERE build_id = $1 ORDER BY position",
    )
    .bind(build_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut jobs = Vec::with_capacity(rows.len());
    let mut deps: Vec<Vec<String>> = Vec::with_capacity(rows.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let s: String = r.try_get("state")?;
        let d: sqlx::types::Json<Vec<String>> = r.try_get("depends_on")?;
        ids.push(r.try_get::<Uuid, _>("id")?);
        index.insert(r.try_get("key")?, i);
        deps.push(d.0);
        jobs.push(PropagationJob {
            state: s.parse().map_err(StorageError::Conflict)?,
            depends_on: Vec::new(),
        });
    }
    for (i, d) in deps.iter().enumerate() {
        jobs[i].depends_on = d.iter().filter_map(|k| index.get(k).copied()).collect();
    }

    let plan = plan_propagation(&jobs);
    let mut changed_ids = Vec::with_capacity(plan.len());
    let mut changed_states = Vec::with_capacity(plan.len());
    for &(i, state) in &plan {
        jobs[i].state = state;
        changed_ids.push(ids[i]);
        changed_states.push(state.as_str());
    }
    // Only rows still waiting change: never write a row to the value it has.
    let changed: Vec<JobView> = if changed_ids.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(&format!(
            "UPDATE jobs AS j SET state = v.st, updated_at = now(), \
                 scheduled_at = CASE WHEN v.st = 'scheduled' THEN clock_timestamp() ELSE j.scheduled_at END, \
                 finished_at = CASE WHEN v.st = 'skipped' THEN now() ELSE j.finished_at END \
             FROM unnest($1::uuid[], $2::text[]) AS v(id, st) \
             WHERE j.id = v.id AND j.state = 'waiting' \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(&changed_ids)
        .bind(&changed_states)
        .fetch_all(&mut *conn)
        .await?
    };
    let mut events = Vec::with_capacity(changed.len() + 1);
    let (mut scheduled, mut skipped) = (0, 0);
    for j in &changed {
        let event_type = if j.state == JobState::Scheduled.as_str() {
            scheduled += 1;
            EventType::JobScheduled
        } else {
            skipped += 1;
            EventType::JobFinished
        };
        events.push(NewEvent::job(event_type, &build, j));
    }

    let next = derive_build_state(build_state, cancel_requested, jobs.iter().map(|j| j.state));
    let moved = move_build(conn, build_id, build_state, next).await?;
    if let Some(b) = &moved {
        events.push(NewEvent::build(build_event(next), b));
    }
    let wrote_events = !events.is_empty();
    events::insert_quiet(conn, events).await?;
    Ok(Propagation::Done {
        scheduled,
        skipped,
        build_state: moved.map(|_| next),
        wrote_events,
    })
}

fn build_event(to: BuildState) -> EventType {
    if to == BuildState::Running {
        EventType::BuildRunning
    } else {
        EventType::BuildFinished
    }
}

/// Moves a build from `from` to `to`, returning it as it is now; `None` when nothing
/// changed. Emits nothing: the caller writes the event.
async fn move_build(
    conn: &mut PgConnection,
    build_id: Uuid,
    from: BuildState,
    to: BuildState,
) -> Result<Option<BuildView>, StorageError> {
    if from == to || !from.can_become(to) {
        return Ok(None);
    }
    Ok(sqlx::query_as(&format!(
        "UPDATE builds AS b SET state = $2, updated_at = now(), \
             started_at = CASE WHEN $2 = 'running' THEN coalesce(b.started_at, now()) ELSE b.started_at END, \
             finished_at = CASE WHEN $2 IN ('passed', 'failed', 'canceled') THEN now() ELSE b.finished_at END \
         FROM pipelines p \
         WHERE b.id = $1 AND b.state = $3 AND p.id = b.pipeline_id \
         RETURNING {BUILD_COLUMNS}"
    ))
    .bind(build_id)
    .bind(to.as_str())
    .bind(from.as_str())
    .fetch_optional(&mut *conn)
    .await?)
}

/// Moves a build and writes its event without `NOTIFY` (the caller wakes the relay
/// after commit). Returns whether it moved.
pub(crate) async fn move_build_quiet(
    conn: &mut PgConnection,
    build_id: Uuid,
    from: BuildState,
    to: BuildState,
) -> Result<bool, StorageError> {
    move_and_emit(conn, build_id, from, to, false).await
}

/// Moves a build from `from` to `to` and emits its event; a no-op when they are equal.
pub async fn set_build_state(
    conn: &mut PgConnection,
    build_id: Uuid,
    from: BuildState,
    to: BuildState,
) -> Result<bool, StorageError> {
    move_and_emit(conn, build_id, from, to, true).await
}

async fn move_and_emit(
    conn: &mut PgConnection,
    build_id: Uuid,
    from: BuildState,
    to: BuildState,
    notify: bool,
) -> Result<bool, StorageError> {
    let Some(build) = move_build(conn, build_id, from, to).await? else {
        return Ok(false);
    };
    let event = vec![NewEvent::build(build_event(to), &build)];
    if notify {
        events::insert(conn, event).await?;
    } else {
        events::insert_quiet(conn, event).await?;
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

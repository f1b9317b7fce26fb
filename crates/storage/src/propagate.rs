//! Propagation: a finished job releases or skips its dependents, and the build's state
//! follows from its jobs. Runs off the request path (the dispatch role consumes
//! `job.finished`), recomputes from the rows each time, and is therefore idempotent.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::views::{BuildView, JobView, BUILD_COLUMNS, BUILD_COLUMNS_AS_B, JOB_COLUMNS};
use chrono::{DateTime, SubsecRound, Utc};
use herald_domain::{
    derive_build_state, plan_propagation, BuildState, EventType, JobState, PropagationJob,
};
use sqlx::{FromRow, PgConnection, Row};
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

/// Jobs of one build change in one statement that also writes their events, and it is
/// the transaction's last: a job becomes runnable (`scheduled_at`) as close to the
/// commit as it can, so the dispatcher sees it at once.
const APPLY: &str = "\
WITH upd AS ( \
    UPDATE jobs AS j SET state = v.st, updated_at = now(), \
        scheduled_at = CASE WHEN v.st = 'scheduled' THEN $3 ELSE j.scheduled_at END, \
        finished_at = CASE WHEN v.st = 'skipped' THEN now() ELSE j.finished_at END \
    FROM unnest($1::uuid[], $2::text[]) AS v(id, st) \
    WHERE j.id = v.id AND j.state = 'waiting' \
    RETURNING j.id), \
ev AS ( \
    INSERT INTO outbox (event_id, event_type, org_id, build_id, payload, traceparent) \
    SELECT e.event_id, e.event_type, e.org_id, e.build_id, e.payload, $10::text \
    FROM unnest($4::uuid[], $5::uuid[], $6::text[], $7::uuid[], $8::uuid[], $9::jsonb[]) \
         WITH ORDINALITY AS e(job_id, event_id, event_type, org_id, build_id, payload, ord) \
    WHERE e.job_id IS NULL OR e.job_id IN (SELECT id FROM upd) \
    ORDER BY e.ord) \
SELECT id FROM upd";

pub async fn propagate_build(
    conn: &mut PgConnection,
    build_id: Uuid,
) -> Result<Propagation, StorageError> {
    // Skip a locked build rather than queue behind it; the caller retries. The build
    // and its jobs come back in one round trip: one row per job, each carrying the
    // build (`b_…`). Edges come from the jobs' own `depends_on` keys; whole rows,
    // because the events show the jobs as this transaction leaves them.
    let rows = sqlx::query(&format!(
        "WITH b AS MATERIALIZED ( \
             SELECT {BUILD_COLUMNS_AS_B}, now() AS tx_now, clock_timestamp() AS db_clock \
             FROM builds b JOIN pipelines p ON p.id = b.pipeline_id \
             WHERE b.id = $1 FOR UPDATE OF b SKIP LOCKED) \
         SELECT b.*, {JOB_COLUMNS} FROM b LEFT JOIN jobs j ON j.build_id = b.b_id ORDER BY j.position, j.attempt"
    ))
    .bind(build_id)
    .fetch_all(&mut *conn)
    .await?;
    let Some(first) = rows.first() else {
        // Locked by another propagation, or gone.
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
    let read_at = std::time::Instant::now();
    let build = BuildView::from_row_prefixed(first, "b_")?;
    let tx_now: DateTime<Utc> = first.try_get("tx_now")?;
    let db_clock: DateTime<Utc> = first.try_get("db_clock")?;
    let build_state: BuildState = build.state.parse().map_err(StorageError::Conflict)?;
    let cancel_requested = build.canceled;
    // A build without jobs (never created so) comes back as one row without a job.
    // Only the newest attempt of each key counts: a retried job's dependents wait for
    // its retry, and the build's state follows the retry.
    let views: Vec<JobView> = rows
        .iter()
        .filter(|r| matches!(r.try_get::<Option<Uuid>, _>("id"), Ok(Some(_))))
        .map(JobView::from_row)
        .filter(|j| !matches!(j, Ok(j) if j.retried_by.is_some()))
        .collect::<Result<_, _>>()?;
    let mut jobs = Vec::with_capacity(views.len());
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(views.len());
    for (i, v) in views.iter().enumerate() {
        index.insert(v.key.as_str(), i);
        jobs.push(PropagationJob {
            state: v.state.parse().map_err(StorageError::Conflict)?,
            depends_on: Vec::new(),
        });
    }
    for (i, v) in views.iter().enumerate() {
        let deps: Vec<String> = serde_json::from_value(v.depends_on.clone()).map_err(|e| {
            StorageError::Conflict(format!("job {} has unreadable depends_on: {e}", v.id))
        })?;
        jobs[i].depends_on = deps
            .iter()
            .filter_map(|k| index.get(k.as_str()).copied())
            .collect();
    }

    let plan = plan_propagation(&jobs);
    for &(i, state) in &plan {
        jobs[i].state = state;
    }
    let next = derive_build_state(build_state, cancel_requested, jobs.iter().map(|j| j.state));
    let moved = move_build(conn, build_id, build_state, next).await?;
    if plan.is_empty() && moved.is_none() {
        return Ok(Propagation::Done {
            scheduled: 0,
            skipped: 0,
            build_state: None,
            wrote_events: false,
        });
    }
    // The database's clock, in microseconds as it keeps them.
    let runnable_at = (db_clock
        + chrono::Duration::from_std(read_at.elapsed()).unwrap_or_default())
    .trunc_subsecs(6);
    let mut changed_ids = Vec::with_capacity(plan.len());
    let mut changed_states = Vec::with_capacity(plan.len());
    let mut event_jobs: Vec<Option<Uuid>> = Vec::with_capacity(plan.len() + 1);
    let mut events = Vec::with_capacity(plan.len() + 1);
    for &(i, state) in &plan {
        let mut j = views[i].clone();
        j.state = state.as_str().to_owned();
        let event_type = if state == JobState::Scheduled {
            j.scheduled_at = Some(runnable_at);
            EventType::JobScheduled
        } else {
            j.finished_at = Some(tx_now);
            EventType::JobFinished
        };
        changed_ids.push(j.id);
        changed_states.push(state.as_str());
        event_jobs.push(Some(j.id));
        events.push(NewEvent::job(event_type, &build, &j));
    }
    if let Some(b) = &moved {
        event_jobs.push(None);
        events.push(NewEvent::build(build_event(next), b));
    }
    let ev = events::outbox_rows(events);
    let updated: Vec<Uuid> = ev
        .bind_to(
            sqlx::query(APPLY)
                .bind(&changed_ids)
                .bind(&changed_states)
                .bind(runnable_at)
                .bind(&event_jobs),
        )
        .bind(ev.trace.as_deref())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    let (mut scheduled, mut skipped) = (0, 0);
    for &(i, state) in &plan {
        if updated.contains(&views[i].id) {
            if state == JobState::Scheduled {
                scheduled += 1;
            } else {
                skipped += 1;
            }
        }
    }
    Ok(Propagation::Done {
        scheduled,
        skipped,
        build_state: moved.map(|_| next),
        wrote_events: !updated.is_empty() || event_jobs.contains(&None),
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
             finished_at = CASE WHEN $2 IN ('passed', 'failed', 'canceled') THEN now() ELSE b.finished_at END, \
             finish_count = b.finish_count + CASE WHEN $2 IN ('passed', 'failed', 'canceled') THEN 1 ELSE 0 END \
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

/// A retry reopens a finished build: `running` again, with `build.running`, and its
/// cancel forgotten (the retry asks for the work again). No `NOTIFY`: the caller
/// wakes the relay after commit. The caller holds the build's lock.
pub(crate) async fn reopen_build(
    conn: &mut PgConnection,
    build_id: Uuid,
    from: BuildState,
) -> Result<bool, StorageError> {
    let build: Option<BuildView> = sqlx::query_as(&format!(
        "UPDATE builds AS b SET state = 'running', finished_at = NULL, cancel_requested_at = NULL, \
             started_at = coalesce(b.started_at, now()), updated_at = now() \
         FROM pipelines p WHERE b.id = $1 AND b.state = $2 AND p.id = b.pipeline_id \
         RETURNING {BUILD_COLUMNS}"
    ))
    .bind(build_id)
    .bind(from.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(build) = build else {
        return Ok(false);
    };
    events::insert_quiet(conn, vec![NewEvent::build(EventType::BuildRunning, &build)]).await?;
    Ok(true)
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

//! How jobs end other than by a plain finish, and how they come back: timeouts, the
//! cancel grace, lost agents, failures that retry automatically, manual retries, and
//! the list of jobs each agent must stop.
//!
//! Lock order, as everywhere: build, then jobs by id, then agents. The sweeps take
//! every lock with `SKIP LOCKED` (a busy row waits for the next sweep); a request
//! (manual retry, a failing finish that retries) waits in that order.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::propagate;
use crate::views::{JobView, JOB_COLUMNS};
use herald_domain::retry::{counts_after, retry_rule, RetryPolicy, EXIT_LOST, EXIT_TIMED_OUT};
use herald_domain::{BuildState, EventType, JobState};
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// One job to end.
#[derive(Debug, Clone)]
pub struct End {
    pub id: Uuid,
    /// The state the job must still be in; otherwise it is left as it is.
    pub from: String,
    /// `failed` or `canceled`.
    pub to: JobState,
    pub exit_status: i32,
    pub timed_out: bool,
    /// Herald ends it, not its agent.
    pub herald_ended: bool,
    /// The agent still holds it and must be told to stop (heartbeat `cancel`).
    pub stop_pending: bool,
}

/// What [`end_jobs`] did.
#[derive(Debug, Default)]
pub struct Ended {
    /// The jobs that ended, as they are now.
    pub jobs: Vec<JobView>,
    /// The automatic retries created for some of them (state `scheduled`).
    pub retries: Vec<JobView>,
}

/// Ends jobs whose builds and rows the caller has locked, creates the automatic
/// retries their rules ask for, and writes `job.finished` then `job.scheduled`, all
/// in the caller's transaction. Sends no `NOTIFY`.
pub async fn end_jobs(conn: &mut PgConnection, ends: &[End]) -> Result<Ended, StorageError> {
    if ends.is_empty() {
        return Ok(Ended::default());
    }
    let ids: Vec<Uuid> = ends.iter().map(|e| e.id).collect();
    let rows = sqlx::query("SELECT id, retry_rules, retry_counts FROM jobs WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
    let mut plans: HashMap<Uuid, (Uuid, Vec<i32>)> = HashMap::new();
    for r in &rows {
        let id: Uuid = r.try_get("id")?;
        let rules: serde_json::Value = r.try_get("retry_rules")?;
        let counts: Vec<i32> = r.try_get("retry_counts")?;
        let rules = RetryPolicy::rules_from_json(&rules);
        let Some(end) = ends.iter().find(|e| e.id == id) else {
            continue;
        };
        if end.to != JobState::Failed {
            continue;
        }
        if let Some(rule) = retry_rule(&rules, &counts, end.exit_status) {
            plans.insert(id, (Uuid::now_v7(), counts_after(&rules, &counts, rule)));
        }
    }
    let ended: Vec<JobView> = sqlx::query_as(&format!(
        "UPDATE jobs AS j SET state = v.st, exit_status = v.code, finished_at = now(), \
             updated_at = now(), timed_out = v.tmo, herald_ended = v.he, stop_pending = v.sp, \
             retried_by = v.retry \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bool[], $6::bool[], \
                     $7::bool[], $8::uuid[]) AS v(id, from_st, st, code, tmo, he, sp, retry) \
         WHERE j.id = v.id AND j.state = v.from_st \
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(&ids)
    .bind(ends.iter().map(|e| e.from.clone()).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.to.as_str()).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.exit_status).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.timed_out).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.herald_ended).collect::<Vec<_>>())
    .bind(ends.iter().map(|e| e.stop_pending).collect::<Vec<_>>())
    .bind(
        ends.iter()
            .map(|e| plans.get(&e.id).map(|p| p.0))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut ended = ended;
    ended.sort_by_key(|j| j.id);
    let (mut olds, mut news, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for j in &ended {
        if let Some((new_id, c)) = plans.get(&j.id) {
            olds.push(j.id);
            news.push(*new_id);
            counts.push(serde_json::json!(c));
        }
    }
    let retries = insert_retries(conn, &olds, &news, &counts, JobState::Scheduled).await?;
    write_events(conn, &ended, &retries).await?;
    Ok(Ended {
        jobs: ended,
        retries,
    })
}

/// Inserts the retries of `olds` (ids `news`, rule counts `counts`) in `state`.
async fn insert_retries(
    conn: &mut PgConnection,
    olds: &[Uuid],
    news: &[Uuid],
    counts: &[serde_json::Value],
    state: JobState,
) -> Result<Vec<JobView>, StorageError> {
    if olds.is_empty() {
        return Ok(Vec::new());
    }
    let mut retries: Vec<JobView> = sqlx::query_as(&format!(
        "INSERT INTO jobs AS j (id, build_id, org_id, position, key, command, queue, priority, \
             label, env, depends_on, state, scheduled_at, attempt, retry_of, timeout_s, \
             retry_rules, retry_counts, retry_manual) \
         SELECT v.new_id, o.build_id, o.org_id, o.position, o.key, o.command, o.queue, o.priority, \
             o.label, o.env, o.depends_on, $4, \
             CASE WHEN $4 = 'scheduled' THEN clock_timestamp() END, o.attempt + 1, o.id, \
             o.timeout_s, o.retry_rules, \
             ARRAY(SELECT jsonb_array_elements_text(v.counts)::int), o.retry_manual \
         FROM unnest($1::uuid[], $2::uuid[], $3::jsonb[]) AS v(old_id, new_id, counts) \
         JOIN jobs o ON o.id = v.old_id \
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(olds)
    .bind(news)
    .bind(counts)
    .bind(state.as_str())
    .fetch_all(&mut *conn)
    .await?;
    retries.sort_by_key(|j| j.id);
    Ok(retries)
}

async fn write_events(
    conn: &mut PgConnection,
    ended: &[JobView],
    retries: &[JobView],
) -> Result<(), StorageError> {
    if ended.is_empty() {
        return Ok(());
    }
    let mut build_ids: Vec<Uuid> = ended.iter().map(|j| j.build_id).collect();
    build_ids.sort_unstable();
    build_ids.dedup();
    let builds = events::load_builds(conn, &build_ids).await?;
    let mut evs = Vec::with_capacity(ended.len() + retries.len());
    for (event_type, jobs) in [
        (EventType::JobFinished, ended),
        (EventType::JobScheduled, retries),
    ] {
        for j in jobs {
            if let Some(b) = builds.get(&j.build_id) {
                evs.push(NewEvent::job(event_type, b, j));
            }
        }
    }
    events::insert_quiet(conn, evs).await?;
    Ok(())
}

/// Locks, in the global order and skipping whatever another transaction holds, the
/// builds of `candidates` (job, build), then those jobs that still satisfy `still`
/// (SQL over `jobs`), in id order. Returns the locked jobs with their states.
pub(crate) async fn lock_for_sweep(
    conn: &mut PgConnection,
    candidates: &[(Uuid, Uuid)],
    still: &str,
    skip_locked: bool,
) -> Result<Vec<(Uuid, String)>, StorageError> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let skip = if skip_locked { "SKIP LOCKED" } else { "" };
    let mut build_ids: Vec<Uuid> = candidates.iter().map(|c| c.1).collect();
    build_ids.sort_unstable();
    build_ids.dedup();
    let locked_builds: Vec<Uuid> = sqlx::query_scalar(&format!(
        "SELECT id FROM builds WHERE id = ANY($1) ORDER BY id FOR UPDATE {skip}"
    ))
    .bind(&build_ids)
    .fetch_all(&mut *conn)
    .await?;
    let job_ids: Vec<Uuid> = candidates
        .iter()
        .filter(|c| locked_builds.contains(&c.1))
        .map(|c| c.0)
        .collect();
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT id, state FROM jobs WHERE id = ANY($1) AND ({still}) ORDER BY id FOR UPDATE {skip}"
    ))
    .bind(&job_ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("state")?)))
        .collect()
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Swept {
    pub ended: usize,
    pub retried: usize,
}

/// Jobs `accepted` or `running` past their deadline (`accepted_at + timeout_s`) fail
/// with -2 and `timed_out`; their agents find them in their heartbeats' cancel lists.
/// At most `batch` per call.
pub async fn sweep_timeouts(conn: &mut PgConnection, batch: i64) -> Result<Swept, StorageError> {
    const STILL: &str = "state IN ('accepted', 'running') AND deadline_at < now()";
    let candidates: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
        "SELECT id, build_id FROM jobs WHERE {STILL} ORDER BY deadline_at LIMIT $1"
    ))
    .bind(batch)
    .fetch_all(&mut *conn)
    .await?;
    let locked = lock_for_sweep(conn, &candidates, STILL, true).await?;
    let ends: Vec<End> = locked
        .into_iter()
        .map(|(id, from)| End {
            id,
            from,
            to: JobState::Failed,
            exit_status: EXIT_TIMED_OUT,
            timed_out: true,
            herald_ended: true,
            stop_pending: true,
        })
        .collect();
    finish_sweep(conn, &ends).await
}

/// Jobs still `canceling` `grace_s` after the cancel become `canceled` with -1.
pub async fn sweep_cancel_grace(
    conn: &mut PgConnection,
    grace_s: f64,
    batch: i64,
) -> Result<Swept, StorageError> {
    const STILL: &str = "state = 'canceling' AND canceling_at < now() - make_interval(secs => $2)";
    let candidates: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT id, build_id FROM jobs WHERE state = 'canceling' \
           AND canceling_at < now() - make_interval(secs => $1) ORDER BY canceling_at LIMIT $2",
    )
    .bind(grace_s)
    .bind(batch)
    .fetch_all(&mut *conn)
    .await?;
    // The recheck binds the grace as $2, after the ids.
    let still = STILL.replace("$2", &format!("{grace_s}::float8"));
    let locked = lock_for_sweep(conn, &candidates, &still, true).await?;
    let ends: Vec<End> = locked
        .into_iter()
        .map(|(id, from)| End {
            id,
            from,
            to: JobState::Canceled,
            exit_status: EXIT_LOST,
            timed_out: false,
            herald_ended: true,
            stop_pending: true,
        })
        .collect();
    finish_sweep(conn, &ends).await
}

async fn finish_sweep(conn: &mut PgConnection, ends: &[End]) -> Result<Swept, StorageError> {
    let ended = end_jobs(conn, ends).await?;
    if !ended.jobs.is_empty() {
        // Rare paths: in-transaction notifications are fine here.
        events::notify(conn, crate::channels::OUTBOX, "").await?;
        events::notify(conn, crate::channels::CANCEL, "").await?;
        // Their agents are free, and retries are runnable.
        events::notify(conn, crate::channels::DISPATCH, "").await?;
    }
    Ok(Swept {
        ended: ended.jobs.len(),
        retried: ended.retries.len(),
    })
}

/// Every (agent, job) that the agent must stop: `canceling`, or ended by Herald
/// while the agent held it and not finished by the agent since. One scan of a small
/// partial index, whatever the number of agents.
pub async fn jobs_to_stop(conn: &mut PgConnection) -> Result<Vec<(Uuid, Uuid)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT agent_id, id FROM jobs \
         WHERE (state = 'canceling' OR stop_pending) AND agent_id IS NOT NULL",
    )
    .fetch_all(conn)
    .await?)
}

/// The agent finished a job Herald had already ended: it no longer needs telling.
/// Returns whether anything changed.
pub async fn stopped(
    conn: &mut PgConnection,
    agent_id: Uuid,
    job_id: Uuid,
) -> Result<bool, StorageError> {
    Ok(sqlx::query(
        "UPDATE jobs SET stop_pending = false WHERE id = $1 AND agent_id = $2 AND stop_pending",
    )
    .bind(job_id)
    .bind(agent_id)
    .execute(conn)
    .await?
    .rows_affected()
        > 0)
}

/// The result of a manual retry.
#[derive(Debug)]
pub struct Retried {
    pub job: JobView,
    /// Jobs became runnable: wake the dispatcher.
    pub scheduled: bool,
}

/// `POST /v1/jobs/{id}/retry`, in the caller's transaction: a new attempt of a
/// `failed` or `canceled` job that nothing retried yet and whose rules allow it. A
/// finished build runs again; dependents skipped because of the job wait again.
/// Locks the build, then the jobs it changes in id order.
pub async fn retry_job(
    conn: &mut PgConnection,
    org_id: Uuid,
    job_id: Uuid,
) -> Result<Retried, StorageError> {
    let build_id: Uuid =
        sqlx::query_scalar("SELECT build_id FROM jobs WHERE id = $1 AND org_id = $2")
            .bind(job_id)
            .bind(org_id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StorageError::NotFound("job"))?;
    let row = sqlx::query(
        "SELECT state, cancel_requested_at IS NOT NULL AS canceled FROM builds WHERE id = $1 FOR UPDATE",
    )
    .bind(build_id)
    .fetch_one(&mut *conn)
    .await?;
    let build_state: String = row.try_get("state")?;
    let build_state: BuildState = build_state.parse().map_err(StorageError::Conflict)?;
    let cancel_requested: bool = row.try_get("canceled")?;
    if cancel_requested && !build_state.is_terminal() {
        return Err(StorageError::Conflict(
            "the build is being canceled; retry once it has finished".into(),
        ));
    }
    // Terminal jobs change only under the build's lock, which this holds.
    let jobs: Vec<JobView> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE j.build_id = $1 AND j.retried_by IS NULL"
    ))
    .bind(build_id)
    .fetch_all(&mut *conn)
    .await?;
    let Some(job) = jobs.iter().find(|j| j.id == job_id) else {
        return Err(StorageError::Conflict("the job was retried already".into()));
    };
    let reopen = skipped_because_of(&jobs, &job.key)?;
    let mut lock: Vec<Uuid> = reopen.iter().copied().chain([job_id]).collect();
    lock.sort_unstable();
    let locked = sqlx::query(
        "SELECT id, state, retried_by, retry_manual, retry_counts FROM jobs \
         WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&lock)
    .fetch_all(&mut *conn)
    .await?;
    let me = locked
        .iter()
        .find(|r| r.try_get::<Uuid, _>("id").ok() == Some(job_id))
        .ok_or(StorageError::NotFound("job"))?;
    let state: String = me.try_get("state")?;
    let retried_by: Option<Uuid> = me.try_get("retried_by")?;
    let manual: bool = me.try_get("retry_manual")?;
    let counts: Vec<i32> = me.try_get("retry_counts")?;
    if state != "failed" && state != "canceled" {
        return Err(StorageError::Conflict(format!(
            "only a failed or canceled job can be retried; this one is {state}"
        )));
    }
    if retried_by.is_some() {
        return Err(StorageError::Conflict("the job was retried already".into()));
    }
    if !manual {
        return Err(StorageError::Conflict(
            "the job's retry.manual is false".into(),
        ));
    }
    let new_id = Uuid::now_v7();
    // Waiting: propagation below schedules it once its dependencies passed.
    let inserted = insert_retries(
        conn,
        &[job_id],
        &[new_id],
        &[serde_json::json!(counts)],
        JobState::Waiting,
    )
    .await?;
    if inserted.is_empty() {
        return Err(StorageError::NotFound("job"));
    }
    sqlx::query("UPDATE jobs SET retried_by = $2, updated_at = now() WHERE id = $1")
        .bind(job_id)
        .bind(new_id)
        .execute(&mut *conn)
        .await?;
    if !reopen.is_empty() {
        sqlx::query(
            "UPDATE jobs SET state = 'waiting', finished_at = NULL, updated_at = now() \
             WHERE id = ANY($1) AND state = 'skipped'",
        )
        .bind(&reopen)
        .execute(&mut *conn)
        .await?;
    }
    if build_state.is_terminal() {
        propagate::reopen_build(conn, build_id, build_state).await?;
    }
    let scheduled = match propagate::propagate_build(conn, build_id).await? {
        propagate::Propagation::Done { scheduled, .. } => scheduled > 0,
        propagate::Propagation::Busy => false,
    };
    let job: JobView = sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1"))
        .bind(new_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Retried { job, scheduled })
}

/// The newest jobs that are `skipped` and depend, directly or through other skipped
/// jobs, on `key`.
fn skipped_because_of(jobs: &[JobView], key: &str) -> Result<Vec<Uuid>, StorageError> {
    let mut deps: HashMap<&str, Vec<String>> = HashMap::new();
    for j in jobs {
        let d: Vec<String> = serde_json::from_value(j.depends_on.clone()).map_err(|e| {
            StorageError::Conflict(format!("job {} has unreadable depends_on: {e}", j.id))
        })?;
        deps.insert(j.key.as_str(), d);
    }
    let mut blocked: HashSet<String> = HashSet::from([key.to_owned()]);
    let mut out = Vec::new();
    loop {
        let mut grew = false;
        for j in jobs {
            if j.state != JobState::Skipped.as_str() || blocked.contains(&j.key) {
                continue;
            }
            let hit = deps
                .get(j.key.as_str())
                .is_some_and(|d| d.iter().any(|k| blocked.contains(k)));
            if hit {
                blocked.insert(j.key.clone());
                out.push(j.id);
                grew = true;
            }
        }
        if !grew {
            return Ok(out);
        }
    }
}

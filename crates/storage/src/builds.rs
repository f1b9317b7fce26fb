//! Builds: creation with their job graph, reads, and cancellation.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::views::{BuildView, JobView, BUILD_COLUMNS, JOB_COLUMNS};
use crate::{channels, propagate};
use herald_domain::{
    derive_build_state, BuildState, CommitSha, EventType, JobAction, JobSpec, JobState,
};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

#[derive(Clone)]
pub struct NewBuild {
    pub commit: CommitSha,
    pub branch: herald_domain::Branch,
    pub message: Option<String>,
    pub jobs: Vec<JobSpec>,
    /// `timeout_s` of jobs that name none (`jobs.default_timeout_s`).
    pub default_timeout_s: i32,
}

/// Creates a build, its jobs and their edges, and the events, in the caller's
/// transaction. Jobs without dependencies are runnable at once. Sends no `NOTIFY`: the
/// caller wakes `herald_outbox` and `herald_dispatch` after commit.
pub async fn create_build(
    conn: &mut PgConnection,
    org_id: Uuid,
    pipeline_slug: &str,
    new: NewBuild,
) -> Result<BuildView, StorageError> {
    // Numbers come from the pipeline row: the first lock in the global order.
    let row = sqlx::query(
        "UPDATE pipelines SET next_build_number = next_build_number + 1 \
         WHERE org_id = $1 AND slug = $2 \
         RETURNING id, next_build_number - 1 AS number, slug, repository",
    )
    .bind(org_id)
    .bind(pipeline_slug)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("pipeline"))?;
    let pipeline_id: Uuid = row.try_get("id")?;
    let number: i32 = row.try_get("number")?;
    let slug: String = row.try_get("slug")?;
    let repository: String = row.try_get("repository")?;
    let build_id = Uuid::now_v7();
    let mut build: BuildView = sqlx::query_as(
        "INSERT INTO builds AS b (id, org_id, pipeline_id, number, state, commit_sha, branch, message) \
         VALUES ($1, $2, $3, $4, 'scheduled', $5, $6, $7) \
         RETURNING b.id, b.org_id, b.number, b.state, b.commit_sha, b.branch, b.message, \
                   $8::text AS pipeline, $9::text AS repository, b.created_at, b.started_at, \
                   b.finished_at, b.cancel_requested_at IS NOT NULL AS canceled, b.finish_count AS attempt",
    )
    .bind(build_id)
    .bind(org_id)
    .bind(pipeline_id)
    .bind(number)
    .bind(new.commit.as_str())
    .bind(new.branch.as_str())
    .bind(&new.message)
    .bind(&slug)
    .bind(&repository)
    .fetch_one(&mut *conn)
    .await?;

    let n = new.jobs.len();
    let job_ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let mut positions = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut commands = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut envs = Vec::with_capacity(n);
    let mut deps_json = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut retry_rules = Vec::with_capacity(n);
    let mut retry_manual = Vec::with_capacity(n);
    let mut edge_from = Vec::new();
    let mut edge_to = Vec::new();
    for (i, spec) in new.jobs.iter().enumerate() {
        positions.push(i32::try_from(i).unwrap_or(i32::MAX));
        keys.push(spec.key.as_str().to_owned());
        commands.push(spec.command.clone());
        queues.push(spec.queue.as_str().to_owned());
        priorities.push(spec.priority);
        labels.push(spec.label.clone());
        envs.push(serde_json::to_value(&spec.env).unwrap_or_default());
        timeouts.push(spec.timeout_s.unwrap_or(new.default_timeout_s));
        retry_rules.push(spec.retry.rules_json());
        retry_manual.push(spec.retry.manual);
        let dep_keys: Vec<&str> = spec
            .depends_on
            .iter()
            .map(|&d| new.jobs[d].key.as_str())
            .collect();
        deps_json.push(serde_json::json!(dep_keys));
        states.push(if spec.depends_on.is_empty() {
            JobState::Scheduled.as_str()
        } else {
            JobState::Waiting.as_str()
        });
        for &d in &spec.depends_on {
            edge_from.push(job_ids[i]);
            edge_to.push(job_ids[d]);
        }
    }
    // Jobs and their edges in one statement (the edges' foreign keys are checked at its
    // end): a job is runnable from `scheduled_at`, so every round trip between that and
    // the commit would count as dispatch latency.
    let mut jobs: Vec<JobView> = sqlx::query_as(&format!(
        "WITH ins AS ( \
             INSERT INTO jobs AS j (id, build_id, org_id, position, key, command, queue, priority, label, env, \
                               depends_on, state, scheduled_at, timeout_s, retry_rules, retry_manual) \
             SELECT id, $2, $3, pos, key, cmd, q, prio, label, env, deps, st, \
                    CASE WHEN st = 'scheduled' THEN clock_timestamp() END, tmo, rules, manual \
             FROM unnest($1::uuid[], $4::int[], $5::text[], $6::text[], $7::text[], $8::int[], \
                         $9::text[], $10::jsonb[], $11::jsonb[], $12::text[], $15::int[], \
                         $16::jsonb[], $17::bool[]) \
                  AS t(id, pos, key, cmd, q, prio, label, env, deps, st, tmo, rules, manual) \
             RETURNING {JOB_COLUMNS}), \
         edges AS ( \
             INSERT INTO job_dependencies (job_id, depends_on_id) \
             SELECT * FROM unnest($13::uuid[], $14::uuid[])) \
         SELECT * FROM ins"
    ))
    .bind(&job_ids)
    .bind(build_id)
    .bind(org_id)
    .bind(&positions)
    .bind(&keys)
    .bind(&commands)
    .bind(&queues)
    .bind(&priorities)
    .bind(&labels)
    .bind(&envs)
    .bind(&deps_json)
    .bind(&states)
    .bind(&edge_from)
    .bind(&edge_to)
    .bind(&timeouts)
    .bind(&retry_rules)
    .bind(&retry_manual)
    .fetch_all(&mut *conn)
    .await?;
    let order: std::collections::HashMap<Uuid, usize> =
        job_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    jobs.sort_by_key(|j| order.get(&j.id).copied().unwrap_or(usize::MAX));

    let mut evs = vec![NewEvent::build(EventType::BuildScheduled, &build)];
    evs.extend(
        jobs.iter()
            .filter(|j| j.state == JobState::Scheduled.as_str())
            .map(|j| NewEvent::job(EventType::JobScheduled, &build, j)),
    );
    // The caller wakes the relay and the dispatcher after commit (`wake`).
    events::insert_quiet(conn, evs).await?;
    build.jobs = Some(jobs);
    Ok(build)
}

/// A build with its jobs, as this connection sees it.
pub async fn get_build_on(
    conn: &mut PgConnection,
    org_id: Uuid,
    build_id: Uuid,
) -> Result<BuildView, StorageError> {
    let mut build: BuildView = sqlx::query_as(&format!(
        "SELECT {BUILD_COLUMNS} FROM builds b JOIN pipelines p ON p.id = b.pipeline_id \
         WHERE b.id = $1 AND b.org_id = $2"
    ))
    .bind(build_id)
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("build"))?;
    let jobs: Vec<JobView> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE j.build_id = $1 ORDER BY j.position, j.attempt"
    ))
    .bind(build_id)
    .fetch_all(conn)
    .await?;
    build.jobs = Some(jobs);
    Ok(build)
}

#[derive(Debug, Default)]
pub struct BuildFilter {
    pub pipeline: Option<String>,
    pub state: Option<BuildState>,
    pub branch: Option<String>,
    /// Keyset cursor: the id of the last build of the previous page.
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// Newest first; `limit + 1` rows are read so the caller knows if there is a next page.
pub async fn list_builds(
    conn: &mut PgConnection,
    org_id: Uuid,
    f: &BuildFilter,
) -> Result<Vec<BuildView>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {BUILD_COLUMNS} FROM builds b JOIN pipelines p ON p.id = b.pipeline_id \
         WHERE b.org_id = $1 \
           AND ($2::text IS NULL OR p.slug = $2) \
           AND ($3::text IS NULL OR b.state = $3) \
           AND ($4::text IS NULL OR b.branch = $4) \
           AND ($5::uuid IS NULL OR b.id < $5) \
         ORDER BY b.id DESC LIMIT $6"
    ))
    .bind(org_id)
    .bind(&f.pipeline)
    .bind(f.state.map(|s| s.as_str()))
    .bind(&f.branch)
    .bind(f.before)
    .bind(f.limit + 1)
    .fetch_all(conn)
    .await?)
}

/// Cancels a build: jobs not yet running become `canceled`, running ones `canceling`
/// until their agent finishes them. Repeating it is harmless.
pub async fn cancel_build(
    conn: &mut PgConnection,
    org_id: Uuid,
    build_id: Uuid,
) -> Result<BuildView, StorageError> {
    let row = sqlx::query("SELECT state FROM builds WHERE id = $1 AND org_id = $2 FOR UPDATE")
        .bind(build_id)
        .bind(org_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StorageError::NotFound("build"))?;
    let state: String = row.try_get("state")?;
    let state: BuildState = state.parse().map_err(StorageError::Conflict)?;
    if state.is_terminal() {
        return get_build_on(conn, org_id, build_id).await;
    }
    sqlx::query(
        "UPDATE builds SET cancel_requested_at = now(), updated_at = now() \
         WHERE id = $1 AND cancel_requested_at IS NULL",
    )
    .bind(build_id)
    .execute(&mut *conn)
    .await?;
    let jobs = sqlx::query(
        "SELECT id, state FROM jobs WHERE build_id = $1 \
         AND state NOT IN ('passed', 'failed', 'canceled', 'skipped', 'canceling') \
         ORDER BY id FOR UPDATE",
    )
    .bind(build_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut canceled = Vec::new();
    let mut canceling = Vec::new();
    for r in &jobs {
        let id: Uuid = r.try_get("id")?;
        let s: String = r.try_get("state")?;
        let s: JobState = s.parse().map_err(StorageError::Conflict)?;
        match s.transition(JobAction::Cancel)? {
            JobState::Canceled => canceled.push(id),
            _ => canceling.push(id),
        }
    }
    sqlx::query(
        "UPDATE jobs SET state = 'canceled', finished_at = now(), updated_at = now() \
         WHERE id = ANY($1) AND state IS DISTINCT FROM 'canceled'",
    )
    .bind(&canceled)
    .execute(&mut *conn)
    .await?;
    // The agents learn it from their heartbeats' cancel lists (`herald_cancel`).
    sqlx::query(
        "UPDATE jobs SET state = 'canceling', canceling_at = now(), updated_at = now() \
         WHERE id = ANY($1) AND state IS DISTINCT FROM 'canceling'",
    )
    .bind(&canceling)
    .execute(&mut *conn)
    .await?;
    events::emit_for_jobs(conn, EventType::JobFinished, &canceled).await?;
    events::emit_for_jobs(conn, EventType::JobCanceling, &canceling).await?;
    if !canceling.is_empty() {
        events::notify(conn, channels::CANCEL, "").await?;
    }
    // Only the newest attempt of each key counts.
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE build_id = $1 AND retried_by IS NULL")
            .bind(build_id)
            .fetch_all(&mut *conn)
            .await?;
    let states = states.iter().filter_map(|s| s.parse::<JobState>().ok());
    let next = derive_build_state(state, true, states);
    propagate::set_build_state(conn, build_id, state, next).await?;
    if !canceled.is_empty() {
        // Canceled assignments free their agents.
        events::notify(conn, channels::DISPATCH, "").await?;
    }
    get_build_on(conn, org_id, build_id).await
}

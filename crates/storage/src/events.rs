//! Writing events into the outbox, inside the caller's transaction.

use crate::channels;
use crate::views::{AgentView, BuildView, JobView, BUILD_COLUMNS, JOB_COLUMNS};
use chrono::Utc;
use herald_domain::EventType;
use serde_json::json;
use sqlx::PgConnection;
use std::collections::HashMap;
use uuid::Uuid;

/// One event to write.
pub struct NewEvent {
    pub event_type: EventType,
    pub org_id: Uuid,
    pub build_id: Option<Uuid>,
    pub data: serde_json::Value,
}

impl NewEvent {
    /// `build.finished` also carries `attempt`: how many times the build has finished.
    pub fn build(event_type: EventType, build: &BuildView) -> Self {
        let data = if event_type == EventType::BuildFinished {
            json!({ "build": build, "attempt": build.attempt })
        } else {
            json!({ "build": build })
        };
        NewEvent {
            event_type,
            org_id: build.org_id,
            build_id: Some(build.id),
            data,
        }
    }

    pub fn job(event_type: EventType, build: &BuildView, job: &JobView) -> Self {
        NewEvent {
            event_type,
            org_id: build.org_id,
            build_id: Some(build.id),
            data: json!({ "build": build, "job": job }),
        }
    }

    pub fn agent(event_type: EventType, agent: &AgentView) -> Self {
        NewEvent {
            event_type,
            org_id: agent.org_id,
            build_id: None,
            data: json!({ "agent": agent }),
        }
    }
}

/// Inserts the events and wakes the relay when the transaction commits (an in-transaction
/// `NOTIFY`).
/// For rare paths; the hot path uses [`insert_quiet`] and a [`crate::wake::Waker`].
pub async fn insert(conn: &mut PgConnection, events: Vec<NewEvent>) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    insert_quiet(conn, events).await?;
    notify(conn, channels::OUTBOX, "").await
}

/// Inserts the events without `NOTIFY`: the caller wakes the relay after commit.
pub async fn insert_quiet(
    conn: &mut PgConnection,
    events: Vec<NewEvent>,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let rows = outbox_rows(events);
    rows.bind_to(sqlx::query(
        "INSERT INTO outbox (event_id, event_type, org_id, build_id, payload, traceparent) \
         SELECT u.*, $6::text FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::jsonb[]) u",
    ))
    .bind(rows.trace.as_deref())
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// Events as the columns of `outbox`, for a statement that inserts them itself.
pub(crate) struct OutboxRows {
    pub ids: Vec<Uuid>,
    pub types: Vec<String>,
    pub orgs: Vec<Uuid>,
    pub builds: Vec<Option<Uuid>>,
    pub payloads: Vec<serde_json::Value>,
    /// The caller's `traceparent`, one for all (they share the caller's span); None
    /// when the process exports no traces.
    pub trace: Option<String>,
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl OutboxRows {
    /// Binds the five columns, in this order, as the statement's next parameters
    /// (`trace` is the caller's to bind, where its statement writes it).
    pub(crate) fn bind_to<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.ids)
            .bind(&self.types)
            .bind(&self.orgs)
            .bind(&self.builds)
            .bind(&self.payloads)
    }
}

pub(crate) fn outbox_rows(events: Vec<NewEvent>) -> OutboxRows {
    let now = Utc::now();
    let mut r = OutboxRows {
        ids: Vec::with_capacity(events.len()),
        types: Vec::with_capacity(events.len()),
        orgs: Vec::with_capacity(events.len()),
        builds: Vec::with_capacity(events.len()),
        payloads: Vec::with_capacity(events.len()),
        trace: herald_trace::current(),
    };
    for e in events {
        let id = Uuid::now_v7();
        r.payloads.push(json!({
            "id": id,
            "type": e.event_type.as_str(),
            "timestamp": now,
            "org_id": e.org_id,
            "data": e.data,
        }));
        r.ids.push(id);
        r.types.push(e.event_type.as_str().to_owned());
        r.orgs.push(e.org_id);
        r.builds.push(e.build_id);
    }
    r
}

pub async fn notify(
    conn: &mut PgConnection,
    channel: &str,
    payload: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn load_builds(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, BuildView>, sqlx::Error> {
    let rows: Vec<BuildView> = sqlx::query_as(&format!(
        "SELECT {BUILD_COLUMNS} FROM builds b JOIN pipelines p ON p.id = b.pipeline_id WHERE b.id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|b| (b.id, b)).collect())
}

pub async fn load_jobs(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<JobView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ANY($1) ORDER BY j.id"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Emits one event of `event_type` per job, each carrying the job and its build as
/// they are now (inside the caller's transaction).
pub async fn emit_for_jobs(
    conn: &mut PgConnection,
    event_type: EventType,
    job_ids: &[Uuid],
) -> Result<Vec<JobView>, sqlx::Error> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let jobs = load_jobs(conn, job_ids).await?;
    let events = job_events(conn, event_type, &jobs).await?;
    insert(conn, events).await?;
    Ok(jobs)
}

/// Like [`emit_for_jobs`] for jobs the caller already holds (from `RETURNING`), on the
/// hot path: no `NOTIFY`, the caller wakes the relay after commit.
pub async fn emit_jobs(
    conn: &mut PgConnection,
    event_type: EventType,
    jobs: &[JobView],
) -> Result<(), sqlx::Error> {
    let events = job_events(conn, event_type, jobs).await?;
    insert_quiet(conn, events).await
}

async fn job_events(
    conn: &mut PgConnection,
    event_type: EventType,
    jobs: &[JobView],
) -> Result<Vec<NewEvent>, sqlx::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut build_ids: Vec<Uuid> = jobs.iter().map(|j| j.build_id).collect();
    build_ids.sort_unstable();
    build_ids.dedup();
    let builds = load_builds(conn, &build_ids).await?;
    Ok(jobs
        .iter()
        .filter_map(|j| {
            builds
                .get(&j.build_id)
                .map(|b| NewEvent::job(event_type, b, j))
        })
        .collect())
}

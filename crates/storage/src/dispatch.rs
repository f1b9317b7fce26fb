//! Assigning runnable jobs to free agents. Several dispatchers may run at once: every
//! row is taken with `SKIP LOCKED`, so they never wait on each other, and a unique
//! index makes "one job per agent" a database fact.

use crate::events;
use crate::{channels, error::StorageError};
use chrono::{DateTime, Utc};
use herald_domain::EventType;
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Assignment {
    pub job_id: Uuid,
    pub agent_id: Uuid,
    pub scheduled_at: Option<DateTime<Utc>>,
}

struct FreeAgent {
    id: Uuid,
    org_id: Uuid,
    queues: Vec<String>,
}

struct Candidate {
    id: Uuid,
    org_id: Uuid,
    queue: String,
    priority: i32,
    scheduled_at: Option<DateTime<Utc>>,
}

/// One round of assignment, in the caller's transaction. Returns what it assigned;
/// the caller commits, then loops while this returns a full batch.
pub async fn assign_round(
    conn: &mut PgConnection,
    max_agents: i64,
) -> Result<Vec<Assignment>, StorageError> {
    let agent_rows = sqlx::query(
        "SELECT a.id, a.org_id, a.queues FROM agents a \
         WHERE a.state = 'connected' \
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.agent_id = a.id \
                           AND j.state IN ('assigned', 'accepted', 'running', 'canceling')) \
         ORDER BY a.last_assigned_at NULLS FIRST, a.id \
         LIMIT $1 FOR UPDATE OF a SKIP LOCKED",
    )
    .bind(max_agents)
    .fetch_all(&mut *conn)
    .await?;
    if agent_rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut agents = Vec::with_capacity(agent_rows.len());
    for r in &agent_rows {
        agents.push(FreeAgent {
            id: r.try_get("id")?,
            org_id: r.try_get("org_id")?,
            queues: r.try_get("queues")?,
        });
    }
    // How many jobs each (org, queue) could take at most.
    let mut wanted: HashMap<(Uuid, &str), i64> = HashMap::new();
    for a in &agents {
        for q in &a.queues {
            *wanted.entry((a.org_id, q.as_str())).or_default() += 1;
        }
    }
    let (mut orgs, mut queues, mut limits) = (Vec::new(), Vec::new(), Vec::new());
    for ((org, queue), n) in &wanted {
        orgs.push(*org);
        queues.push(queue.to_string());
        limits.push(*n);
    }
    let job_rows = sqlx::query(
        "SELECT j.id, j.org_id, j.queue, j.priority, j.scheduled_at \
         FROM unnest($1::uuid[], $2::text[], $3::bigint[]) AS q(org_id, queue, lim) \
         CROSS JOIN LATERAL ( \
             SELECT id, org_id, queue, priority, scheduled_at FROM jobs \
             WHERE state = 'scheduled' AND org_id = q.org_id AND queue = q.queue \
             ORDER BY priority DESC, scheduled_at, id \
             LIMIT q.lim FOR UPDATE SKIP LOCKED) j",
    )
    .bind(&orgs)
    .bind(&queues)
    .bind(&limits)
    .fetch_all(&mut *conn)
    .await?;
    let mut candidates = Vec::with_capacity(job_rows.len());
    for r in &job_rows {
        candidates.push(Candidate {
            id: r.try_get("id")?,
            org_id: r.try_get("org_id")?,
            queue: r.try_get("queue")?,
            priority: r.try_get("priority")?,
            scheduled_at: r.try_get("scheduled_at")?,
        });
    }
    // Highest priority first, then oldest; a job locked twice through two queues of the
    // same agent set appears once.
    candidates.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.scheduled_at.cmp(&b.scheduled_at))
            .then(a.id.cmp(&b.id))
    });
    candidates.dedup_by_key(|c| c.id);
    let mut taken = vec![false; agents.len()];
    let mut out = Vec::new();
    for job in candidates {
        let pick = agents.iter().enumerate().position(|(i, a)| {
            !taken[i] && a.org_id == job.org_id && a.queues.contains(&job.queue)
        });
        if let Some(i) = pick {
            taken[i] = true;
            out.push(Assignment {
                job_id: job.id,
                agent_id: agents[i].id,
                scheduled_at: job.scheduled_at,
            });
        }
    }
    if out.is_empty() {
        return Ok(out);
    }
    let job_ids: Vec<Uuid> = out.iter().map(|a| a.job_id).collect();
    let agent_ids: Vec<Uuid> = out.iter().map(|a| a.agent_id).collect();
    sqlx::query(
        "UPDATE jobs SET state = 'assigned', agent_id = v.agent_id, assigned_at = now(), updated_at = now() \
         FROM unnest($1::uuid[], $2::uuid[]) v(job_id, agent_id) \
         WHERE jobs.id = v.job_id AND jobs.state = 'scheduled'",
    )
    .bind(&job_ids)
    .bind(&agent_ids)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE agents SET last_assigned_at = now() WHERE id = ANY($1)")
        .bind(&agent_ids)
        .execute(&mut *conn)
        .await?;
    events::emit_for_jobs(conn, EventType::JobAssigned, &job_ids).await?;
    sqlx::query(
        "SELECT pg_notify($3, a::text || ' ' || j::text) FROM unnest($1::uuid[], $2::uuid[]) v(a, j)",
    )
    .bind(&agent_ids)
    .bind(&job_ids)
    .bind(channels::ASSIGNED)
    .execute(&mut *conn)
    .await?;
    Ok(out)
}

/// Jobs currently assigned but not accepted, for a process that (re)starts listening
/// and must not miss assignments made while it was not.
pub async fn pending_assignments(
    conn: &mut PgConnection,
) -> Result<Vec<(Uuid, Uuid)>, StorageError> {
    let rows = sqlx::query(
        "SELECT agent_id, id FROM jobs WHERE state = 'assigned' AND agent_id IS NOT NULL",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("agent_id")?, r.try_get("id")?)))
        .collect()
}

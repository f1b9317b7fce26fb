//! Agents: registration, authentication, heartbeats, and what happens to their jobs
//! when they go away.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::views::{AgentView, AGENT_COLUMNS};
use crate::{channels, lifecycle, tokens};
use chrono::{DateTime, Utc};
use herald_domain::retry::EXIT_LOST;
use herald_domain::{AgentState, EventType, JobState, QueueName};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct AgentAuth {
    pub id: Uuid,
    pub org_id: Uuid,
    pub state: AgentState,
}

pub async fn register(
    conn: &mut PgConnection,
    org_id: Uuid,
    name: &str,
    queues: &[QueueName],
) -> Result<(AgentView, String), StorageError> {
    let token = tokens::generate(tokens::AGENT_ACCESS_PREFIX);
    let queues: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
    let agent: AgentView = sqlx::query_as(&format!(
        "INSERT INTO agents AS a (id, org_id, name, queues, state, token_hash) \
         VALUES ($1, $2, $3, $4, 'connected', $5) RETURNING {AGENT_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(org_id)
    .bind(name)
    .bind(&queues)
    .bind(tokens::hash(&token))
    .fetch_one(&mut *conn)
    .await?;
    events::insert(
        conn,
        vec![NewEvent::agent(EventType::AgentConnected, &agent)],
    )
    .await?;
    events::notify(conn, channels::DISPATCH, "").await?;
    Ok((agent, token))
}

/// The current auth facts of the agents `ids`, in one query; agents that no longer
/// exist are absent.
pub async fn auth_by_ids(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<AgentAuth>, StorageError> {
    let rows = sqlx::query("SELECT id, org_id, state FROM agents WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| {
            let state: String = row.try_get("state")?;
            Ok(AgentAuth {
                id: row.try_get("id")?,
                org_id: row.try_get("org_id")?,
                state: state.parse().map_err(StorageError::Conflict)?,
            })
        })
        .collect()
}

pub async fn auth(conn: &mut PgConnection, token: &str) -> Result<Option<AgentAuth>, StorageError> {
    let row = sqlx::query("SELECT id, org_id, state FROM agents WHERE token_hash = $1")
        .bind(tokens::hash(token))
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let state: String = row.try_get("state")?;
    Ok(Some(AgentAuth {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        state: state.parse().map_err(StorageError::Conflict)?,
    }))
}

/// Records many heartbeats in one statement. Only moves timestamps forward, and only
/// by at least `min_advance`, so a repeated or late flush writes nothing and a busy
/// agent's row is not rewritten at every flush.
pub async fn record_heartbeats(
    conn: &mut PgConnection,
    beats: &[(Uuid, DateTime<Utc>)],
    min_advance: std::time::Duration,
) -> Result<u64, StorageError> {
    if beats.is_empty() {
        return Ok(0);
    }
    let (ids, at): (Vec<Uuid>, Vec<DateTime<Utc>>) = beats.iter().copied().unzip();
    Ok(sqlx::query(
        "UPDATE agents SET last_heartbeat_at = v.at \
         FROM unnest($1::uuid[], $2::timestamptz[]) v(id, at) \
         WHERE agents.id = v.id AND agents.state = 'connected' \
           AND agents.last_heartbeat_at < v.at - make_interval(secs => $3)",
    )
    .bind(&ids)
    .bind(&at)
    .bind(min_advance.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected())
}

pub async fn disconnect(conn: &mut PgConnection, agent_id: Uuid) -> Result<(), StorageError> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_optional(&mut *conn)
        .await?;
    match state.as_deref() {
        None => Err(StorageError::NotFound("agent")),
        Some("disconnected") => Ok(()),
        Some(_) => release(conn, &[agent_id], AgentState::Disconnected, None)
            .await
            .map(|_| ()),
    }
}

/// Agents without a heartbeat for `lost_after_s` become `lost`. Batched, skipping
/// agents (and their jobs' builds and jobs) that another transaction holds. Returns how
/// many were lost.
pub async fn sweep_lost(conn: &mut PgConnection, lost_after_s: f64) -> Result<usize, StorageError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM agents WHERE state = 'connected' \
           AND last_heartbeat_at < now() - make_interval(secs => $1) \
         ORDER BY id LIMIT 200",
    )
    .bind(lost_after_s)
    .fetch_all(&mut *conn)
    .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    release(conn, &ids, AgentState::Lost, Some(lost_after_s)).await
}

/// Marks agents lost (`lost_after_s` set: only those still without a heartbeat, and
/// skipping locked rows) or disconnected (waiting for locks), and settles their jobs:
/// an assignment goes back to the queue, accepted or running jobs fail with exit
/// status -1 (and may retry automatically), canceling jobs become canceled. Locks in
/// the global order: the builds of their jobs, the jobs by id, then the agents.
/// Returns how many agents changed.
async fn release(
    conn: &mut PgConnection,
    candidates: &[Uuid],
    to: AgentState,
    lost_after_s: Option<f64>,
) -> Result<usize, StorageError> {
    let skip_locked = lost_after_s.is_some();
    let held: Vec<(Uuid, Uuid, Uuid)> = sqlx::query_as(
        "SELECT id, build_id, agent_id FROM jobs WHERE agent_id = ANY($1) \
           AND state IN ('assigned', 'accepted', 'running', 'canceling')",
    )
    .bind(candidates)
    .fetch_all(&mut *conn)
    .await?;
    let pairs: Vec<(Uuid, Uuid)> = held.iter().map(|h| (h.0, h.1)).collect();
    let locked = lifecycle::lock_for_sweep(
        conn,
        &pairs,
        "state IN ('assigned', 'accepted', 'running', 'canceling')",
        skip_locked,
    )
    .await?;
    // An agent whose job could not be locked waits for the next sweep.
    let agent_ids: Vec<Uuid> = candidates
        .iter()
        .copied()
        .filter(|a| {
            held.iter()
                .filter(|h| h.2 == *a)
                .all(|h| locked.iter().any(|l| l.0 == h.0))
        })
        .collect();
    let column = if to == AgentState::Lost {
        "lost_at"
    } else {
        "disconnected_at"
    };
    let agents: Vec<AgentView> = sqlx::query_as(&format!(
        "WITH l AS ( \
             SELECT id FROM agents WHERE id = ANY($1) AND state IS DISTINCT FROM $2 \
               AND ($3::float8 IS NULL OR (state = 'connected' \
                    AND last_heartbeat_at < now() - make_interval(secs => $3))) \
             ORDER BY id FOR UPDATE {}) \
         UPDATE agents a SET state = $2, {column} = now(), updated_at = now() \
         FROM l WHERE a.id = l.id RETURNING {AGENT_COLUMNS}",
        if skip_locked { "SKIP LOCKED" } else { "" }
    ))
    .bind(&agent_ids)
    .bind(to.as_str())
    .bind(lost_after_s)
    .fetch_all(&mut *conn)
    .await?;
    if agents.is_empty() {
        return Ok(0);
    }
    let released: Vec<Uuid> = agents.iter().map(|a| a.id).collect();
    let requeued: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs SET state = 'scheduled', agent_id = NULL, assigned_at = NULL, updated_at = now() \
         WHERE agent_id = ANY($1) AND state = 'assigned' RETURNING id",
    )
    .bind(&released)
    .fetch_all(&mut *conn)
    .await?;
    let ends: Vec<lifecycle::End> = held
        .iter()
        .filter(|h| released.contains(&h.2))
        .filter_map(|h| locked.iter().find(|l| l.0 == h.0))
        .filter(|l| l.1 != "assigned")
        .map(|(id, from)| lifecycle::End {
            id: *id,
            from: from.clone(),
            to: if from == "canceling" {
                JobState::Canceled
            } else {
                JobState::Failed
            },
            exit_status: EXIT_LOST,
            timed_out: false,
            herald_ended: true,
            // The agent is gone: nobody will read its cancel list.
            stop_pending: false,
        })
        .collect();
    let ended = lifecycle::end_jobs(conn, &ends).await?;
    sqlx::query("UPDATE jobs SET stop_pending = false WHERE agent_id = ANY($1) AND stop_pending")
        .bind(&released)
        .execute(&mut *conn)
        .await?;
    let event_type = if to == AgentState::Lost {
        EventType::AgentLost
    } else {
        EventType::AgentDisconnected
    };
    events::insert(
        conn,
        agents
            .iter()
            .map(|a| NewEvent::agent(event_type, a))
            .collect(),
    )
    .await?;
    events::emit_for_jobs(conn, EventType::JobScheduled, &requeued).await?;
    for a in &agents {
        events::notify(conn, channels::AGENT_GONE, &a.id.to_string()).await?;
    }
    if !requeued.is_empty() || !ended.retries.is_empty() {
        events::notify(conn, channels::DISPATCH, "").await?;
    }
    Ok(agents.len())
}

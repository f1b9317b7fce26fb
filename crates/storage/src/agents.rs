//! Agents: registration, authentication, heartbeats, and what happens to their jobs
//! when they go away.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use crate::views::{AgentView, AGENT_COLUMNS};
use crate::{channels, tokens};
use chrono::{DateTime, Utc};
use herald_domain::{AgentState, EventType, QueueName};
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
    let locked: Option<String> =
        sqlx::query_scalar("SELECT state FROM agents WHERE id = $1 FOR UPDATE")
            .bind(agent_id)
            .fetch_optional(&mut *conn)
            .await?;
    match locked.as_deref() {
        None => Err(StorageError::NotFound("agent")),
        Some("disconnected") => Ok(()),
        Some(_) => release(conn, &[agent_id], AgentState::Disconnected).await,
    }
}

/// Agents without a heartbeat for `lost_after_s` become `lost`. Batched, skipping
/// agents another transaction holds. Returns how many were lost.
pub async fn sweep_lost(conn: &mut PgConnection, lost_after_s: f64) -> Result<usize, StorageError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM agents WHERE state = 'connected' \
           AND last_heartbeat_at < now() - make_interval(secs => $1) \
         ORDER BY id LIMIT 200 FOR UPDATE SKIP LOCKED",
    )
    .bind(lost_after_s)
    .fetch_all(&mut *conn)
    .await?;
    if !ids.is_empty() {
        release(conn, &ids, AgentState::Lost).await?;
    }
    Ok(ids.len())
}

/// Marks locked agents lost or disconnected and settles their jobs: an assignment goes
/// back to the queue, accepted or running jobs fail with exit status -1, canceling
/// jobs become canceled.
async fn release(
    conn: &mut PgConnection,
    agent_ids: &[Uuid],
    to: AgentState,
) -> Result<(), StorageError> {
    let column = if to == AgentState::Lost {
        "lost_at"
    } else {
        "disconnected_at"
    };
    let agents: Vec<AgentView> = sqlx::query_as(&format!(
        "UPDATE agents a SET state = $2, {column} = now(), updated_at = now() \
         WHERE a.id = ANY($1) AND a.state IS DISTINCT FROM $2 RETURNING {AGENT_COLUMNS}"
    ))
    .bind(agent_ids)
    .bind(to.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let requeued: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs SET state = 'scheduled', agent_id = NULL, assigned_at = NULL, updated_at = now() \
         WHERE agent_id = ANY($1) AND state = 'assigned' RETURNING id",
    )
    .bind(agent_ids)
    .fetch_all(&mut *conn)
    .await?;
    let failed: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs SET state = CASE WHEN state = 'canceling' THEN 'canceled' ELSE 'failed' END, \
                exit_status = -1, finished_at = now(), updated_at = now() \
         WHERE agent_id = ANY($1) AND state IN ('accepted', 'running', 'canceling') RETURNING id",
    )
    .bind(agent_ids)
    .fetch_all(&mut *conn)
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
    events::emit_for_jobs(conn, EventType::JobFinished, &failed).await?;
    for a in &agents {
        events::notify(conn, channels::AGENT_GONE, &a.id.to_string()).await?;
    }
    if !requeued.is_empty() {
        events::notify(conn, channels::DISPATCH, "").await?;
    }
    Ok(())
}

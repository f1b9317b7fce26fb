use crate::error::ApiError;
use crate::extract::{parse_id, Agent, ApiJson, Registration};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use herald_domain::QueueName;
use herald_storage::jobs::{self, AgentCall};
use herald_storage::views::JobView;
use herald_storage::{channels, StorageError};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgent {
    name: String,
    #[serde(default = "default_queues")]
    queues: Vec<String>,
}

fn default_queues() -> Vec<String> {
    vec!["default".into()]
}

#[utoipa::path(
    post,
    path = "/v1/agents/register",
    operation_id = "registerAgent", request_body = RegisterAgent,
    tag = "agents"
)]
pub async fn register(
    State(state): State<AppState>,
    Registration(org): Registration,
    ApiJson(body): ApiJson<RegisterAgent>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 255 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name: must be 1-255 characters without control characters",
        ));
    }
    if body.queues.is_empty() || body.queues.len() > 32 {
        return Err(ApiError::invalid("queues: must list 1 to 32 queues"));
    }
    let queues = body
        .queues
        .iter()
        .map(|q| QueueName::parse("queues[]", q))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tx = state.router.primary().begin().await?;
    let (agent, token) = herald_storage::agents::register(&mut tx, org, name, &queues).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": agent.id,
            "name": agent.name,
            "queues": agent.queues,
            "state": agent.state,
            "access_token": token,
            "heartbeat_interval_s": state.settings.heartbeat_interval_s,
            "ping_wait_max_s": state.settings.ping_wait_max_s,
        })),
    ))
}

fn ping_job(job: &JobView) -> serde_json::Value {
    json!({"job": {
        "id": job.id,
        "build_id": job.build_id,
        "key": job.key,
        "label": job.label,
        "command": job.command,
        "queue": job.queue,
        "priority": job.priority,
        "state": job.state,
        "env": job.env,
        "scheduled_at": job.scheduled_at,
        "assigned_at": job.assigned_at,
        "attempt": job.attempt,
        "retry_of": job.retry_of,
        "retried_by": job.retried_by,
        "timed_out": job.timed_out,
        "exit_status": job.exit_status,
        "timeout_s": job.timeout_s,
    }})
}

/// The long poll. Returns the agent's assigned job as soon as there is one, or 204
/// after `wait` seconds. While parked it costs no database query: it waits on an
/// in-memory mailbox that the assignment listener fills.
#[utoipa::path(post, path = "/v1/agent/ping", operation_id = "ping", tag = "agents")]
pub async fn ping(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let max = state.settings.ping_wait_max_s;
    let wait = match q.get("wait") {
        None => max.min(20),
        Some(w) => match w.parse::<u64>() {
            Ok(w) if w <= max => w,
            _ => {
                return Err(ApiError::invalid(format!(
                    "wait must be an integer from 0 to {max}"
                )))
            }
        },
    };
    state.heartbeats.record(agent.id);
    let mut mailbox = state.parked.subscribe(agent.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let answer = |job: &JobView| {
        if let Some(at) = job.scheduled_at {
            let latency = (Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!("herald_dispatch_latency_seconds").record(latency);
        }
        Ok((StatusCode::OK, Json(ping_job(job))).into_response())
    };
    loop {
        let current = mailbox.borrow_and_update().clone();
        if let Some(mail) = current {
            // Assigned by this process a moment ago: the job as committed came along.
            if let Some(job) = mail.fresh_job(agent.id) {
                return answer(job);
            }
            let mut conn = state.router.primary().acquire().await?;
            match jobs::job_for_agent(&mut conn, agent.id, mail.job).await {
                Ok(job) if job.state == "assigned" => return answer(&job),
                Ok(_) | Err(StorageError::NotFound(_)) => state.parked.clear(agent.id, mail.job),
                Err(e) => return Err(e.into()),
            }
        }
        tokio::select! {
            changed = mailbox.changed() => {
                if changed.is_err() {
                    // The agent was forgotten (lost or disconnected).
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            // Shutting down: the agent pings the next process.
            _ = state.stopping.cancelled() => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    }
}

/// Buffered (see `heartbeat`); `cancel` comes from the process's in-memory cancel
/// list (see `stops`), so an idle agent's heartbeat costs no query.
#[utoipa::path(
    post,
    path = "/v1/agent/heartbeat",
    operation_id = "heartbeat",
    tag = "agents"
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    Agent(agent): Agent,
) -> Json<serde_json::Value> {
    let at = state.heartbeats.record(agent.id);
    let cancel = state
        .stops
        .for_agent(state.router.primary(), agent.id)
        .await;
    Json(json!({"received_at": at, "cancel": cancel}))
}

#[utoipa::path(
    post,
    path = "/v1/agent/disconnect",
    operation_id = "disconnect",
    tag = "agents"
)]
pub async fn disconnect(
    State(state): State<AppState>,
    Agent(agent): Agent,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.router.primary().begin().await?;
    herald_storage::agents::disconnect(&mut tx, agent.id).await?;
    tx.commit().await?;
    state.cache.forget_agent(agent.id);
    state.parked.forget(agent.id);
    Ok(StatusCode::NO_CONTENT)
}

async fn call(
    state: &AppState,
    agent: Uuid,
    id: &str,
    call: AgentCall,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(id, "job")?;
    let mut conn = state.router.primary().acquire().await?;
    let applied = jobs::apply_call(&mut conn, agent, id, call).await?;
    drop(conn);
    if applied.wrote_events {
        state.wake(&[channels::OUTBOX]);
    }
    if applied.freed_agent {
        state.wake(&[channels::AGENT_FREE]);
    }
    if applied.scheduled {
        state.wake(&[channels::DISPATCH]);
        metrics::counter!("herald_jobs_retried_total", "by" => "rule").increment(1);
    }
    if applied.stopped {
        state.wake(&[channels::CANCEL]);
    }
    if matches!(call, AgentCall::Accept) {
        state.parked.clear(agent, id);
    }
    state.router.note_write().await;
    Ok(Json(applied.job))
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{id}/accept",
    operation_id = "acceptJob",
    tag = "agents"
)]
pub async fn accept(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    call(&state, agent.id, &id, AgentCall::Accept).await
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{id}/start",
    operation_id = "startJob",
    tag = "agents"
)]
pub async fn start(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    call(&state, agent.id, &id, AgentCall::Start).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Finish {
    exit_status: i32,
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{id}/finish",
    operation_id = "finishJob", request_body = Finish,
    tag = "agents"
)]
pub async fn finish(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Finish>,
) -> Result<Json<JobView>, ApiError> {
    call(
        &state,
        agent.id,
        &id,
        AgentCall::Finish {
            exit_status: body.exit_status,
        },
    )
    .await
}

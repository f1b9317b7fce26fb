//! `GET /v1/jobs/{id}` (org token, or the access token of the agent holding the job)
//! and `POST /v1/jobs/{id}/retry` (org token).

use crate::error::ApiError;
use crate::extract::{parse_id, Agent, Org};
use crate::AppState;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use herald_storage::views::{JobView, JOB_COLUMNS};
use herald_storage::{channels, jobs, lifecycle, tokens, StorageError};
use sqlx::PgConnection;
use uuid::Uuid;

/// Who reads a job: an org by its API token, or an agent by its access token.
pub enum Reader {
    Org(Uuid),
    Agent(Uuid),
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let agent_token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(_, t)| t.trim().starts_with(tokens::AGENT_ACCESS_PREFIX));
        if agent_token {
            let Agent(a) = Agent::from_request_parts(parts, state).await?;
            Ok(Reader::Agent(a.id))
        } else {
            let Org(org) = Org::from_request_parts(parts, state).await?;
            Ok(Reader::Org(org))
        }
    }
}

async fn org_job(conn: &mut PgConnection, org: Uuid, id: Uuid) -> Result<JobView, StorageError> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 AND j.org_id = $2"
    ))
    .bind(id)
    .bind(org)
    .fetch_optional(conn)
    .await?
    .ok_or(StorageError::NotFound("job"))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", operation_id = "getJob", tag = "builds")]
pub async fn get(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&id, "job")?;
    let job = match reader {
        Reader::Org(org) => read_or_primary!(state, |conn| org_job(conn, org, id))?,
        // The agent acts on what it reads (a cancel): the primary has the truth.
        Reader::Agent(agent) => {
            let mut conn = state.router.primary().acquire().await?;
            jobs::job_for_agent(&mut conn, agent, id).await?
        }
    };
    Ok(Json(job))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    operation_id = "retryJob",
    tag = "builds"
)]
pub async fn retry(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = parse_id(&id, "job")?;
    let mut tx = state.router.primary().begin().await?;
    let retried = lifecycle::retry_job(&mut tx, org, id).await?;
    tx.commit().await?;
    if retried.scheduled {
        state.wake(&[channels::OUTBOX, channels::DISPATCH]);
    } else {
        state.wake(&[channels::OUTBOX]);
    }
    state.router.note_write().await;
    metrics::counter!("herald_jobs_retried_total", "by" => "manual").increment(1);
    Ok((StatusCode::CREATED, Json(retried.job)))
}

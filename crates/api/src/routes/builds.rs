use super::{list_response, page};
use crate::error::ApiError;
use crate::extract::{parse_id, Org};
use crate::{idempotency, AppState};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_domain::{validate_jobs, Branch, BuildState, CommitSha, RawJob};
use herald_storage::builds::{self, BuildFilter, NewBuild};
use herald_storage::channels;
use herald_storage::idempotency::{self as store, Claim};
use herald_storage::views::BuildView;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBuild {
    commit: String,
    #[serde(default = "default_branch")]
    branch: String,
    #[serde(default)]
    message: Option<String>,
    jobs: Vec<RawJob>,
}

fn default_branch() -> String {
    "main".into()
}

/// With an `Idempotency-Key`, the key is claimed in the transaction that creates the
/// build (see `crate::idempotency`).
pub async fn create(
    State(state): State<AppState>,
    Org(org): Org,
    Path(slug): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers)?;
    let body: CreateBuild = idempotency::parse(&state, raw.clone()).await?;
    let commit = CommitSha::parse(&body.commit)?;
    let branch = Branch::parse(&body.branch)?;
    if body.message.as_ref().is_some_and(|m| m.len() > 10_000) {
        return Err(ApiError::invalid("message: must be at most 10000 bytes"));
    }
    let jobs = validate_jobs(body.jobs)?;
    let mut tx = state.router.primary().begin().await?;
    if let Some(key) = &key {
        let hash = idempotency::fingerprint(&format!("POST /v1/pipelines/{slug}/builds"), &raw);
        match store::claim(&mut tx, org, key, &hash).await? {
            Claim::New => {}
            other => {
                tx.rollback().await?;
                return idempotency::answer(other);
            }
        }
    }
    let build = builds::create_build(
        &mut tx,
        org,
        &slug,
        NewBuild {
            commit,
            branch,
            message: body.message,
            jobs,
            default_timeout_s: state.settings.default_job_timeout_s,
        },
    )
    .await?;
    if let Some(key) = &key {
        let body = serde_json::to_value(&build).map_err(|e| ApiError::Internal(e.to_string()))?;
        store::store(&mut tx, org, key, StatusCode::CREATED.as_u16(), &body).await?;
    }
    tx.commit().await?;
    state.wake(&[channels::OUTBOX, channels::DISPATCH]);
    state.router.note_write().await;
    metrics::counter!("herald_builds_created_total").increment(1);
    Ok((StatusCode::CREATED, Json(build)).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, ApiError> {
    let id = parse_id(&id, "build")?;
    // Not on the replica yet, or the replica failed: the primary has the truth.
    let build = read_or_primary!(state, |conn| builds::get_build_on(conn, org, id))?;
    Ok(Json(build))
}

pub async fn list(
    State(state): State<AppState>,
    Org(org): Org,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = page(&q)?;
    let filter = BuildFilter {
        pipeline: q.get("pipeline").cloned(),
        state: match q.get("state") {
            None => None,
            Some(s) => Some(s.parse::<BuildState>().map_err(ApiError::invalid)?),
        },
        branch: q.get("branch").cloned(),
        before: p.before,
        limit: p.limit,
    };
    let rows = read_or_primary!(state, |conn| builds::list_builds(conn, org, &filter))?;
    Ok(Json(list_response(rows, p.limit, |b| b.id)))
}

pub async fn cancel(
    State(state): State<AppState>,
    Org(org): Org,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, ApiError> {
    let id = parse_id(&id, "build")?;
    let mut tx = state.router.primary().begin().await?;
    let build = builds::cancel_build(&mut tx, org, id).await?;
    tx.commit().await?;
    state.router.note_write().await;
    Ok(Json(build))
}

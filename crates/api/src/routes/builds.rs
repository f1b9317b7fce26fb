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
use herald_domain::input::MAX_MESSAGE_CHARS;
use herald_domain::{text, validate_jobs, Branch, BuildState, CommitSha, RawJob, Slug};
use herald_storage::builds::{self, BuildFilter, NewBuild};
use herald_storage::channels;
use herald_storage::idempotency::{self as store, Claim};
use herald_storage::views::BuildView;
use herald_storage::StorageError;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize, utoipa::ToSchema)]
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
#[utoipa::path(
    post,
    path = "/v1/pipelines/{slug}/builds",
    operation_id = "createBuild", request_body = CreateBuild,
    tag = "builds"
)]
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
    if let Some(m) = &body.message {
        text("message", m, MAX_MESSAGE_CHARS)?;
    }
    let jobs = validate_jobs(body.jobs)?;
    let slug = super::path_slug(&slug)?;
    let new = NewBuild {
        commit,
        branch,
        message: body.message,
        jobs,
        default_timeout_s: state.settings.default_job_timeout_s,
    };
    let idem = key.map(|k| {
        let hash = idempotency::fingerprint(&format!("POST /v1/pipelines/{slug}/builds"), &raw);
        (k, hash)
    });
    let created = match create_once(&state, org, &slug, new.clone(), idem.as_ref(), false).await? {
        Ok(created) => created,
        // Nothing was committed: once more, on a connection that answers.
        Err(e) => {
            tracing::warn!(error = %e, "creating a build failed before commit; retrying once");
            create_once(&state, org, &slug, new, idem.as_ref(), true).await??
        }
    };
    let build = match created {
        Created::Build(build) => *build,
        Created::Answered(claim) => return idempotency::answer(claim),
    };
    state.wake(&[channels::OUTBOX, channels::DISPATCH]);
    state.router.note_write().await;
    metrics::counter!("herald_builds_created_total").increment(1);
    Ok((StatusCode::CREATED, Json(build)).into_response())
}

/// What one attempt at creating a build came to.
enum Created {
    Build(Box<BuildView>),
    /// The `Idempotency-Key` was seen before: its answer, and nothing created.
    Answered(Claim),
}

/// One attempt at creating a build, claiming its `Idempotency-Key` (if any) in the
/// same transaction. `Ok(Err(e))`: a connection error before the commit, so nothing
/// was written and a retry is safe. A failed commit is not retried: it may have taken
/// effect.
async fn create_once(
    state: &AppState,
    org: uuid::Uuid,
    slug: &str,
    new: NewBuild,
    idem: Option<&(String, Vec<u8>)>,
    fresh: bool,
) -> Result<Result<Created, StorageError>, ApiError> {
    let acquired = if fresh {
        herald_storage::live_connection(state.router.primary()).await
    } else {
        state.router.primary().acquire().await
    };
    let mut conn = match acquired {
        Ok(c) => c,
        Err(e) => return retryable(e.into()),
    };
    let attempt = async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if let Some((key, hash)) = idem {
            match store::claim(&mut tx, org, key, hash).await? {
                Claim::New => {}
                other => {
                    tx.rollback().await?;
                    return Ok::<_, StorageError>((Created::Answered(other), None));
                }
            }
        }
        let build = builds::create_build(&mut tx, org, slug, new).await?;
        if let Some((key, _)) = idem {
            let body = serde_json::to_value(&build)
                .map_err(|e| StorageError::Database(sqlx::Error::Encode(Box::new(e))))?;
            store::store(&mut tx, org, key, StatusCode::CREATED.as_u16(), &body).await?;
        }
        Ok((Created::Build(Box::new(build)), Some(tx)))
    };
    let result = attempt.await;
    match result {
        Ok((created, tx)) => {
            if let Some(tx) = tx {
                tx.commit().await?;
            }
            Ok(Ok(created))
        }
        Err(e) => retryable(e),
    }
}

fn retryable<T>(e: StorageError) -> Result<Result<T, StorageError>, ApiError> {
    if e.is_unavailable() {
        Ok(Err(e))
    } else {
        Err(e.into())
    }
}

#[utoipa::path(
    get,
    path = "/v1/builds/{id}",
    operation_id = "getBuild",
    tag = "builds"
)]
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

#[utoipa::path(get, path = "/v1/builds", operation_id = "listBuilds", tag = "builds")]
pub async fn list(
    State(state): State<AppState>,
    Org(org): Org,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = page(&q)?;
    // An empty filter is no filter; one no build can match (not a slug, a control
    // character) answers an empty page without asking the database.
    let pipeline = q.get("pipeline").filter(|v| !v.is_empty());
    let branch = q.get("branch").filter(|v| !v.is_empty());
    let impossible = pipeline.is_some_and(|v| Slug::parse("pipeline", v).is_err())
        || branch.is_some_and(|v| Branch::parse(v).is_err());
    let filter = BuildFilter {
        pipeline: pipeline.cloned(),
        state: match q.get("state") {
            None => None,
            Some(s) => Some(s.parse::<BuildState>().map_err(ApiError::invalid)?),
        },
        branch: branch.cloned(),
        before: p.before,
        limit: p.limit,
    };
    if impossible {
        return Ok(Json(list_response(Vec::<BuildView>::new(), p.limit, |b| {
            b.id
        })));
    }
    let rows = read_or_primary!(state, |conn| builds::list_builds(conn, org, &filter))?;
    Ok(Json(list_response(rows, p.limit, |b| b.id)))
}

#[utoipa::path(
    post,
    path = "/v1/builds/{id}/cancel",
    operation_id = "cancelBuild",
    tag = "builds"
)]
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

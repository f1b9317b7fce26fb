use crate::error::ApiError;
use crate::extract::{Admin, ApiJson, Org};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use herald_domain::{parse_repository, Slug};
use herald_storage::orgs;
use serde::Deserialize;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    slug: String,
}

#[utoipa::path(post, path = "/v1/orgs", operation_id = "createOrg", request_body = CreateOrg, tag = "operator")]
pub async fn create_org(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(body): ApiJson<CreateOrg>,
) -> Result<(StatusCode, Json<orgs::CreatedOrg>), ApiError> {
    let slug = Slug::parse("slug", &body.slug)?;
    let mut conn = state.router.primary().acquire().await?;
    let org = orgs::create_org(&mut conn, &slug).await?;
    drop(conn);
    state.router.note_write().await;
    Ok((StatusCode::CREATED, Json(org)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePipeline {
    slug: String,
    repository: String,
}

#[utoipa::path(
    post,
    path = "/v1/pipelines",
    operation_id = "createPipeline", request_body = CreatePipeline,
    tag = "pipelines"
)]
pub async fn create_pipeline(
    State(state): State<AppState>,
    Org(org): Org,
    ApiJson(body): ApiJson<CreatePipeline>,
) -> Result<(StatusCode, Json<herald_storage::views::PipelineView>), ApiError> {
    let slug = Slug::parse("slug", &body.slug)?;
    let repository = parse_repository(&body.repository)?;
    let mut conn = state.router.primary().acquire().await?;
    let p = orgs::create_pipeline(&mut conn, org, &slug, &repository).await?;
    drop(conn);
    state.router.note_write().await;
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(
    get,
    path = "/v1/pipelines/{slug}",
    operation_id = "getPipeline",
    tag = "pipelines"
)]
pub async fn get_pipeline(
    State(state): State<AppState>,
    Org(org): Org,
    Path(slug): Path<String>,
) -> Result<Json<herald_storage::views::PipelineView>, ApiError> {
    let slug = super::path_slug(&slug)?;
    let pipeline = read_or_primary!(state, |conn| orgs::get_pipeline(conn, org, &slug))?;
    Ok(Json(pipeline))
}

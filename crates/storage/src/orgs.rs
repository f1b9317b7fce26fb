//! Orgs, their tokens, and pipelines.

use crate::error::StorageError;
use crate::tokens;
use crate::views::PipelineView;
use herald_domain::Slug;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

#[derive(Debug, Serialize)]
pub struct CreatedOrg {
    pub id: Uuid,
    pub slug: String,
    pub api_token: String,
    pub agent_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Api,
    AgentRegistration,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Api => "api",
            TokenKind::AgentRegistration => "agent_registration",
        }
    }
}

pub async fn create_org(conn: &mut PgConnection, slug: &Slug) -> Result<CreatedOrg, StorageError> {
    let id = Uuid::now_v7();
    let api_token = tokens::generate(tokens::API_PREFIX);
    let agent_token = tokens::generate(tokens::AGENT_REGISTRATION_PREFIX);
    let res = sqlx::query(
        "WITH o AS (INSERT INTO orgs (id, slug) VALUES ($1, $2) RETURNING id) \
         INSERT INTO org_tokens (token_hash, org_id, kind) \
         SELECT h, o.id, k FROM o, unnest($3::bytea[], $4::text[]) t(h, k)",
    )
    .bind(id)
    .bind(slug.as_str())
    .bind(vec![tokens::hash(&api_token), tokens::hash(&agent_token)])
    .bind(vec![
        TokenKind::Api.as_str(),
        TokenKind::AgentRegistration.as_str(),
    ])
    .execute(conn)
    .await;
    match res {
        Ok(_) => Ok(CreatedOrg {
            id,
            slug: slug.to_string(),
            api_token,
            agent_token,
        }),
        Err(e) if StorageError::is_unique_violation(&e) => Err(StorageError::Conflict(format!(
            "an org with slug `{slug}` already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

pub async fn org_for_token(
    conn: &mut PgConnection,
    token: &str,
    kind: TokenKind,
) -> Result<Option<Uuid>, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT org_id FROM org_tokens WHERE token_hash = $1 AND kind = $2")
            .bind(tokens::hash(token))
            .bind(kind.as_str())
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn create_pipeline(
    conn: &mut PgConnection,
    org_id: Uuid,
    slug: &Slug,
    repository: &str,
) -> Result<PipelineView, StorageError> {
    let res = sqlx::query(
        "INSERT INTO pipelines (id, org_id, slug, repository) VALUES ($1, $2, $3, $4) \
         RETURNING id, slug, repository, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(org_id)
    .bind(slug.as_str())
    .bind(repository)
    .fetch_one(conn)
    .await;
    match res {
        Ok(r) => Ok(PipelineView {
            id: r.try_get("id")?,
            slug: r.try_get("slug")?,
            repository: r.try_get("repository")?,
            created_at: r.try_get("created_at")?,
        }),
        Err(e) if StorageError::is_unique_violation(&e) => Err(StorageError::Conflict(format!(
            "a pipeline with slug `{slug}` already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

pub async fn get_pipeline(
    conn: &mut PgConnection,
    org_id: Uuid,
    slug: &str,
) -> Result<PipelineView, StorageError> {
    let r = sqlx::query(
        "SELECT id, slug, repository, created_at FROM pipelines WHERE org_id = $1 AND slug = $2",
    )
    .bind(org_id)
    .bind(slug)
    .fetch_optional(conn)
    .await?
    .ok_or(StorageError::NotFound("pipeline"))?;
    Ok(PipelineView {
        id: r.try_get("id")?,
        slug: r.try_get("slug")?,
        repository: r.try_get("repository")?,
        created_at: r.try_get("created_at")?,
    })
}

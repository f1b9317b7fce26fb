//! Extractors that turn every malformed request into the API's own error body.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use herald_storage::agents::AgentAuth;
use herald_storage::orgs::{self, TokenKind};
use herald_storage::tokens;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// A JSON body: 400 when it is not JSON, 422 when it is JSON of the wrong shape,
/// 413 when it is too large.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(crate::MAX_BODY_BYTES)
            } else {
                ApiError::BadRequest("invalid_body", e.body_text())
            }
        })?;
        from_json_bytes(&bytes).map(ApiJson)
    }
}

/// A JSON body already read: `{}` when empty, 400 when it is not JSON, 422 when it is
/// JSON of the wrong shape.
pub fn from_json_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    // serde reads a struct from an array too (`[null, null]`); every body is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::Unprocessable(
            "invalid_body",
            "request body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Unprocessable("invalid_body", e.to_string()),
        _ => ApiError::BadRequest(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        ),
    })
}

/// Parses a path id; a malformed id names no resource, so it is a 404.
pub fn parse_id(raw: &str, what: &'static str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(what))
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The operator, by the admin token.
pub struct Admin {
    /// A short fingerprint of the token, for audit trails.
    pub fingerprint: String,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        match &state.admin_token {
            Some(admin) if tokens::constant_time_eq(admin, token) => Ok(Admin {
                fingerprint: hex_prefix(token),
            }),
            // 403 only for a token that is valid, for something else; 401 otherwise.
            _ if is_valid_token(state, token).await? => Err(ApiError::Forbidden(
                "this endpoint needs the operator token".into(),
            )),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// Whether `token` is a live org API, agent registration or agent access token.
/// Looked up only when it has one of their prefixes.
async fn is_valid_token(state: &AppState, token: &str) -> Result<bool, ApiError> {
    if state.cache.org(token).is_some() || state.cache.agent(token).is_some() {
        return Ok(true);
    }
    let kind = if token.starts_with(tokens::API_PREFIX) {
        Some(TokenKind::Api)
    } else if token.starts_with(tokens::AGENT_REGISTRATION_PREFIX) {
        Some(TokenKind::AgentRegistration)
    } else if token.starts_with(tokens::AGENT_ACCESS_PREFIX) {
        None
    } else {
        return Ok(false);
    };
    let mut conn = state.router.primary().acquire().await?;
    Ok(match kind {
        Some(kind) => orgs::org_for_token(&mut conn, token, kind).await?.is_some(),
        None => herald_storage::agents::auth(&mut conn, token)
            .await?
            .is_some_and(|a| a.state == herald_domain::AgentState::Connected),
    })
}

fn hex_prefix(token: &str) -> String {
    tokens::hash(token)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An org, by its API token.
pub struct Org(pub Uuid);

impl FromRequestParts<AppState> for Org {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if let Some(org) = state.cache.org(token) {
            return Ok(Org(org));
        }
        let mut conn = state.router.primary().acquire().await?;
        let org = orgs::org_for_token(&mut conn, token, TokenKind::Api)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        state.cache.put_org(token, org);
        Ok(Org(org))
    }
}

/// An org, by its agent registration token.
pub struct Registration(pub Uuid);

impl FromRequestParts<AppState> for Registration {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let mut conn = state.router.primary().acquire().await?;
        orgs::org_for_token(&mut conn, token, TokenKind::AgentRegistration)
            .await?
            .map(Registration)
            .ok_or(ApiError::Unauthorized)
    }
}

/// A connected agent, by its access token. Cached: a parked agent's ping costs the
/// database nothing. The cache entry is dropped when the agent is lost or disconnects.
pub struct Agent(pub AgentAuth);

impl FromRequestParts<AppState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if let Some(agent) = state.cache.agent(token) {
            return Ok(Agent(agent));
        }
        let mut conn = state.router.primary().acquire().await?;
        let agent = herald_storage::agents::auth(&mut conn, token)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if agent.state != herald_domain::AgentState::Connected {
            return Err(ApiError::Unauthorized);
        }
        state.cache.put_agent(token, agent.clone());
        Ok(Agent(agent))
    }
}

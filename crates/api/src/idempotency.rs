//! `Idempotency-Key` on `POST /v1/pipelines/{slug}/builds` and `POST /v1/webhooks`: a
//! repeat with the same key, org and request within 24 h gets the first response and
//! creates nothing; the same key with another request is 422 `idempotency_key_reused`.
//!
//! Builds claim the key in the transaction that creates the build (see
//! `routes::builds::create`), so two requests at once create one build: the second
//! waits on the key's row and then reads the first's response. Webhook creation
//! resolves the URL (a network call) before its transaction, so its claim commits on
//! its own first and a concurrent repeat polls for the stored response.

use crate::error::ApiError;
use crate::extract::{ApiJson, Org};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_storage::idempotency::{self, Claim};
use herald_storage::tokens;
use std::time::Duration;
use uuid::Uuid;

pub const HEADER: &str = "idempotency-key";

/// The header's value: `None` when absent; 422 when not 1-255 printable ASCII.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(HEADER) else {
        return Ok(None);
    };
    let bytes = v.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(ApiError::Unprocessable(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters".into(),
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// What identifies a request: its route and its exact body.
pub fn fingerprint(route: &str, body: &[u8]) -> Vec<u8> {
    tokens::hash(&format!("{route}\n{}", String::from_utf8_lossy(body)))
}

pub fn reused() -> ApiError {
    ApiError::Unprocessable(
        "idempotency_key_reused",
        "this Idempotency-Key was used with another request".into(),
    )
}

fn in_progress() -> ApiError {
    ApiError::Conflict(
        "idempotency_key_in_progress",
        "a request with this Idempotency-Key is still being processed; try again".into(),
    )
}

/// The stored first response.
pub fn replay(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, Json(body)).into_response()
}

/// Maps a claim that is not this request's to its response.
pub fn answer(claim: Claim) -> Result<Response, ApiError> {
    match claim {
        Claim::Replay { status, body } => Ok(replay(status, body)),
        Claim::Reused => Err(reused()),
        Claim::InProgress | Claim::New => Err(in_progress()),
    }
}

/// Parses `body` as the JSON of `T`, with the API's errors. The body was read under
/// the router's `DefaultBodyLimit`; parsing it here applies no second, smaller limit.
pub async fn parse<T: serde::de::DeserializeOwned>(
    _state: &AppState,
    body: Bytes,
) -> Result<T, ApiError> {
    crate::extract::from_json_bytes(&body)
}

/// How long a repeat of a webhook creation waits for the first one's response.
const WAIT: Duration = Duration::from_secs(15);

/// `POST /v1/webhooks` with an optional `Idempotency-Key` around
/// `routes::webhooks::create`.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    operation_id = "createWebhook", request_body = crate::routes::webhooks::CreateWebhook,
    tag = "webhooks"
)]
pub async fn create_webhook(
    State(state): State<AppState>,
    Org(org): Org,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(key) = key(&headers)? else {
        let parsed = parse(&state, body).await?;
        return crate::routes::webhooks::create(State(state), Org(org), ApiJson(parsed))
            .await
            .map(IntoResponse::into_response);
    };
    let parsed = parse(&state, body.clone()).await?;
    let hash = fingerprint("POST /v1/webhooks", &body);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let claim = claim_alone(&state, org, &key, &hash).await?;
        match claim {
            Claim::New => break,
            Claim::InProgress if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return answer(other),
        }
    }
    let result =
        crate::routes::webhooks::create(State(state.clone()), Org(org), ApiJson(parsed)).await;
    let mut conn = state.router.primary().acquire().await?;
    match result {
        Ok((status, Json(v))) => {
            idempotency::store(&mut conn, org, &key, status.as_u16(), &v).await?;
            Ok((status, Json(v)).into_response())
        }
        Err(e) => {
            idempotency::release(&mut conn, org, &key).await?;
            Err(e)
        }
    }
}

async fn claim_alone(
    state: &AppState,
    org: Uuid,
    key: &str,
    hash: &[u8],
) -> Result<Claim, ApiError> {
    let mut conn = state.router.primary().acquire().await?;
    Ok(idempotency::claim(&mut conn, org, key, hash).await?)
}

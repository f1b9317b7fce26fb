/// Runs a read on the pool the router picks (the replica once it has this process's
/// writes) and again on the primary when the replica fails or lacks the row.
/// `read_or_primary!(state, |conn| some_read(conn, ...))` evaluates to the read's
/// `Result<_, StorageError>`; `conn` is a `&mut PgConnection`.
macro_rules! read_or_primary {
    ($state:expr, |$conn:ident| $read:expr) => {{
        let reader = $state.router.reader().await;
        let first = match reader.pool.acquire().await {
            Ok(mut c) => {
                let $conn: &mut sqlx::PgConnection = &mut c;
                $read.await
            }
            Err(e) => Err(herald_storage::StorageError::from(e)),
        };
        match first {
            Err(e) if reader.is_replica => {
                if !matches!(e, herald_storage::StorageError::NotFound(_)) {
                    tracing::warn!(error = %e, "replica read failed; using the primary");
                    $state.router.replica_failed();
                }
                match $state.router.primary().acquire().await {
                    Ok(mut c) => {
                        let $conn: &mut sqlx::PgConnection = &mut c;
                        $read.await
                    }
                    Err(e) => Err(herald_storage::StorageError::from(e)),
                }
            }
            other => other,
        }
    }};
}

pub mod agents;
pub mod builds;
pub mod health;
pub mod jobs;
pub mod ops;
pub mod orgs;
pub mod overview;
pub mod webhook_controls;
pub mod webhooks;

use crate::error::ApiError;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::Engine;
use std::collections::HashMap;
use uuid::Uuid;

/// A pipeline slug from a path: one that cannot be a slug names no pipeline (and never
/// reaches the database, which refuses some bytes).
pub fn path_slug(raw: &str) -> Result<String, ApiError> {
    herald_domain::Slug::parse("pipeline", raw)
        .map(herald_domain::Slug::into_inner)
        .map_err(|_| ApiError::NotFound("pipeline"))
}

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

/// `?limit=` and `?cursor=` of a list call.
pub struct Page {
    pub limit: i64,
    pub before: Option<Uuid>,
}

pub fn page(q: &HashMap<String, String>) -> Result<Page, ApiError> {
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let before = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::BadRequest(
                "invalid_cursor",
                "cursor is not one this API returned".into(),
            )
        })?),
    };
    Ok(Page { limit, before })
}

pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

/// Any 22 characters of the URL-safe alphabet name a position (the spare bits of the
/// last one are ignored), so a cursor the document's pattern allows is never refused.
fn decode_cursor(c: &str) -> Option<Uuid> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
    );
    let bytes = LENIENT.decode(c).ok()?;
    Uuid::from_slice(&bytes).ok()
}

/// The pattern of a cursor, for the OpenAPI document.
pub const CURSOR_PATTERN: &str = "^$|^[A-Za-z0-9_-]{22}$";

/// `{"items": [...], "next_cursor": ...}` from `limit + 1` rows.
pub fn list_response<T: serde::Serialize>(
    mut rows: Vec<T>,
    limit: i64,
    id: impl Fn(&T) -> Uuid,
) -> serde_json::Value {
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = if more {
        rows.last().map(|r| encode_cursor(id(r)))
    } else {
        None
    };
    serde_json::json!({"items": rows, "next_cursor": next})
}

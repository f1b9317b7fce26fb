//! `Idempotency-Key`: the first response to a key, per org, kept for a day. A claim
//! is a row under a primary key: two requests with the same key at once meet on it,
//! and the second waits for the first's transaction and then reads its response.

use crate::error::StorageError;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// How long a key holds its response.
pub const RETENTION_S: f64 = 86_400.0;

#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This request owns the key: do the work, then [`store`] the response.
    New,
    /// The key answered before: return this.
    Replay {
        status: u16,
        body: serde_json::Value,
    },
    /// The key was used with another request.
    Reused,
    /// Another request holds the key and has not answered yet.
    InProgress,
}

/// Claims `key` for a request whose fingerprint is `hash`. Waits for a concurrent
/// claim of the same key to commit or roll back. An expired key, or a claim that
/// never answered within a minute (its process died), is claimed afresh.
pub async fn claim(
    conn: &mut PgConnection,
    org_id: Uuid,
    key: &str,
    hash: &[u8],
) -> Result<Claim, StorageError> {
    let claimed: Option<i32> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys AS k (org_id, key, request_hash) VALUES ($1, $2, $3) \
         ON CONFLICT (org_id, key) DO UPDATE SET request_hash = excluded.request_hash, \
             status = NULL, body = NULL, created_at = now() \
         WHERE k.created_at < now() - make_interval(secs => $4) \
            OR (k.status IS NULL AND k.created_at < now() - interval '60 seconds') \
         RETURNING 1",
    )
    .bind(org_id)
    .bind(key)
    .bind(hash)
    .bind(RETENTION_S)
    .fetch_optional(&mut *conn)
    .await?;
    if claimed.is_some() {
        return Ok(Claim::New);
    }
    let row = sqlx::query(
        "SELECT request_hash, status, body FROM idempotency_keys WHERE org_id = $1 AND key = $2",
    )
    .bind(org_id)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        // Deleted in between (expired): the caller may try again.
        return Ok(Claim::InProgress);
    };
    let stored: Vec<u8> = row.try_get("request_hash")?;
    if stored != hash {
        return Ok(Claim::Reused);
    }
    let status: Option<i32> = row.try_get("status")?;
    let body: Option<serde_json::Value> = row.try_get("body")?;
    Ok(match (status, body) {
        (Some(s), Some(body)) => Claim::Replay {
            status: u16::try_from(s).unwrap_or(200),
            body,
        },
        _ => Claim::InProgress,
    })
}

/// Records the response of the request that claimed `key`.
pub async fn store(
    conn: &mut PgConnection,
    org_id: Uuid,
    key: &str,
    status: u16,
    body: &serde_json::Value,
) -> Result<(), StorageError> {
    sqlx::query(
        "UPDATE idempotency_keys SET status = $3, body = $4 WHERE org_id = $1 AND key = $2",
    )
    .bind(org_id)
    .bind(key)
    .bind(i32::from(status))
    .bind(body)
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives a claim up (the request failed): the key may be used again.
pub async fn release(conn: &mut PgConnection, org_id: Uuid, key: &str) -> Result<(), StorageError> {
    sqlx::query("DELETE FROM idempotency_keys WHERE org_id = $1 AND key = $2 AND status IS NULL")
        .bind(org_id)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes up to `batch` keys older than a day. Returns how many.
pub async fn expire(conn: &mut PgConnection, batch: i64) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE (org_id, key) IN ( \
             SELECT org_id, key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(RETENTION_S)
    .bind(batch)
    .execute(conn)
    .await?
    .rows_affected())
}

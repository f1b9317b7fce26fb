//! The relay's side of the outbox: read unpublished rows in order, mark them published
//! after the broker confirmed them, and expire old rows in small batches.

use crate::error::StorageError;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub build_id: Option<Uuid>,
    pub payload: serde_json::Value,
    /// The writer's W3C `traceparent`, when it exported traces.
    pub traceparent: Option<String>,
    /// The event's build belongs to a pipeline with a GitHub integration (at the time
    /// of the read): commit statuses may follow it.
    pub github: bool,
}

/// Reads the next batch of unpublished rows other than `confirmed` (the broker has
/// them, the outbox does not know yet), and with `mark` also marks those published,
/// in one round trip. Both parts see one snapshot, hence the exclusion by id. Without
/// `mark` the statement writes nothing, so it costs no commit flush.
pub async fn mark_and_fetch(
    conn: &mut PgConnection,
    confirmed: &[i64],
    mark: bool,
    limit: i64,
) -> Result<Vec<OutboxRow>, StorageError> {
    let rows = sqlx::query(
        "WITH marked AS ( \
             UPDATE outbox SET published_at = now() \
             WHERE $2 AND id = ANY($1) AND published_at IS NULL) \
         SELECT o.id, o.event_id, o.event_type, o.build_id, o.payload, o.traceparent, \
                EXISTS (SELECT 1 FROM builds b JOIN github_integrations g ON g.pipeline_id = b.pipeline_id \
                        WHERE b.id = o.build_id) AS github \
         FROM outbox o \
         WHERE o.published_at IS NULL AND o.id <> ALL($1) ORDER BY o.id LIMIT $3",
    )
    .bind(confirmed)
    .bind(mark)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                event_type: r.try_get("event_type")?,
                build_id: r.try_get("build_id")?,
                payload: r.try_get("payload")?,
                traceparent: r.try_get("traceparent")?,
                github: r.try_get("github")?,
            })
        })
        .collect()
}

pub async fn backlog(conn: &mut PgConnection) -> Result<(i64, Option<f64>), StorageError> {
    let r = sqlx::query(
        "SELECT count(*) AS n, extract(epoch FROM now() - min(created_at))::float8 AS age \
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(conn)
    .await?;
    Ok((r.try_get("n")?, r.try_get("age")?))
}

/// Deletes at most `batch` published rows older than `retention_s`, skipping locked ones.
pub async fn expire(
    conn: &mut PgConnection,
    retention_s: f64,
    batch: i64,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM outbox WHERE id IN ( \
             SELECT id FROM outbox WHERE published_at < now() - make_interval(secs => $1) \
             ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_s)
    .bind(batch)
    .execute(conn)
    .await?
    .rows_affected())
}

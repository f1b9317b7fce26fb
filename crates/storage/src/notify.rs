//! Notification rows: webhooks, GitHub integrations, deliveries and their attempt log,
//! coalesced commit statuses, and the per-type switches with their audit trail.

use crate::error::StorageError;
use crate::events;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

pub mod channels {
    /// Payload: org id. Webhooks or GitHub integrations of that org changed.
    pub const SUBSCRIPTIONS: &str = "herald_subscriptions";
    /// A notification type's mode or rate changed.
    pub const TYPES: &str = "herald_notification_types";
    /// Deliveries became due now (replay, redeliver, resume).
    pub const DUE: &str = "herald_deliveries_due";
    pub use crate::channels::HEALTH;
}

pub const TYPES: &[&str] = &["webhook", "github_commit_status"];

// ---------------------------------------------------------------- webhooks

#[derive(Debug, Clone, Serialize)]
pub struct WebhookView {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub pipeline: Option<String>,
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    pub secret: String,
    #[serde(skip)]
    pub org_id: Uuid,
    #[serde(skip)]
    pub pipeline_id: Option<Uuid>,
}

const WEBHOOK_COLUMNS: &str =
    "w.id, w.org_id, w.url, w.events, w.pipeline_id, p.slug AS pipeline, \
     w.disabled_at IS NOT NULL AS disabled, w.disabled_reason, w.created_at, w.secret";

impl FromRow<'_, PgRow> for WebhookView {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(WebhookView {
            id: r.try_get("id")?,
            org_id: r.try_get("org_id")?,
            url: r.try_get("url")?,
            events: r.try_get("events")?,
            pipeline_id: r.try_get("pipeline_id")?,
            pipeline: r.try_get("pipeline")?,
            disabled: r.try_get("disabled")?,
            disabled_reason: r.try_get("disabled_reason")?,
            created_at: r.try_get("created_at")?,
            secret: r.try_get("secret")?,
        })
    }
}

pub async fn create_webhook(
    conn: &mut PgConnection,
    org_id: Uuid,
    url: &str,
    events: &[String],
    pipeline: Option<&str>,
    secret: &str,
) -> Result<WebhookView, StorageError> {
    let pipeline_id: Option<Uuid> = match pipeline {
        None => None,
        Some(slug) => Some(
            sqlx::query_scalar("SELECT id FROM pipelines WHERE org_id = $1 AND slug = $2")
                .bind(org_id)
                .bind(slug)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or(StorageError::NotFound("pipeline"))?,
        ),
    };
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO webhooks (id, org_id, pipeline_id, url, events, secret) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(org_id)
    .bind(pipeline_id)
    .bind(url)
    .bind(events)
    .bind(secret)
    .execute(&mut *conn)
    .await?;
    events::notify(conn, channels::SUBSCRIPTIONS, &org_id.to_string()).await?;
    get_webhook(conn, org_id, id).await
}

pub async fn get_webhook(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
) -> Result<WebhookView, StorageError> {
    sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks w LEFT JOIN pipelines p ON p.id = w.pipeline_id \
         WHERE w.id = $1 AND w.org_id = $2 AND w.deleted_at IS NULL"
    ))
    .bind(id)
    .bind(org_id)
    .fetch_optional(conn)
    .await?
    .ok_or(StorageError::NotFound("webhook"))
}

pub async fn list_webhooks(
    conn: &mut PgConnection,
    org_id: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<WebhookView>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks w LEFT JOIN pipelines p ON p.id = w.pipeline_id \
         WHERE w.org_id = $1 AND w.deleted_at IS NULL AND ($2::uuid IS NULL OR w.id < $2) \
         ORDER BY w.id DESC LIMIT $3"
    ))
    .bind(org_id)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(conn)
    .await?)
}

/// Every live webhook of an org, for the subscription cache.
pub async fn org_webhooks(
    conn: &mut PgConnection,
    org_id: Uuid,
) -> Result<Vec<WebhookView>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks w LEFT JOIN pipelines p ON p.id = w.pipeline_id \
         WHERE w.org_id = $1 AND w.deleted_at IS NULL"
    ))
    .bind(org_id)
    .fetch_all(conn)
    .await?)
}

/// A webhook by id, deleted or not (the sender must see deletions).
pub async fn webhook_by_id(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<(WebhookView, bool)>, StorageError> {
    let row = sqlx::query(&format!(
        "SELECT {WEBHOOK_COLUMNS}, w.deleted_at IS NOT NULL AS deleted FROM webhooks w \
         LEFT JOIN pipelines p ON p.id = w.pipeline_id WHERE w.id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some((WebhookView::from_row(&r)?, r.try_get("deleted")?))),
    }
}

pub async fn delete_webhook(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
) -> Result<(), StorageError> {
    let n = sqlx::query(
        "UPDATE webhooks SET deleted_at = now(), updated_at = now() \
         WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(org_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(StorageError::NotFound("webhook"));
    }
    events::notify(conn, channels::SUBSCRIPTIONS, &org_id.to_string()).await?;
    Ok(())
}

/// 410 Gone from the receiver: the endpoint is disabled until someone re-creates it.
pub async fn disable_webhook(
    conn: &mut PgConnection,
    id: Uuid,
    reason: &str,
) -> Result<(), StorageError> {
    let org: Option<Uuid> = sqlx::query_scalar(
        "UPDATE webhooks SET disabled_at = now(), disabled_reason = $2, updated_at = now() \
         WHERE id = $1 AND disabled_at IS NULL RETURNING org_id",
    )
    .bind(id)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(org) = org {
        events::notify(conn, channels::SUBSCRIPTIONS, &org.to_string()).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- GitHub

#[derive(Debug, Clone, Serialize)]
pub struct GithubIntegration {
    pub pipeline: String,
    pub repository: String,
    pub api_url: String,
    pub job_statuses: bool,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub pipeline_id: Uuid,
    #[serde(skip)]
    pub token: String,
}

pub async fn put_github(
    conn: &mut PgConnection,
    org_id: Uuid,
    pipeline: &str,
    api_url: &str,
    token: &str,
    job_statuses: bool,
) -> Result<GithubIntegration, StorageError> {
    let pipeline_id: Uuid =
        sqlx::query_scalar("SELECT id FROM pipelines WHERE org_id = $1 AND slug = $2")
            .bind(org_id)
            .bind(pipeline)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StorageError::NotFound("pipeline"))?;
    sqlx::query(
        "INSERT INTO github_integrations (pipeline_id, org_id, api_url, token, job_statuses) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (pipeline_id) DO UPDATE SET api_url = excluded.api_url, token = excluded.token, \
             job_statuses = excluded.job_statuses, updated_at = now()",
    )
    .bind(pipeline_id)
    .bind(org_id)
    .bind(api_url)
    .bind(token)
    .bind(job_statuses)
    .execute(&mut *conn)
    .await?;
    events::notify(conn, channels::SUBSCRIPTIONS, &org_id.to_string()).await?;
    let mut all = org_github(conn, org_id).await?;
    all.retain(|g| g.pipeline_id == pipeline_id);
    all.pop().ok_or(StorageError::NotFound("pipeline"))
}

pub async fn org_github(
    conn: &mut PgConnection,
    org_id: Uuid,
) -> Result<Vec<GithubIntegration>, StorageError> {
    let rows = sqlx::query(
        "SELECT g.pipeline_id, p.slug, p.repository, g.api_url, g.token, g.job_statuses, g.updated_at \
         FROM github_integrations g JOIN pipelines p ON p.id = g.pipeline_id WHERE g.org_id = $1",
    )
    .bind(org_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(GithubIntegration {
                pipeline_id: r.try_get("pipeline_id")?,
                pipeline: r.try_get("slug")?,
                repository: r.try_get("repository")?,
                api_url: r.try_get("api_url")?,
                token: r.try_get("token")?,
                job_statuses: r.try_get("job_statuses")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------- deliveries

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const DELIVERY_COLUMNS: &str =
    "id, webhook_id, event_id, event_type, status, attempts, last_status_code, \
     last_error, next_attempt_at, created_at, updated_at";

impl FromRow<'_, PgRow> for DeliveryView {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(DeliveryView {
            id: r.try_get("id")?,
            webhook_id: r.try_get("webhook_id")?,
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            last_status_code: r.try_get("last_status_code")?,
            last_error: r.try_get("last_error")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

/// A delivery as the sender needs it.
#[derive(Debug, Clone)]
pub struct DeliveryWork {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
}

fn work_from(r: &PgRow) -> Result<DeliveryWork, sqlx::Error> {
    Ok(DeliveryWork {
        id: r.try_get("id")?,
        webhook_id: r.try_get("webhook_id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        payload: r
            .try_get::<Option<serde_json::Value>, _>("payload")?
            .unwrap_or(serde_json::Value::Null),
        attempts: r.try_get("attempts")?,
    })
}

/// The columns of [`DeliveryWork`] for `deliveries d`, with the body from wherever it is.
const WORK_COLUMNS: &str = "d.id, d.webhook_id, d.event_id, d.event_type, \
     coalesce(d.payload, (SELECT p.payload FROM delivery_payloads p WHERE p.event_id = d.event_id)) AS payload, \
     d.attempts";

/// Records one event's deliveries, once each however often the event is redelivered.
/// `held` rows wait in PostgreSQL (their type is paused); `skipped` rows are recorded
/// and never sent (their type is disabled). Returns the rows that are pending and not
/// yet attempted, which the caller hands to the broker.
pub struct NewDeliveries<'a> {
    pub org_id: Uuid,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub payload: &'a serde_json::Value,
    pub webhook_ids: &'a [Uuid],
    pub status: &'a str,
    pub held: bool,
}

pub async fn record_deliveries(
    conn: &mut PgConnection,
    new: NewDeliveries<'_>,
) -> Result<Vec<DeliveryWork>, StorageError> {
    let NewDeliveries {
        org_id,
        event_id,
        event_type,
        payload,
        webhook_ids,
        status,
        held,
    } = new;
    if webhook_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = webhook_ids.iter().map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "WITH body AS (INSERT INTO delivery_payloads (event_id, payload) VALUES ($3, $5) \
                       ON CONFLICT (event_id) DO NOTHING) \
         INSERT INTO deliveries (id, org_id, webhook_id, event_id, event_type, status, next_attempt_at) \
         SELECT id, $2, wh, $3, $4, $6, CASE WHEN $7 THEN now() END \
         FROM unnest($1::uuid[], $8::uuid[]) AS t(id, wh) \
         ON CONFLICT (event_id, webhook_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(org_id)
    .bind(event_id)
    .bind(event_type)
    .bind(payload)
    .bind(status)
    .bind(held)
    .bind(webhook_ids)
    .execute(&mut *conn)
    .await?;
    // The body is the caller's: not read back (or copied) once per endpoint; the
    // returned rows carry none.
    let rows = sqlx::query(
        "SELECT id, webhook_id, event_id, event_type, NULL::jsonb AS payload, attempts FROM deliveries \
         WHERE event_id = $1 AND status = 'pending' AND attempts = 0 AND next_attempt_at IS NULL",
    )
    .bind(event_id)
    .fetch_all(conn)
    .await?;
    Ok(rows.iter().map(work_from).collect::<Result<_, _>>()?)
}

/// Of `(delivery, attempts made before)` pairs of a redelivered message, the
/// deliveries still waiting for that attempt: pending, in the broker (not held or
/// scheduled in PostgreSQL), with no attempt recorded since.
pub async fn still_to_attempt(
    conn: &mut PgConnection,
    items: &[(Uuid, i32)],
) -> Result<Vec<Uuid>, StorageError> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = items.iter().copied().unzip();
    Ok(sqlx::query_scalar(
        "SELECT d.id FROM deliveries d JOIN unnest($1::uuid[], $2::int[]) AS v(id, attempts) \
           ON d.id = v.id \
         WHERE d.status = 'pending' AND d.attempts = v.attempts AND d.next_attempt_at IS NULL",
    )
    .bind(&ids)
    .bind(&attempts)
    .fetch_all(conn)
    .await?)
}

pub async fn list_deliveries(
    conn: &mut PgConnection,
    org_id: Uuid,
    webhook_id: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<DeliveryView>, StorageError> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhooks WHERE id = $1 AND org_id = $2)")
            .bind(webhook_id)
            .bind(org_id)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        return Err(StorageError::NotFound("webhook"));
    }
    Ok(sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = $1 \
         AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
    ))
    .bind(webhook_id)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(conn)
    .await?)
}

/// Queues a delivery again, whatever its state: the scheduler hands it to the broker.
pub async fn redeliver(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
) -> Result<(), StorageError> {
    let n = sqlx::query(
        "UPDATE deliveries SET status = 'pending', next_attempt_at = now(), updated_at = now() \
         WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(org_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(StorageError::NotFound("delivery"));
    }
    events::notify(conn, channels::DUE, "").await?;
    Ok(())
}

/// Dead deliveries (and dead commit statuses) back to pending, oldest first, in one batch.
pub async fn replay_dead(
    conn: &mut PgConnection,
    kind: Option<&str>,
    limit: i64,
) -> Result<u64, StorageError> {
    let mut n = 0;
    if kind.is_none_or(|k| k == "webhook") {
        n += sqlx::query(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now() \
             WHERE id IN (SELECT id FROM deliveries WHERE status = 'dead' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(limit)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    if kind.is_none_or(|k| k == "github_commit_status") {
        n += sqlx::query(
            "UPDATE commit_statuses SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now() \
             WHERE (repository, sha, context) IN ( \
                 SELECT repository, sha, context FROM commit_statuses WHERE status = 'dead' \
                 ORDER BY updated_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(limit)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    if n > 0 {
        events::notify(conn, channels::DUE, "").await?;
    }
    Ok(n)
}

/// The result of one attempt, written in batches.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: Uuid,
    /// `succeeded`, `failed` (a retry is scheduled), `dead`, `skipped`, or `pending` (held).
    pub status: String,
    /// Whether an HTTP attempt was made (a held or skipped delivery makes none).
    pub attempted: bool,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub duration_ms: i32,
}

/// Writes many attempt results in one transaction: the delivery rows and the attempt log.
pub async fn record_attempts(
    conn: &mut PgConnection,
    batch: &[AttemptRecord],
) -> Result<(), StorageError> {
    if batch.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = batch.iter().map(|a| a.delivery_id).collect();
    let statuses: Vec<&str> = batch.iter().map(|a| a.status.as_str()).collect();
    let attempted: Vec<bool> = batch.iter().map(|a| a.attempted).collect();
    let next: Vec<Option<DateTime<Utc>>> = batch.iter().map(|a| a.next_attempt_at).collect();
    let codes: Vec<Option<i32>> = batch.iter().map(|a| a.status_code).collect();
    let errors: Vec<Option<&str>> = batch.iter().map(|a| a.error.as_deref()).collect();
    let bodies: Vec<Option<&str>> = batch.iter().map(|a| a.response_body.as_deref()).collect();
    let durations: Vec<i32> = batch.iter().map(|a| a.duration_ms).collect();
    sqlx::query(
        "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[], $5::int[], $6::text[]) \
                    AS t(id, status, attempted, next_at, code, err)), \
              upd AS ( \
                 UPDATE deliveries d SET status = v.status, \
                     attempts = d.attempts + CASE WHEN v.attempted THEN 1 ELSE 0 END, \
                     next_attempt_at = v.next_at, \
                     last_status_code = CASE WHEN v.attempted THEN v.code ELSE d.last_status_code END, \
                     last_error = CASE WHEN v.attempted OR v.err IS NOT NULL THEN v.err ELSE d.last_error END, \
                     updated_at = now() \
                 FROM v WHERE d.id = v.id RETURNING d.id, d.attempts) \
         INSERT INTO delivery_attempts (delivery_id, attempt, status_code, error, response_body, duration_ms) \
         SELECT t.id, upd.attempts, t.code, t.err, t.body, t.ms \
         FROM unnest($1::uuid[], $3::bool[], $5::int[], $6::text[], $7::text[], $8::int[]) AS t(id, attempted, code, err, body, ms) \
         JOIN upd ON upd.id = t.id WHERE t.attempted",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&attempted)
    .bind(&next)
    .bind(&codes)
    .bind(&errors)
    .bind(&bodies)
    .bind(&durations)
    .execute(&mut *conn)
    .await?;
    // Wake the scheduler so it sleeps until the earliest of these.
    if batch.iter().any(|a| a.next_attempt_at.is_some()) {
        events::notify(conn, channels::DUE, "").await?;
    }
    Ok(())
}

/// Deliveries whose time has come (retries, held rows of a resumed type, replays).
pub async fn due_deliveries(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(DeliveryWork, DateTime<Utc>)>, StorageError> {
    let rows = sqlx::query(&format!(
        "SELECT {WORK_COLUMNS}, d.next_attempt_at FROM deliveries d \
         WHERE d.next_attempt_at <= now() ORDER BY d.next_attempt_at LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((work_from(r)?, r.try_get("next_attempt_at")?)))
        .collect()
}

/// After the broker confirmed them: the rows are in the broker now. Only rows still
/// due at the time that was read are changed.
pub async fn mark_enqueued(
    conn: &mut PgConnection,
    rows: &[(Uuid, DateTime<Utc>)],
) -> Result<u64, StorageError> {
    let (ids, at): (Vec<Uuid>, Vec<DateTime<Utc>>) = rows.iter().copied().unzip();
    Ok(sqlx::query(
        "UPDATE deliveries d SET next_attempt_at = NULL, status = CASE WHEN d.status = 'failed' THEN 'pending' ELSE d.status END \
         FROM unnest($1::uuid[], $2::timestamptz[]) v(id, at) WHERE d.id = v.id AND d.next_attempt_at = v.at",
    )
    .bind(&ids)
    .bind(&at)
    .execute(conn)
    .await?
    .rows_affected())
}

pub async fn next_due(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT min(t) FROM (SELECT min(next_attempt_at) AS t FROM deliveries WHERE next_attempt_at IS NOT NULL \
         UNION ALL SELECT min(next_attempt_at) FROM commit_statuses WHERE next_attempt_at IS NOT NULL) x",
    )
    .fetch_one(conn)
    .await?)
}

// ---------------------------------------------------------------- commit statuses

#[derive(Debug, Clone)]
pub struct WantedStatus {
    pub repository: String,
    pub sha: String,
    pub context: String,
    pub org_id: Uuid,
    pub pipeline_id: Uuid,
    pub build_id: Uuid,
    pub state: String,
    pub rank: i16,
    pub description: String,
    pub target_url: String,
}

/// Records the newest wanted status. A newer build replaces an older one; within one
/// build a status only moves forward (pending → final). Returns true when it changed.
pub async fn want_status(
    conn: &mut PgConnection,
    w: &WantedStatus,
    skip: bool,
    held: bool,
) -> Result<bool, StorageError> {
    let changed: Option<i64> = sqlx::query_scalar(
        "INSERT INTO commit_statuses AS c (repository, sha, context, org_id, pipeline_id, build_id, state, rank, \
                                           description, target_url, status, sent_version, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $11 THEN 'skipped' ELSE 'pending' END, \
                 CASE WHEN $11 THEN 1 ELSE 0 END, CASE WHEN $12 THEN now() END) \
         ON CONFLICT (repository, sha, context) DO UPDATE SET \
             build_id = excluded.build_id, state = excluded.state, rank = excluded.rank, \
             description = excluded.description, target_url = excluded.target_url, \
             version = c.version + 1, \
             sent_version = CASE WHEN $11 THEN c.version + 1 ELSE c.sent_version END, \
             status = CASE WHEN $11 THEN 'skipped' ELSE 'pending' END, attempts = 0, \
             next_attempt_at = CASE WHEN $12 THEN now() END, \
             updated_at = now() \
         WHERE (excluded.build_id > c.build_id OR (excluded.build_id = c.build_id AND excluded.rank > c.rank)) \
           AND (c.state, c.description) IS DISTINCT FROM (excluded.state, excluded.description) \
         RETURNING version",
    )
    .bind(&w.repository)
    .bind(&w.sha)
    .bind(&w.context)
    .bind(w.org_id)
    .bind(w.pipeline_id)
    .bind(w.build_id)
    .bind(&w.state)
    .bind(w.rank)
    .bind(&w.description)
    .bind(&w.target_url)
    .bind(skip)
    .bind(held)
    .fetch_optional(conn)
    .await?;
    Ok(changed.is_some())
}

#[derive(Debug, Clone)]
pub struct StatusWork {
    pub repository: String,
    pub sha: String,
    pub context: String,
    pub state: String,
    pub description: String,
    pub target_url: String,
    pub version: i64,
    pub sent_version: i64,
    pub attempts: i32,
    pub api_url: String,
    pub token: String,
    /// Set when this worker holds the send claim (see [`claim_status`]).
    pub lease: Option<DateTime<Utc>>,
}

fn status_work_from(r: &sqlx::postgres::PgRow) -> Result<StatusWork, StorageError> {
    Ok(StatusWork {
        repository: r.try_get("repository")?,
        sha: r.try_get("sha")?,
        context: r.try_get("context")?,
        state: r.try_get("state")?,
        description: r.try_get("description")?,
        target_url: r.try_get("target_url")?,
        version: r.try_get("version")?,
        sent_version: r.try_get("sent_version")?,
        attempts: r.try_get("attempts")?,
        api_url: r.try_get("api_url")?,
        token: r.try_get("token")?,
        lease: r.try_get("sending_until")?,
    })
}

pub async fn status_work(
    conn: &mut PgConnection,
    repository: &str,
    sha: &str,
    context: &str,
) -> Result<Option<StatusWork>, StorageError> {
    let r = sqlx::query(
        "SELECT c.repository, c.sha, c.context, c.state, c.description, c.target_url, c.version, c.sent_version, \
                c.attempts, NULL::timestamptz AS sending_until, g.api_url, g.token \
         FROM commit_statuses c JOIN github_integrations g ON g.pipeline_id = c.pipeline_id \
         WHERE c.repository = $1 AND c.sha = $2 AND c.context = $3",
    )
    .bind(repository)
    .bind(sha)
    .bind(context)
    .fetch_optional(conn)
    .await?;
    r.as_ref().map(status_work_from).transpose()
}

/// Claims the newest unsent version for one send. None when nothing is unsent, or when
/// another worker holds the claim: that worker's [`status_result`] sees any newer
/// version and schedules it at once, so dropping here loses nothing. A claim that
/// outlives a dead worker expires, and `next_attempt_at` brings the row back then.
pub async fn claim_status(
    conn: &mut PgConnection,
    repository: &str,
    sha: &str,
    context: &str,
    lease: std::time::Duration,
) -> Result<Option<StatusWork>, StorageError> {
    let r = sqlx::query(
        "UPDATE commit_statuses c             SET sending_until = now() + $4 * interval '1 millisecond',                 next_attempt_at = now() + $4 * interval '1 millisecond'          FROM github_integrations g          WHERE g.pipeline_id = c.pipeline_id AND c.repository = $1 AND c.sha = $2 AND c.context = $3            AND c.version > c.sent_version AND (c.sending_until IS NULL OR c.sending_until < now())          RETURNING c.repository, c.sha, c.context, c.state, c.description, c.target_url, c.version,                    c.sent_version, c.attempts, c.sending_until, g.api_url, g.token",
    )
    .bind(repository)
    .bind(sha)
    .bind(context)
    .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2))
    .fetch_optional(conn)
    .await?;
    r.as_ref().map(status_work_from).transpose()
}

/// Records the outcome of sending `version`. `sent` marks it delivered; otherwise the
/// row waits until `next_attempt_at` (or is dead/skipped).
#[derive(Debug, Clone, Default)]
pub struct StatusResult<'a> {
    pub status: &'a str,
    /// GitHub has this version now.
    pub sent: bool,
    /// An HTTP attempt was made.
    pub attempted: bool,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub code: Option<i32>,
    pub error: Option<&'a str>,
}

pub async fn status_result(
    conn: &mut PgConnection,
    w: &StatusWork,
    r: StatusResult<'_>,
) -> Result<(), StorageError> {
    let StatusResult {
        status,
        sent,
        attempted,
        next_attempt_at,
        code,
        error,
    } = r;
    // A newer version that arrived during a claimed send was dropped by its worker
    // (the claim was taken); it is due now.
    let due: Option<bool> = sqlx::query_scalar(
        "UPDATE commit_statuses SET \
             sent_version = CASE WHEN $5 THEN greatest(sent_version, $4) ELSE sent_version END, \
             status = CASE WHEN version > $4 AND $5 THEN 'pending' ELSE $6 END, \
             attempts = CASE WHEN $5 THEN 0 WHEN $7 THEN attempts + 1 ELSE attempts END, \
             next_attempt_at = CASE WHEN $5 AND version > $4 AND $11::timestamptz IS NOT NULL THEN now() ELSE $8 END, \
             sending_until = CASE WHEN sending_until IS NOT DISTINCT FROM $11 THEN NULL ELSE sending_until END, \
             last_status_code = coalesce($9, last_status_code), last_error = $10, updated_at = now() \
         WHERE repository = $1 AND sha = $2 AND context = $3 \
         RETURNING next_attempt_at IS NOT NULL",
    )
    .bind(&w.repository)
    .bind(&w.sha)
    .bind(&w.context)
    .bind(w.version)
    .bind(sent)
    .bind(status)
    .bind(attempted)
    .bind(next_attempt_at)
    .bind(code)
    .bind(error)
    .bind(w.lease)
    .fetch_optional(&mut *conn)
    .await?;
    if due == Some(true) {
        events::notify(conn, channels::DUE, "").await?;
    }
    Ok(())
}

pub async fn due_statuses(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(String, String, String, DateTime<Utc>)>, StorageError> {
    let rows = sqlx::query(
        "SELECT repository, sha, context, next_attempt_at FROM commit_statuses \
         WHERE next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("repository")?,
                r.try_get("sha")?,
                r.try_get("context")?,
                r.try_get("next_attempt_at")?,
            ))
        })
        .collect()
}

pub async fn mark_statuses_enqueued(
    conn: &mut PgConnection,
    rows: &[(String, String, String, DateTime<Utc>)],
) -> Result<(), StorageError> {
    let repos: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let shas: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let ctxs: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.3).collect();
    sqlx::query(
        "UPDATE commit_statuses c SET next_attempt_at = NULL \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) v(r, s, x, at) \
         WHERE c.repository = v.r AND c.sha = v.s AND c.context = v.x AND c.next_attempt_at = v.at",
    )
    .bind(&repos)
    .bind(&shas)
    .bind(&ctxs)
    .bind(&at)
    .execute(conn)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------- kill switches

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NotificationType {
    #[serde(rename = "type")]
    pub kind: String,
    pub mode: String,
    pub rate_per_s: f64,
    pub burst: i32,
    pub updated_at: DateTime<Utc>,
    pub reason: String,
}

pub async fn notification_types(
    conn: &mut PgConnection,
) -> Result<Vec<NotificationType>, StorageError> {
    let rows = sqlx::query("SELECT type, mode, rate_per_s, burst, updated_at, reason FROM notification_types ORDER BY type DESC")
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(NotificationType {
                kind: r.try_get("type")?,
                mode: r.try_get("mode")?,
                rate_per_s: r.try_get("rate_per_s")?,
                burst: r.try_get("burst")?,
                updated_at: r.try_get("updated_at")?,
                reason: r.try_get("reason")?,
            })
        })
        .collect()
}

/// Changes a type's switch, records who and why, and tells every process. Resuming a
/// paused type makes its held deliveries due now.
pub async fn set_notification_type(
    conn: &mut PgConnection,
    kind: &str,
    mode: &str,
    rate_per_s: Option<f64>,
    burst: Option<i32>,
    reason: &str,
    actor: &str,
) -> Result<NotificationType, StorageError> {
    let r = sqlx::query(
        "UPDATE notification_types SET mode = $2, rate_per_s = coalesce($3, rate_per_s), burst = coalesce($4, burst), \
             reason = $5, updated_at = now() WHERE type = $1 \
         RETURNING type, mode, rate_per_s, burst, updated_at, reason",
    )
    .bind(kind)
    .bind(mode)
    .bind(rate_per_s)
    .bind(burst)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("notification type"))?;
    let t = NotificationType {
        kind: r.try_get("type")?,
        mode: r.try_get("mode")?,
        rate_per_s: r.try_get("rate_per_s")?,
        burst: r.try_get("burst")?,
        updated_at: r.try_get("updated_at")?,
        reason: r.try_get("reason")?,
    };
    sqlx::query(
        "INSERT INTO notification_type_changes (type, mode, rate_per_s, burst, reason, actor) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&t.kind)
    .bind(&t.mode)
    .bind(t.rate_per_s)
    .bind(t.burst)
    .bind(reason)
    .bind(actor)
    .execute(&mut *conn)
    .await?;
    events::notify(conn, channels::TYPES, kind).await?;
    if mode == "enabled" {
        events::notify(conn, channels::DUE, "").await?;
    }
    Ok(t)
}

// ---------------------------------------------------------------- ops

#[derive(Debug, Clone, Serialize)]
pub struct QueueStat {
    pub name: String,
    pub depth: i64,
    pub oldest_age_s: Option<f64>,
}

/// Backlogs that live in PostgreSQL.
pub async fn queue_stats(conn: &mut PgConnection) -> Result<Vec<QueueStat>, StorageError> {
    let rows = sqlx::query(
        "SELECT 'jobs.runnable' AS name, count(*) AS depth, extract(epoch FROM now() - min(scheduled_at))::float8 AS age \
             FROM jobs WHERE state = 'scheduled' \
         UNION ALL SELECT 'outbox', count(*), extract(epoch FROM now() - min(created_at))::float8 \
             FROM outbox WHERE published_at IS NULL \
         UNION ALL SELECT 'webhook.pending', count(*), extract(epoch FROM now() - min(created_at))::float8 \
             FROM deliveries WHERE status IN ('pending', 'failed') \
         UNION ALL SELECT 'webhook.dead', count(*), extract(epoch FROM now() - min(updated_at))::float8 \
             FROM deliveries WHERE status = 'dead' \
         UNION ALL SELECT 'github_commit_status.pending', count(*), extract(epoch FROM now() - min(updated_at))::float8 \
             FROM commit_statuses WHERE version > sent_version AND status IN ('pending', 'failed')",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(QueueStat {
                name: r.try_get("name")?,
                depth: r.try_get("depth")?,
                oldest_age_s: r.try_get("age")?,
            })
        })
        .collect()
}

/// Expires old attempt logs and finished deliveries in small batches.
pub async fn expire_history(
    conn: &mut PgConnection,
    retention_s: f64,
    batch: i64,
) -> Result<u64, StorageError> {
    let a = sqlx::query(
        "DELETE FROM delivery_attempts WHERE id IN (SELECT id FROM delivery_attempts \
         WHERE attempted_at < now() - make_interval(secs => $1) ORDER BY attempted_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_s)
    .bind(batch)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let d = sqlx::query(
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
         WHERE created_at < now() - make_interval(secs => $1) AND status IN ('succeeded', 'skipped', 'dead') \
         ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_s)
    .bind(batch)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    // Bodies no delivery refers to any more.
    let p = sqlx::query(
        "DELETE FROM delivery_payloads WHERE event_id IN (SELECT p.event_id FROM delivery_payloads p \
         WHERE p.created_at < now() - make_interval(secs => $1) \
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = p.event_id) \
         ORDER BY p.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_s)
    .bind(batch)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(a + d + p)
}

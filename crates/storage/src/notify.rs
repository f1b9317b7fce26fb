//! Notification rows: webhooks, GitHub integrations, deliveries and their attempt log,
//! coalesced commit statuses, and the per-type switches with their audit trail.

use crate::error::StorageError;
use crate::events::{self, NewEvent};
use chrono::{DateTime, Utc};
use herald_domain::EventType;
use serde::Serialize;
use serde_json::json;
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
    pub enabled: bool,
    /// The v1 name of `!enabled`, kept for v1 clients.
    pub disabled: bool,
    /// `gone` (a 410), `failing` or `manual`; None while enabled.
    pub disabled_reason: Option<String>,
    /// None: the global per-endpoint limit.
    pub rate_per_s: Option<f64>,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    pub secret: String,
    /// The secret before the last rotation, while it still signs (see [`Self::signing_secrets`]).
    #[serde(skip)]
    pub old_secret: Option<(String, DateTime<Utc>)>,
    #[serde(skip)]
    pub org_id: Uuid,
    #[serde(skip)]
    pub pipeline_id: Option<Uuid>,
}

impl WebhookView {
    /// The secrets an attempt made at `now` is signed with: the current one, then the
    /// old one until it expires.
    pub fn old_secret_at(&self, now: DateTime<Utc>) -> Option<&str> {
        self.old_secret
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(s, _)| s.as_str())
    }
}

const WEBHOOK_COLUMNS: &str =
    "w.id, w.org_id, w.url, w.events, w.pipeline_id, p.slug AS pipeline, \
     w.disabled_at IS NOT NULL AS disabled, w.disabled_reason, w.created_at, w.secret, \
     w.rate_per_s, w.old_secret, w.old_secret_expires_at";

impl FromRow<'_, PgRow> for WebhookView {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        let disabled: bool = r.try_get("disabled")?;
        let old: Option<String> = r.try_get("old_secret")?;
        let old_until: Option<DateTime<Utc>> = r.try_get("old_secret_expires_at")?;
        Ok(WebhookView {
            id: r.try_get("id")?,
            org_id: r.try_get("org_id")?,
            url: r.try_get("url")?,
            events: r.try_get("events")?,
            pipeline_id: r.try_get("pipeline_id")?,
            pipeline: r.try_get("pipeline")?,
            enabled: !disabled,
            disabled,
            disabled_reason: if disabled {
                r.try_get("disabled_reason")?
            } else {
                None
            },
            rate_per_s: r.try_get("rate_per_s")?,
            created_at: r.try_get("created_at")?,
            secret: r.try_get("secret")?,
            old_secret: old.zip(old_until),
        })
    }
}

async fn pipeline_id(
    conn: &mut PgConnection,
    org_id: Uuid,
    slug: &str,
) -> Result<Uuid, StorageError> {
    sqlx::query_scalar("SELECT id FROM pipelines WHERE org_id = $1 AND slug = $2")
        .bind(org_id)
        .bind(slug)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StorageError::NotFound("pipeline"))
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
        Some(slug) => Some(pipeline_id(conn, org_id, slug).await?),
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

/// Why an endpoint was disabled, as the API shows it.
pub mod reasons {
    /// The receiver answered 410 Gone.
    pub const GONE: &str = "gone";
    /// Every attempt failed for `webhooks.disable_after_s` and at least
    /// `webhooks.disable_min_failures` attempts.
    pub const FAILING: &str = "failing";
    /// `PATCH {"enabled": false}`.
    pub const MANUAL: &str = "manual";
}

/// The `webhook.disabled` event of a webhook just disabled.
fn disabled_event(hook: &WebhookView, reason: &str) -> NewEvent {
    NewEvent {
        event_type: EventType::WebhookDisabled,
        org_id: hook.org_id,
        build_id: None,
        data: json!({"webhook": hook, "reason": reason}),
    }
}

/// Disables an enabled endpoint (`reason` from [`reasons`]) and writes its
/// `webhook.disabled` event in the caller's transaction. None when it was disabled or
/// deleted already: each disable is announced once.
pub async fn disable_webhook(
    conn: &mut PgConnection,
    id: Uuid,
    reason: &str,
) -> Result<Option<WebhookView>, StorageError> {
    let org: Option<Uuid> = sqlx::query_scalar(
        "UPDATE webhooks SET disabled_at = now(), disabled_reason = $2, updated_at = now() \
         WHERE id = $1 AND disabled_at IS NULL AND deleted_at IS NULL RETURNING org_id",
    )
    .bind(id)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(org) = org else { return Ok(None) };
    let hook = get_webhook(conn, org, id).await?;
    events::insert(conn, vec![disabled_event(&hook, reason)]).await?;
    events::notify(conn, channels::SUBSCRIPTIONS, &org.to_string()).await?;
    Ok(Some(hook))
}

/// `PATCH /v1/webhooks/{id}`: a field left `None` is unchanged; `Some(None)` clears a
/// nullable one. The URL must have passed the SSRF check already.
#[derive(Debug, Clone, Default)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub pipeline: Option<Option<String>>,
    pub enabled: Option<bool>,
    pub rate_per_s: Option<Option<f64>>,
}

/// Applies a patch in the caller's transaction. Returns the webhook and whether this
/// call disabled it (its `webhook.disabled` event is written then). Re-enabling
/// clears the reason and the failure streak.
pub async fn update_webhook(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
    patch: &WebhookPatch,
) -> Result<(WebhookView, bool), StorageError> {
    let was_disabled: bool = sqlx::query_scalar(
        "SELECT disabled_at IS NOT NULL FROM webhooks \
         WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("webhook"))?;
    let pipeline: Option<Option<Uuid>> = match &patch.pipeline {
        None => None,
        Some(None) => Some(None),
        Some(Some(slug)) => Some(Some(pipeline_id(conn, org_id, slug).await?)),
    };
    sqlx::query(
        "UPDATE webhooks SET \
             url = coalesce($3, url), \
             events = coalesce($4, events), \
             pipeline_id = CASE WHEN $5 THEN $6 ELSE pipeline_id END, \
             rate_per_s = CASE WHEN $7 THEN $8 ELSE rate_per_s END, \
             disabled_at = CASE WHEN $9 IS TRUE THEN NULL \
                                WHEN $9 IS FALSE THEN coalesce(disabled_at, now()) ELSE disabled_at END, \
             disabled_reason = CASE WHEN $9 IS TRUE THEN NULL WHEN $9 IS FALSE THEN 'manual' \
                                    ELSE disabled_reason END, \
             failing_since = CASE WHEN $9 IS TRUE THEN NULL ELSE failing_since END, \
             failures = CASE WHEN $9 IS TRUE THEN 0 ELSE failures END, \
             updated_at = now() \
         WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(org_id)
    .bind(patch.url.as_deref())
    .bind(patch.events.as_deref())
    .bind(pipeline.is_some())
    .bind(pipeline.flatten())
    .bind(patch.rate_per_s.is_some())
    .bind(patch.rate_per_s.flatten())
    .bind(patch.enabled)
    .execute(&mut *conn)
    .await?;
    let hook = get_webhook(conn, org_id, id).await?;
    let disabled_now = !was_disabled && patch.enabled == Some(false);
    if disabled_now {
        events::insert(conn, vec![disabled_event(&hook, reasons::MANUAL)]).await?;
    }
    events::notify(conn, channels::SUBSCRIPTIONS, &org_id.to_string()).await?;
    Ok((hook, disabled_now))
}

/// Replaces the secret; the old one keeps signing (as a second signature) for
/// `old_valid_s` seconds. Returns when it stops.
pub async fn rotate_secret(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
    new_secret: &str,
    old_valid_s: i64,
) -> Result<DateTime<Utc>, StorageError> {
    let until: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE webhooks SET old_secret = secret, secret = $3, \
             old_secret_expires_at = now() + make_interval(secs => $4), updated_at = now() \
         WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL RETURNING old_secret_expires_at",
    )
    .bind(id)
    .bind(org_id)
    .bind(new_secret)
    .bind(old_valid_s as f64)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("webhook"))?;
    events::notify(conn, channels::SUBSCRIPTIONS, &org_id.to_string()).await?;
    Ok(until)
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
/// and never sent (their type is disabled). Returns the rows that are pending, neither
/// claimed by a worker nor attempted nor waiting in PostgreSQL, which the caller hands
/// to the broker (again, for an event seen before: a claim drops the extra copy).
pub struct NewDeliveries<'a> {
    pub org_id: Uuid,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub payload: &'a serde_json::Value,
    pub webhook_ids: &'a [Uuid],
    /// Those of `webhook_ids` whose endpoint is disabled: recorded `skipped`.
    pub disabled: &'a [Uuid],
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
        disabled,
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
         SELECT id, $2, wh, $3, $4, CASE WHEN wh = ANY($9) THEN 'skipped' ELSE $6 END, \
                CASE WHEN $7 AND NOT wh = ANY($9) THEN now() END \
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
    .bind(disabled)
    .execute(&mut *conn)
    .await?;
    // The body is the caller's: not read back (or copied) once per endpoint; the
    // returned rows carry none.
    let rows = sqlx::query(
        "SELECT id, webhook_id, event_id, event_type, NULL::jsonb AS payload, attempts FROM deliveries \
         WHERE event_id = $1 AND status = 'pending' AND attempts = 0 AND next_attempt_at IS NULL \
           AND claimed_until IS NULL",
    )
    .bind(event_id)
    .fetch_all(conn)
    .await?;
    Ok(rows.iter().map(work_from).collect::<Result<_, _>>()?)
}

/// Of `(delivery, attempts made before)` pairs of a delivery message (any copy of
/// it), claims for `lease` the deliveries still waiting for that attempt: pending, with
/// no attempt recorded since, and no live claim of another worker. Rows another
/// transaction holds are skipped, not waited for (whoever holds them is recording or
/// claiming them). The claim's end is also the row's `next_attempt_at`, so a claim
/// that outlives its worker comes due for the scheduler. Returns the ids claimed; only
/// their holder sends them.
pub async fn claim_deliveries(
    conn: &mut PgConnection,
    items: &[(Uuid, i32)],
    lease: std::time::Duration,
) -> Result<Vec<Uuid>, StorageError> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = items.iter().copied().unzip();
    Ok(sqlx::query_scalar(
        "WITH c AS ( \
             SELECT d.id FROM deliveries d JOIN unnest($1::uuid[], $2::int[]) AS v(id, attempts) \
               ON d.id = v.id \
             WHERE d.status = 'pending' AND d.attempts = v.attempts \
               AND (d.claimed_until IS NULL OR d.claimed_until < now()) \
             ORDER BY d.id FOR UPDATE OF d SKIP LOCKED) \
         UPDATE deliveries d SET claimed_until = now() + make_interval(secs => $3), \
             next_attempt_at = now() + make_interval(secs => $3) \
         FROM c WHERE d.id = c.id RETURNING d.id",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(lease.as_secs_f64())
    .fetch_all(conn)
    .await?)
}

/// After a restart of the database server, gives the claims last renewed before it
/// (`claimed_until` earlier than the server's start plus `lease`) until `grace` after
/// the start. Their holders lost their connections to the restart, not necessarily
/// their lives: one that sent a delivery and got its 2xx is still trying to write the
/// result, and its pool may need longer than one lease to reconnect. Without this the
/// scheduler would send those deliveries again the moment their lease ran out. A
/// holder that did die costs `grace` of delay instead of `lease`. Does nothing (and
/// reads nothing) once `grace` has passed since the start. Run by the scheduler when
/// it is elected, before its first pass. Returns how many claims were extended.
pub async fn honour_claims_across_restart(
    conn: &mut PgConnection,
    lease: std::time::Duration,
    grace: std::time::Duration,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "WITH s AS (SELECT pg_postmaster_start_time() AS started), \
         c AS (SELECT d.id FROM deliveries d, s \
               WHERE now() < s.started + make_interval(secs => $2) \
                 AND d.status = 'pending' AND d.claimed_until IS NOT NULL \
                 AND d.next_attempt_at < s.started + make_interval(secs => $1) \
                 AND d.claimed_until < s.started + make_interval(secs => $1) \
               ORDER BY d.id FOR UPDATE OF d SKIP LOCKED) \
         UPDATE deliveries d SET claimed_until = s.started + make_interval(secs => $2), \
             next_attempt_at = s.started + make_interval(secs => $2) \
         FROM c, s WHERE d.id = c.id",
    )
    .bind(lease.as_secs_f64())
    .bind(grace.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected())
}

/// Extends the live claims on `ids` to `lease` from now, while their attempts run.
/// Rows recorded meanwhile (claim cleared) or whose claim ran out are left alone; rows
/// locked at that moment are being recorded. Returns how many were extended.
pub async fn renew_claims(
    conn: &mut PgConnection,
    ids: &[Uuid],
    lease: std::time::Duration,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "WITH c AS ( \
             SELECT id FROM deliveries WHERE id = ANY($1) AND claimed_until > now() \
             ORDER BY id FOR UPDATE SKIP LOCKED) \
         UPDATE deliveries d SET claimed_until = now() + make_interval(secs => $2), \
             next_attempt_at = now() + make_interval(secs => $2) \
         FROM c WHERE d.id = c.id",
    )
    .bind(ids)
    .bind(lease.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected())
}

/// The filters of `GET /v1/webhooks/{id}/deliveries`, each optional.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Keyset cursor: rows older than this delivery.
    pub before: Option<Uuid>,
}

/// The list query, newest first by (created_at, id), with only the conditions that
/// apply: each filter meets its own index (webhook_id + status, + event_type, +
/// created_at) rather than one generic plan.
fn list_query(f: &DeliveryFilter, cols: &str) -> String {
    let mut sql = format!("SELECT {cols} FROM deliveries d WHERE d.webhook_id = $1");
    let mut n = 2;
    let mut arg = |cond: &str| {
        let s = cond.replace('?', &format!("${n}"));
        n += 1;
        s
    };
    if f.status.is_some() {
        sql += &arg(" AND d.status = ?");
    }
    if f.event_type.is_some() {
        sql += &arg(" AND d.event_type = ?");
    }
    if f.since.is_some() {
        sql += &arg(" AND d.created_at >= ?");
    }
    if f.until.is_some() {
        sql += &arg(" AND d.created_at < ?");
    }
    if f.before.is_some() {
        sql += &arg(
            " AND (d.created_at, d.id) < (SELECT c.created_at, c.id FROM deliveries c WHERE c.id = ?)",
        );
    }
    sql += &arg(" ORDER BY d.created_at DESC, d.id DESC LIMIT ?");
    sql
}

fn bind_list<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    webhook_id: Uuid,
    f: &'q DeliveryFilter,
    limit: i64,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q = q.bind(webhook_id);
    if let Some(s) = &f.status {
        q = q.bind(s);
    }
    if let Some(t) = &f.event_type {
        q = q.bind(t);
    }
    if let Some(t) = f.since {
        q = q.bind(t);
    }
    if let Some(t) = f.until {
        q = q.bind(t);
    }
    if let Some(b) = f.before {
        q = q.bind(b);
    }
    q.bind(limit + 1)
}

const DELIVERY_COLUMNS_D: &str =
    "d.id, d.webhook_id, d.event_id, d.event_type, d.status, d.attempts, d.last_status_code, \
     d.last_error, d.next_attempt_at, d.created_at, d.updated_at";

pub async fn list_deliveries(
    conn: &mut PgConnection,
    org_id: Uuid,
    webhook_id: Uuid,
    filter: &DeliveryFilter,
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
    let sql = list_query(filter, DELIVERY_COLUMNS_D);
    let rows = bind_list(sqlx::query(&sql), webhook_id, filter, limit)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .iter()
        .map(DeliveryView::from_row)
        .collect::<Result<_, _>>()?)
}

/// The plan of [`list_deliveries`]'s query for these filters (`EXPLAIN` text), so a
/// test can show that each filter is served by an index.
pub async fn explain_list_deliveries(
    conn: &mut PgConnection,
    webhook_id: Uuid,
    filter: &DeliveryFilter,
    limit: i64,
) -> Result<String, StorageError> {
    let sql = format!("EXPLAIN {}", list_query(filter, DELIVERY_COLUMNS_D));
    let lines: Vec<String> = bind_list(sqlx::query(&sql), webhook_id, filter, limit)
        .fetch_all(conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
    Ok(lines.join("\n"))
}

/// One logged attempt, as `GET /v1/deliveries/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// The most attempts `GET /v1/deliveries/{id}` shows.
pub const MAX_SHOWN_ATTEMPTS: i64 = 50;

/// A delivery of the org with its newest attempts (at most [`MAX_SHOWN_ATTEMPTS`]).
pub async fn get_delivery(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
) -> Result<(DeliveryView, Vec<AttemptView>), StorageError> {
    let d: DeliveryView = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1 AND org_id = $2"
    ))
    .bind(id)
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StorageError::NotFound("delivery"))?;
    let rows = sqlx::query(
        "SELECT attempted_at, status_code, error, duration_ms FROM delivery_attempts \
         WHERE delivery_id = $1 ORDER BY attempted_at DESC, id DESC LIMIT $2",
    )
    .bind(id)
    .bind(MAX_SHOWN_ATTEMPTS)
    .fetch_all(conn)
    .await?;
    let attempts = rows
        .iter()
        .map(|r| {
            Ok(AttemptView {
                at: r.try_get("attempted_at")?,
                status_code: r.try_get("status_code")?,
                error: r.try_get("error")?,
                duration_ms: r.try_get("duration_ms")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok((d, attempts))
}

// ---------------------------------------------------------------- recover

/// The statuses a recover sends again.
const RECOVERABLE: &str = "('failed', 'dead', 'skipped')";

/// Starts a recover of one endpoint's deliveries created in `[since, until)`: records
/// it for the scheduler, which marks the rows due in small batches. Returns how many
/// rows match now. The caller checks that the webhook is the org's and enabled.
pub async fn start_recovery(
    conn: &mut PgConnection,
    webhook_id: Uuid,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<i64, StorageError> {
    let queued: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM deliveries WHERE webhook_id = $1 AND status IN {RECOVERABLE} \
         AND created_at >= $2 AND created_at < $3"
    ))
    .bind(webhook_id)
    .bind(since)
    .bind(until)
    .fetch_one(&mut *conn)
    .await?;
    if queued > 0 {
        sqlx::query(
            "INSERT INTO webhook_recoveries (id, webhook_id, since, until, queued) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(webhook_id)
        .bind(since)
        .bind(until)
        .bind(queued)
        .execute(&mut *conn)
        .await?;
        events::notify(conn, channels::DUE, "").await?;
    }
    Ok(queued)
}

/// Whether a recover is still open.
pub async fn recovery_open(conn: &mut PgConnection) -> Result<bool, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM webhook_recoveries WHERE finished_at IS NULL)",
    )
    .fetch_one(conn)
    .await?)
}

/// One short step of the oldest open recover, in the caller's transaction: up to
/// `batch` of its deliveries (oldest first, after its cursor) that are still failed,
/// dead or skipped become pending and due now, keeping their id (the `webhook-id`) and
/// attempt count; the cursor moves past them in the same transaction. Rows locked at
/// that moment (SKIP LOCKED) are being handed to the broker or redelivered already.
/// The scheduler sends the marked rows like any due retry: through the type's switch,
/// the rate limits and the throttle. Returns the rows marked, or None when no recover
/// is open.
pub async fn recover_step(
    conn: &mut PgConnection,
    batch: i64,
) -> Result<Option<u64>, StorageError> {
    let Some(r) = sqlx::query(
        "SELECT r.id, r.webhook_id, r.since, r.until, r.cursor_at, r.cursor_id, \
                w.disabled_at IS NOT NULL OR w.deleted_at IS NOT NULL AS stopped \
         FROM webhook_recoveries r JOIN webhooks w ON w.id = r.webhook_id \
         WHERE r.finished_at IS NULL ORDER BY r.created_at LIMIT 1 FOR UPDATE OF r SKIP LOCKED",
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let id: Uuid = r.try_get("id")?;
    if r.try_get::<bool, _>("stopped")? {
        // Disabled or deleted meanwhile: its deliveries would only be skipped again.
        sqlx::query("UPDATE webhook_recoveries SET finished_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        return Ok(Some(0));
    }
    let row = sqlx::query(&format!(
        "WITH c AS ( \
             SELECT d.id, d.created_at FROM deliveries d \
             WHERE d.webhook_id = $1 AND d.status IN {RECOVERABLE} \
               AND d.created_at >= $2 AND d.created_at < $3 \
               AND ($4::timestamptz IS NULL OR (d.created_at, d.id) > ($4, $5::uuid)) \
             ORDER BY d.created_at, d.id LIMIT $6 FOR UPDATE SKIP LOCKED), \
         m AS ( \
             UPDATE deliveries d SET status = 'pending', next_attempt_at = now(), updated_at = now() \
             FROM c WHERE d.id = c.id RETURNING d.id, d.created_at) \
         SELECT count(*) AS n, max(created_at) AS last_at, \
                (SELECT id FROM m ORDER BY created_at DESC, id DESC LIMIT 1) AS last_id FROM m"
    ))
    .bind(r.try_get::<Uuid, _>("webhook_id")?)
    .bind(r.try_get::<DateTime<Utc>, _>("since")?)
    .bind(r.try_get::<DateTime<Utc>, _>("until")?)
    .bind(r.try_get::<Option<DateTime<Utc>>, _>("cursor_at")?)
    .bind(r.try_get::<Option<Uuid>, _>("cursor_id")?)
    .bind(batch)
    .fetch_one(&mut *conn)
    .await?;
    let n: i64 = row.try_get("n")?;
    let last_at: Option<DateTime<Utc>> = row.try_get("last_at")?;
    let last_id: Option<Uuid> = row.try_get("last_id")?;
    sqlx::query(
        "UPDATE webhook_recoveries SET cursor_at = coalesce($2, cursor_at), \
             cursor_id = coalesce($3, cursor_id), marked = marked + $4, \
             finished_at = CASE WHEN $4 < $5 THEN now() END WHERE id = $1",
    )
    .bind(id)
    .bind(last_at)
    .bind(last_id)
    .bind(n)
    .bind(batch)
    .execute(&mut *conn)
    .await?;
    Ok(Some(u64::try_from(n).unwrap_or(0)))
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
    /// Its endpoint, whose failure streak an attempt moves.
    pub webhook_id: Uuid,
    /// `succeeded`, `failed` (a retry is scheduled), `dead`, `skipped`, or `pending` (held).
    pub status: String,
    /// Whether an HTTP attempt was made (a held or skipped delivery makes none).
    pub attempted: bool,
    /// The row's attempt count when this attempt began: the record applies only to a row
    /// that still counts that many, so writing it twice (a retried commit) or late
    /// (after another worker's attempt) changes nothing.
    pub attempts_before: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub duration_ms: i32,
}

/// An endpoint whose attempts all failed since `since`, `failures` of them.
#[derive(Debug, Clone, Copy)]
pub struct FailureStreak {
    pub webhook_id: Uuid,
    pub since: DateTime<Utc>,
    pub failures: i32,
}

/// Writes many attempt results in one transaction, in one statement: the delivery
/// rows, the attempt log, and the failure streak of the endpoints that failed (or
/// that succeeded after failing; a healthy endpoint's row is neither locked nor
/// written). Returns the streaks of enabled endpoints that are failing now, for the
/// caller's auto-disable.
pub async fn record_attempts(
    conn: &mut PgConnection,
    batch: &[AttemptRecord],
) -> Result<Vec<FailureStreak>, StorageError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = batch.iter().map(|a| a.delivery_id).collect();
    let hooks: Vec<Uuid> = batch.iter().map(|a| a.webhook_id).collect();
    let statuses: Vec<&str> = batch.iter().map(|a| a.status.as_str()).collect();
    let attempted: Vec<bool> = batch.iter().map(|a| a.attempted).collect();
    let next: Vec<Option<DateTime<Utc>>> = batch.iter().map(|a| a.next_attempt_at).collect();
    let codes: Vec<Option<i32>> = batch.iter().map(|a| a.status_code).collect();
    let errors: Vec<Option<&str>> = batch.iter().map(|a| a.error.as_deref()).collect();
    let bodies: Vec<Option<&str>> = batch.iter().map(|a| a.response_body.as_deref()).collect();
    let durations: Vec<i32> = batch.iter().map(|a| a.duration_ms).collect();
    let before: Vec<i32> = batch.iter().map(|a| a.attempts_before).collect();
    let rows = sqlx::query(
        "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[], $5::int[], $6::text[], $10::int[]) \
                    AS t(id, status, attempted, next_at, code, err, before)), \
              upd AS ( \
                 UPDATE deliveries d SET status = v.status, \
                     attempts = d.attempts + CASE WHEN v.attempted THEN 1 ELSE 0 END, \
                     next_attempt_at = v.next_at, claimed_until = NULL, \
                     last_status_code = CASE WHEN v.attempted THEN v.code ELSE d.last_status_code END, \
                     last_error = CASE WHEN v.attempted OR v.err IS NOT NULL THEN v.err ELSE d.last_error END, \
                     updated_at = now() \
                 FROM v WHERE d.id = v.id AND d.attempts = v.before RETURNING d.id, d.attempts), \
              log AS ( \
                 INSERT INTO delivery_attempts (delivery_id, attempt, status_code, error, response_body, duration_ms) \
                 SELECT t.id, upd.attempts, t.code, t.err, t.body, t.ms \
                 FROM unnest($1::uuid[], $3::bool[], $5::int[], $6::text[], $7::text[], $8::int[]) AS t(id, attempted, code, err, body, ms) \
                 JOIN upd ON upd.id = t.id WHERE t.attempted), \
              h AS ( \
                 SELECT wh, bool_or(status = 'succeeded') AS ok, count(*) FILTER (WHERE status <> 'succeeded') AS n \
                 FROM unnest($9::uuid[], $2::text[], $3::bool[], $1::uuid[]) AS t(wh, status, attempted, id) \
                 JOIN upd ON upd.id = t.id WHERE attempted GROUP BY wh), \
              l AS ( \
                 SELECT w.id FROM webhooks w JOIN h ON h.wh = w.id \
                 WHERE NOT h.ok OR w.failing_since IS NOT NULL ORDER BY w.id FOR UPDATE OF w), \
              streak AS ( \
                 UPDATE webhooks w SET \
                     failing_since = CASE WHEN h.ok THEN NULL ELSE coalesce(w.failing_since, now()) END, \
                     failures = CASE WHEN h.ok THEN 0 ELSE w.failures + h.n::int END \
                 FROM l JOIN h ON h.wh = l.id WHERE w.id = l.id \
                 RETURNING w.id, w.failing_since, w.failures, w.disabled_at IS NULL AND w.deleted_at IS NULL AS live) \
         SELECT id, failing_since, failures FROM streak WHERE live AND failing_since IS NOT NULL",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&attempted)
    .bind(&next)
    .bind(&codes)
    .bind(&errors)
    .bind(&bodies)
    .bind(&durations)
    .bind(&hooks)
    .bind(&before)
    .fetch_all(&mut *conn)
    .await?;
    // Wake the scheduler so it sleeps until the earliest of these.
    if batch.iter().any(|a| a.next_attempt_at.is_some()) {
        events::notify(conn, channels::DUE, "").await?;
    }
    rows.iter()
        .map(|r| {
            Ok(FailureStreak {
                webhook_id: r.try_get("id")?,
                since: r.try_get("failing_since")?,
                failures: r.try_get("failures")?,
            })
        })
        .collect()
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

/// Before they are handed to the broker: the rows are the broker's now, so a message
/// never finds its row still waiting (or `failed`). Each is due again after
/// `republish_after` unless a worker claims it first: a row marked but never published
/// (the scheduler died, the publish failed) is not lost. Only rows still due at the
/// time that was read are changed. Returns those, and the time they are due again.
pub async fn mark_enqueued(
    conn: &mut PgConnection,
    rows: &[(Uuid, DateTime<Utc>)],
    republish_after: std::time::Duration,
) -> Result<(Vec<Uuid>, Option<DateTime<Utc>>), StorageError> {
    let (ids, at): (Vec<Uuid>, Vec<DateTime<Utc>>) = rows.iter().copied().unzip();
    let marked = sqlx::query(
        "UPDATE deliveries d SET next_attempt_at = now() + make_interval(secs => $3), claimed_until = NULL, \
             status = CASE WHEN d.status = 'failed' THEN 'pending' ELSE d.status END \
         FROM unnest($1::uuid[], $2::timestamptz[]) v(id, at) WHERE d.id = v.id AND d.next_attempt_at = v.at \
         RETURNING d.id, d.next_attempt_at",
    )
    .bind(&ids)
    .bind(&at)
    .bind(republish_after.as_secs_f64())
    .fetch_all(conn)
    .await?;
    let until = marked
        .first()
        .map(|r| r.try_get("next_attempt_at"))
        .transpose()?;
    let ids = marked
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    Ok((ids, until))
}

/// After a publish failed: the rows [`mark_enqueued`] marked at `until` and no worker
/// claimed are due again now.
pub async fn unmark_enqueued(
    conn: &mut PgConnection,
    ids: &[Uuid],
    until: DateTime<Utc>,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "UPDATE deliveries SET next_attempt_at = now() \
         WHERE id = ANY($1) AND next_attempt_at = $2 AND claimed_until IS NULL",
    )
    .bind(ids)
    .bind(until)
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
    /// Which finish of the build (or attempt of the job) this status belongs to: a
    /// retry starts the next round, where pending after a final state is right.
    pub round: i32,
    pub description: String,
    pub target_url: String,
}

/// Records the newest wanted status. A newer build replaces an older one; within one
/// build a later round replaces an earlier one, and within one round a status only
/// moves forward (pending → final). Returns true when it changed.
pub async fn want_status(
    conn: &mut PgConnection,
    w: &WantedStatus,
    skip: bool,
    held: bool,
) -> Result<bool, StorageError> {
    let changed: Option<i64> = sqlx::query_scalar(
        "INSERT INTO commit_statuses AS c (repository, sha, context, org_id, pipeline_id, build_id, state, rank, \
                                           description, target_url, status, sent_version, next_attempt_at, round) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $11 THEN 'skipped' ELSE 'pending' END, \
                 CASE WHEN $11 THEN 1 ELSE 0 END, CASE WHEN $12 THEN now() END, $13) \
         ON CONFLICT (repository, sha, context) DO UPDATE SET \
             build_id = excluded.build_id, state = excluded.state, rank = excluded.rank, \
             round = excluded.round, \
             description = excluded.description, target_url = excluded.target_url, \
             version = c.version + 1, \
             sent_version = CASE WHEN $11 THEN c.version + 1 ELSE c.sent_version END, \
             status = CASE WHEN $11 THEN 'skipped' ELSE 'pending' END, attempts = 0, \
             next_attempt_at = CASE WHEN $12 THEN now() END, \
             updated_at = now() \
         WHERE (excluded.build_id > c.build_id \
                OR (excluded.build_id = c.build_id \
                    AND (excluded.round, excluded.rank) > (c.round, c.rank))) \
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
    .bind(w.round)
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
    .execute(&mut *conn)
    .await?
    .rows_affected();
    // Finished recovers, once they are history too.
    let r = sqlx::query(
        "DELETE FROM webhook_recoveries WHERE id IN (SELECT id FROM webhook_recoveries \
         WHERE finished_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_s)
    .bind(batch)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(a + d + p + r)
}

//! The outbox relay: publishes committed events from PostgreSQL to RabbitMQ's
//! `{prefix}.events` exchange, in order, with publisher confirms, and a copy of the
//! events of pipelines with a GitHub integration to `{prefix}.status`, the
//! commit-status fan-out's exchange (an event no status can follow costs no message).
//!
//! Owns nothing but the hand-over. Reads the outbox on its own small pool and never
//! holds a transaction while it talks to the broker: rows are read, published and
//! confirmed, and only then marked published. A relay killed in between publishes
//! them again (at-least-once; consumers deduplicate by message id). One relay at a
//! time is elected with an advisory lock, so several relay processes never storm the
//! broker and the events of a build keep their order.

use herald_bus::{OutgoingMessage, Publisher};
use herald_storage::maintenance::{self, keys};
use herald_storage::{channels, outbox, wake, LocalWakes, StorageError};
use sqlx::{Connection, PgConnection, PgPool};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct RelaySettings {
    pub batch_size: i64,
    /// The relay wakes on NOTIFY at commit; this poll is only a backstop.
    pub backstop_poll_s: f64,
    /// Rows the broker confirmed are marked published at most this often, in one
    /// write, instead of one write per small batch. Until then the relay excludes them
    /// by id; a relay that dies first publishes them again (consumers deduplicate).
    pub mark_interval_ms: u64,
    /// Woken from idle, the relay waits this long before it reads, so that the events
    /// of the next few commits go out in one read and one confirmed batch instead of
    /// one each. Adds as much to an event's way to the broker.
    pub coalesce_ms: u64,
}

/// Confirmed rows waiting for their mark beyond this many are marked at once: the
/// read excludes them one by one.
const MAX_UNMARKED: usize = 256;

pub async fn run(
    url: String,
    pool: PgPool,
    publisher: Arc<Publisher>,
    settings: RelaySettings,
    local: LocalWakes,
    cancel: CancellationToken,
) {
    metrics::gauge!("herald_leader", "role" => "relay").set(0.0);
    let mut backoff = Duration::from_millis(200);
    while !cancel.is_cancelled() {
        match lead(&url, &pool, &publisher, &settings, &local, &cancel).await {
            Ok(()) => break,
            Err(e) => {
                metrics::gauge!("herald_relay_leader").set(0.0);
                metrics::gauge!("herald_leader", "role" => "relay").set(0.0);
                tracing::warn!(error = %e, "relay session ended; standing for election again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics::gauge!("herald_relay_leader").set(0.0);
    metrics::gauge!("herald_leader", "role" => "relay").set(0.0);
}

async fn lead(
    url: &str,
    pool: &PgPool,
    publisher: &Publisher,
    s: &RelaySettings,
    local: &LocalWakes,
    cancel: &CancellationToken,
) -> Result<(), StorageError> {
    let mut session =
        maintenance::leader_session(url, &format!("herald-relay-{}", std::process::id())).await?;
    tokio::select! {
        r = maintenance::acquire(&mut session, keys::RELAY) => r?,
        _ = cancel.cancelled() => return Ok(()),
    }
    tracing::info!("elected outbox relay");
    metrics::gauge!("herald_relay_leader").set(1.0);
    metrics::gauge!("herald_leader", "role" => "relay").set(1.0);
    let wake = Arc::new(Notify::new());
    let listening = cancel.child_token();
    tokio::spawn(listen(
        pool.clone(),
        local.clone(),
        wake.clone(),
        listening.clone(),
    ));
    let result = relay_loop(&mut session, publisher, s, &wake, cancel).await;
    listening.cancel();
    if result.is_ok() {
        let _ = maintenance::release(&mut session, keys::RELAY).await;
        let _ = session.close().await;
    }
    result
}

async fn relay_loop(
    session: &mut PgConnection,
    publisher: &Publisher,
    s: &RelaySettings,
    wake: &Notify,
    cancel: &CancellationToken,
) -> Result<(), StorageError> {
    let backstop = Duration::from_secs_f64(s.backstop_poll_s.max(0.1));
    let mark_every = Duration::from_millis(s.mark_interval_ms);
    let coalesce = Duration::from_millis(s.coalesce_ms);
    let mut broker_backoff = Duration::from_millis(100);
    // Losing a mark in a crash only republishes, so the marks need not wait for the
    // WAL flush. Events keep synchronous commit: they are written by other sessions.
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut *session)
        .await?;
    // Confirmed by the broker and not yet marked; `since` is when the oldest was.
    let mut confirmed: Vec<i64> = Vec::new();
    let mut since = Instant::now();
    loop {
        let mark = !confirmed.is_empty()
            && (confirmed.len() >= MAX_UNMARKED
                || since.elapsed() >= mark_every
                || cancel.is_cancelled());
        // Reads run on the leader's own session: if it died, we are no longer leader.
        let rows = outbox::mark_and_fetch(session, &confirmed, mark, s.batch_size).await?;
        if mark {
            metrics::counter!("herald_relay_published_total").increment(confirmed.len() as u64);
            confirmed.clear();
        }
        if cancel.is_cancelled() && confirmed.is_empty() {
            return Ok(());
        }
        if rows.is_empty() {
            metrics::gauge!("herald_outbox_backlog").set(0.0);
            let mark_due = if confirmed.is_empty() {
                backstop
            } else {
                mark_every.saturating_sub(since.elapsed())
            };
            tokio::select! {
                _ = wake.notified() => {
                    if !coalesce.is_zero() {
                        tokio::time::sleep(coalesce).await;
                    }
                }
                _ = tokio::time::sleep(backstop.min(mark_due)) => {}
                // Loops once more to mark what is confirmed, then returns.
                _ = cancel.cancelled() => {}
            }
            continue;
        }
        // One span per traced event, open until the broker confirmed the batch.
        let mut spans = Vec::new();
        let msgs: Vec<OutgoingMessage> = rows
            .iter()
            .map(|r| {
                let mut headers: Vec<(String, String)> = r
                    .build_id
                    .map(|b| vec![("build_id".to_owned(), b.to_string())])
                    .unwrap_or_default();
                if let Some(tp) = r.traceparent.as_deref() {
                    headers.push((
                        herald_trace::HEADER.to_owned(),
                        publish_span(r, tp, &mut spans),
                    ));
                }
                OutgoingMessage {
                    routing_key: r.event_type.clone(),
                    message_id: r.event_id.to_string(),
                    body: serde_json::to_vec(&r.payload).unwrap_or_default(),
                    headers,
                }
            })
            .collect();
        // Commit statuses follow only the builds of pipelines with a GitHub
        // integration: only those events are copied to their queue.
        let status: Vec<OutgoingMessage> = rows
            .iter()
            .zip(&msgs)
            .filter(|(r, _)| r.github)
            .map(|(_, m)| m.clone())
            .collect();
        let mut published = publisher.publish_events(&msgs).await;
        if published.is_ok() && !status.is_empty() {
            published = publisher.publish_status_events(&status).await;
        }
        drop(spans);
        match published {
            Ok(()) => {
                broker_backoff = Duration::from_millis(100);
                if confirmed.is_empty() {
                    since = Instant::now();
                }
                confirmed.extend(rows.iter().map(|r| r.id));
            }
            Err(e) => {
                // The rows stay unpublished; nothing is lost while the broker is away.
                metrics::counter!("herald_relay_publish_errors_total").increment(1);
                tracing::warn!(error = %e, n = rows.len(), "publish failed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(broker_backoff) => {}
                    _ = cancel.cancelled() => {}
                }
                broker_backoff = (broker_backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Opens the publish span of a traced event, child of the writer's span, and returns
/// the `traceparent` the message carries on: its own, or the writer's as it was when
/// this process exports no traces.
fn publish_span(row: &outbox::OutboxRow, writer: &str, spans: &mut Vec<tracing::Span>) -> String {
    let span = herald_trace::span(|| {
        tracing::info_span!("outbox publish", otel.kind = "producer",
            event.id = %row.event_id, event.r#type = %row.event_type)
    });
    herald_trace::set_parent(&span, Some(writer));
    let own = herald_trace::of(&span);
    spans.push(span);
    own.unwrap_or_else(|| writer.to_owned())
}

async fn listen(pool: PgPool, local: LocalWakes, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut heard = wake::listen(pool, &local, &[channels::OUTBOX], cancel);
    while heard.recv().await.is_some() {
        wake.notify_one();
    }
}

//! Heartbeats are buffered in memory and written in one statement per flush, so a
//! thousand idle agents cost one transaction every few seconds, not a thousand.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Default)]
pub struct Heartbeats {
    pending: Mutex<HashMap<Uuid, DateTime<Utc>>>,
}

impl Heartbeats {
    pub fn record(&self, agent: Uuid) -> DateTime<Utc> {
        let now = Utc::now();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(agent, now);
        }
        now
    }

    pub async fn flush(&self, pool: &PgPool, min_advance: Duration) {
        let beats: Vec<(Uuid, DateTime<Utc>)> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        if beats.is_empty() {
            return;
        }
        let result = async {
            let mut conn = pool.acquire().await?;
            herald_storage::agents::record_heartbeats(&mut conn, &beats, min_advance).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, n = beats.len(), "heartbeat flush failed; keeping them for the next one");
            if let Ok(mut p) = self.pending.lock() {
                for (agent, at) in beats {
                    p.entry(agent).or_insert(at);
                }
            }
        }
    }

    pub async fn run(
        &self,
        pool: PgPool,
        every: Duration,
        min_advance: Duration,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.flush(&pool, min_advance).await,
                _ = cancel.cancelled() => {
                    self.flush(&pool, min_advance).await;
                    return;
                }
            }
        }
    }
}

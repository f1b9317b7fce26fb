//! Parked pings. Each API process listens once on PostgreSQL's `herald_assigned`
//! channel and wakes the agent's parked ping in memory, whichever process assigned the
//! job. A parked ping costs no database query while it waits.

use crate::cache::TokenCache;
use herald_storage::{channels, wake, Heard, LocalWakes};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Default)]
pub struct Parked {
    slots: Mutex<HashMap<Uuid, watch::Sender<Option<Uuid>>>>,
}

impl Parked {
    /// The agent's mailbox: holds the job last assigned to it, if any.
    pub fn subscribe(&self, agent: Uuid) -> watch::Receiver<Option<Uuid>> {
        match self.slots.lock() {
            Ok(mut slots) => slots
                .entry(agent)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe(),
            Err(_) => watch::channel(None).1,
        }
    }

    pub fn deliver(&self, agent: Uuid, job: Uuid) {
        if let Ok(mut slots) = self.slots.lock() {
            slots
                .entry(agent)
                .or_insert_with(|| watch::channel(None).0)
                .send_replace(Some(job));
        }
    }

    /// Empties the mailbox if it still holds `job`.
    pub fn clear(&self, agent: Uuid, job: Uuid) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(tx) = slots.get(&agent) {
                tx.send_if_modified(|v| {
                    if *v == Some(job) {
                        *v = None;
                        true
                    } else {
                        false
                    }
                });
                if tx.receiver_count() == 0 && tx.borrow().is_none() {
                    slots.remove(&agent);
                }
            }
        }
    }

    pub fn forget(&self, agent: Uuid) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&agent);
        }
    }

    pub fn parked_count(&self) -> usize {
        self.slots
            .lock()
            .map(|s| s.values().filter(|tx| tx.receiver_count() > 0).count())
            .unwrap_or(0)
    }
}

/// Listens for assignments and agent departures until cancelled. On every (re)connect
/// (and whenever it may have missed something) it reloads the pending assignments.
pub async fn listen(
    pool: PgPool,
    local: LocalWakes,
    parked: Arc<Parked>,
    cache: Arc<TokenCache>,
    cancel: CancellationToken,
) {
    let mut heard = wake::listen(
        pool.clone(),
        &local,
        &[channels::ASSIGNED, channels::AGENT_GONE],
        cancel,
    );
    while let Some(h) = heard.recv().await {
        match h {
            Heard::Notice { channel, payload } => handle(&channel, &payload, &parked, &cache),
            Heard::Resync => {
                cache.forget_all_agents();
                if let Err(e) = resync(&pool, &parked).await {
                    tracing::warn!(error = %e, "cannot reload pending assignments");
                }
            }
        }
    }
}

fn handle(channel: &str, payload: &str, parked: &Parked, cache: &TokenCache) {
    if channel == channels::ASSIGNED {
        let mut parts = payload.split(' ');
        if let (Some(Ok(agent)), Some(Ok(job))) = (
            parts.next().map(Uuid::parse_str),
            parts.next().map(Uuid::parse_str),
        ) {
            parked.deliver(agent, job);
        }
    } else if channel == channels::AGENT_GONE {
        if let Ok(agent) = Uuid::parse_str(payload) {
            cache.forget_agent(agent);
            parked.forget(agent);
        }
    }
}

async fn resync(pool: &PgPool, parked: &Parked) -> Result<(), herald_storage::StorageError> {
    let mut conn = pool.acquire().await?;
    for (agent, job) in herald_storage::dispatch::pending_assignments(&mut conn).await? {
        parked.deliver(agent, job);
    }
    Ok(())
}

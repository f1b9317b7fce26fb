//! Parked pings. Each API process listens once on PostgreSQL's `herald_assigned`
//! channel and wakes the agent's parked ping in memory, whichever process assigned the
//! job. A parked ping costs no database query while it waits. The same connection
//! hears `herald_cancel`, which marks the heartbeat cancel lists stale.

use crate::cache::TokenCache;
use crate::stops::Stops;
use herald_storage::views::JobView;
use herald_storage::{channels, wake, Heard, LocalWakes};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a job handed over in memory by this process's dispatcher may be given to a
/// ping without reading it again. A ping parked when the job was assigned takes it at
/// once; a later ping (the agent came back) reads the row, which may have moved on.
pub const CARRIED_FRESH: Duration = Duration::from_secs(2);

/// What an agent's mailbox holds: the job last assigned to it and, when this
/// process's dispatcher assigned it, the job itself as committed and when.
#[derive(Debug, Clone)]
pub struct Mail {
    pub job: Uuid,
    pub carried: Option<(Arc<JobView>, Instant)>,
}

impl Mail {
    /// The carried job, if it is still fresh and is this agent's.
    pub fn fresh_job(&self, agent: Uuid) -> Option<&JobView> {
        self.carried
            .as_ref()
            .filter(|(j, at)| {
                at.elapsed() < CARRIED_FRESH && j.id == self.job && j.agent_id == Some(agent)
            })
            .map(|(j, _)| j.as_ref())
    }
}

#[derive(Default)]
pub struct Parked {
    slots: Mutex<HashMap<Uuid, watch::Sender<Option<Mail>>>>,
}

impl Parked {
    /// The agent's mailbox: holds the job last assigned to it, if any.
    pub fn subscribe(&self, agent: Uuid) -> watch::Receiver<Option<Mail>> {
        match self.slots.lock() {
            Ok(mut slots) => slots
                .entry(agent)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe(),
            Err(_) => watch::channel(None).1,
        }
    }

    pub fn deliver(&self, agent: Uuid, job: Uuid, carried: Option<JobView>) {
        let mail = Mail {
            job,
            carried: carried.map(|j| (Arc::new(j), Instant::now())),
        };
        if let Ok(mut slots) = self.slots.lock() {
            slots
                .entry(agent)
                .or_insert_with(|| watch::channel(None).0)
                .send_replace(Some(mail));
        }
    }

    /// Empties the mailbox if it still holds `job`.
    pub fn clear(&self, agent: Uuid, job: Uuid) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(tx) = slots.get(&agent) {
                tx.send_if_modified(|v| {
                    if v.as_ref().is_some_and(|m| m.job == job) {
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
    stops: Arc<Stops>,
    cancel: CancellationToken,
) {
    let mut heard = wake::listen(
        pool.clone(),
        &local,
        &[channels::ASSIGNED, channels::AGENT_GONE, channels::CANCEL],
        cancel,
    );
    while let Some(h) = heard.recv().await {
        match h {
            Heard::Notice { channel, .. } if channel == channels::CANCEL => stops.invalidate(),
            Heard::Notice { channel, payload } => handle(&channel, &payload, &parked, &cache),
            Heard::Resync => {
                stops.invalidate();
                if let Err(e) = refresh_agents(&pool, &cache).await {
                    tracing::warn!(error = %e, "cannot re-read cached agents; forgetting them");
                    cache.forget_all_agents();
                }
                if let Err(e) = resync(&pool, &parked).await {
                    tracing::warn!(error = %e, "cannot reload pending assignments");
                }
            }
        }
    }
}

fn handle(channel: &str, payload: &str, parked: &Parked, cache: &TokenCache) {
    if channel == channels::ASSIGNED {
        // "agent job", and from this process's dispatcher "agent job {the job}".
        let mut parts = payload.splitn(3, ' ');
        if let (Some(Ok(agent)), Some(Ok(job))) = (
            parts.next().map(Uuid::parse_str),
            parts.next().map(Uuid::parse_str),
        ) {
            let carried = parts
                .next()
                .and_then(|j| serde_json::from_str::<JobView>(j).ok());
            parked.deliver(agent, job, carried);
        }
    } else if channel == channels::AGENT_GONE {
        if let Ok(agent) = Uuid::parse_str(payload) {
            cache.forget_agent(agent);
            parked.forget(agent);
        }
    }
}

/// A departure may have been missed: re-read every cached agent in one query.
async fn refresh_agents(
    pool: &PgPool,
    cache: &TokenCache,
) -> Result<(), herald_storage::StorageError> {
    let ids = cache.cached_agents();
    if ids.is_empty() {
        return Ok(());
    }
    let mut conn = pool.acquire().await?;
    let fresh = herald_storage::agents::auth_by_ids(&mut conn, &ids).await?;
    cache.refresh_agents(&ids, &fresh);
    Ok(())
}

async fn resync(pool: &PgPool, parked: &Parked) -> Result<(), herald_storage::StorageError> {
    let mut conn = pool.acquire().await?;
    for (agent, job) in herald_storage::dispatch::pending_assignments(&mut conn).await? {
        parked.deliver(agent, job, None);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: Uuid, agent: Uuid) -> JobView {
        serde_json::from_value(serde_json::json!({
            "id": id, "build_id": Uuid::now_v7(), "key": "a", "label": null,
            "command": "true", "queue": "default", "priority": 0, "state": "assigned",
            "depends_on": [], "agent_id": agent, "exit_status": null, "env": {},
            "created_at": "2026-11-28T00:00:00Z", "scheduled_at": "2026-11-28T00:00:01Z",
            "assigned_at": "2026-11-28T00:00:02Z", "accepted_at": null,
            "started_at": null, "finished_at": null
        }))
        .expect("a job view")
    }

    #[test]
    fn a_carried_job_is_given_only_while_fresh_and_only_to_its_agent() {
        let (agent, other, id) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let fresh = Mail {
            job: id,
            carried: Some((Arc::new(job(id, agent)), Instant::now())),
        };
        assert_eq!(fresh.fresh_job(agent).map(|j| j.id), Some(id));
        assert!(fresh.fresh_job(other).is_none(), "another agent's job");
        if let Some(old) = Instant::now().checked_sub(CARRIED_FRESH) {
            let stale = Mail {
                job: id,
                carried: Some((Arc::new(job(id, agent)), old)),
            };
            assert!(
                stale.fresh_job(agent).is_none(),
                "stale: read the row again"
            );
        }
        let mismatched = Mail {
            job: Uuid::now_v7(),
            carried: fresh.carried.clone(),
        };
        assert!(
            mismatched.fresh_job(agent).is_none(),
            "not the job in the mailbox"
        );
        let bare = Mail {
            job: id,
            carried: None,
        };
        assert!(bare.fresh_job(agent).is_none());
    }

    #[test]
    fn an_assignment_from_this_process_carries_the_job_and_one_from_another_does_not() {
        let parked = Parked::default();
        let cache = TokenCache::default();
        let (agent, id) = (Uuid::now_v7(), Uuid::now_v7());
        let mailbox = parked.subscribe(agent);
        let full = format!(
            "{agent} {id} {}",
            serde_json::to_string(&job(id, agent)).expect("json")
        );
        handle(channels::ASSIGNED, &full, &parked, &cache);
        let mail = mailbox.borrow().clone().expect("mail");
        assert_eq!(mail.fresh_job(agent).map(|j| j.id), Some(id));
        handle(
            channels::ASSIGNED,
            &format!("{agent} {id}"),
            &parked,
            &cache,
        );
        let mail = mailbox.borrow().clone().expect("mail");
        assert_eq!(mail.job, id);
        assert!(mail.carried.is_none());
        parked.clear(agent, id);
        assert!(mailbox.borrow().is_none());
    }
}

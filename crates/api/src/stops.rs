//! The heartbeat's `cancel` list: which jobs each agent must stop. Every API process
//! keeps the whole list in memory (it is small: jobs `canceling` or ended by Herald
//! while their agent held them) and reads it again in one indexed query only when a
//! `herald_cancel` wake-up (heard by the
//! assignment listener, `parked::listen`) said it changed, or when a heartbeat finds it older than
//! [`BACKSTOP`]. Ten thousand idle agents' heartbeats cost no query each.

use herald_storage::lifecycle;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How old the list may be before a heartbeat reads it again, in case a wake-up was
/// lost.
pub const BACKSTOP: Duration = Duration::from_secs(5);

/// Jobs to stop by agent, and when that was read.
type List = (HashMap<Uuid, Vec<Uuid>>, Option<Instant>);

pub struct Stops {
    list: Mutex<List>,
    dirty: AtomicBool,
    refresh: tokio::sync::Mutex<()>,
}

impl Default for Stops {
    fn default() -> Self {
        Stops {
            list: Mutex::new((HashMap::new(), None)),
            dirty: AtomicBool::new(true),
            refresh: tokio::sync::Mutex::new(()),
        }
    }
}

impl Stops {
    pub fn invalidate(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    fn fresh(&self) -> bool {
        !self.dirty.load(Ordering::SeqCst)
            && self
                .list
                .lock()
                .map(|l| l.1.is_some_and(|at| at.elapsed() < BACKSTOP))
                .unwrap_or(false)
    }

    /// The jobs `agent` must stop, oldest first.
    pub async fn for_agent(&self, pool: &PgPool, agent: Uuid) -> Vec<Uuid> {
        if !self.fresh() {
            let _one = self.refresh.lock().await;
            if !self.fresh() {
                // Cleared before the read: a change during it marks the list again.
                self.dirty.store(false, Ordering::SeqCst);
                match self.read(pool).await {
                    Ok(map) => {
                        if let Ok(mut l) = self.list.lock() {
                            *l = (map, Some(Instant::now()));
                        }
                        metrics::counter!("herald_cancel_list_reads_total").increment(1);
                    }
                    Err(e) => {
                        self.invalidate();
                        tracing::warn!(error = %e, "cannot read the cancel list; using the last one");
                    }
                }
            }
        }
        self.list
            .lock()
            .ok()
            .and_then(|l| l.0.get(&agent).cloned())
            .unwrap_or_default()
    }

    async fn read(
        &self,
        pool: &PgPool,
    ) -> Result<HashMap<Uuid, Vec<Uuid>>, herald_storage::StorageError> {
        let mut conn = pool.acquire().await?;
        let mut map: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (agent, job) in lifecycle::jobs_to_stop(&mut conn).await? {
            map.entry(agent).or_default().push(job);
        }
        for jobs in map.values_mut() {
            jobs.sort_unstable();
        }
        Ok(map)
    }
}

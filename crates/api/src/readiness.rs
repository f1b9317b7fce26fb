//! What `/readyz` reports for any process, whatever its roles: each dependency the
//! roles need (named probes) and each role's loop (a liveness registry the role tasks
//! hold a guard of while they run).

use crate::Probe;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one probe may take before it counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The loops of this process, by name (`role:relay`, ...). A name is running while
/// every guard registered under it is alive.
#[derive(Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<BTreeMap<String, Vec<Arc<AtomicBool>>>>>,
}

/// Held by a role's task; dropping it (the task ended, returned or panicked) marks the
/// loop stopped.
pub struct LoopGuard(Arc<AtomicBool>);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Liveness {
    pub fn register(&self, name: &str) -> LoopGuard {
        let flag = Arc::new(AtomicBool::new(true));
        if let Ok(mut loops) = self.loops.lock() {
            loops.entry(name.to_owned()).or_default().push(flag.clone());
        }
        LoopGuard(flag)
    }

    /// Each registered name and whether all its loops still run.
    pub fn states(&self) -> Vec<(String, bool)> {
        match self.loops.lock() {
            Ok(loops) => loops
                .iter()
                .map(|(name, flags)| {
                    let alive = flags.iter().all(|f| f.load(Ordering::Relaxed));
                    (name.clone(), alive)
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Watches `task`: the loop `name` runs until the task ends.
    pub fn watch(
        &self,
        name: &str,
        task: tokio::task::JoinHandle<()>,
    ) -> tokio::task::JoinHandle<()> {
        let guard = self.register(name);
        tokio::spawn(async move {
            let _guard = guard;
            let _ = task.await;
        })
    }
}

/// The health endpoints' state: probes of the dependencies, the loops, the metrics.
#[derive(Clone, Default)]
pub struct Health {
    pub probes: Vec<(String, Probe)>,
    /// Reported, but not needed for readiness: the process works without them (reads
    /// fall back from a replica that is down to the primary).
    pub optional: Vec<(String, Probe)>,
    pub liveness: Liveness,
    pub metrics: Option<PrometheusHandle>,
}

impl Health {
    /// Runs every probe (concurrently, each bounded by [`PROBE_TIMEOUT`]) and reads
    /// every loop: `(ready, checks)` with `"ok"` or the error per name.
    pub async fn check(&self) -> (bool, BTreeMap<String, String>) {
        let (needed, optional) =
            futures::future::join(run(&self.probes), run(&self.optional)).await;
        let mut ready = needed.values().all(|v| v == "ok");
        let mut checks = needed;
        checks.extend(optional);
        for (name, alive) in self.liveness.states() {
            ready &= alive;
            let state = if alive { "ok" } else { "stopped" };
            checks.insert(name, state.to_owned());
        }
        (ready, checks)
    }
}

/// Runs `probes` concurrently, each bounded by [`PROBE_TIMEOUT`].
async fn run(probes: &[(String, Probe)]) -> BTreeMap<String, String> {
    let runs = probes.iter().map(|(name, probe)| async move {
        let state = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
        };
        (name.clone(), state)
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// A probe that runs `SELECT 1` on `pool`.
pub fn database_probe(pool: sqlx::PgPool) -> Probe {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_loop_makes_the_process_unready() {
        let health = Health::default();
        let guard = health.liveness.register("role:relay");
        let ok: Probe = Arc::new(|| Box::pin(async { Ok(()) }));
        let down: Probe = Arc::new(|| Box::pin(async { Err("connection refused".into()) }));
        let mut health = health;
        health.probes.push(("broker".into(), ok));
        let (ready, checks) = health.check().await;
        assert!(ready);
        assert_eq!(checks["role:relay"], "ok");
        assert_eq!(checks["broker"], "ok");
        drop(guard);
        let (ready, checks) = health.check().await;
        assert!(!ready);
        assert_eq!(checks["role:relay"], "stopped");
        health
            .probes
            .push(("database:primary".into(), down.clone()));
        let (_, checks) = health.check().await;
        assert_eq!(checks["database:primary"], "connection refused");
        // An optional dependency is reported, and does not make the process unready.
        let mut health = Health::default();
        health.optional.push(("database:replica".into(), down));
        let (ready, checks) = health.check().await;
        assert!(ready);
        assert_eq!(checks["database:replica"], "connection refused");
    }
}

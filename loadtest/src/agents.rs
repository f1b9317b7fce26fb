//! The simulated agents and the state they share with the build creator: error
//! counts, the tracker of created and dispatched jobs, latency histograms, and the
//! agent loop (long poll, accept, start, sleep, finish).

use crate::builds::roots;
use crate::Args;
use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use herald_client::{Client, PingJob};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Default)]
pub struct Errors {
    pub ping: AtomicU64,
    pub accept: AtomicU64,
    pub start: AtomicU64,
    pub finish: AtomicU64,
    pub create: AtomicU64,
    pub last: Mutex<Vec<String>>,
}

impl Errors {
    pub fn record(&self, counter: &AtomicU64, what: &str, e: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap();
        // Keep the first few distinct messages for the report.
        let msg = format!("{what}: {e}");
        let msg: String = msg.chars().take(300).collect();
        if last.len() < 8 && !last.contains(&msg) {
            last.push(msg);
        }
    }

    pub fn total(&self) -> u64 {
        [
            &self.ping,
            &self.accept,
            &self.start,
            &self.finish,
            &self.create,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub fn line(&self) -> String {
        format!(
            "ping {}, accept {}, start {}, finish {}, create build {}",
            self.ping.load(Ordering::Relaxed),
            self.accept.load(Ordering::Relaxed),
            self.start.load(Ordering::Relaxed),
            self.finish.load(Ordering::Relaxed),
            self.create.load(Ordering::Relaxed),
        )
    }
}

/// Which created jobs are still to be dispatched, to detect lost or duplicated jobs.
#[derive(Default)]
pub struct Tracker {
    /// Created, not yet dispatched, not skipped.
    pub pending: HashSet<String>,
    /// Job → the jobs that depend on it (skipped by Herald when it fails).
    pub dependents: HashMap<String, Vec<String>>,
    /// Dispatched at least once.
    pub seen: HashSet<String>,
    /// Finished with a failure.
    pub failed: HashSet<String>,
    /// Jobs we expect Herald to skip because a dependency failed.
    pub skipped: u64,
}

impl Tracker {
    /// Registers a created build's jobs (from the create response).
    pub fn add_build(&mut self, jobs: &[(String, Vec<String>)]) {
        for (id, deps) in jobs {
            for d in deps {
                self.dependents
                    .entry(d.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
        for (id, deps) in jobs {
            // The job may already have reached an agent before the create returned.
            if self.seen.contains(id) {
                continue;
            }
            if deps.iter().any(|d| self.failed.contains(d)) {
                self.skip(id);
                continue;
            }
            self.pending.insert(id.clone());
        }
    }

    /// Returns false when the job had already been dispatched once (a duplicate).
    pub fn dispatched(&mut self, id: &str) -> bool {
        self.pending.remove(id);
        self.seen.insert(id.to_owned())
    }

    pub fn failed(&mut self, id: &str) {
        self.failed.insert(id.to_owned());
        let deps = self.dependents.get(id).cloned().unwrap_or_default();
        for d in deps {
            self.skip(&d);
        }
    }

    pub fn skip(&mut self, id: &str) {
        if self.pending.remove(id) {
            self.skipped += 1;
        }
        let deps = self.dependents.get(id).cloned().unwrap_or_default();
        for d in deps {
            self.skip(&d);
        }
    }
}

pub struct Shared {
    pub args: Args,
    pub stop: AtomicBool,
    /// Microseconds since the epoch at which the load phase started; 0 before.
    pub load_start_us: AtomicU64,
    /// Agents with a long poll in flight.
    pub parked: AtomicUsize,
    /// Agents working on a job (between the ping's return and the finish).
    pub busy: AtomicUsize,
    /// Every sample of the load phase, microseconds.
    pub hist: Mutex<Histogram<u64>>,
    /// Samples since the last progress line.
    pub window: Mutex<Histogram<u64>>,
    /// The same samples split: jobs scheduled by the build's creation, and jobs
    /// scheduled later by propagation (a dependency passed).
    pub hist_roots: Mutex<Histogram<u64>>,
    pub hist_dependents: Mutex<Histogram<u64>>,
    /// Client-side HTTP round trips during the load phase, microseconds.
    pub api: Mutex<HashMap<&'static str, Histogram<u64>>>,
    /// Jobs handed to an agent (any phase).
    pub dispatched: AtomicU64,
    /// Handed out while the load phase had not started (there should be none).
    pub dispatched_before_load: AtomicU64,
    pub duplicate: AtomicU64,
    pub stale_samples: AtomicU64,
    pub no_scheduled_at: AtomicU64,
    pub negative_latency: AtomicU64,
    pub passed: AtomicU64,
    pub failed: AtomicU64,
    pub builds_created: AtomicU64,
    pub jobs_created: AtomicU64,
    pub tracker: Mutex<Tracker>,
    pub errors: Errors,
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

pub fn now_us() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0)
}

impl Shared {
    pub fn new(args: Args) -> Self {
        Shared {
            args,
            stop: AtomicBool::new(false),
            load_start_us: AtomicU64::new(0),
            parked: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            hist: Mutex::new(new_hist()),
            window: Mutex::new(new_hist()),
            hist_roots: Mutex::new(new_hist()),
            hist_dependents: Mutex::new(new_hist()),
            api: Mutex::new(HashMap::new()),
            dispatched: AtomicU64::new(0),
            dispatched_before_load: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            stale_samples: AtomicU64::new(0),
            no_scheduled_at: AtomicU64::new(0),
            negative_latency: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            builds_created: AtomicU64::new(0),
            jobs_created: AtomicU64::new(0),
            tracker: Mutex::new(Tracker::default()),
            errors: Errors::default(),
        }
    }

    /// A ping returned `job` at `returned_at`.
    pub fn on_dispatch(&self, job: &PingJob, returned_at: DateTime<Utc>) {
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        let load_start = self.load_start_us.load(Ordering::Relaxed);
        if load_start == 0 {
            self.dispatched_before_load.fetch_add(1, Ordering::Relaxed);
        }
        let fresh = self.tracker.lock().unwrap().dispatched(&job.id.to_string());
        if !fresh {
            self.duplicate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(at) = job.scheduled_at else {
            self.no_scheduled_at.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let at_us = at.timestamp_micros();
        if load_start == 0 || at_us < load_start as i64 {
            self.stale_samples.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut us = returned_at.timestamp_micros() - at_us;
        if us < 0 {
            self.negative_latency.fetch_add(1, Ordering::Relaxed);
            us = 0;
        }
        let us = (us as u64).max(1);
        self.hist.lock().unwrap().saturating_record(us);
        self.window.lock().unwrap().saturating_record(us);
        let k: Option<usize> = job.key.strip_prefix('j').and_then(|k| k.parse().ok());
        let dependent = k.is_some_and(|k| k >= roots(self.args.jobs_per_build));
        let split = if dependent {
            &self.hist_dependents
        } else {
            &self.hist_roots
        };
        split.lock().unwrap().saturating_record(us);
    }

    /// Times `f` as API call `what`, when the load phase is on.
    pub async fn timed<T>(&self, what: &'static str, f: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let r = f.await;
        if self.load_start_us.load(Ordering::Relaxed) != 0 {
            let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.api
                .lock()
                .unwrap()
                .entry(what)
                .or_insert_with(new_hist)
                .saturating_record(us.max(1));
        }
        r
    }
}

pub async fn agent_loop(agent: Client, sh: Arc<Shared>) {
    let mut rng = StdRng::from_entropy();
    let wait = sh.args.ping_wait;
    while !sh.stop.load(Ordering::Relaxed) {
        sh.parked.fetch_add(1, Ordering::Relaxed);
        let r = agent.ping(wait).await;
        sh.parked.fetch_sub(1, Ordering::Relaxed);
        let returned_at = Utc::now();
        let job = match r {
            Ok(None) => continue,
            Ok(Some(job)) => job,
            Err(e) => {
                sh.errors.record(&sh.errors.ping, "ping", &e);
                tokio::time::sleep(Duration::from_millis(500 + rng.gen_range(0..500))).await;
                continue;
            }
        };
        sh.on_dispatch(&job, returned_at);
        sh.busy.fetch_add(1, Ordering::Relaxed);
        run_job(&agent, &sh, &job, &mut rng).await;
        sh.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn run_job(agent: &Client, sh: &Shared, job: &PingJob, rng: &mut StdRng) {
    let a = &sh.args;
    if let Err(e) = sh
        .timed("accept", agent.job_call(job.id, "accept", None))
        .await
    {
        sh.errors.record(&sh.errors.accept, "accept", &e);
        return;
    }
    if let Err(e) = sh
        .timed("start", agent.job_call(job.id, "start", None))
        .await
    {
        sh.errors.record(&sh.errors.start, "start", &e);
        return;
    }
    let (lo, hi) = (
        a.job_min_ms.min(a.job_max_ms),
        a.job_max_ms.max(a.job_min_ms),
    );
    let work = rng.gen_range(lo..=hi);
    tokio::time::sleep(Duration::from_millis(work)).await;
    let exit_status = i32::from(rng.gen_bool(a.fail_rate.clamp(0.0, 1.0)));
    let body = json!({"exit_status": exit_status});
    match sh
        .timed("finish", agent.job_call(job.id, "finish", Some(&body)))
        .await
    {
        Ok(_) if exit_status == 0 => {
            sh.passed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            sh.failed.fetch_add(1, Ordering::Relaxed);
            sh.tracker.lock().unwrap().failed(&job.id.to_string());
        }
        Err(e) => sh.errors.record(&sh.errors.finish, "finish", &e),
    }
}

/// Registers `n` agents, `concurrency` at a time (3 attempts each), and starts each
/// agent's loop as soon as it is registered.
pub async fn register_agents(
    org_agent: &Client,
    sh: &Arc<Shared>,
    agents: &mut JoinSet<()>,
) -> Result<()> {
    let n = sh.args.agents;
    let sem = Arc::new(Semaphore::new(sh.args.register_concurrency.max(1)));
    let mut regs = JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let c = org_agent.clone();
        let queue = sh.args.queue.clone();
        regs.spawn(async move {
            let _permit = permit;
            let name = format!("loadtest-{i}");
            let mut last = None;
            for attempt in 0..3u64 {
                match c.register_agent(&name, &[queue.as_str()]).await {
                    Ok(r) => return Ok(r),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
            Err(anyhow!(
                "registering agent {name}: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            ))
        });
        // Start the loops of the agents registered so far.
        while let Some(r) = regs.try_join_next() {
            let reg = r??;
            agents.spawn(agent_loop(
                org_agent.with_token(reg.access_token),
                sh.clone(),
            ));
        }
    }
    while let Some(r) = regs.join_next().await {
        let reg = r??;
        agents.spawn(agent_loop(
            org_agent.with_token(reg.access_token),
            sh.clone(),
        ));
    }
    Ok(())
}

impl Shared {
    /// Forgets the samples and counts of an earlier load phase.
    pub fn reset_samples(&self) {
        for h in [
            &self.hist,
            &self.window,
            &self.hist_roots,
            &self.hist_dependents,
        ] {
            h.lock().unwrap().reset();
        }
        self.api.lock().unwrap().clear();
        for c in [
            &self.passed,
            &self.failed,
            &self.builds_created,
            &self.jobs_created,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_skips_dependents_of_failures() {
        let mut t = Tracker::default();
        t.add_build(&[
            ("a".into(), vec![]),
            ("b".into(), vec!["a".into()]),
            ("c".into(), vec!["b".into()]),
        ]);
        assert!(t.dispatched("a"));
        assert!(!t.dispatched("a"));
        t.failed("a");
        assert!(t.pending.is_empty());
        assert_eq!(t.skipped, 2);
    }
}

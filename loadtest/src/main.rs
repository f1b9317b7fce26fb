//! herald-loadtest: drives a running Herald through its HTTP API only (the
//! `herald-client` crate) and measures
//!
//! 1. the database transactions per second while every agent is parked in a long poll
//!    (read from `pg_stat_database`, the only thing it reads from PostgreSQL), and
//! 2. the dispatch latency under load: the time the agent's ping returned minus the
//!    job's `scheduled_at`, both on this machine's clock.
//!
//! It exits non-zero only when setup fails (org, pipeline, agents, database
//! connection); missed targets are reported, not turned into an exit status.

mod notify;

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use hdrhistogram::Histogram;
use herald_client::{Client, Method, PingJob};
use notify::{Receivers, Scenario};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Targets of issue 2; reported, never enforced through the exit status.
const TARGET_P99_MS: f64 = 25.0;
const TARGET_IDLE_TX_PER_S: f64 = 1.0;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "herald-loadtest",
    version,
    about = "Load test for Herald's dispatch: idle cost of parked agents, dispatch latency under load"
)]
struct Args {
    /// Herald's API base URL.
    #[arg(
        long,
        env = "HERALD_LOADTEST_BASE_URL",
        default_value = "http://127.0.0.1:18080"
    )]
    base_url: String,
    /// Operator token (HERALD_AUTH__ADMIN_TOKEN of the server).
    #[arg(long, env = "HERALD_LOADTEST_ADMIN_TOKEN")]
    admin_token: String,
    /// Herald's primary database, read only for pg_stat_database (the datname is the
    /// database of this URL). Without it the idle transaction rate is not measured.
    #[arg(long, env = "HERALD_LOADTEST_DB_URL")]
    db_url: Option<String>,
    /// Optional: the replica's copy of the same database, to report its read rate too.
    #[arg(long, env = "HERALD_LOADTEST_REPLICA_DB_URL")]
    replica_db_url: Option<String>,
    /// Number of agents to register.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 50)]
    register_concurrency: usize,
    /// Queue every agent listens on and every job goes to.
    #[arg(long, default_value = "default")]
    queue: String,
    /// `wait` of each long poll, seconds (Herald caps it at agents.ping_wait_max_s).
    #[arg(long, default_value_t = 30)]
    ping_wait: u64,
    /// Seconds to let every agent park before measuring the idle phase.
    #[arg(long, default_value_t = 5.0)]
    idle_warmup_s: f64,
    /// Minimum seconds between the end of setup and the first pg_stat_database read.
    /// PostgreSQL backends flush their transaction counts lazily: an idle backend can
    /// hold them for up to 10 s (PGSTAT_IDLE_INTERVAL). Reading sooner counts the
    /// setup burst (registrations, first authentications) as idle traffic. The idle
    /// window opens after max(--idle-warmup-s, --stats-settle-s).
    #[arg(long, default_value_t = 12.0)]
    stats_settle_s: f64,
    /// Length of the idle measurement window, seconds (0 skips the idle phase).
    #[arg(long, default_value_t = 30.0)]
    idle_seconds: f64,
    /// Length of the load phase, seconds (0 skips it).
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    /// Jobs per second to create during the load phase.
    #[arg(long, default_value_t = 100.0)]
    jobs_per_s: f64,
    /// Jobs per build. The first ~60 % are independent; each of the others depends on
    /// one of them, so propagation (scheduling on a dependency's success) is exercised.
    #[arg(long, default_value_t = 5)]
    jobs_per_build: usize,
    /// Build creations in flight at once; when Herald is slower than the rate, the
    /// creator falls behind (visible in the achieved rate) instead of piling up.
    #[arg(long, default_value_t = 64)]
    max_inflight_builds: usize,
    /// Shortest simulated job, milliseconds.
    #[arg(long, default_value_t = 50)]
    job_min_ms: u64,
    /// Longest simulated job, milliseconds.
    #[arg(long, default_value_t = 500)]
    job_max_ms: u64,
    /// Share of jobs that finish with exit status 1.
    #[arg(long, default_value_t = 0.05)]
    fail_rate: f64,
    /// After the load phase, seconds to wait for outstanding jobs to be dispatched and
    /// finished before reporting.
    #[arg(long, default_value_t = 30.0)]
    drain_s: f64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5.0)]
    progress_s: f64,
    #[command(flatten)]
    notify: notify::NotifyArgs,
}

// ---------------------------------------------------------------------------------
// Shared state of all agents and the build creator.

#[derive(Default)]
struct Errors {
    ping: AtomicU64,
    accept: AtomicU64,
    start: AtomicU64,
    finish: AtomicU64,
    create: AtomicU64,
    last: Mutex<Vec<String>>,
}

impl Errors {
    fn record(&self, counter: &AtomicU64, what: &str, e: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap();
        // Keep the first few distinct messages for the report.
        let msg = format!("{what}: {e}");
        let msg: String = msg.chars().take(300).collect();
        if last.len() < 8 && !last.contains(&msg) {
            last.push(msg);
        }
    }

    fn total(&self) -> u64 {
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

    fn line(&self) -> String {
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
struct Tracker {
    /// Created, not yet dispatched, not skipped.
    pending: HashSet<String>,
    /// Job → the jobs that depend on it (skipped by Herald when it fails).
    dependents: HashMap<String, Vec<String>>,
    /// Dispatched at least once.
    seen: HashSet<String>,
    /// Finished with a failure.
    failed: HashSet<String>,
    /// Jobs we expect Herald to skip because a dependency failed.
    skipped: u64,
}

impl Tracker {
    /// Registers a created build's jobs (from the create response).
    fn add_build(&mut self, jobs: &[(String, Vec<String>)]) {
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
    fn dispatched(&mut self, id: &str) -> bool {
        self.pending.remove(id);
        self.seen.insert(id.to_owned())
    }

    fn failed(&mut self, id: &str) {
        self.failed.insert(id.to_owned());
        let deps = self.dependents.get(id).cloned().unwrap_or_default();
        for d in deps {
            self.skip(&d);
        }
    }

    fn skip(&mut self, id: &str) {
        if self.pending.remove(id) {
            self.skipped += 1;
        }
        let deps = self.dependents.get(id).cloned().unwrap_or_default();
        for d in deps {
            self.skip(&d);
        }
    }
}

struct Shared {
    args: Args,
    stop: AtomicBool,
    /// Microseconds since the epoch at which the load phase started; 0 before.
    load_start_us: AtomicU64,
    /// Agents with a long poll in flight.
    parked: AtomicUsize,
    /// Agents working on a job (between the ping's return and the finish).
    busy: AtomicUsize,
    /// Every sample of the load phase, microseconds.
    hist: Mutex<Histogram<u64>>,
    /// Samples since the last progress line.
    window: Mutex<Histogram<u64>>,
    /// The same samples split: jobs scheduled by the build's creation, and jobs
    /// scheduled later by propagation (a dependency passed).
    hist_roots: Mutex<Histogram<u64>>,
    hist_dependents: Mutex<Histogram<u64>>,
    /// Client-side HTTP round trips during the load phase, microseconds.
    api: Mutex<HashMap<&'static str, Histogram<u64>>>,
    /// Jobs handed to an agent (any phase).
    dispatched: AtomicU64,
    /// Handed out while the load phase had not started (there should be none).
    dispatched_before_load: AtomicU64,
    duplicate: AtomicU64,
    stale_samples: AtomicU64,
    no_scheduled_at: AtomicU64,
    negative_latency: AtomicU64,
    passed: AtomicU64,
    failed: AtomicU64,
    builds_created: AtomicU64,
    jobs_created: AtomicU64,
    tracker: Mutex<Tracker>,
    errors: Errors,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

fn now_us() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0)
}

impl Shared {
    fn new(args: Args) -> Self {
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
    fn on_dispatch(&self, job: &PingJob, returned_at: DateTime<Utc>) {
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
    async fn timed<T>(&self, what: &'static str, f: impl std::future::Future<Output = T>) -> T {
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

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, mean {:.2} ms (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.mean() / 1000.0,
        h.len()
    )
}

// ---------------------------------------------------------------------------------
// Agents.

async fn agent_loop(agent: Client, sh: Arc<Shared>) {
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

async fn run_job(agent: &Client, sh: &Shared, job: &PingJob, rng: &mut StdRng) {
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
async fn register_agents(
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

// ---------------------------------------------------------------------------------
// Builds.

fn random_commit(rng: &mut StdRng) -> String {
    (0..40)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// How many of a build's `n` jobs have no dependency.
fn roots(n: usize) -> usize {
    let n = n.clamp(1, 500);
    (n.div_ceil(5) * 3).clamp(1, n)
}

/// A build of `n` jobs: the first ~60 % independent, each other job depending on one
/// of those (job k on job k - roots).
fn build_body(n: usize, queue: &str, rng: &mut StdRng) -> Value {
    let n = n.clamp(1, 500);
    let roots = roots(n);
    let jobs: Vec<Value> = (0..n)
        .map(|k| {
            let deps: Vec<String> = if k >= roots {
                vec![format!("j{}", (k - roots) % roots)]
            } else {
                Vec::new()
            };
            json!({"key": format!("j{k}"), "command": "true", "queue": queue, "depends_on": deps})
        })
        .collect();
    json!({
        "commit": random_commit(rng),
        "branch": "main",
        "message": "herald-loadtest",
        "jobs": jobs,
    })
}

fn created_jobs(build: &Value) -> Vec<(String, Vec<String>)> {
    let jobs = build
        .get("jobs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ids: HashMap<String, String> = jobs
        .iter()
        .filter_map(|j| {
            Some((
                j.get("key")?.as_str()?.to_owned(),
                j.get("id")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    jobs.iter()
        .filter_map(|j| {
            let id = j.get("id")?.as_str()?.to_owned();
            let deps = j
                .get("depends_on")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str())
                        .map(|d| ids.get(d).cloned().unwrap_or_else(|| d.to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            Some((id, deps))
        })
        .collect()
}

/// Creates builds at a steady rate until `deadline`.
async fn create_builds(api: Client, pipeline: String, sh: Arc<Shared>, deadline: Instant) {
    let a = &sh.args;
    let per_build = a.jobs_per_build.clamp(1, 500);
    let builds_per_s = a.jobs_per_s / per_build as f64;
    if !(builds_per_s.is_finite() && builds_per_s > 0.0) {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / builds_per_s);
    let sem = Arc::new(Semaphore::new(a.max_inflight_builds.max(1)));
    let mut rng = StdRng::from_entropy();
    let mut inflight = JoinSet::new();
    let start = Instant::now();
    let mut i: u32 = 0;
    loop {
        let at = start + period * i;
        if at >= deadline || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let body = build_body(per_build, &a.queue, &mut rng);
        let (api, pipeline, sh2) = (api.clone(), pipeline.clone(), sh.clone());
        inflight.spawn(async move {
            let _permit = permit;
            match sh2
                .timed("create build", api.create_build(&pipeline, &body))
                .await
            {
                Ok(b) => {
                    let jobs = created_jobs(&b);
                    sh2.builds_created.fetch_add(1, Ordering::Relaxed);
                    sh2.jobs_created
                        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                    sh2.tracker.lock().unwrap().add_build(&jobs);
                }
                Err(e) => sh2.errors.record(&sh2.errors.create, "create build", &e),
            }
        });
        while inflight.try_join_next().is_some() {}
        i += 1;
    }
    while inflight.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------
// PostgreSQL: pg_stat_database only.

struct TxProbe {
    conn: PgConnection,
    label: &'static str,
}

impl TxProbe {
    async fn connect(url: &str, label: &'static str) -> Result<Self> {
        let conn = PgConnection::connect(url)
            .await
            .with_context(|| format!("connecting to the {label} database for pg_stat_database"))?;
        // One warm-up read, so the connection's own start-up is flushed to the
        // statistics long before the measurement window opens.
        let mut p = TxProbe { conn, label };
        p.read().await?;
        Ok(p)
    }

    /// Committed + rolled back transactions of this database so far. A single simple
    /// query: exactly one transaction of our own.
    async fn read(&mut self) -> Result<i64> {
        let row = sqlx::raw_sql(
            "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut self.conn)
        .await
        .with_context(|| format!("reading pg_stat_database on the {}", self.label))?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// WAL bytes written and WAL flushes (fsyncs) so far, of the whole cluster
    /// (`pg_stat_wal`): what every commit costs the disk and the replica.
    async fn wal(&mut self) -> Result<(i64, i64)> {
        let row = sqlx::raw_sql("SELECT wal_bytes::bigint, wal_sync FROM pg_stat_wal")
            .fetch_one(&mut self.conn)
            .await
            .with_context(|| format!("reading pg_stat_wal on the {}", self.label))?;
        Ok((row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?))
    }
}

struct IdleResult {
    seconds: f64,
    primary: Option<(i64, f64)>,
    replica: Option<(i64, f64)>,
    parked_min: usize,
    parked_max: usize,
    parked_at_end: usize,
    agents: usize,
}

async fn idle_phase(
    sh: &Arc<Shared>,
    primary: &mut Option<TxProbe>,
    replica: &mut Option<TxProbe>,
) -> Result<IdleResult> {
    let a = &sh.args;
    let wait = a.idle_warmup_s.max(a.stats_settle_s).max(0.0);
    println!(
        "[idle] warm-up {wait:.0} s (agents park; PostgreSQL flushes the setup's statistics), \
         then measuring {:.0} s with every agent long-polling (wait={} s)",
        a.idle_seconds, a.ping_wait
    );
    // A read now and one at the end of the warm-up show how much setup traffic was
    // still unflushed: what a too-short warm-up would have counted as idle.
    let before_warmup = match primary.as_mut() {
        Some(p) => Some(p.read().await?),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let mut parked_min = sh.parked.load(Ordering::Relaxed);
    let mut parked_max = parked_min;
    let p0 = match primary.as_mut() {
        Some(p) => Some(p.read().await?),
        None => None,
    };
    if let Some((b, p)) = before_warmup.zip(p0) {
        println!(
            "[idle] {} primary transactions counted during the {wait:.0} s warm-up (setup traffic flushed late)",
            (p - b - 1).max(0)
        );
    }
    let r0 = match replica.as_mut() {
        Some(p) => Some(p.read().await?),
        None => None,
    };
    let started = Instant::now();
    let window = Duration::from_secs_f64(a.idle_seconds.max(0.0));
    let mut next_line = started + Duration::from_secs_f64(a.progress_s.max(1.0));
    while started.elapsed() < window {
        let left = window.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        let p = sh.parked.load(Ordering::Relaxed);
        parked_min = parked_min.min(p);
        parked_max = parked_max.max(p);
        if Instant::now() >= next_line {
            println!(
                "[idle {:>4.0}s] parked {p} of {} agents, errors {}",
                started.elapsed().as_secs_f64(),
                a.agents,
                sh.errors.total()
            );
            next_line += Duration::from_secs_f64(a.progress_s.max(1.0));
        }
    }
    let p1 = match primary.as_mut() {
        Some(p) => Some(p.read().await?),
        None => None,
    };
    let r1 = match replica.as_mut() {
        Some(p) => Some(p.read().await?),
        None => None,
    };
    let seconds = started.elapsed().as_secs_f64();
    // Our own first read committed after its snapshot, so it is in the second count.
    let rate = |a: Option<i64>, b: Option<i64>| {
        a.zip(b).map(|(a, b)| {
            let n = (b - a - 1).max(0);
            (n, n as f64 / seconds)
        })
    };
    Ok(IdleResult {
        seconds,
        primary: rate(p0, p1),
        replica: rate(r0, r1),
        parked_min,
        parked_max,
        parked_at_end: sh.parked.load(Ordering::Relaxed),
        agents: a.agents,
    })
}

// ---------------------------------------------------------------------------------
// Herald's own histograms, from GET /metrics (Prometheus text).

#[derive(Debug, Clone, Default)]
struct PromHist {
    /// (upper bound, cumulative count), ascending.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

fn label_value<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("{name}=\"");
    let i = labels.find(&pat)? + pat.len();
    let rest = &labels[i..];
    Some(&rest[..rest.find('"')?])
}

/// Sums every series of histogram `name` whose labels contain `filter`.
fn parse_hist(text: &str, name: &str, filter: &str) -> Option<PromHist> {
    let mut h = PromHist::default();
    let mut found = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (kind, rest) = if let Some(r) = rest.strip_prefix("_bucket") {
            ("bucket", r)
        } else if let Some(r) = rest.strip_prefix("_sum") {
            ("sum", r)
        } else if let Some(r) = rest.strip_prefix("_count") {
            ("count", r)
        } else {
            continue;
        };
        let (labels, value) = match rest.rfind(' ') {
            Some(i) => (&rest[..i], rest[i + 1..].trim()),
            None => continue,
        };
        if !labels.is_empty() && !labels.starts_with('{') {
            continue; // another metric sharing the prefix
        }
        if !labels.contains(filter) {
            continue;
        }
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        found = true;
        match kind {
            "bucket" => {
                let le = match label_value(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(s) => s.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some(b) => b.1 += v,
                    None => h.buckets.push((le, v)),
                }
            }
            "sum" => h.sum += v,
            _ => h.count += v,
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    found.then_some(h)
}

impl PromHist {
    fn minus(&self, before: Option<&PromHist>) -> PromHist {
        let Some(b) = before else {
            return self.clone();
        };
        PromHist {
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| {
                    let prev = b.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
                    (*le, c - prev)
                })
                .collect(),
            sum: self.sum - b.sum,
            count: self.count - b.count,
        }
    }

    /// The upper bound of the bucket holding quantile `q`.
    fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| *le)
    }

    fn describe(&self) -> String {
        if self.count <= 0.0 {
            return "no samples".into();
        }
        let bound = |q| match self.quantile_bound(q) {
            Some(b) if b.is_finite() => format!("<= {} ms", b * 1000.0),
            Some(_) => "> largest bucket".into(),
            None => "?".into(),
        };
        format!(
            "n={}, mean {:.2} ms, p50 {}, p99 {}",
            self.count,
            self.sum / self.count * 1000.0,
            bound(0.5),
            bound(0.99)
        )
    }
}

const SERVER_HISTOGRAMS: &[(&str, &str, &str)] = &[
    (
        "herald_dispatch_latency_seconds",
        "",
        "scheduled_at -> ping answered (server)",
    ),
    (
        "herald_dispatch_assign_seconds",
        "",
        "scheduled_at -> assignment committed",
    ),
    (
        "herald_dispatch_round_seconds",
        "",
        "one assignment round (transaction)",
    ),
    (
        "herald_db_pool_acquire_seconds",
        "pool=\"dispatch\"",
        "dispatch pool acquire",
    ),
];

async fn scrape(plain: &Client) -> Option<String> {
    match plain.call(Method::GET, "/metrics", None).await {
        Ok(r) if r.status.is_success() => match r.body {
            Value::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

fn server_report(before: Option<&str>, after: Option<&str>) -> Vec<String> {
    let Some(after) = after else {
        return vec!["(GET /metrics failed)".into()];
    };
    SERVER_HISTOGRAMS
        .iter()
        .map(|(name, filter, what)| {
            let now = parse_hist(after, name, filter);
            let then = before.and_then(|b| parse_hist(b, name, filter));
            let shown = if filter.is_empty() {
                name.to_string()
            } else {
                format!("{name}{{{filter}}}")
            };
            match now {
                Some(h) => format!("{shown} ({what}): {}", h.minus(then.as_ref()).describe()),
                None => format!("{shown} ({what}): not exported"),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Load phase.

struct LoadResult {
    seconds: f64,
    dispatched_in_window: u64,
    builds: u64,
    jobs: u64,
    hist: Histogram<u64>,
    hist_roots: Histogram<u64>,
    hist_dependents: Histogram<u64>,
    api: Vec<(&'static str, Histogram<u64>)>,
    undispatched: usize,
    skipped: u64,
    /// Primary transactions during the load window: (count, per second).
    tx_load: Option<(i64, f64)>,
    /// WAL bytes, WAL flushes and the seconds they were counted over.
    wal_load: Option<(i64, i64, f64)>,
    drained: bool,
    metrics: Vec<String>,
}

async fn load_phase(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    pipeline: &str,
    mut primary: Option<&mut TxProbe>,
    seconds: f64,
) -> LoadResult {
    let a = &sh.args;
    let metrics_before = scrape(plain).await;
    let per_build = a.jobs_per_build.clamp(1, 500);
    println!(
        "[load] {:.0} s at {} jobs/s ({:.2} builds/s of {} jobs), jobs sleep {}-{} ms, fail rate {}",
        seconds,
        a.jobs_per_s,
        a.jobs_per_s / per_build as f64,
        per_build,
        a.job_min_ms,
        a.job_max_ms,
        a.fail_rate
    );
    let tx_before = match primary.as_mut() {
        Some(p) => p.read().await.ok(),
        None => None,
    };
    let wal_before = match primary.as_mut() {
        Some(p) => p.wal().await.ok(),
        None => None,
    };
    let mut tx_load = None;
    let mut wal_load = None;
    let dispatched_before = sh.dispatched.load(Ordering::Relaxed);
    sh.load_start_us.store(now_us(), Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds.max(0.0));
    let creator = tokio::spawn(create_builds(
        api.clone(),
        pipeline.to_owned(),
        sh.clone(),
        deadline,
    ));
    let every = Duration::from_secs_f64(a.progress_s.max(1.0));
    let mut next = started + every;
    let mut last_dispatched = dispatched_before;
    let mut last_at = started;
    let mut dispatched_in_window = None;
    let drain_deadline = deadline + Duration::from_secs_f64(a.drain_s.max(0.0));
    let mut drained = false;
    loop {
        let now = Instant::now();
        if dispatched_in_window.is_none() && now >= deadline {
            dispatched_in_window = Some(sh.dispatched.load(Ordering::Relaxed) - dispatched_before);
            if let (Some(p), Some(b)) = (primary.as_mut(), tx_before) {
                if let Ok(a) = p.read().await {
                    let n = (a - b - 1).max(0);
                    tx_load = Some((n, n as f64 / started.elapsed().as_secs_f64()));
                }
                if let (Ok(a), Some(b)) = (p.wal().await, wal_before) {
                    wal_load = Some((a.0 - b.0, a.1 - b.1, started.elapsed().as_secs_f64()));
                }
            }
        }
        if now >= deadline && creator.is_finished() {
            let undispatched = sh.tracker.lock().unwrap().pending.len();
            if undispatched == 0 && sh.busy.load(Ordering::Relaxed) == 0 {
                drained = true;
                break;
            }
            if now >= drain_deadline {
                break;
            }
        }
        if now >= next {
            let d = sh.dispatched.load(Ordering::Relaxed);
            let rate = (d - last_dispatched) as f64 / now.duration_since(last_at).as_secs_f64();
            last_dispatched = d;
            last_at = now;
            let window = {
                let mut w = sh.window.lock().unwrap();
                let s = if w.is_empty() {
                    "no samples".to_string()
                } else {
                    format!(
                        "p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
                        ms(w.value_at_quantile(0.5)),
                        ms(w.value_at_quantile(0.99)),
                        ms(w.max())
                    )
                };
                w.reset();
                s
            };
            let phase = if now < deadline { "load" } else { "drain" };
            println!(
                "[{phase} {:>4.0}s] builds {} jobs {} | dispatched {} ({:.1}/s) passed {} failed {} | busy {} parked {} pending {} | {window} | errors {}",
                started.elapsed().as_secs_f64(),
                sh.builds_created.load(Ordering::Relaxed),
                sh.jobs_created.load(Ordering::Relaxed),
                d - dispatched_before,
                rate,
                sh.passed.load(Ordering::Relaxed),
                sh.failed.load(Ordering::Relaxed),
                sh.busy.load(Ordering::Relaxed),
                sh.parked.load(Ordering::Relaxed),
                sh.tracker.lock().unwrap().pending.len(),
                sh.errors.total(),
            );
            next += every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics_after = scrape(plain).await;
    let (undispatched, skipped) = {
        let t = sh.tracker.lock().unwrap();
        (t.pending.len(), t.skipped)
    };
    LoadResult {
        seconds,
        dispatched_in_window: dispatched_in_window
            .unwrap_or_else(|| sh.dispatched.load(Ordering::Relaxed) - dispatched_before),
        builds: sh.builds_created.load(Ordering::Relaxed),
        jobs: sh.jobs_created.load(Ordering::Relaxed),
        hist: sh.hist.lock().unwrap().clone(),
        hist_roots: sh.hist_roots.lock().unwrap().clone(),
        hist_dependents: sh.hist_dependents.lock().unwrap().clone(),
        api: {
            let api = sh.api.lock().unwrap();
            ["create build", "accept", "start", "finish"]
                .iter()
                .filter_map(|k| api.get(k).map(|h| (*k, h.clone())))
                .collect()
        },
        undispatched,
        skipped,
        drained,
        tx_load,
        wal_load,
        metrics: server_report(metrics_before.as_deref(), metrics_after.as_deref()),
    }
}

// ---------------------------------------------------------------------------------
// Notification scenarios (issue 3).

impl Shared {
    /// Forgets the samples and counts of an earlier load phase.
    fn reset_samples(&self) {
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

fn latest(samples: &Mutex<Vec<notify::HeraldSample>>) -> Option<notify::HeraldSample> {
    samples.lock().unwrap().last().copied()
}

/// Waits until every delivery Herald created has reached a receiver at least once
/// (fast endpoints only matter here: failing ones are reached on their first attempt).
async fn notify_drain(
    r: &Receivers,
    samples: &Mutex<Vec<notify::HeraldSample>>,
    limit: Duration,
) -> (f64, bool) {
    let started = Instant::now();
    loop {
        // The monitor refreshes the samples every second.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let created = latest(samples).map_or(0.0, |s| s.created);
        let got = r.first.load(Ordering::Relaxed) as f64;
        if got >= created && created > 0.0 {
            return (started.elapsed().as_secs_f64(), true);
        }
        if started.elapsed() >= limit {
            return (started.elapsed().as_secs_f64(), false);
        }
    }
}

/// The broker and PostgreSQL backlogs, from GET /v1/ops/queues (once, at the end: it
/// counts rows).
async fn queues_line(admin: &Client) -> String {
    match admin.expect(Method::GET, "/v1/ops/queues", None, 200).await {
        Ok(v) => v
            .get("items")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|q| {
                        let name = q.get("name")?.as_str()?;
                        let depth = q.get("depth")?.as_i64()?;
                        (depth > 0 || name.contains("webhook")).then(|| format!("{name} {depth}"))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        Err(e) => format!("GET /v1/ops/queues failed: {e}"),
    }
}

fn throttle_env() -> String {
    match std::env::var("HERALD_NOTIFY__THROTTLE__ENABLED") {
        Ok(v) if v.eq_ignore_ascii_case("false") || v == "0" => "off".into(),
        Ok(v) => format!("on (HERALD_NOTIFY__THROTTLE__ENABLED={v})"),
        Err(_) => "on (default)".into(),
    }
}

/// What the receivers saw, and Herald's counters, over `[t0, t0 + seconds)`.
fn receiver_lines(
    r: &Receivers,
    samples: &[notify::HeraldSample],
    t0: Instant,
    seconds: f64,
    warmup_s: f64,
    builds: u64,
) -> (Vec<String>, Option<f64>) {
    let mut out = Vec::new();
    let s0 = r.second(t0);
    let w0 = s0 + warmup_s.max(0.0).round() as usize;
    let w1 = s0 + seconds.max(0.0).floor() as usize;
    let origin_s = |sec: usize| sec as f64;
    let created_phase = match (
        notify::nearest(samples, origin_s(s0)),
        notify::nearest(samples, origin_s(w1)),
    ) {
        (Some(a), Some(b)) => Some(b.created - a.created),
        _ => None,
    };
    let created_window = match (
        notify::nearest(samples, origin_s(w0)),
        notify::nearest(samples, origin_s(w1)),
    ) {
        (Some(a), Some(b)) if b.at_s > a.at_s => Some((b.created - a.created) / (b.at_s - a.at_s)),
        _ => None,
    };
    if let Some(c) = created_phase {
        out.push(format!(
            "notify: created       {c:.0} deliveries during the phase (herald_notify_deliveries_created_total), {} per build; {}/s in the rate window",
            if builds > 0 { format!("{:.1}", c / builds as f64) } else { "?".into() },
            created_window.map_or("?".into(), |c| format!("{c:.0}"))
        ));
    }
    let rate = (w1 > w0).then(|| r.received_between(w0, w1) as f64 / (w1 - w0) as f64);
    match rate {
        Some(rate) => {
            let (lo, hi) = r.window_rates(w0, w1, 5).unwrap_or((rate, rate));
            out.push(format!(
                "notify: delivered     {rate:.0}/s sustained over seconds {}-{} of the phase ({} distinct webhook-ids first received); 5 s windows: min {lo:.0}/s, max {hi:.0}/s",
                w0 - s0,
                w1 - s0,
                r.received_between(w0, w1)
            ));
        }
        None => out.push("notify: delivered     phase shorter than the rate warm-up".into()),
    }
    let slots: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at_s >= origin_s(s0) && s.at_s <= origin_s(w1))
        .filter_map(|s| s.throttle_factor.zip(s.webhook_concurrency))
        .collect();
    if !slots.is_empty() {
        let min_f = slots.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
        let mean_f = slots.iter().map(|x| x.0).sum::<f64>() / slots.len() as f64;
        let min_c = slots.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        out.push(format!(
            "notify: throttle      factor mean {mean_f:.2}, min {min_f:.2}; webhook slots min {min_c:.0} (herald gauges, 1 s samples)"
        ));
    }
    (out, rate)
}

fn receiver_totals(r: &Receivers) -> Vec<String> {
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    vec![
        format!(
            "notify: requests      {} (valid signature {}, invalid {}, of which stale/future timestamp {}); repeated webhook-ids {} (retries after 500)",
            l(&r.requests),
            l(&r.valid),
            l(&r.invalid),
            l(&r.stale_or_future),
            l(&r.repeats)
        ),
        format!(
            "notify: duplicates    {} webhook-ids received again after a 2xx; {} events reaching one endpoint under two webhook-ids",
            l(&r.dup_after_ok),
            l(&r.dup_event)
        ),
        format!(
            "notify latency        {}",
            quantiles(&r.hist.lock().unwrap())
        ),
        "                      (event's timestamp -> receiver got the request; first receipt of each webhook-id; this machine's clock)".into(),
        format!(
            "  fast receivers      {}",
            quantiles(&r.hist_fast.lock().unwrap())
        ),
        format!(
            "  anomalies           without timestamp {}, negative latency {}",
            l(&r.no_timestamp),
            l(&r.negative)
        ),
    ]
}

async fn notify_scenario(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    admin: &Client,
    pipeline: &str,
    mut primary: Option<&mut TxProbe>,
    setup_s: f64,
) -> Result<String> {
    let a = &sh.args;
    let na = &a.notify;
    let r = Receivers::start(na).await?;
    let pats: Vec<&str> = r.endpoints.iter().map(|e| e.pattern.as_str()).collect();
    let per_build = notify::notifications_per_build(&pats, a.jobs_per_build.clamp(1, 500));
    let count = |b| r.endpoints.iter().filter(|e| e.behaviour == b).count();
    let hosts: Vec<String> = r.hosts.iter().map(ToString::to_string).collect();
    let mut distinct: Vec<&str> = pats.clone();
    distinct.dedup();
    let layout = format!(
        "notify: endpoints     {} on {} receivers ({}); {} fast, {} answer after {} ms, {} answer 500; events {} (round-robin); {per_build} notifications per build expected",
        r.endpoints.len(),
        hosts.len(),
        hosts.join(" "),
        count(notify::Behaviour::Fast),
        count(notify::Behaviour::Slow),
        na.slow_ms,
        count(notify::Behaviour::Fail),
        na.patterns().join(",")
    );
    println!("[notify] {}", layout.trim_start_matches("notify: "));
    println!("[notify] throttle {}", throttle_env());
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mon = tokio::spawn(notify::monitor(
        r.clone(),
        plain.clone(),
        a.progress_s,
        stop.clone(),
        samples.clone(),
    ));
    let mut report = NotifyReport::default();
    report.lines.push(layout);
    report
        .lines
        .push(format!("notify: throttle      {}", throttle_env()));

    let text = match na.scenario {
        Scenario::Storm => {
            let base_s = na.baseline_s.unwrap_or(a.duration_s);
            println!("[storm] baseline: {base_s:.0} s of dispatch load, no webhooks");
            let base = load_phase(sh, api, plain, pipeline, primary.as_deref_mut(), base_s).await;
            sh.reset_samples();
            r.create_webhooks(api).await?;
            println!(
                "[storm] {} webhooks created; storm: {:.0} s of the same dispatch load",
                r.endpoints.len(),
                a.duration_s
            );
            // Let every process drop its cached subscriptions.
            tokio::time::sleep(Duration::from_secs(1)).await;
            r.measuring.store(true, Ordering::Relaxed);
            let t0 = Instant::now();
            let storm = load_phase(sh, api, plain, pipeline, primary, a.duration_s).await;
            let (lines, _) = receiver_lines(
                &r,
                &samples.lock().unwrap(),
                t0,
                a.duration_s,
                na.rate_warmup_s,
                storm.builds,
            );
            report.lines.extend(lines);
            report.lines.extend(receiver_totals(&r));
            report.lines.push(format!(
                "notify: backlog       at the end: {}",
                queues_line(admin).await
            ));
            if let (false, false) = (base.hist.is_empty(), storm.hist.is_empty()) {
                let (b, st) = (
                    ms(base.hist.value_at_quantile(0.99)),
                    ms(storm.hist.value_at_quantile(0.99)),
                );
                let ratio = st / b;
                report.lines.push(format!(
                    "isolation             dispatch p99 storm {st:.2} ms / baseline {b:.2} ms = {ratio:.2} (throttle {})",
                    throttle_env()
                ));
                let on = !throttle_env().starts_with("off");
                report.targets.push(format!(
                    "isolation ratio {ratio:.2} <= {} with throttle {}: {}",
                    notify::TARGET_ISOLATION_RATIO,
                    if on { "on" } else { "off" },
                    if on {
                        met(ratio <= notify::TARGET_ISOLATION_RATIO)
                    } else {
                        "(the target applies with the throttle on; reference run)"
                    }
                ));
            }
            stop.store(true, Ordering::Relaxed);
            let _ = mon.await;
            summary(
                sh,
                setup_s,
                None,
                &[("baseline", &base), ("storm", &storm)],
                &report,
            )
        }
        _ => {
            r.create_webhooks(api).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            r.measuring.store(true, Ordering::Relaxed);
            let t0 = Instant::now();
            let load = load_phase(sh, api, plain, pipeline, primary, a.duration_s).await;
            let (drain_s, drained) = notify_drain(
                &r,
                &samples,
                Duration::from_secs_f64(na.notify_drain_s.max(0.0)),
            )
            .await;
            stop.store(true, Ordering::Relaxed);
            let _ = mon.await;
            let all = samples.lock().unwrap().clone();
            let (lines, rate) =
                receiver_lines(&r, &all, t0, a.duration_s, na.rate_warmup_s, load.builds);
            report.lines.extend(lines);
            let created = all.last().map_or(0.0, |s| s.created);
            report.lines.push(format!(
                "notify: after drain   {} of {created:.0} created deliveries received ({}, {drain_s:.0} s)",
                r.first.load(Ordering::Relaxed),
                if drained { "drained" } else { "NOT drained" }
            ));
            report.lines.extend(receiver_totals(&r));
            report.lines.push(format!(
                "notify: backlog       at the end: {}",
                queues_line(admin).await
            ));
            if let Some(rate) = rate {
                report.targets.push(format!(
                    "webhook deliveries {rate:.0}/s >= {}/s sustained: {}",
                    notify::TARGET_DELIVERIES_PER_S,
                    met(rate >= notify::TARGET_DELIVERIES_PER_S)
                ));
            }
            summary(sh, setup_s, None, &[("", &load)], &report)
        }
    };
    Ok(text)
}

// ---------------------------------------------------------------------------------

fn met(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

/// Extra lines and target lines of the notification scenarios.
#[derive(Default)]
struct NotifyReport {
    lines: Vec<String>,
    targets: Vec<String>,
}

/// `loads`: one unlabelled load phase (the dispatch scenario), or labelled phases.
fn summary(
    sh: &Shared,
    setup_s: f64,
    idle: Option<&IdleResult>,
    loads: &[(&str, &LoadResult)],
    report: &NotifyReport,
) -> String {
    let a = &sh.args;
    let mut s = String::new();
    let _ = writeln!(s, "```text");
    let _ = writeln!(
        s,
        "herald-loadtest {} at {}",
        env!("CARGO_PKG_VERSION"),
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        s,
        "agents registered     {} (in {:.1} s, {} at a time)",
        a.agents, setup_s, a.register_concurrency
    );
    if let Some(i) = idle {
        let _ = writeln!(
            s,
            "idle: parked agents   {} at the end of the window (min {}, max {} of {} over {:.1} s; ping wait {} s)",
            i.parked_at_end, i.parked_min, i.parked_max, i.agents, i.seconds, a.ping_wait
        );
        match i.primary {
            Some((n, r)) => {
                let _ = writeln!(
                    s,
                    "idle: primary tx/s    {r:.2} ({n} transactions in {:.1} s, pg_stat_database, own reads excluded)",
                    i.seconds
                );
            }
            None => {
                let _ = writeln!(s, "idle: primary tx/s    not measured (no --db-url)");
            }
        }
        if let Some((n, r)) = i.replica {
            let _ = writeln!(
                s,
                "idle: replica tx/s    {r:.2} ({n} transactions in {:.1} s)",
                i.seconds
            );
        }
    }
    for (label, l) in loads {
        if !label.is_empty() {
            let _ = writeln!(s, "--- {label} phase ---");
        }
        let per_build = a.jobs_per_build.clamp(1, 500);
        let _ = writeln!(
            s,
            "load: target          {} jobs/s for {:.0} s ({:.2} builds/s x {per_build} jobs; jobs {}-{} ms, {}% fail)",
            a.jobs_per_s,
            l.seconds,
            a.jobs_per_s / per_build as f64,
            a.job_min_ms,
            a.job_max_ms,
            a.fail_rate * 100.0
        );
        let _ = writeln!(
            s,
            "load: created         {} builds, {} jobs ({:.1} jobs/s); {} skipped after a failed dependency",
            l.builds,
            l.jobs,
            l.jobs as f64 / l.seconds.max(1e-9),
            l.skipped
        );
        let _ = writeln!(
            s,
            "load: achieved        {:.1} jobs/s dispatched during the load window ({} jobs); {} passed, {} failed in total",
            l.dispatched_in_window as f64 / l.seconds.max(1e-9),
            l.dispatched_in_window,
            sh.passed.load(Ordering::Relaxed),
            sh.failed.load(Ordering::Relaxed)
        );
        if let Some((n, r)) = l.tx_load {
            let _ = writeln!(
                s,
                "load: primary tx/s    {r:.0} ({n} transactions; {:.1} per dispatched job)",
                n as f64 / (l.dispatched_in_window.max(1) as f64)
            );
        }
        if let Some((bytes, syncs, secs)) = l.wal_load {
            let jobs = l.dispatched_in_window.max(1) as f64;
            let _ = writeln!(
                s,
                "load: primary WAL     {:.2} MB/s, {:.0} flushes/s ({:.1} kB and {:.1} flushes per dispatched job; pg_stat_wal, whole cluster)",
                bytes as f64 / secs.max(1e-9) / 1e6,
                syncs as f64 / secs.max(1e-9),
                bytes as f64 / jobs / 1e3,
                syncs as f64 / jobs
            );
        }
        let _ = writeln!(s, "dispatch latency      {}", quantiles(&l.hist));
        let _ = writeln!(
            s,
            "                      (ping returned - job scheduled_at, this machine's clock)"
        );
        let _ = writeln!(s, "  jobs without deps   {}", quantiles(&l.hist_roots));
        let _ = writeln!(s, "  dependent jobs      {}", quantiles(&l.hist_dependents));
        let _ = writeln!(s, "API round trips (client side, load phase):");
        for (what, h) in &l.api {
            let _ = writeln!(s, "  {what:<19} {}", quantiles(h));
        }
        let _ = writeln!(
            s,
            "not dispatched        {} jobs {} ({:.0} s drain)",
            l.undispatched,
            if l.drained {
                "(drained)"
            } else {
                "still pending at the end"
            },
            a.drain_s
        );
        let _ = writeln!(
            s,
            "anomalies             duplicate dispatches {}, dispatched before load {}, stale samples {}, without scheduled_at {}, negative latency {}",
            sh.duplicate.load(Ordering::Relaxed),
            sh.dispatched_before_load.load(Ordering::Relaxed),
            sh.stale_samples.load(Ordering::Relaxed),
            sh.no_scheduled_at.load(Ordering::Relaxed),
            sh.negative_latency.load(Ordering::Relaxed),
        );
    }
    let _ = writeln!(s, "errors                {}", sh.errors.line());
    for e in sh.errors.last.lock().unwrap().iter() {
        let _ = writeln!(s, "  e.g. {e}");
    }
    for (label, l) in loads {
        let phase = if label.is_empty() { "load" } else { label };
        let _ = writeln!(s, "herald /metrics over the {phase} phase (bucket bounds):");
        for m in &l.metrics {
            let _ = writeln!(s, "  {m}");
        }
    }
    for line in &report.lines {
        let _ = writeln!(s, "{line}");
    }
    let mut targets = Vec::new();
    for (label, l) in loads.iter().filter(|(_, l)| !l.hist.is_empty()) {
        let p99 = ms(l.hist.value_at_quantile(0.99));
        let label = if label.is_empty() {
            String::new()
        } else {
            format!(" ({label})")
        };
        targets.push(format!(
            "dispatch p99{label} {p99:.2} ms <= {TARGET_P99_MS} ms: {}",
            met(p99 <= TARGET_P99_MS)
        ));
    }
    if let Some((_, r)) = idle.and_then(|i| i.primary) {
        targets.push(format!(
            "idle {r:.2} tx/s <= {TARGET_IDLE_TX_PER_S} tx/s with {} agents: {}",
            a.agents,
            met(r <= TARGET_IDLE_TX_PER_S)
        ));
    }
    targets.extend(report.targets.iter().cloned());
    for t in targets {
        let _ = writeln!(s, "target                {t}");
    }
    let _ = writeln!(s, "```");
    s
}

async fn run(args: Args) -> Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let wall = Instant::now();
    let plain = Client::new(args.base_url.clone());
    let admin = plain.with_token(args.admin_token.clone());

    // Database probes first, so their own connection start-up is long flushed.
    let mut primary = match &args.db_url {
        Some(u) => Some(TxProbe::connect(u, "primary").await?),
        None => None,
    };
    let mut replica = match &args.replica_db_url {
        Some(u) => Some(TxProbe::connect(u, "replica").await?),
        None => None,
    };

    let slug = format!(
        "loadtest-{}-{:04x}",
        Utc::now().format("%Y%m%d%H%M%S"),
        rand::random::<u16>()
    );
    let org = admin
        .create_org(&slug)
        .await
        .context("creating the org (is Herald up, is the admin token right?)")?;
    let token = |k: &str| {
        org.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("create org: no {k} in {org}"))
    };
    let api = plain.with_token(token("api_token")?);
    let org_agent = plain.with_token(token("agent_token")?);
    let pipeline = "loadtest";
    api.create_pipeline(pipeline, "herald/loadtest")
        .await
        .context("creating the pipeline")?;
    println!(
        "[setup] org {slug}, pipeline {pipeline}; registering {} agents, {} at a time",
        args.agents, args.register_concurrency
    );

    let sh = Arc::new(Shared::new(args.clone()));
    let mut agents = JoinSet::new();
    let reg_started = Instant::now();
    register_agents(&org_agent, &sh, &mut agents).await?;
    let setup_s = reg_started.elapsed().as_secs_f64();
    println!(
        "[setup] {} agents registered in {setup_s:.1} s",
        args.agents
    );

    let text = if args.notify.scenario == Scenario::Dispatch {
        let idle = if args.idle_seconds > 0.0 {
            Some(idle_phase(&sh, &mut primary, &mut replica).await?)
        } else {
            None
        };
        let load = if args.duration_s > 0.0 {
            Some(
                load_phase(
                    &sh,
                    &api,
                    &plain,
                    pipeline,
                    primary.as_mut(),
                    args.duration_s,
                )
                .await,
            )
        } else {
            None
        };
        let loads: Vec<(&str, &LoadResult)> = load.iter().map(|l| ("", l)).collect();
        summary(
            &sh,
            setup_s,
            idle.as_ref(),
            &loads,
            &NotifyReport::default(),
        )
    } else {
        notify_scenario(
            &sh,
            &api,
            &plain,
            &admin,
            pipeline,
            primary.as_mut(),
            setup_s,
        )
        .await?
    };
    sh.stop.store(true, Ordering::Relaxed);
    println!(
        "\n=== herald-loadtest summary (total {:.0} s) ===",
        wall.elapsed().as_secs_f64()
    );
    print!("{text}");
    // Parked long polls are simply dropped with the runtime.
    agents.abort_all();
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald-loadtest: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let r = runtime.block_on(run(args));
    runtime.shutdown_background();
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-loadtest: setup failed: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_shape_has_dependencies() {
        let mut rng = StdRng::seed_from_u64(1);
        let b = build_body(5, "default", &mut rng);
        let jobs = b["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 5);
        let deps: Vec<usize> = jobs
            .iter()
            .map(|j| j["depends_on"].as_array().unwrap().len())
            .collect();
        assert_eq!(deps, vec![0, 0, 0, 1, 1]);
        assert_eq!(b["commit"].as_str().unwrap().len(), 40);
        let one = build_body(1, "default", &mut rng);
        assert_eq!(one["jobs"][0]["depends_on"].as_array().unwrap().len(), 0);
    }

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

    #[test]
    fn parses_prometheus_histograms() {
        let text = "# TYPE herald_dispatch_round_seconds histogram\n\
            herald_dispatch_round_seconds_bucket{le=\"0.001\"} 2\n\
            herald_dispatch_round_seconds_bucket{le=\"0.01\"} 9\n\
            herald_dispatch_round_seconds_bucket{le=\"+Inf\"} 10\n\
            herald_dispatch_round_seconds_sum 0.05\n\
            herald_dispatch_round_seconds_count 10\n\
            herald_db_pool_acquire_seconds_bucket{pool=\"dispatch\",le=\"0.001\"} 4\n\
            herald_db_pool_acquire_seconds_bucket{pool=\"api\",le=\"0.001\"} 7\n\
            herald_db_pool_acquire_seconds_count{pool=\"dispatch\"} 4\n";
        let h = parse_hist(text, "herald_dispatch_round_seconds", "").unwrap();
        assert_eq!(h.count, 10.0);
        assert_eq!(h.quantile_bound(0.5), Some(0.01));
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        let p = parse_hist(text, "herald_db_pool_acquire_seconds", "pool=\"dispatch\"").unwrap();
        assert_eq!(p.buckets, vec![(0.001, 4.0)]);
        assert!(parse_hist(text, "herald_nothing", "").is_none());
    }
}

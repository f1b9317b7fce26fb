//! Chaos scenario (issue 10): Herald as several processes with split roles, agents and
//! builds running throughout through the api processes (failing over between them),
//! verifying webhook receivers and a fake GitHub; faults at seeded random moments
//! (kill -9 and replacement, SIGTERM under load, RabbitMQ and PostgreSQL restarts,
//! replica stop and start, a hanging receiver); then a ledger per fault. It exits
//! non-zero when a delivery was lost, a job reached two agents, a build is stuck, a
//! commit status ended wrong or a SIGTERM took longer than 30 s.
//!
//! The ledger reads Herald's `outbox` table (read-only: the events it recorded); all
//! else it learns through the HTTP API and what the receivers saw.

use crate::builds::build_body;
use crate::cluster::{Cluster, Failover, HttpLedger, Kind};
use crate::fakes::{ChaosReceivers, FakeGithub};
use crate::Args;
use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use herald_client::Method;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// The `herald` binary the chaos scenario runs as several processes.
    #[arg(long, env = "HERALD_CHAOS_HERALD_BIN", default_value = "herald")]
    pub herald_bin: PathBuf,
    /// Seed of the fault schedule (random when unset; printed either way).
    #[arg(long, env = "HERALD_CHAOS_SEED")]
    pub seed: Option<u64>,
    /// First of the five consecutive http.listen ports of the processes.
    #[arg(long, env = "HERALD_CHAOS_PORT_BASE", default_value_t = 18180)]
    pub port_base: u16,
    /// Where each process's log goes.
    #[arg(
        long,
        env = "HERALD_CHAOS_LOG_DIR",
        default_value = "/tmp/herald-loadtest/chaos"
    )]
    pub log_dir: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 8)]
    pub chaos_agents: usize,
    /// Webhook endpoints (all subscribed to every event).
    #[arg(long, default_value_t = 4)]
    pub chaos_endpoints: usize,
    /// kill -9 faults in all, spread over the three kinds of process.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// How long the hanging receiver hangs.
    #[arg(long, default_value_t = 30.0)]
    pub hang_s: f64,
    /// How long RabbitMQ stays stopped, and the replica.
    #[arg(long, default_value_t = 3.0)]
    pub rabbit_down_s: f64,
    #[arg(long, default_value_t = 8.0)]
    pub replica_down_s: f64,
    /// A fault not healed within this long is reported as not healed.
    #[arg(long, default_value_t = 120.0)]
    pub heal_timeout_s: f64,
    /// Shell commands that stop and start the services. The defaults fit the Debian
    /// services of scripts/services.sh.
    #[arg(
        long,
        env = "HERALD_CHAOS_RABBIT_STOP",
        default_value = "rabbitmqctl -q stop_app"
    )]
    pub rabbit_stop: String,
    #[arg(
        long,
        env = "HERALD_CHAOS_RABBIT_START",
        default_value = "rabbitmqctl -q start_app && rabbitmqctl -q await_startup --timeout 60"
    )]
    pub rabbit_start: String,
    #[arg(
        long,
        env = "HERALD_CHAOS_PG_RESTART",
        default_value = "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | sort -V | tail -n 1)\" main restart"
    )]
    pub pg_restart: String,
    #[arg(
        long,
        env = "HERALD_CHAOS_REPLICA_STOP",
        default_value = "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | sort -V | tail -n 1)\" replica stop"
    )]
    pub replica_stop: String,
    #[arg(
        long,
        env = "HERALD_CHAOS_REPLICA_START",
        default_value = "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | sort -V | tail -n 1)\" replica start"
    )]
    pub replica_start: String,
    /// Run at the end whatever happened, so that every service is left running.
    #[arg(
        long,
        env = "HERALD_CHAOS_RESTORE",
        default_value = "bash scripts/services.sh"
    )]
    pub restore: String,
}

fn sh(cmd: &str) -> Result<()> {
    let st = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !st.success() {
        bail!("`{cmd}` failed: {st}");
    }
    Ok(())
}

async fn sh_async(cmd: String) -> Result<()> {
    tokio::task::spawn_blocking(move || sh(&cmd)).await?
}

/// Brings back whatever a fault left stopped, then runs the restore command: on
/// success, on error and on panic.
struct ServiceGuard {
    down: Mutex<Vec<(String, String)>>,
    restore: String,
}

impl ServiceGuard {
    fn stopped(&self, what: &str, start: &str) {
        self.down
            .lock()
            .unwrap()
            .push((what.to_owned(), start.to_owned()));
    }

    fn started(&self, what: &str) {
        self.down.lock().unwrap().retain(|(w, _)| w != what);
    }
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        let down = std::mem::take(&mut *self.down.lock().unwrap_or_else(|e| e.into_inner()));
        for (what, start) in down {
            eprintln!("[chaos] restoring {what}: {start}");
            if let Err(e) = sh(&start) {
                eprintln!("[chaos] {e:#}");
            }
        }
        println!("[chaos] leaving the services running: {}", self.restore);
        if let Err(e) = sh(&self.restore) {
            eprintln!("[chaos] restore failed: {e:#}");
        }
    }
}

#[derive(Debug, Clone)]
enum Fault {
    Kill9(Kind),
    Sigterm(Kind),
    RabbitRestart,
    PgRestart,
    ReplicaStopStart,
    HangReceiver,
}

impl Fault {
    fn label(&self) -> String {
        match self {
            Fault::Kill9(k) => format!("kill -9 {}", k.name()),
            Fault::Sigterm(k) => format!("SIGTERM {}", k.name()),
            Fault::RabbitRestart => "rabbitmq restart".into(),
            Fault::PgRestart => "postgres restart".into(),
            Fault::ReplicaStopStart => "replica stop/start".into(),
            Fault::HangReceiver => "receiver hangs".into(),
        }
    }
}

struct FaultRec {
    label: String,
    at: DateTime<Utc>,
    at_s: f64,
    heal_s: Option<f64>,
    note: String,
}

struct BuildRec {
    id: String,
    sha: String,
    created_at: DateTime<Utc>,
}

/// When a job was first accepted, and by which agents.
type Accepts = (DateTime<Utc>, HashSet<String>);

#[derive(Default)]
struct World {
    stop_agents: AtomicBool,
    stop_builds: AtomicBool,
    builds: Mutex<Vec<BuildRec>>,
    /// Job → the agents whose accept of it answered 200, with the first accept's time.
    accepted: Mutex<HashMap<String, Accepts>>,
    create_failed: AtomicU64,
    jobs_done: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl World {
    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap();
        if v.len() < 12 && !v.contains(&e) {
            v.push(e);
        }
    }
}

fn job_path(id: &str, action: &str) -> String {
    format!("/v1/jobs/{id}/{action}")
}

async fn agent_loop(w: Arc<World>, fc: Failover, agent_id: String, args: Arc<Args>) {
    let mut rng = StdRng::from_entropy();
    let wait = args.ping_wait.min(10);
    while !w.stop_agents.load(Ordering::Relaxed) {
        let r = fc
            .call(
                Method::POST,
                &format!("/v1/agent/ping?wait={wait}"),
                None,
                &[],
            )
            .await;
        let job = match r {
            Ok(rep) if rep.status.as_u16() == 200 => {
                rep.body["job"]["id"].as_str().map(str::to_owned)
            }
            Ok(rep) if rep.status.as_u16() == 204 => continue,
            _ => None,
        };
        let Some(job) = job else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let limit = Duration::from_secs(60);
        match fc
            .call_until(Method::PUT, &job_path(&job, "accept"), None, &[], limit)
            .await
        {
            Ok(rep) if rep.status.as_u16() == 200 => {
                let mut acc = w.accepted.lock().unwrap();
                acc.entry(job.clone())
                    .or_insert_with(|| (Utc::now(), HashSet::new()))
                    .1
                    .insert(agent_id.clone());
            }
            Ok(rep) => {
                w.error(format!("accept -> {}", rep.status.as_u16()));
                continue;
            }
            Err(e) => {
                w.error(format!("accept: {e}"));
                continue;
            }
        }
        match fc
            .call_until(Method::PUT, &job_path(&job, "start"), None, &[], limit)
            .await
        {
            Ok(rep) if rep.status.as_u16() == 200 => {}
            Ok(rep) => {
                w.error(format!("start -> {}", rep.status.as_u16()));
                continue;
            }
            Err(e) => {
                w.error(format!("start: {e}"));
                continue;
            }
        }
        let (lo, hi) = (
            args.job_min_ms.min(args.job_max_ms),
            args.job_max_ms.max(args.job_min_ms),
        );
        tokio::time::sleep(Duration::from_millis(rng.gen_range(lo..=hi))).await;
        let exit = i32::from(rng.gen_bool(args.fail_rate.clamp(0.0, 1.0)));
        let body = json!({"exit_status": exit});
        match fc
            .call_until(
                Method::PUT,
                &job_path(&job, "finish"),
                Some(&body),
                &[],
                limit,
            )
            .await
        {
            Ok(rep) if rep.status.as_u16() == 200 => {
                w.jobs_done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(rep) => w.error(format!("finish -> {}", rep.status.as_u16())),
            Err(e) => w.error(format!("finish: {e}")),
        }
    }
}

async fn heartbeat_loop(w: Arc<World>, fc: Failover, every: Duration) {
    while !w.stop_agents.load(Ordering::Relaxed) {
        let _ = fc
            .call(Method::POST, "/v1/agent/heartbeat", None, &[])
            .await;
        tokio::time::sleep(every).await;
    }
}

/// Creates one build (retrying through failover with one Idempotency-Key).
async fn create_build(w: &World, api: &Failover, jobs: usize, rng: &mut StdRng) -> Option<String> {
    let body = build_body(jobs, "default", rng);
    let key = format!("chaos-{:016x}", rng.gen::<u64>());
    let r = api
        .call_until(
            Method::POST,
            "/v1/pipelines/chaos/builds",
            Some(&body),
            &[("Idempotency-Key", key.as_str())],
            Duration::from_secs(90),
        )
        .await;
    match r {
        Ok(rep) if rep.status.as_u16() == 201 => {
            let id = rep.body["id"].as_str()?.to_owned();
            w.builds.lock().unwrap().push(BuildRec {
                id: id.clone(),
                sha: body["commit"].as_str().unwrap_or_default().to_owned(),
                created_at: Utc::now(),
            });
            Some(id)
        }
        Ok(rep) => {
            w.create_failed.fetch_add(1, Ordering::Relaxed);
            w.error(format!(
                "create build -> {} {}",
                rep.status.as_u16(),
                rep.body
            ));
            None
        }
        Err(e) => {
            w.create_failed.fetch_add(1, Ordering::Relaxed);
            w.error(format!("create build: {e}"));
            None
        }
    }
}

async fn creator(w: Arc<World>, api: Failover, per_s: f64, jobs: usize) {
    let period = Duration::from_secs_f64(1.0 / per_s.max(0.01));
    let mut rng = StdRng::from_entropy();
    let mut set = tokio::task::JoinSet::new();
    while !w.stop_builds.load(Ordering::Relaxed) {
        let (w2, api2, seed) = (w.clone(), api.clone(), rng.gen::<u64>());
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            create_build(&w2, &api2, jobs, &mut rng).await;
        });
        while set.try_join_next().is_some() {}
        tokio::time::sleep(period).await;
    }
    while set.join_next().await.is_some() {}
}

/// Waits until the api processes answer; creates a 1-job build and waits until every
/// receiver got its `build.finished`: the fault has healed.
async fn heal(
    w: &World,
    api: &Failover,
    r: &ChaosReceivers,
    cluster: &mut Cluster,
    since: Instant,
    limit: Duration,
) -> Option<f64> {
    let mut rng = StdRng::from_entropy();
    let canary = loop {
        let _ = cluster.watch();
        if let Some(id) = create_build(w, api, 1, &mut rng).await {
            break id;
        }
        if since.elapsed() > limit {
            return None;
        }
    };
    loop {
        let _ = cluster.watch();
        if r.all_finished(&canary) {
            return Some(since.elapsed().as_secs_f64());
        }
        if since.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps `d` while replacing processes that exit on their own.
async fn idle(cluster: &mut Cluster, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        let _ = cluster.watch();
        tokio::time::sleep(Duration::from_millis(200).min(until - Instant::now())).await;
    }
}

fn plan(rng: &mut StdRng, kills: usize) -> Vec<Fault> {
    let kinds = [Kind::Api, Kind::RelayNotify, Kind::DispatchMaintenance];
    let mut f: Vec<Fault> = (0..kills).map(|i| Fault::Kill9(kinds[i % 3])).collect();
    f.push(Fault::Sigterm(*kinds.choose(rng).unwrap_or(&Kind::Api)));
    f.push(Fault::RabbitRestart);
    f.push(Fault::RabbitRestart);
    f.push(Fault::PgRestart);
    f.push(Fault::ReplicaStopStart);
    f.push(Fault::HangReceiver);
    f.shuffle(rng);
    f
}

fn slot_of(cluster: &Cluster, kind: Kind, rng: &mut StdRng) -> usize {
    let slots: Vec<usize> = (0..cluster.slots.len())
        .filter(|i| cluster.slots[*i].kind == kind)
        .collect();
    *slots.choose(rng).unwrap_or(&0)
}

async fn inject(
    f: &Fault,
    ca: &ChaosArgs,
    cluster: &mut Cluster,
    r: &ChaosReceivers,
    guard: &ServiceGuard,
    rng: &mut StdRng,
) -> Result<String> {
    Ok(match f {
        Fault::Kill9(k) => {
            let i = slot_of(cluster, *k, rng);
            cluster.kill9_and_replace(i)?;
            format!("slot {i}")
        }
        Fault::Sigterm(k) => {
            let i = slot_of(cluster, *k, rng);
            let took = cluster.term(i, Duration::from_secs(30)).await;
            cluster.start(i)?;
            match took {
                Some(d) => format!("slot {i} exited in {:.1} s", d.as_secs_f64()),
                None => format!("slot {i} did NOT exit within 30 s (SIGKILL)"),
            }
        }
        Fault::RabbitRestart => {
            guard.stopped("rabbitmq", &ca.rabbit_start);
            sh_async(ca.rabbit_stop.clone()).await?;
            idle(cluster, Duration::from_secs_f64(ca.rabbit_down_s)).await;
            sh_async(ca.rabbit_start.clone()).await?;
            guard.started("rabbitmq");
            format!("down {:.0} s", ca.rabbit_down_s)
        }
        Fault::PgRestart => {
            sh_async(ca.pg_restart.clone()).await?;
            String::new()
        }
        Fault::ReplicaStopStart => {
            guard.stopped("replica", &ca.replica_start);
            sh_async(ca.replica_stop.clone()).await?;
            idle(cluster, Duration::from_secs_f64(ca.replica_down_s)).await;
            sh_async(ca.replica_start.clone()).await?;
            guard.started("replica");
            format!("down {:.0} s", ca.replica_down_s)
        }
        Fault::HangReceiver => {
            let i = rng.gen_range(0..r.endpoints.len());
            r.hang(i, Duration::from_secs_f64(ca.hang_s));
            format!("endpoint {i} for {:.0} s", ca.hang_s)
        }
    })
}

/// The org, pipeline, GitHub integration, webhooks and agents; returns the org API
/// client and the agents' clients.
async fn setup(
    plain: &Failover,
    admin_token: &str,
    r: &ChaosReceivers,
    github_url: &str,
    agents: usize,
) -> Result<(Failover, Vec<(String, Failover, u64)>)> {
    let admin = plain.with_token(admin_token);
    let limit = Duration::from_secs(60);
    let slug = format!("chaos-{}", Utc::now().format("%Y%m%d%H%M%S"));
    let org = admin
        .call_until(
            Method::POST,
            "/v1/orgs",
            Some(&json!({"slug": slug})),
            &[],
            limit,
        )
        .await?;
    if org.status.as_u16() != 201 {
        bail!("create org -> {} {}", org.status, org.body);
    }
    let tok = |k: &str| {
        org.body[k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no {k} in {}", org.body))
    };
    let api = plain.with_token(&tok("api_token")?);
    let reg = plain.with_token(&tok("agent_token")?);
    let expect = |rep: herald_client::Reply, code: u16, what: &str| -> Result<Value> {
        if rep.status.as_u16() == code {
            Ok(rep.body)
        } else {
            bail!("{what} -> {} {}", rep.status, rep.body)
        }
    };
    expect(
        api.call_until(
            Method::POST,
            "/v1/pipelines",
            Some(&json!({"slug": "chaos", "repository": "herald/chaos"})),
            &[],
            limit,
        )
        .await?,
        201,
        "create pipeline",
    )?;
    expect(
        api.call_until(
            Method::PUT,
            "/v1/pipelines/chaos/github",
            Some(&json!({"api_url": github_url, "token": "chaos-token", "job_statuses": false})),
            &[],
            limit,
        )
        .await?,
        200,
        "github integration",
    )?;
    for (i, e) in r.endpoints.iter().enumerate() {
        let v = expect(
            api.call_until(
                Method::POST,
                "/v1/webhooks",
                Some(&json!({"url": e.url, "events": ["*"]})),
                &[],
                limit,
            )
            .await?,
            201,
            "create webhook",
        )?;
        r.set_key(i, v["secret"].as_str().unwrap_or_default())?;
    }
    let mut out = Vec::new();
    for i in 0..agents {
        let v = expect(
            reg.call_until(
                Method::POST,
                "/v1/agents/register",
                Some(&json!({"name": format!("chaos-{i}"), "queues": ["default"]})),
                &[],
                limit,
            )
            .await?,
            201,
            "register agent",
        )?;
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        let every = v["heartbeat_interval_s"]
            .as_u64()
            .unwrap_or(30)
            .clamp(1, 10);
        out.push((
            id,
            plain.with_token(v["access_token"].as_str().unwrap_or_default()),
            every,
        ));
    }
    Ok((api, out))
}

async fn wait_ready(urls: &[String], limit: Duration) -> Result<()> {
    let c = herald_client::Client::new("http://127.0.0.1");
    let started = Instant::now();
    for u in urls {
        loop {
            let ok = herald_client::Client::new(u.clone())
                .call(Method::GET, "/readyz", None)
                .await
                .is_ok_and(|r| r.status.is_success());
            if ok {
                break;
            }
            if started.elapsed() > limit {
                bail!("{u}/readyz not ready after {:.0} s", limit.as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    drop(c);
    Ok(())
}

/// Outbox and build state the drain waits for.
async fn backlog(admin: &Failover) -> Option<i64> {
    let rep = admin
        .call(Method::GET, "/v1/ops/queues", None, &[])
        .await
        .ok()?;
    let items = rep.body["items"].as_array()?.clone();
    Some(
        items
            .iter()
            .filter(|q| {
                let n = q["name"].as_str().unwrap_or_default();
                n == "outbox" || n.ends_with(".pending")
            })
            .filter_map(|q| q["depth"].as_i64())
            .sum(),
    )
}

pub async fn run(args: Args) -> Result<bool> {
    let ca = args.chaos.clone();
    let seed = ca.seed.unwrap_or_else(rand::random);
    println!("[chaos] seed {seed} (rerun with --seed {seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let db_url = args
        .db_url
        .clone()
        .context("--db-url is needed: the ledger reads the outbox")?;
    let guard = ServiceGuard {
        down: Mutex::new(Vec::new()),
        restore: ca.restore.clone(),
    };
    let mut cluster = Cluster::new(ca.herald_bin.clone(), ca.log_dir.clone(), ca.port_base)?;
    cluster.start_all()?;
    let urls = cluster.api_urls();
    println!(
        "[chaos] {} processes: {}; api at {}",
        cluster.slots.len(),
        cluster
            .slots
            .iter()
            .map(|s| format!("{} :{}", s.kind.roles(), s.port))
            .collect::<Vec<_>>()
            .join(", "),
        urls.join(" ")
    );
    wait_ready(&urls, Duration::from_secs(90)).await?;
    let ledger = Arc::new(HttpLedger::default());
    let plain = Failover::new(&urls, ledger.clone());
    let admin = plain.with_token(&args.admin_token);
    let r = ChaosReceivers::start(ca.chaos_endpoints).await?;
    let (github, github_url) = FakeGithub::start().await?;
    let (api, agents) = setup(&plain, &args.admin_token, &r, &github_url, ca.chaos_agents).await?;
    // Every process's subscription cache must see the new webhooks before events count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counted_from = Utc::now();
    let started = Instant::now();
    let w = Arc::new(World::default());
    let shared_args = Arc::new(args.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for (id, fc, every) in agents {
        tasks.spawn(heartbeat_loop(
            w.clone(),
            fc.clone(),
            Duration::from_secs(every),
        ));
        tasks.spawn(agent_loop(w.clone(), fc, id, shared_args.clone()));
    }
    let per_build = args.jobs_per_build.clamp(1, 500);
    let creator_task = tokio::spawn(creator(
        w.clone(),
        api.clone(),
        args.jobs_per_s / per_build as f64,
        per_build,
    ));

    let faults = plan(&mut rng, ca.kills);
    let gap = args.duration_s.max(1.0) / faults.len() as f64;
    println!(
        "[chaos] {} faults over about {:.0} s: {}",
        faults.len(),
        args.duration_s,
        faults
            .iter()
            .map(Fault::label)
            .collect::<Vec<_>>()
            .join(", ")
    );
    idle(&mut cluster, Duration::from_secs_f64(gap.min(5.0))).await;
    let mut recs = Vec::new();
    let heal_limit = Duration::from_secs_f64(ca.heal_timeout_s);
    for f in &faults {
        let pause = gap * rng.gen_range(0.5..1.5);
        idle(&mut cluster, Duration::from_secs_f64(pause)).await;
        let at = Utc::now();
        let t = Instant::now();
        let note = match inject(f, &ca, &mut cluster, &r, &guard, &mut rng).await {
            Ok(n) => n,
            Err(e) => format!("FAULT FAILED: {e:#}"),
        };
        let heal_s = heal(&w, &api, &r, &mut cluster, t, heal_limit).await;
        println!(
            "[chaos {:>5.0}s] {:<22} {:<28} healed in {}",
            started.elapsed().as_secs_f64(),
            f.label(),
            note,
            heal_s.map_or("NOT HEALED".into(), |s| format!("{s:.1} s"))
        );
        recs.push(FaultRec {
            label: f.label(),
            at,
            at_s: started.elapsed().as_secs_f64() - t.elapsed().as_secs_f64(),
            heal_s,
            note,
        });
    }
    w.stop_builds.store(true, Ordering::Relaxed);
    let _ = creator_task.await;
    // Drain: every build's build.finished at the receivers, nothing left pending.
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain_s.max(10.0));
    let drained = loop {
        let _ = cluster.watch();
        let finished = r.finished_builds();
        let all = w
            .builds
            .lock()
            .unwrap()
            .iter()
            .all(|b| finished.contains(&b.id));
        if all && backlog(&admin).await == Some(0) {
            break true;
        }
        if Instant::now() > drain_until {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let drain_s = started.elapsed().as_secs_f64();
    println!(
        "[chaos] drain {}",
        if drained { "complete" } else { "INCOMPLETE" }
    );
    w.stop_agents.store(true, Ordering::Relaxed);
    let report = ledger_report(LedgerInput {
        w: &w,
        api: &api,
        r: &r,
        github: &github,
        db_url: &db_url,
        recs: &recs,
        counted_from,
        http: &ledger,
        cluster: &cluster,
        seed,
        drained,
        total_s: drain_s,
        args: &args,
    })
    .await;
    tasks.abort_all();
    cluster.stop_all().await;
    drop(guard);
    let (text, ok) = report?;
    println!("\n=== herald-loadtest chaos ledger ===");
    print!("{text}");
    Ok(ok)
}

struct LedgerInput<'a> {
    w: &'a World,
    api: &'a Failover,
    r: &'a ChaosReceivers,
    github: &'a FakeGithub,
    db_url: &'a str,
    recs: &'a [FaultRec],
    counted_from: DateTime<Utc>,
    http: &'a HttpLedger,
    cluster: &'a Cluster,
    seed: u64,
    drained: bool,
    total_s: f64,
    args: &'a Args,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    events: u64,
    expected: u64,
    received: u64,
    lost: u64,
    dup: u64,
    two_agents: u64,
    stuck: u64,
    wrong_status: u64,
    server_errors: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.events += o.events;
        self.expected += o.expected;
        self.received += o.received;
        self.lost += o.lost;
        self.dup += o.dup;
        self.two_agents += o.two_agents;
        self.stuck += o.stuck;
        self.wrong_status += o.wrong_status;
        self.server_errors += o.server_errors;
    }
}

/// Index of the window holding `t`: 0 before the first fault, i + 1 from fault i on.
fn window(recs: &[FaultRec], t: DateTime<Utc>) -> usize {
    recs.iter().take_while(|f| f.at <= t).count()
}

/// Every delivery of webhook `id` (delivery id → event id, status), all pages.
async fn deliveries(api: &Failover, id: &str) -> Result<HashMap<String, (String, String)>> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/webhooks/{id}/deliveries?limit=500&cursor={c}"),
            None => format!("/v1/webhooks/{id}/deliveries?limit=500"),
        };
        let rep = api
            .call_until(Method::GET, &path, None, &[], Duration::from_secs(30))
            .await?;
        if rep.status.as_u16() != 200 {
            bail!("GET {path} -> {} {}", rep.status, rep.body);
        }
        for d in rep.body["items"].as_array().cloned().unwrap_or_default() {
            out.insert(
                d["id"].as_str().unwrap_or_default().to_owned(),
                (
                    d["event_id"].as_str().unwrap_or_default().to_owned(),
                    d["status"].as_str().unwrap_or_default().to_owned(),
                ),
            );
        }
        match rep.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(out),
        }
    }
}

async fn webhook_ids(api: &Failover) -> Result<Vec<(String, String)>> {
    let rep = api
        .call_until(
            Method::GET,
            "/v1/webhooks?limit=500",
            None,
            &[],
            Duration::from_secs(30),
        )
        .await?;
    Ok(rep.body["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap_or_default().to_owned(),
                h["url"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

fn github_state(build_state: &str) -> Option<&'static str> {
    match build_state {
        "passed" => Some("success"),
        "failed" => Some("failure"),
        "canceled" => Some("error"),
        _ => None,
    }
}

async fn ledger_report(i: LedgerInput<'_>) -> Result<(String, bool)> {
    let n = i.recs.len() + 1;
    let mut rows = vec![Tally::default(); n];
    let mut notes: Vec<String> = Vec::new();

    // Events the outbox holds, from the moment the webhooks were in place.
    let mut conn = PgConnection::connect(i.db_url)
        .await
        .context("connecting to the primary to read the outbox")?;
    let events: Vec<(String, DateTime<Utc>)> =
        sqlx::query("SELECT event_id::text AS id, created_at FROM outbox WHERE created_at >= $1")
            .bind(i.counted_from)
            .fetch_all(&mut conn)
            .await
            .context("reading the outbox")?
            .iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("created_at")?)))
            .collect::<Result<_, sqlx::Error>>()?;
    let _ = conn.close().await;
    let event_at: HashMap<&str, DateTime<Utc>> =
        events.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    for (_, at) in &events {
        let k = window(i.recs, *at);
        rows[k].events += 1;
        rows[k].expected += i.r.endpoints.len() as u64;
    }

    // Per endpoint: Herald's deliveries (webhook-id → event) against what it got.
    let hooks = webhook_ids(i.api).await?;
    let mut lost_status: HashMap<String, u64> = HashMap::new();
    for e in &i.r.endpoints {
        let Some((hook, _)) = hooks.iter().find(|(_, u)| *u == e.url) else {
            notes.push(format!("webhook for {} not found", e.url));
            continue;
        };
        let ds = deliveries(i.api, hook).await?;
        let seen = e.seen.lock().unwrap().clone();
        let mut got: HashSet<&str> = HashSet::new();
        for (wid, (event, status)) in &ds {
            let Some(at) = event_at.get(event.as_str()) else {
                continue;
            };
            let k = window(i.recs, *at);
            match seen.get(wid) {
                Some(s) if s.ok_at.is_some() => {
                    got.insert(event.as_str());
                    rows[k].received += 1;
                    if s.after_ok > 0 {
                        rows[k].dup += 1;
                        notes.push(format!(
                            "duplicate after 2xx: webhook-id {wid} ({}) received {} more time(s)",
                            s.event_type, s.after_ok
                        ));
                    }
                }
                _ => {
                    *lost_status.entry(status.clone()).or_default() += 1;
                }
            }
        }
        for (id, at) in &events {
            if !got.contains(id.as_str()) {
                rows[window(i.recs, *at)].lost += 1;
            }
        }
        let without_row = events
            .iter()
            .filter(|(id, _)| !ds.values().any(|(ev, _)| ev == id))
            .count();
        if without_row > 0 {
            notes.push(format!(
                "{without_row} events have no delivery row for {}",
                e.url
            ));
        }
    }
    if !lost_status.is_empty() {
        notes.push(format!(
            "undelivered deliveries by Herald status: {lost_status:?}"
        ));
    }

    // Jobs accepted by two agents.
    for (job, (at, agents)) in i.w.accepted.lock().unwrap().iter() {
        if agents.len() > 1 {
            rows[window(i.recs, *at)].two_agents += 1;
            notes.push(format!("job {job} accepted by {} agents", agents.len()));
        }
    }

    // Builds not terminal, and commit statuses whose final state is wrong.
    let builds: Vec<(String, String, DateTime<Utc>)> =
        i.w.builds
            .lock()
            .unwrap()
            .iter()
            .map(|b| (b.id.clone(), b.sha.clone(), b.created_at))
            .collect();
    let last = i.github.last();
    for (id, sha, at) in &builds {
        let k = window(i.recs, *at);
        let state = match i
            .api
            .call_until(
                Method::GET,
                &format!("/v1/builds/{id}"),
                None,
                &[],
                Duration::from_secs(30),
            )
            .await
        {
            Ok(rep) if rep.status.as_u16() == 200 => {
                rep.body["state"].as_str().unwrap_or_default().to_owned()
            }
            Ok(rep) => format!("GET -> {}", rep.status.as_u16()),
            Err(e) => format!("GET failed: {e}"),
        };
        match github_state(&state) {
            None => {
                rows[k].stuck += 1;
                notes.push(format!("build {id} is {state}"));
            }
            Some(want) => {
                let got = last.get(&(sha.clone(), "herald/chaos".to_owned()));
                if got.map(String::as_str) != Some(want) {
                    rows[k].wrong_status += 1;
                    notes.push(format!(
                        "build {id} is {state}; GitHub's last status: {}",
                        got.map_or("none", String::as_str)
                    ));
                }
            }
        }
    }

    for (at, what) in i.http.server_errors.lock().unwrap().iter() {
        rows[window(i.recs, *at)].server_errors += 1;
        if notes.iter().filter(|n| n.starts_with("5xx")).count() < 10 {
            notes.push(format!("5xx at {}: {what}", at.format("%H:%M:%S%.3f")));
        }
    }

    let mut s = String::new();
    let a = i.args;
    let _ = writeln!(s, "```text");
    let _ = writeln!(
        s,
        "herald-loadtest chaos at {}: seed {}, {:.0} s in all, {} builds ({} jobs each, {:.1} jobs/s), {} agents, {} endpoints, {} processes",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        i.seed,
        i.total_s,
        builds.len(),
        a.jobs_per_build,
        a.jobs_per_s,
        a.chaos.chaos_agents,
        i.r.endpoints.len(),
        i.cluster.slots.len(),
    );
    let _ = writeln!(
        s,
        "{:<22} {:>6} {:>7} {:>7} {:>8} {:>8} {:>5} {:>8} {:>8} {:>7} {:>6} {:>5}  note",
        "fault",
        "at s",
        "heal s",
        "events",
        "expected",
        "received",
        "lost",
        "dup>2xx",
        "2-agent",
        "stuck",
        "wrong",
        "5xx"
    );
    let mut total = Tally::default();
    for (k, row) in rows.iter().enumerate() {
        total.add(row);
        let (label, at, heal, note) = if k == 0 {
            (
                "(before faults)".to_owned(),
                "0".to_owned(),
                "-".to_owned(),
                String::new(),
            )
        } else {
            let f = &i.recs[k - 1];
            (
                f.label.clone(),
                format!("{:.0}", f.at_s),
                f.heal_s.map_or("NOT".into(), |h| format!("{h:.1}")),
                f.note.clone(),
            )
        };
        let _ = writeln!(
            s,
            "{label:<22} {at:>6} {heal:>7} {:>7} {:>8} {:>8} {:>5} {:>8} {:>8} {:>7} {:>6} {:>5}  {note}",
            row.events, row.expected, row.received, row.lost, row.dup, row.two_agents, row.stuck, row.wrong_status, row.server_errors
        );
    }
    let _ = writeln!(
        s,
        "{:<22} {:>6} {:>7} {:>7} {:>8} {:>8} {:>5} {:>8} {:>8} {:>7} {:>6} {:>5}",
        "TOTAL",
        "",
        "",
        total.events,
        total.expected,
        total.received,
        total.lost,
        total.dup,
        total.two_agents,
        total.stuck,
        total.wrong_status,
        total.server_errors
    );
    let _ = writeln!(
        s,
        "drain {}; jobs finished {}; builds not created (gave up after 90 s) {}; transport errors {}, failovers {}; receiver requests {} (invalid signatures {})",
        if i.drained { "complete" } else { "INCOMPLETE" },
        i.w.jobs_done.load(Ordering::Relaxed),
        i.w.create_failed.load(Ordering::Relaxed),
        i.http.transport_errors.load(Ordering::Relaxed),
        i.http.failovers.load(Ordering::Relaxed),
        i.r.requests.load(Ordering::Relaxed),
        i.r.invalid.load(Ordering::Relaxed),
    );
    for e in &i.cluster.unexpected_exits {
        notes.push(format!("process: {e}"));
    }
    let panics = i.cluster.panics();
    for p in panics.iter().take(5) {
        notes.push(format!("panic: {p}"));
    }
    for e in i.w.errors.lock().unwrap().iter() {
        notes.push(format!("agent/creator error: {e}"));
    }
    let slow_term = i.recs.iter().any(|f| f.note.contains("did NOT exit"));
    let invalid = i.r.invalid.load(Ordering::Relaxed);
    for n in notes.iter().take(60) {
        let _ = writeln!(s, "  {n}");
    }
    let ok = total.lost == 0
        && total.two_agents == 0
        && total.stuck == 0
        && total.wrong_status == 0
        && !slow_term
        && invalid == 0
        && panics.is_empty();
    let _ = writeln!(
        s,
        "verdict               {} (lost {}, jobs to two agents {}, stuck builds {}, wrong statuses {}, SIGTERM over 30 s {}, invalid signatures {}, panics {})",
        if ok { "PASS" } else { "FAIL" },
        total.lost,
        total.two_agents,
        total.stuck,
        total.wrong_status,
        slow_term,
        invalid,
        panics.len()
    );
    let _ = writeln!(s, "```");
    Ok((s, ok))
}

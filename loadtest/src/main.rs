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

mod agents;
mod builds;
mod cluster;
mod fakes;
mod metrics;
mod plot;
mod receivers;
mod report;
mod scenarios;

use agents::{register_agents, Shared};
use anyhow::{anyhow, bail, Context, Result};
use chrono::Utc;
use clap::Parser;
use herald_client::Client;
use metrics::TxProbe;
use receivers::Scenario;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

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
    /// Where the incident and ceilings scenarios write their tables, CSVs and plots
    /// (default docs/bench-raw/<scenario>-<UTC date, and for incident the time>).
    #[arg(long)]
    out_dir: Option<std::path::PathBuf>,
    /// Herald server process ids, separated by spaces or commas, whose CPU time
    /// (/proc/<pid>/stat) the ceilings scenario charges to each step; run.sh sets it.
    #[arg(long, env = "HERALD_LOADTEST_HERALD_PIDS")]
    herald_pids: Option<String>,
    #[command(flatten)]
    notify: receivers::NotifyArgs,
    #[command(flatten)]
    ceilings: scenarios::ceilings::CeilingsArgs,
    #[command(flatten)]
    chaos: scenarios::chaos::ChaosArgs,
    #[command(flatten)]
    incident: scenarios::incident::IncidentArgs,
}

async fn run(args: Args) -> Result<()> {
    if args.notify.scenario == Scenario::Chaos {
        return match scenarios::chaos::run(args).await? {
            true => Ok(()),
            false => Err(anyhow!("the chaos ledger shows a failure")),
        };
    }
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

    let text = match args.notify.scenario {
        Scenario::Dispatch => {
            scenarios::dispatch::run(
                &sh,
                &api,
                &plain,
                pipeline,
                &mut primary,
                &mut replica,
                setup_s,
            )
            .await?
        }
        Scenario::Webhooks => {
            scenarios::webhooks::run(
                &sh,
                &api,
                &plain,
                &admin,
                pipeline,
                primary.as_mut(),
                setup_s,
            )
            .await?
        }
        Scenario::Chaos => bail!("the chaos scenario runs on its own"),
        Scenario::Ceilings => {
            scenarios::ceilings::run(
                &sh,
                &api,
                &plain,
                &admin,
                pipeline,
                primary.as_mut(),
                setup_s,
            )
            .await?
        }
        Scenario::Incident => {
            scenarios::incident::run(&sh, &api, &plain, &admin, pipeline, setup_s).await?
        }
        Scenario::Storm => {
            scenarios::storm::run(
                &sh,
                &api,
                &plain,
                &admin,
                pipeline,
                primary.as_mut(),
                setup_s,
            )
            .await?
        }
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

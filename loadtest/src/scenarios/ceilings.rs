//! Ceilings scenario (issue 14): the offered load ramps in steps until a target
//! breaks; the last step that held is the ceiling. One table row per step, with what
//! each job or delivery cost: primary transactions, WAL bytes, broker messages and
//! Herald CPU seconds.
//!
//! * `--phase jobs`: builds of one job at each of `--job-steps` jobs/s, dispatched to
//!   the parked agents, accepted, started, finished. A step holds when dispatch p99
//!   <= 25 ms, every job it created was dispatched by its end + `--step-grace-s`, the
//!   creators kept up (>= 95 % of the offered rate) and no API call failed.
//! * `--phase webhooks`: `--webhook-jobs-per-s` of one-job builds (also the dispatch
//!   load beside the webhooks), each event fanned out to as many endpoints as make
//!   the step's deliveries/s of `--delivery-steps`. A step holds when the
//!   event-to-receiver p99 <= 2 s and every delivery the step's builds caused was
//!   received by its end + grace (+ the same creator and error checks).
//!
//! The throttle is a setting of the server, so webhooks with the throttle off and
//! on are two runs of run.sh (its header gives the commands). Steps are separated by
//! their drain, so each starts with nothing outstanding; the cost windows are
//! contiguous (each step's from its start to the next one's), so no work is counted
//! twice or lost.

use crate::agents::Shared;
use crate::builds::Pace;
use crate::metrics::{clock_ticks, cpu_jiffies, ms, process_ticks, quantiles, scrape, TxProbe};
use crate::receivers::{notifications_per_build, parse_value, sample_of, Receivers};
use crate::report::{met, TARGET_P99_MS};
use crate::scenarios::dispatch::load_phase_at;
use crate::scenarios::webhooks::{queues_line, setup_sized, throttle_env, NotifySetup};
use anyhow::{Context, Result};
use chrono::Utc;
use herald_client::Client;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Webhooks: event-to-receiver p99 at which a step breaks, milliseconds.
pub const TARGET_NOTIFY_P99_MS: f64 = 2000.0;
/// Issue 14's targets, reported against the ceiling (never an exit status).
pub const TARGET_JOBS_PER_S: f64 = 300.0;
pub const TARGET_DELIVERIES_PER_S: f64 = 7500.0;
pub const TARGET_TX_PER_JOB: f64 = 6.0;
pub const TARGET_TX_PER_DELIVERY: f64 = 0.2;
/// A step whose creators made fewer than this share of the offered builds did not
/// offer its load (Herald's API was too slow to take them): it breaks.
const MIN_CREATED_SHARE: f64 = 0.95;
/// Each job of the ceilings is a build of its own.
const JOBS_PER_BUILD: usize = 1;
/// Herald's default per-host rate is 5000/s: the receivers get a host per this many
/// deliveries/s offered, so that limit is not what is measured.
const DELIVERIES_PER_HOST: f64 = 2500.0;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Jobs,
    Webhooks,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CeilingsArgs {
    /// Ceilings: which ramp to run.
    #[arg(long, value_enum, default_value_t = Phase::Jobs)]
    pub phase: Phase,
    /// Ceilings, jobs: created jobs/s of each step, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "50,100,150,200,300,400,600,800,1000,1200,1600"
    )]
    pub job_steps: Vec<f64>,
    /// Ceilings, webhooks: offered deliveries/s of each step, in order (rounded up to
    /// a whole number of endpoints).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,3000,5000,7500,10000,12500,15000,20000"
    )]
    pub delivery_steps: Vec<f64>,
    /// Ceilings, webhooks: jobs/s (one-job builds) whose events are delivered.
    #[arg(long, default_value_t = 50.0)]
    pub webhook_jobs_per_s: f64,
    /// Ceilings: seconds of load per step.
    #[arg(long, default_value_t = 20.0)]
    pub step_s: f64,
    /// Ceilings: seconds after a step's load for its jobs to be dispatched (and its
    /// deliveries received); what is still outstanding then is a growing backlog.
    #[arg(long, default_value_t = 3.0)]
    pub step_grace_s: f64,
    /// Ceilings: at most this many steps.
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Ceilings: no step starts that could end after this many seconds of ramp.
    #[arg(long, default_value_t = 1200.0)]
    pub max_total_s: f64,
    /// Ceilings: build creator tasks, each with its share of the rate.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
}

/// Cumulative counters, read at each step boundary.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    tx: Option<i64>,
    lsn: Option<i64>,
    published: Option<f64>,
    consumed: Option<f64>,
    /// Herald's processes: None when a pid was not given or could not be read.
    herald_ticks: Option<u64>,
    own_ticks: Option<u64>,
    cpu: Option<(u64, u64)>,
    deliveries_created: Option<f64>,
}

struct Probes<'a> {
    primary: Option<&'a mut TxProbe>,
    plain: Client,
    pids: Vec<String>,
    ticks: f64,
}

impl Probes<'_> {
    async fn read(&mut self) -> Reading {
        let (tx, lsn) = match self.primary.as_deref_mut() {
            Some(p) => (p.read().await.ok(), p.lsn().await.ok()),
            None => (None, None),
        };
        let text = scrape(&self.plain).await;
        // A counter Herald has not incremented yet is not exported: zero.
        let value = |name: &str| {
            text.as_deref()
                .map(|t| parse_value(t, name, "").unwrap_or(0.0))
        };
        let herald_ticks = if self.pids.is_empty() {
            None
        } else {
            self.pids
                .iter()
                .map(|p| process_ticks(p))
                .sum::<Option<u64>>()
        };
        Reading {
            at: Instant::now(),
            tx,
            lsn,
            published: value("herald_bus_published_total"),
            consumed: value("herald_bus_consumed_total"),
            herald_ticks,
            own_ticks: process_ticks("self"),
            cpu: cpu_jiffies(),
            deliveries_created: text.as_deref().map(|t| sample_of(t, 0.0).created),
        }
    }
}

/// What a step cost, in all (None: not measured).
#[derive(Debug, Clone, Copy, Default)]
struct Costs {
    seconds: f64,
    tx: Option<f64>,
    wal: Option<f64>,
    published: Option<f64>,
    consumed: Option<f64>,
    herald_cpu_s: Option<f64>,
    own_cpu_s: Option<f64>,
    box_cpu: Option<f64>,
    deliveries_created: Option<f64>,
}

fn costs(a: &Reading, b: &Reading, ticks: f64) -> Costs {
    let d = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| y - x);
    let di = |x: Option<i64>, y: Option<i64>| x.zip(y).map(|(x, y)| (y - x) as f64);
    let du = |x: Option<u64>, y: Option<u64>| x.zip(y).map(|(x, y)| y.saturating_sub(x) as f64);
    Costs {
        seconds: b.at.duration_since(a.at).as_secs_f64(),
        // The probe's own reads at the first boundary (pg_stat_database, then the
        // LSN) are two transactions of this database.
        tx: di(a.tx, b.tx).map(|n| (n - 2.0).max(0.0)),
        wal: di(a.lsn, b.lsn),
        published: d(a.published, b.published),
        consumed: d(a.consumed, b.consumed),
        herald_cpu_s: du(a.herald_ticks, b.herald_ticks).map(|t| t / ticks),
        own_cpu_s: du(a.own_ticks, b.own_ticks).map(|t| t / ticks),
        box_cpu: a.cpu.zip(b.cpu).and_then(|(x, y)| {
            let total = y.1.saturating_sub(x.1);
            (total > 0).then(|| y.0.saturating_sub(x.0) as f64 / total as f64 * 100.0)
        }),
        deliveries_created: d(a.deliveries_created, b.deliveries_created),
    }
}

/// One step's row.
#[derive(Debug, Clone, Default)]
struct Row {
    step: usize,
    /// Jobs/s or deliveries/s offered.
    offered: f64,
    endpoints: usize,
    jobs_created: u64,
    jobs_per_s: f64,
    dispatched_per_s: f64,
    /// Webhooks: deliveries the step's builds cause, and those received.
    expected: f64,
    received: f64,
    received_per_s: f64,
    /// Dispatch latency (jobs) or event-to-receiver latency (webhooks), ms.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// Webhooks: the dispatch p99 of the jobs beside them, ms.
    dispatch_p99_ms: Option<f64>,
    /// Jobs not dispatched, or deliveries not received, at the end of the grace.
    backlog: f64,
    errors: u64,
    /// Jobs created (jobs) or deliveries received (webhooks): what costs are per.
    units: f64,
    costs: Costs,
    /// None: held; Some(why): broke.
    broke: Option<String>,
}

fn per(x: Option<f64>, units: f64, scale: f64) -> String {
    match x {
        Some(x) if units > 0.0 => format!("{:.2}", x / units * scale),
        _ => "-".into(),
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn verdict(r: &Row) -> String {
    match &r.broke {
        None => "held".into(),
        Some(why) => format!("BROKE: {why}"),
    }
}

const JOBS_HEADER: &[&str] = &[
    "step",
    "offered jobs/s",
    "created/s",
    "dispatched/s",
    "dispatch p50 ms",
    "dispatch p99 ms",
    "backlog",
    "errors",
    "tx/job",
    "WAL kB/job",
    "broker msgs/job",
    "Herald CPU ms/job",
    "box CPU %",
    "result",
];

const WEBHOOKS_HEADER: &[&str] = &[
    "step",
    "offered deliveries/s",
    "endpoints",
    "created/s",
    "received/s",
    "latency p50 ms",
    "latency p99 ms",
    "backlog",
    "dispatch p99 ms",
    "errors",
    "tx/delivery",
    "WAL B/delivery",
    "broker msgs/delivery",
    "Herald CPU ms/delivery",
    "box CPU %",
    "result",
];

/// Broker messages: published + consumed (each message is both, once or more).
fn msgs(c: &Costs) -> Option<f64> {
    c.published.zip(c.consumed).map(|(p, q)| p + q)
}

fn cells(phase: Phase, r: &Row) -> Vec<String> {
    let c = &r.costs;
    let secs = c.seconds.max(1e-9);
    match phase {
        Phase::Jobs => vec![
            r.step.to_string(),
            format!("{:.0}", r.offered),
            format!("{:.1}", r.jobs_per_s),
            format!("{:.1}", r.dispatched_per_s),
            opt(r.p50_ms, 2),
            opt(r.p99_ms, 2),
            format!("{:.0}", r.backlog),
            r.errors.to_string(),
            per(c.tx, r.units, 1.0),
            per(c.wal, r.units, 1e-3),
            per(msgs(c), r.units, 1.0),
            per(c.herald_cpu_s, r.units, 1e3),
            opt(c.box_cpu, 0),
            verdict(r),
        ],
        Phase::Webhooks => vec![
            r.step.to_string(),
            format!("{:.0}", r.offered),
            r.endpoints.to_string(),
            opt(c.deliveries_created.map(|d| d / secs), 0),
            format!("{:.0}", r.received_per_s),
            opt(r.p50_ms, 1),
            opt(r.p99_ms, 1),
            format!("{:.0}", r.backlog),
            opt(r.dispatch_p99_ms, 2),
            r.errors.to_string(),
            per(c.tx, r.units, 1.0),
            per(c.wal, r.units, 1.0),
            per(msgs(c), r.units, 1.0),
            per(c.herald_cpu_s, r.units, 1e3),
            opt(c.box_cpu, 0),
            verdict(r),
        ],
    }
}

fn md_row(v: &[String]) -> String {
    format!("| {} |", v.join(" | "))
}

fn md_table(phase: Phase, rows: &[Row]) -> String {
    let header: Vec<String> = match phase {
        Phase::Jobs => JOBS_HEADER,
        Phase::Webhooks => WEBHOOKS_HEADER,
    }
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut s = md_row(&header);
    s.push('\n');
    s.push_str(&md_row(&vec!["---".to_string(); header.len()]));
    s.push('\n');
    for r in rows {
        s.push_str(&md_row(&cells(phase, r)));
        s.push('\n');
    }
    s
}

const CSV_HEADER: &str =
    "phase,step,offered_per_s,endpoints,jobs_created,jobs_per_s,dispatched_per_s,\
expected_deliveries,received_deliveries,received_per_s,deliveries_created,p50_ms,p99_ms,\
dispatch_p99_ms,backlog,errors,units,window_s,tx,wal_bytes,broker_published,broker_consumed,\
herald_cpu_s,loadtest_cpu_s,box_cpu_pct,tx_per_unit,wal_bytes_per_unit,broker_msgs_per_unit,\
herald_cpu_ms_per_unit,held,why";

fn csv_row(phase: Phase, r: &Row) -> String {
    let c = &r.costs;
    let o = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.4}"));
    let u = |x: Option<f64>, scale: f64| {
        x.filter(|_| r.units > 0.0)
            .map_or(String::new(), |x| format!("{:.4}", x / r.units * scale))
    };
    [
        format!("{phase:?}").to_lowercase(),
        r.step.to_string(),
        format!("{:.1}", r.offered),
        r.endpoints.to_string(),
        r.jobs_created.to_string(),
        format!("{:.2}", r.jobs_per_s),
        format!("{:.2}", r.dispatched_per_s),
        format!("{:.0}", r.expected),
        format!("{:.0}", r.received),
        format!("{:.1}", r.received_per_s),
        o(c.deliveries_created),
        o(r.p50_ms),
        o(r.p99_ms),
        o(r.dispatch_p99_ms),
        format!("{:.0}", r.backlog),
        r.errors.to_string(),
        format!("{:.0}", r.units),
        format!("{:.2}", c.seconds),
        o(c.tx),
        o(c.wal),
        o(c.published),
        o(c.consumed),
        o(c.herald_cpu_s),
        o(c.own_cpu_s),
        o(c.box_cpu),
        u(c.tx, 1.0),
        u(c.wal, 1.0),
        u(msgs(c), 1.0),
        u(c.herald_cpu_s, 1e3),
        (r.broke.is_none()).to_string(),
        format!(
            "\"{}\"",
            r.broke.clone().unwrap_or_default().replace('"', "'")
        ),
    ]
    .join(",")
}

/// The reasons a step broke, from what every phase checks.
fn common_breaks(r: &Row, offered_jobs_per_s: f64, step_s: f64) -> Vec<String> {
    let mut why = Vec::new();
    let want = offered_jobs_per_s * step_s;
    if (r.jobs_created as f64) < want * MIN_CREATED_SHARE {
        why.push(format!(
            "created {} of {want:.0} jobs offered",
            r.jobs_created
        ));
    }
    if r.errors > 0 {
        why.push(format!("{} API errors", r.errors));
    }
    why
}

fn stat_line(r: &Row, phase: Phase) -> String {
    let c = &r.costs;
    let (unit, units) = match phase {
        Phase::Jobs => ("job", "jobs"),
        Phase::Webhooks => ("delivery", "deliveries"),
    };
    format!(
        "[ceilings] step {} {}: {:.0} {units} in {:.1} s; per {unit}: tx {}, WAL {} B, broker msgs {}, Herald CPU {} ms (load test's own CPU {} s, box {} %)",
        r.step,
        verdict(r),
        r.units,
        c.seconds,
        per(c.tx, r.units, 1.0),
        per(c.wal, r.units, 1.0),
        per(msgs(c), r.units, 1.0),
        per(c.herald_cpu_s, r.units, 1e3),
        opt(c.own_cpu_s, 1),
        opt(c.box_cpu, 0),
    )
}

/// How far the ramp got: the highest offered rate that held, and whether a step
/// above it broke (else the ceiling is only known to be at least that).
#[derive(Debug, Clone, Copy)]
struct Ceiling {
    held: Option<f64>,
    reached: bool,
}

/// The ramp's outcome in a sentence.
fn ceiling_line(phase: Phase, rows: &[Row], stopped: &str) -> (String, Ceiling) {
    let unit = match phase {
        Phase::Jobs => "jobs/s",
        Phase::Webhooks => "deliveries/s",
    };
    let held = rows.iter().take_while(|r| r.broke.is_none()).last();
    let broke = rows.iter().find(|r| r.broke.is_some());
    let measured = |r: &Row| match phase {
        Phase::Jobs => r.jobs_per_s,
        Phase::Webhooks => r.received_per_s,
    };
    match (held, broke) {
        (Some(h), Some(b)) => (
            format!(
                "ceiling: {:.0} {unit} offered held (step {}, {:.0} {unit} measured); {:.0} {unit} broke (step {}: {})",
                h.offered,
                h.step,
                measured(h),
                b.offered,
                b.step,
                b.broke.clone().unwrap_or_default()
            ),
            Ceiling {
                held: Some(h.offered),
                reached: true,
            },
        ),
        (None, Some(b)) => (
            format!(
                "ceiling: below the first step; {:.0} {unit} broke (step {}: {})",
                b.offered,
                b.step,
                b.broke.clone().unwrap_or_default()
            ),
            Ceiling {
                held: None,
                reached: true,
            },
        ),
        (Some(h), None) => (
            format!(
                "ceiling: not reached; every step held up to {:.0} {unit} (step {}), then {stopped}",
                h.offered, h.step
            ),
            Ceiling {
                held: Some(h.offered),
                reached: false,
            },
        ),
        (None, None) => (
            format!("ceiling: no step ran ({stopped})"),
            Ceiling {
                held: None,
                reached: false,
            },
        ),
    }
}

/// Whether another step of `step_s` (+ its drains) fits in the ramp's time limit.
fn time_left(ca: &CeilingsArgs, started: Instant) -> bool {
    let need = ca.step_s + 2.0 * ca.step_grace_s + 5.0;
    started.elapsed().as_secs_f64() + need <= ca.max_total_s
}

pub async fn run(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    admin: &Client,
    pipeline: &str,
    primary: Option<&mut TxProbe>,
    setup_s: f64,
) -> Result<String> {
    let a = &sh.args;
    let ca = &a.ceilings;
    let started_utc = Utc::now();
    let out_dir =
        crate::report::out_dir(a, format!("ceilings-{}", started_utc.format("%Y-%m-%d")))?;
    let throttle = throttle_env();
    let base = match ca.phase {
        Phase::Jobs => "jobs".to_string(),
        Phase::Webhooks if throttle.starts_with("off") => "webhooks-throttle-off".into(),
        Phase::Webhooks => "webhooks-throttle-on".into(),
    };
    let pids: Vec<String> = a
        .herald_pids
        .as_deref()
        .unwrap_or("")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .collect();
    let mut notes = vec![
        format!(
            "herald-loadtest {} ({} build) at {}; Herald profile {} (HERALD_LOADTEST_PROFILE)",
            env!("CARGO_PKG_VERSION"),
            if cfg!(debug_assertions) { "debug" } else { "release" },
            started_utc.format("%Y-%m-%d %H:%M UTC"),
            std::env::var("HERALD_LOADTEST_PROFILE").unwrap_or_else(|_| "release".into())
        ),
        format!(
            "{} agents registered in {setup_s:.1} s; ping wait {} s; jobs sleep {}-{} ms, {}% fail; builds of {JOBS_PER_BUILD} job from {} creator tasks (each <= {} builds in flight)",
            a.agents,
            a.ping_wait,
            a.job_min_ms,
            a.job_max_ms,
            a.fail_rate * 100.0,
            ca.producers.max(1),
            a.max_inflight_builds
        ),
        format!(
            "steps of {:.0} s + up to {:.0} s grace (and, for webhooks, up to {:.0} s more for the deliveries); at most {} steps, {:.0} s",
            ca.step_s, ca.step_grace_s, ca.step_grace_s, ca.max_steps, ca.max_total_s
        ),
        format!("throttle {throttle}"),
        if pids.is_empty() {
            "Herald CPU: not measured (HERALD_LOADTEST_HERALD_PIDS not set)".into()
        } else {
            format!("Herald CPU: /proc/<pid>/stat utime+stime of pid(s) {}", pids.join(" "))
        },
        "tx: pg_stat_database xact_commit+xact_rollback of Herald's database (the probe's own reads excluded); \
         WAL: pg_current_wal_lsn, whole cluster (anything else writing to it is counted too); \
         broker msgs: herald_bus_published_total + herald_bus_consumed_total of the process serving /metrics"
            .into(),
    ];
    if pids.len() > 1 {
        notes.push(
            "several Herald processes: CPU is their sum, but the broker counters and \
             herald_notify_deliveries_created_total are only those of the process serving /metrics"
                .into(),
        );
    }
    if primary.is_none() {
        notes.push("no --db-url: transactions and WAL not measured".into());
    }
    for n in &notes {
        println!("[ceilings] {n}");
    }
    // One pipeline per creator task: a pipeline's build numbers are one row that
    // every build of it updates, which would serialize the creators.
    let mut pipelines = vec![pipeline.to_owned()];
    for k in 2..=ca.producers.max(1) {
        let name = format!("{pipeline}-{k}");
        api.create_pipeline(&name, &format!("herald/{name}"))
            .await
            .with_context(|| format!("creating pipeline {name}"))?;
        pipelines.push(name);
    }
    notes.push(format!(
        "builds go to {} pipelines, one per creator task",
        pipelines.len()
    ));
    notes.push(
        "per-unit costs of a step that broke include work it left undone or unfinished: \
         read them for the steps that held"
            .into(),
    );
    for n in &notes[notes.len() - 2..] {
        println!("[ceilings] {n}");
    }
    let mut probes = Probes {
        primary,
        plain: plain.clone(),
        pids,
        ticks: clock_ticks(),
    };
    let ramp = Instant::now();
    let (rows, extra, listed) = match ca.phase {
        Phase::Jobs => (
            jobs(sh, api, plain, &pipelines, &mut probes, ramp).await,
            Vec::new(),
            ca.job_steps.len(),
        ),
        Phase::Webhooks => {
            let (rows, extra) =
                webhooks(sh, api, plain, admin, &pipelines, &mut probes, ramp).await?;
            (rows, extra, ca.delivery_steps.len())
        }
    };
    // Only read when no step broke.
    let stopped = if rows.len() >= ca.max_steps {
        format!("--max-steps {} reached", ca.max_steps)
    } else if rows.len() < listed {
        format!("--max-total-s {:.0} reached", ca.max_total_s)
    } else {
        "the step list ended (offer more with --job-steps / --delivery-steps)".into()
    };
    let (ceiling, reached) = ceiling_line(ca.phase, &rows, &stopped);

    let mut md = String::new();
    let _ = writeln!(md, "# Ceilings: {base}\n");
    let _ = writeln!(md, "```text");
    for n in notes.iter().chain(extra.iter()) {
        let _ = writeln!(md, "{n}");
    }
    let _ = writeln!(md, "```\n");
    md.push_str(&md_table(ca.phase, &rows));
    let _ = writeln!(md, "\n{ceiling}");
    let targets = targets(ca.phase, &rows, reached);
    for t in &targets {
        let _ = writeln!(md, "\ntarget: {t}");
    }
    let mut csv = String::from(CSV_HEADER);
    csv.push('\n');
    for r in &rows {
        csv.push_str(&csv_row(ca.phase, r));
        csv.push('\n');
    }
    let md_path = out_dir.join(format!("{base}.md"));
    let csv_path = out_dir.join(format!("{base}.csv"));
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(&csv_path, &csv).with_context(|| format!("writing {}", csv_path.display()))?;

    let mut s = String::new();
    let _ = writeln!(s, "{}", md_table(ca.phase, &rows));
    let _ = writeln!(s, "{ceiling}");
    for t in &targets {
        let _ = writeln!(s, "target                {t}");
    }
    let _ = writeln!(s, "errors                {}", sh.errors.line());
    for e in sh.errors.last.lock().unwrap().iter() {
        let _ = writeln!(s, "  e.g. {e}");
    }
    let _ = writeln!(
        s,
        "files                 {} and {}",
        md_path.display(),
        csv_path.display()
    );
    Ok(s)
}

/// "MET"/"MISSED" for a ceiling against `target`; neither when the ramp stopped
/// below the target without a step breaking.
fn judge(c: Ceiling, target: f64) -> String {
    let held = c.held.unwrap_or(0.0);
    let shown = if c.reached {
        format!("{held:.0}")
    } else {
        format!(">= {held:.0} (no step broke)")
    };
    let verdict = if held >= target {
        "MET"
    } else if c.reached {
        "MISSED"
    } else {
        "NOT TESTED (the ramp stopped below the target)"
    };
    format!("{shown} >= {target}: {verdict}")
}

fn targets(phase: Phase, rows: &[Row], ceiling: Ceiling) -> Vec<String> {
    let held: Vec<&Row> = rows.iter().take_while(|r| r.broke.is_none()).collect();
    // The per-unit cost at the highest step that held: the one a sizing would use.
    let top = held.last();
    let tx = top.and_then(|r| r.costs.tx.map(|t| t / r.units.max(1.0)));
    let mut out = Vec::new();
    match phase {
        Phase::Jobs => {
            out.push(format!(
                "jobs/s with dispatch p99 <= {TARGET_P99_MS} ms: {}",
                judge(ceiling, TARGET_JOBS_PER_S)
            ));
            if let Some(t) = tx {
                out.push(format!(
                    "primary tx per job {t:.2} <= {TARGET_TX_PER_JOB} (at the highest step that held): {}",
                    met(t <= TARGET_TX_PER_JOB)
                ));
            }
        }
        Phase::Webhooks => {
            out.push(format!(
                "deliveries/s with p99 <= {:.0} s: {}",
                TARGET_NOTIFY_P99_MS / 1000.0,
                judge(ceiling, TARGET_DELIVERIES_PER_S)
            ));
            if let Some(t) = tx {
                out.push(format!(
                    "primary tx per delivery {t:.3} <= {TARGET_TX_PER_DELIVERY} (at the highest step that held, the jobs' own included): {}",
                    met(t <= TARGET_TX_PER_DELIVERY)
                ));
            }
        }
    }
    out
}

fn pace(ca: &CeilingsArgs, jobs_per_s: f64) -> Pace {
    Pace {
        jobs_per_s,
        jobs_per_build: JOBS_PER_BUILD,
        producers: ca.producers.max(1),
        drain_s: ca.step_grace_s,
    }
}

/// Warns when a rate needs more agents than are parked (then the agents, not
/// Herald, would be the ceiling).
fn check_agents(sh: &Shared, jobs_per_s: f64) {
    let a = &sh.args;
    // Work time plus the accept/start/finish round trips, roughly.
    let job_s = (a.job_min_ms + a.job_max_ms) as f64 / 2000.0 + 0.03;
    let busy = jobs_per_s * job_s;
    if busy > a.agents as f64 * 0.5 {
        println!(
            "[ceilings] warning: {jobs_per_s:.0} jobs/s keeps ~{busy:.0} of {} agents busy; \
             with fewer parked agents the agents become the limit (raise --agents or lower --job-max-ms)",
            a.agents
        );
    }
}

async fn jobs(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    pipelines: &[String],
    probes: &mut Probes<'_>,
    ramp: Instant,
) -> Vec<Row> {
    let ca = &sh.args.ceilings;
    let mut rows = Vec::new();
    let mut at = probes.read().await;
    for (k, &rate) in ca.job_steps.iter().enumerate().take(ca.max_steps) {
        if !time_left(ca, ramp) {
            break;
        }
        println!(
            "\n[ceilings] step {}: {rate:.0} jobs/s for {:.0} s",
            k + 1,
            ca.step_s
        );
        check_agents(sh, rate);
        sh.reset_samples();
        let errors0 = sh.errors.total();
        let dispatched0 = sh.dispatched.load(Ordering::Relaxed);
        let l = load_phase_at(sh, api, plain, pipelines, None, ca.step_s, pace(ca, rate)).await;
        let next = probes.read().await;
        let c = costs(&at, &next, probes.ticks);
        at = next;
        let dispatched = sh.dispatched.load(Ordering::Relaxed) - dispatched0;
        let p = |q| (!l.hist.is_empty()).then(|| ms(l.hist.value_at_quantile(q)));
        let mut r = Row {
            step: k + 1,
            offered: rate,
            jobs_created: l.jobs,
            jobs_per_s: l.jobs as f64 / ca.step_s.max(1e-9),
            dispatched_per_s: dispatched as f64 / c.seconds.max(1e-9),
            p50_ms: p(0.5),
            p99_ms: p(0.99),
            backlog: l.undispatched as f64,
            errors: sh.errors.total() - errors0,
            units: l.jobs as f64,
            costs: c,
            ..Row::default()
        };
        let mut why = common_breaks(&r, rate, ca.step_s);
        match r.p99_ms {
            Some(p99) if p99 > TARGET_P99_MS => {
                why.push(format!("dispatch p99 {p99:.1} ms > {TARGET_P99_MS} ms"))
            }
            Some(_) => {}
            None => why.push("no dispatch samples".into()),
        }
        if l.undispatched > 0 {
            why.push(format!(
                "{} jobs not dispatched {:.0} s after the step",
                l.undispatched, ca.step_grace_s
            ));
        }
        r.broke = (!why.is_empty()).then(|| why.join("; "));
        println!("[ceilings] dispatch latency {}", quantiles(&l.hist));
        println!("{}", stat_line(&r, Phase::Jobs));
        println!("{}", md_row(&cells(Phase::Jobs, &r)));
        let broke = r.broke.is_some();
        rows.push(r);
        if broke {
            break;
        }
    }
    rows
}

/// Deliveries one one-job build causes on endpoints `0..n`.
fn deliveries_per_build(r: &Receivers, n: usize) -> usize {
    r.endpoints
        .iter()
        .take(n)
        .map(|e| notifications_per_build(&[e.pattern.as_str()], JOBS_PER_BUILD))
        .sum()
}

/// Endpoints needed to offer `rate` deliveries/s at `jobs_per_s` (at least one).
fn endpoints_for(r: &Receivers, rate: f64, jobs_per_s: f64) -> usize {
    let builds_per_s = jobs_per_s / JOBS_PER_BUILD as f64;
    let mut n = 1;
    while n < r.endpoints.len() && (deliveries_per_build(r, n) as f64) * builds_per_s < rate {
        n += 1;
    }
    n
}

async fn webhooks(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    admin: &Client,
    pipelines: &[String],
    probes: &mut Probes<'_>,
    ramp: Instant,
) -> Result<(Vec<Row>, Vec<String>)> {
    let a = &sh.args;
    let ca = &a.ceilings;
    let na = &a.notify;
    let jobs_per_s = ca.webhook_jobs_per_s;
    let steps: Vec<f64> = ca
        .delivery_steps
        .iter()
        .copied()
        .take(ca.max_steps)
        .collect();
    let top = steps.iter().copied().fold(0.0, f64::max);
    // Endpoints for the highest step, from the deliveries one build causes on one
    // endpoint of each pattern (round-robin, as the receivers lay them out).
    let pats = na.patterns();
    let per_endpoint_mean = pats
        .iter()
        .map(|p| notifications_per_build(&[p.as_str()], JOBS_PER_BUILD) as f64)
        .sum::<f64>()
        / pats.len().max(1) as f64;
    let per_endpoint_s = per_endpoint_mean * jobs_per_s / JOBS_PER_BUILD as f64;
    anyhow::ensure!(
        per_endpoint_s > 0.0,
        "--webhook-jobs-per-s and --webhook-events cause no deliveries"
    );
    let max_endpoints = ((top / per_endpoint_s).ceil() as usize + pats.len()).max(1);
    let hosts = na
        .receiver_hosts
        .max((top / DELIVERIES_PER_HOST).ceil() as usize);
    let NotifySetup {
        r,
        stop,
        samples: _,
        mon,
        report,
    } = setup_sized(sh, plain, max_endpoints, hosts, JOBS_PER_BUILD).await?;
    let mut extra = report.lines.clone();
    extra.push(format!(
        "webhooks: {jobs_per_s} jobs/s of one-job builds (the dispatch load beside them); each endpoint gets ~{per_endpoint_s:.0} deliveries/s; endpoints are added step by step; created/s and received/s are over the step and its drain; a delivery's latency is its event's timestamp to the receiver"
    ));
    println!("[ceilings] {}", extra.last().map_or("", String::as_str));
    r.measuring.store(true, Ordering::Relaxed);
    let mut created = 0;
    let mut rows = Vec::new();
    for (k, &rate) in steps.iter().enumerate() {
        if !time_left(ca, ramp) {
            break;
        }
        let n = endpoints_for(&r, rate, jobs_per_s).max(created);
        if n > created {
            r.create_webhooks_of(api, created..n, na.rotate_secrets)
                .await?;
            created = n;
            // Every notify process hears of new subscriptions within milliseconds.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let per_build = deliveries_per_build(&r, n) as f64;
        let offered = per_build * jobs_per_s / JOBS_PER_BUILD as f64;
        println!(
            "\n[ceilings] step {}: {offered:.0} deliveries/s offered ({n} endpoints x {jobs_per_s} jobs/s) for {:.0} s",
            k + 1,
            ca.step_s
        );
        check_agents(sh, jobs_per_s);
        sh.reset_samples();
        for h in [&r.hist, &r.hist_fast] {
            h.lock().unwrap().reset();
        }
        // The webhook creation above stays out of the step's cost window.
        let before = probes.read().await;
        let errors0 = sh.errors.total();
        let first0 = r.first.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let l = load_phase_at(
            sh,
            api,
            plain,
            pipelines,
            None,
            ca.step_s,
            pace(ca, jobs_per_s),
        )
        .await;
        let expected = l.builds as f64 * per_build;
        let grace_end = Instant::now() + Duration::from_secs_f64(ca.step_grace_s.max(0.0));
        loop {
            let got = (r.first.load(Ordering::Relaxed) - first0) as f64;
            if got >= expected || Instant::now() >= grace_end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let received = (r.first.load(Ordering::Relaxed) - first0) as f64;
        let next = probes.read().await;
        let c = costs(&before, &next, probes.ticks);
        let hist = r.hist.lock().unwrap().clone();
        let p = |q| (!hist.is_empty()).then(|| ms(hist.value_at_quantile(q)));
        let mut row = Row {
            step: k + 1,
            offered,
            endpoints: n,
            jobs_created: l.jobs,
            jobs_per_s: l.jobs as f64 / ca.step_s.max(1e-9),
            expected,
            received,
            // Over the step and its drain: what was delivered in the time it took.
            received_per_s: received / t0.elapsed().as_secs_f64().max(1e-9),
            p50_ms: p(0.5),
            p99_ms: p(0.99),
            dispatch_p99_ms: (!l.hist.is_empty()).then(|| ms(l.hist.value_at_quantile(0.99))),
            backlog: (expected - received).max(0.0),
            errors: sh.errors.total() - errors0,
            units: received,
            costs: c,
            ..Row::default()
        };
        let mut why = common_breaks(&row, jobs_per_s, ca.step_s);
        match row.p99_ms {
            Some(p99) if p99 > TARGET_NOTIFY_P99_MS => why.push(format!(
                "delivery p99 {:.2} s > {:.0} s",
                p99 / 1000.0,
                TARGET_NOTIFY_P99_MS / 1000.0
            )),
            Some(_) => {}
            None => why.push("no deliveries received".into()),
        }
        if row.backlog > 0.0 {
            why.push(format!(
                "{:.0} of {expected:.0} deliveries not received after the step's drain",
                row.backlog
            ));
        }
        row.broke = (!why.is_empty()).then(|| why.join("; "));
        println!("[ceilings] delivery latency {}", quantiles(&hist));
        println!("{}", stat_line(&row, Phase::Webhooks));
        println!("{}", md_row(&cells(Phase::Webhooks, &row)));
        let broke = row.broke.is_some();
        rows.push(row);
        if broke {
            break;
        }
    }
    extra.push(format!(
        "backlog at the end (GET /v1/ops/queues): {}",
        queues_line(admin).await
    ));
    stop.store(true, Ordering::Relaxed);
    let _ = mon.await;
    Ok((rows, extra))
}

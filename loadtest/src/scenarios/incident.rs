//! Incident scenario (issue 13): the Buildkite 2023 post-mortem replayed on one box.
//!
//! Phases, with builds created and dispatched throughout:
//! 1. baseline: the peak build rate, commit statuses on, no webhooks;
//! 2. peak: the same rate with every webhook (job and build events, 50-100
//!    notifications per build) to healthy receivers;
//! 3. degraded: a fifth of the endpoints answer after 2 s, some answer 500;
//! 4. outage: every receiver is down and the operator pauses the webhook type, until
//!    `--backlog` deliveries wait (or `--outage-max-s`);
//! 5. drain: receivers back, the type enabled again, builds at an off-peak rate, until
//!    the backlog is gone (or `--drain-max-s`).
//!
//! Sampled every second: dispatch p50/p99 (the agents' own clocks), deliveries/s at
//! the receivers, Herald's throttle factor and counters (/metrics), WAL MB/s and
//! transactions/s (pg_current_wal_lsn, pg_stat_database), the machine's load; every
//! `--overview-every-s`, the backlog's depth and oldest age (GET /v1/ops/overview).
//! Commit-status latency (build finished_at → the fake GitHub got its final state) is
//! computed at the end from the builds list. Then a ledger by webhook-id, SVG plots,
//! a CSV of the samples and the summary with PASS/MISS lines.

use crate::agents::{new_hist, now_us, Shared};
use crate::builds::{build_body, created_jobs};
use crate::metrics::{cpu_jiffies, ms};
use crate::plot::{self, HLine, Line, Panel, Phase};
use crate::receivers::{matches, parse_value};
use crate::scenarios::incident_fakes::{uuid_bits, Github, Health, Receivers};
use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use herald_client::{Client, Method};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Targets of issue 13; reported as PASS/MISS, never through the exit status.
pub const TARGET_DISPATCH_RATIO: f64 = 1.5;
pub const TARGET_STATUS_P99_S: f64 = 5.0;
pub const TARGET_DRAIN_SHARE: f64 = 0.9;
/// A 10 s window of the drain below this share of the steady rate is a cliff.
pub const CLIFF_SHARE: f64 = 0.5;

#[derive(clap::Args, Debug, Clone)]
pub struct IncidentArgs {
    /// Builds per second at peak (baseline, peak, degraded and outage phases); jobs
    /// per build from --jobs-per-build.
    #[arg(long, default_value_t = 20.0)]
    pub builds_per_s: f64,
    /// Builds per second while the backlog drains (off-peak; default half the peak).
    #[arg(long)]
    pub drain_builds_per_s: Option<f64>,
    /// Seconds of the peak phase (healthy receivers). The baseline's length is
    /// --baseline-s (default 45).
    #[arg(long, default_value_t = 45.0)]
    pub peak_s: f64,
    /// Seconds of the degraded phase (slow and failing receivers).
    #[arg(long, default_value_t = 45.0)]
    pub degraded_s: f64,
    /// Deliveries waiting (webhook.pending of /v1/ops/overview) at which the outage
    /// ends.
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: i64,
    /// The outage ends after this long even if the backlog is smaller.
    #[arg(long, default_value_t = 300.0)]
    pub outage_max_s: f64,
    /// Seconds the receivers are down before the operator pauses the webhook type
    /// (negative: never paused, the receivers are down the whole outage).
    #[arg(long, default_value_t = 0.0)]
    pub pause_after_s: f64,
    /// The drain ends after this long even if the backlog is not gone.
    #[arg(long, default_value_t = 420.0)]
    pub drain_max_s: f64,
    /// Seconds between two reads of GET /v1/ops/overview (each counts the backlog).
    #[arg(long, default_value_t = 5.0)]
    pub overview_every_s: f64,
}

const PHASES: [&str; 5] = ["baseline", "peak", "degraded", "outage", "drain"];
const OUTAGE: usize = 3;
const DRAIN: usize = 4;

/// One second of the run.
#[derive(Debug, Clone, Default)]
struct Sample {
    t: f64,
    phase: usize,
    dispatch_n: u64,
    dispatch_p50_ms: Option<f64>,
    dispatch_p99_ms: Option<f64>,
    delivered: f64,
    requests: f64,
    created_per_s: Option<f64>,
    scheduled_per_s: Option<f64>,
    throttle: Option<f64>,
    wal_mb_s: Option<f64>,
    tx_s: Option<f64>,
    load1: Option<f64>,
    cpu_busy: Option<f64>,
    rustc: usize,
    builds_per_s: f64,
}

/// One read of GET /v1/ops/overview.
#[derive(Debug, Clone, Default)]
struct Overview {
    t: f64,
    pending: Option<i64>,
    pending_age_s: Option<f64>,
    notify_msgs: Option<i64>,
    deliver_msgs: Option<i64>,
    github_pending: Option<i64>,
    took_ms: f64,
}

struct World {
    sh: Arc<Shared>,
    r: Arc<Receivers>,
    origin_utc: DateTime<Utc>,
    phase: AtomicUsize,
    /// Builds per second × 1000.
    rate_milli: AtomicU64,
    stop_load: AtomicBool,
    stop_sampling: AtomicBool,
    samples: Mutex<Vec<Sample>>,
    overviews: Mutex<Vec<Overview>>,
    phase_hists: Mutex<Vec<Histogram<u64>>>,
    /// Dispatch over 5 s windows: (mid t, p50 ms, p99 ms, n).
    win5: Mutex<Vec<(f64, f64, f64, u64)>>,
    created_builds: AtomicU64,
}

impl World {
    fn t(&self) -> f64 {
        self.r.origin.elapsed().as_secs_f64()
    }
    fn set_rate(&self, builds_per_s: f64) {
        self.rate_milli
            .store((builds_per_s.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
    }
    fn rate(&self) -> f64 {
        self.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
    fn last_overview(&self) -> Option<Overview> {
        self.overviews.lock().unwrap().last().cloned()
    }
}

/// Creates builds at the world's current rate until told to stop.
async fn creator(w: Arc<World>, api: Client, pipeline: String) {
    let a = &w.sh.args;
    let per_build = a.jobs_per_build.clamp(1, 500);
    let sem = Arc::new(Semaphore::new(a.max_inflight_builds.max(1)));
    let mut rng = StdRng::from_entropy();
    let mut inflight = JoinSet::new();
    let mut next = Instant::now();
    while !w.stop_load.load(Ordering::Relaxed) {
        let rate = w.rate();
        if rate <= 0.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            next = Instant::now();
            continue;
        }
        next += Duration::from_secs_f64(1.0 / rate);
        let now = Instant::now();
        // Behind by more than a second (Herald slower than the rate): catch up no
        // further; the achieved rate shows it.
        if next + Duration::from_secs(1) < now {
            next = now;
        }
        tokio::time::sleep_until(next.into()).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let body = build_body(per_build, &a.queue, &mut rng);
        let (api, pipeline, w2) = (api.clone(), pipeline.clone(), w.clone());
        inflight.spawn(async move {
            let _permit = permit;
            let sh = &w2.sh;
            match sh
                .timed("create build", api.create_build(&pipeline, &body))
                .await
            {
                Ok(b) => {
                    let jobs = created_jobs(&b);
                    sh.builds_created.fetch_add(1, Ordering::Relaxed);
                    w2.created_builds.fetch_add(1, Ordering::Relaxed);
                    sh.jobs_created
                        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                    sh.tracker.lock().unwrap().add_build(&jobs);
                }
                Err(e) => sh.errors.record(&sh.errors.create, "create build", &e),
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// WAL position (bytes) and this database's transactions, in one statement.
async fn wal_and_tx(conn: &mut PgConnection) -> Option<(f64, f64)> {
    let row = sqlx::query(
        "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8, \
         (SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database WHERE datname = current_database())",
    )
    .fetch_one(&mut *conn)
    .await
    .ok()?;
    Some((row.try_get(0).ok()?, row.try_get(1).ok()?))
}

fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Compiler processes on the machine (other people's builds share the two cores).
fn rustc_count() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.trim() == "rustc")
                .unwrap_or(false)
        })
        .count()
}

/// Every second: the dispatch window, the receivers, Herald's counters, PostgreSQL.
async fn sampler(w: Arc<World>, plain: Client, db_url: Option<String>) {
    let mut conn = match &db_url {
        Some(u) => PgConnection::connect(u).await.ok(),
        None => None,
    };
    let mut prev_hist = new_hist();
    let mut prev_pg: Option<(f64, f64, Instant)> = None;
    let mut prev_counters: Option<(f64, f64, Instant)> = None;
    let mut prev_cpu = cpu_jiffies();
    let mut acc5 = new_hist();
    let mut acc5_n = 0;
    let mut next = Instant::now() + Duration::from_secs(1);
    while !w.stop_sampling.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_secs(1);
        let t = w.t();
        let phase = w.phase.load(Ordering::Relaxed);
        let cur = w.sh.hist.lock().unwrap().clone();
        let mut win = cur.clone();
        if win.subtract(&prev_hist).is_err() {
            win = cur.clone();
        }
        prev_hist = cur;
        if let Some(h) = w.phase_hists.lock().unwrap().get_mut(phase) {
            let _ = h.add(&win);
        }
        let _ = acc5.add(&win);
        acc5_n += 1;
        if acc5_n == 5 {
            if !acc5.is_empty() {
                w.win5.lock().unwrap().push((
                    t - 2.5,
                    ms(acc5.value_at_quantile(0.5)),
                    ms(acc5.value_at_quantile(0.99)),
                    acc5.len(),
                ));
            }
            acc5.reset();
            acc5_n = 0;
        }
        let q = |p: f64| (!win.is_empty()).then(|| ms(win.value_at_quantile(p)));
        // The receivers' last complete second.
        let (delivered, requests) = w.r.at_second(w.r.second(Instant::now()).saturating_sub(1));
        let mut s = Sample {
            t,
            phase,
            dispatch_n: win.len(),
            dispatch_p50_ms: q(0.5),
            dispatch_p99_ms: q(0.99),
            delivered: delivered as f64,
            requests: requests as f64,
            load1: load1(),
            rustc: rustc_count(),
            builds_per_s: w.rate(),
            ..Default::default()
        };
        let cpu = cpu_jiffies();
        if let (Some((b0, t0)), Some((b1, t1))) = (prev_cpu, cpu) {
            if t1 > t0 {
                s.cpu_busy = Some((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0);
            }
        }
        prev_cpu = cpu;
        if let Some(text) = crate::metrics::scrape(&plain).await {
            let now = Instant::now();
            let created = parse_value(
                &text,
                "herald_notify_deliveries_created_total",
                "type=\"webhook\"",
            )
            .unwrap_or(0.0);
            let scheduled = parse_value(&text, "herald_notify_scheduled_total", "type=\"webhook\"")
                .unwrap_or(0.0);
            s.throttle = parse_value(&text, "herald_notify_throttle_factor", "");
            if let Some((c0, s0, at)) = prev_counters {
                let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                s.created_per_s = Some((created - c0) / dt);
                s.scheduled_per_s = Some((scheduled - s0) / dt);
            }
            prev_counters = Some((created, scheduled, now));
        }
        if let Some(c) = conn.as_mut() {
            if let Some((wal, tx)) = wal_and_tx(c).await {
                let now = Instant::now();
                if let Some((w0, x0, at)) = prev_pg {
                    let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                    s.wal_mb_s = Some((wal - w0) / dt / 1e6);
                    // Our own read is one transaction a second.
                    s.tx_s = Some(((tx - x0 - 1.0) / dt).max(0.0));
                }
                prev_pg = Some((wal, tx, now));
            }
        }
        w.samples.lock().unwrap().push(s);
    }
}

/// Reads GET /v1/ops/overview every `every`.
async fn overview_loop(w: Arc<World>, admin: Client, every: Duration) {
    while !w.stop_sampling.load(Ordering::Relaxed) {
        let started = Instant::now();
        let t = w.t();
        if let Ok(v) = admin
            .expect(Method::GET, "/v1/ops/overview", None, 200)
            .await
        {
            let queues = v["queues"].as_array().cloned().unwrap_or_default();
            let find = |pred: &dyn Fn(&str) -> bool| {
                queues
                    .iter()
                    .find(|q| q["name"].as_str().is_some_and(pred))
                    .cloned()
            };
            let pending = find(&|n| n == "webhook.pending");
            let o = Overview {
                t,
                pending: pending.as_ref().and_then(|q| q["depth"].as_i64()),
                pending_age_s: pending.as_ref().and_then(|q| q["oldest_age_s"].as_f64()),
                notify_msgs: find(&|n| n.ends_with(".notify")).and_then(|q| q["depth"].as_i64()),
                deliver_msgs: find(&|n| n.ends_with(".deliver.webhook"))
                    .and_then(|q| q["depth"].as_i64()),
                github_pending: find(&|n| n == "github_commit_status.pending")
                    .and_then(|q| q["depth"].as_i64()),
                took_ms: started.elapsed().as_secs_f64() * 1000.0,
            };
            w.overviews.lock().unwrap().push(o);
        }
        let left = every.saturating_sub(started.elapsed());
        tokio::time::sleep(left.max(Duration::from_millis(200))).await;
    }
}

/// The operator's switch. A 503 (Herald's database pool exhausted under the load) is
/// retried, as an operator would, for up to a minute.
async fn set_webhook_mode(admin: &Client, mode: &str, reason: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        match admin
            .expect(
                Method::PUT,
                "/v1/ops/notification-types/webhook",
                Some(&json!({"mode": mode, "reason": reason})),
                200,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                println!("[incident] setting the webhook type to {mode} failed ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(anyhow!(e))
                    .with_context(|| format!("setting the webhook type to {mode}"))
            }
        }
    }
}

/// Prints a progress line every `every` until told to stop.
async fn progress(w: Arc<World>, every: Duration) {
    let mut last_first = 0u64;
    let mut last_at = Instant::now();
    while !w.stop_sampling.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let now = Instant::now();
        let first = w.r.first.load(Ordering::Relaxed);
        let rate = (first - last_first) as f64 / now.duration_since(last_at).as_secs_f64();
        last_first = first;
        last_at = now;
        let (p99, wal, tx, thr) = {
            let s = w.samples.lock().unwrap();
            let tail: Vec<&Sample> = s
                .iter()
                .rev()
                .take(every.as_secs().max(1) as usize)
                .collect();
            let max = |f: &dyn Fn(&Sample) -> Option<f64>| {
                tail.iter()
                    .filter_map(|x| f(x))
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            };
            (
                max(&|x| x.dispatch_p99_ms),
                max(&|x| x.wal_mb_s),
                max(&|x| x.tx_s),
                tail.first().and_then(|x| x.throttle),
            )
        };
        let o = w.last_overview().unwrap_or_default();
        let f = |v: Option<f64>, d: usize| v.map_or("?".into(), |v| format!("{v:.d$}"));
        println!(
            "[incident {:>5.0}s {:<8}] builds {} ({:.1}/s) dispatched {} | dispatch p99 {} ms (worst 1 s) | received {} ({rate:.0}/s) | backlog {} (oldest {} s) notify-queue {} | throttle {} | WAL {} MB/s tx/s {} | errors {}",
            w.t(),
            PHASES.get(w.phase.load(Ordering::Relaxed)).copied().unwrap_or("end"),
            w.created_builds.load(Ordering::Relaxed),
            w.rate(),
            w.sh.dispatched.load(Ordering::Relaxed),
            f(p99, 1),
            first,
            o.pending.map_or("?".into(), |v| v.to_string()),
            f(o.pending_age_s, 0),
            o.notify_msgs.map_or("?".into(), |v| v.to_string()),
            f(thr, 2),
            f(wal, 1),
            f(tx, 0),
            w.sh.errors.total(),
        );
    }
}

/// Waits for an overview read taken after `after_t` and returns it.
async fn fresh_overview(w: &World, after_t: f64, limit: Duration) -> Option<Overview> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(o) = w.last_overview().filter(|o| o.t > after_t) {
            return Some(o);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

fn backlog_empty(o: &Overview) -> bool {
    o.pending == Some(0) && o.notify_msgs.unwrap_or(0) == 0 && o.deliver_msgs.unwrap_or(0) == 0
}

/// With builds still coming, some deliveries are always in flight: the backlog counts
/// as drained once at most `in_flight` wait, none older than 15 s, and the fan-out
/// keeps up (at most 200 events waiting).
fn backlog_drained(o: &Overview, in_flight: i64) -> bool {
    o.pending.is_some_and(|p| p <= in_flight)
        && o.pending_age_s.unwrap_or(0.0) <= 15.0
        && o.notify_msgs.unwrap_or(0) <= 200
}

/// Every delivery of webhook `hook` (webhook-id bits → event id bits, status).
async fn deliveries_of(api: &Client, hook: &str) -> Result<Vec<(u128, u128, String)>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/webhooks/{hook}/deliveries?limit=500&cursor={c}"),
            None => format!("/v1/webhooks/{hook}/deliveries?limit=500"),
        };
        let v = api
            .expect(Method::GET, &path, None, 200)
            .await
            .with_context(|| format!("GET {path}"))?;
        for d in v["items"].as_array().cloned().unwrap_or_default() {
            let (Some(id), Some(ev)) = (
                d["id"].as_str().and_then(uuid_bits),
                d["event_id"].as_str().and_then(uuid_bits),
            ) else {
                continue;
            };
            out.push((id, ev, d["status"].as_str().unwrap_or_default().to_owned()));
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(out),
        }
    }
}

/// (id, finished_at) of every build of the pipeline.
async fn builds_finished(
    api: &Client,
    pipeline: &str,
) -> Result<Vec<(String, Option<DateTime<Utc>>)>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/builds?pipeline={pipeline}&limit=500&cursor={c}"),
            None => format!("/v1/builds?pipeline={pipeline}&limit=500"),
        };
        let v = api
            .expect(Method::GET, &path, None, 200)
            .await
            .with_context(|| format!("GET {path}"))?;
        for b in v["items"].as_array().cloned().unwrap_or_default() {
            let Some(id) = b["id"].as_str() else { continue };
            let fin = b["finished_at"]
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.with_timezone(&Utc));
            out.push((id.to_owned(), fin));
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(out),
        }
    }
}

struct Ledger {
    expected: u64,
    rows: u64,
    without_row: u64,
    received: u64,
    ok: u64,
    lost: u64,
    lost_by_status: HashMap<String, u64>,
}

/// Herald's deliveries of every endpoint against the outbox's events since
/// `counted_from` (what should exist) and what the receivers got (by webhook-id).
async fn ledger(
    r: &Receivers,
    api: &Client,
    db_url: Option<&str>,
    counted_from: DateTime<Utc>,
) -> Result<Ledger> {
    let mut events: Vec<(u128, String)> = Vec::new();
    if let Some(u) = db_url {
        let mut conn = PgConnection::connect(u)
            .await
            .context("connecting to the primary to read the outbox")?;
        let rows = sqlx::query(
            "SELECT event_id::text AS id, event_type FROM outbox WHERE created_at >= $1",
        )
        .bind(counted_from)
        .fetch_all(&mut conn)
        .await
        .context("reading the outbox")?;
        for row in rows {
            let id: String = row.try_get("id")?;
            let ty: String = row.try_get("event_type")?;
            if let Some(b) = uuid_bits(&id) {
                events.push((b, ty));
            }
        }
        let _ = conn.close().await;
    }
    let mut l = Ledger {
        expected: 0,
        rows: 0,
        without_row: 0,
        received: 0,
        ok: 0,
        lost: 0,
        lost_by_status: HashMap::new(),
    };
    let mut set = JoinSet::new();
    let sem = Arc::new(Semaphore::new(4));
    for e in &r.endpoints {
        let hook = e
            .hook_id
            .get()
            .cloned()
            .ok_or_else(|| anyhow!("webhook of {} not created", e.url))?;
        let (api, sem) = (api.clone(), sem.clone());
        let pattern = e.pattern.clone();
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            (pattern, deliveries_of(&api, &hook).await)
        });
    }
    while let Some(j) = set.join_next().await {
        let (pattern, ds) = j?;
        let ds = ds?;
        let with_row: HashSet<u128> = ds.iter().map(|d| d.1).collect();
        for (ev, ty) in &events {
            if matches(&pattern, ty) {
                l.expected += 1;
                if !with_row.contains(ev) {
                    l.without_row += 1;
                }
            }
        }
        for (wid, _, status) in &ds {
            l.rows += 1;
            let (got, ok) = r.got(*wid);
            if got {
                l.received += 1;
            } else {
                l.lost += 1;
                *l.lost_by_status.entry(status.clone()).or_default() += 1;
            }
            if ok {
                l.ok += 1;
            }
        }
    }
    Ok(l)
}

fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

pub async fn run(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    admin: &Client,
    pipeline: &str,
    setup_s: f64,
) -> Result<String> {
    let a = &sh.args;
    let ia = &a.incident;
    let na = &a.notify;
    let started_utc = Utc::now();
    let out_dir = crate::report::out_dir(
        a,
        format!("incident-{}", started_utc.format("%Y-%m-%d-%H%M")),
    )?;

    let (github, github_url) = Github::start().await?;
    api.expect(
        Method::PUT,
        &format!("/v1/pipelines/{pipeline}/github"),
        Some(&json!({"api_url": github_url, "token": "incident-token", "job_statuses": false})),
        200,
    )
    .await
    .context("the GitHub integration")?;
    let patterns: Vec<String> = match &na.webhook_events {
        Some(list) => list
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect(),
        None => [
            "job.scheduled",
            "job.assigned",
            "job.started",
            "job.finished",
            "build.*",
        ]
        .map(String::from)
        .to_vec(),
    };
    if patterns.is_empty() {
        bail!("--webhook-events names no event");
    }
    let n_endpoints = if na.webhooks == 0 { 20 } else { na.webhooks };
    let r = Receivers::start(
        n_endpoints,
        na.receiver_hosts,
        &patterns,
        na.slow_share.unwrap_or(0.2),
        na.fail_share.unwrap_or(0.05),
        na.slow_ms,
    )
    .await?;
    let pats: Vec<&str> = r.endpoints.iter().map(|e| e.pattern.as_str()).collect();
    let per_build =
        crate::receivers::notifications_per_build(&pats, a.jobs_per_build.clamp(1, 500));
    let drain_rate = ia.drain_builds_per_s.unwrap_or(ia.builds_per_s / 2.0);
    let baseline_s = na.baseline_s.unwrap_or(45.0);
    println!(
        "[incident] {} endpoints on {} receivers, patterns {} round-robin: {per_build} notifications per build; {} slow ({} ms) and {} failing when degraded",
        r.endpoints.len(),
        r.hosts.len(),
        patterns.join(","),
        r.endpoints.iter().filter(|e| e.kind == super::incident_fakes::Kind::Slow).count(),
        na.slow_ms,
        r.endpoints.iter().filter(|e| e.kind == super::incident_fakes::Kind::Fail).count(),
    );
    println!(
        "[incident] {:.1} builds/s x {} jobs at peak ({:.0} deliveries/s offered), {drain_rate:.1} builds/s while draining; backlog target {}; out {}",
        ia.builds_per_s,
        a.jobs_per_build,
        ia.builds_per_s * per_build as f64,
        ia.backlog,
        out_dir.display()
    );

    let w = Arc::new(World {
        sh: sh.clone(),
        r: r.clone(),
        origin_utc: Utc::now() - chrono::Duration::from_std(r.origin.elapsed()).unwrap_or_default(),
        phase: AtomicUsize::new(0),
        rate_milli: AtomicU64::new(0),
        stop_load: AtomicBool::new(false),
        stop_sampling: AtomicBool::new(false),
        samples: Mutex::new(Vec::new()),
        overviews: Mutex::new(Vec::new()),
        phase_hists: Mutex::new((0..PHASES.len()).map(|_| new_hist()).collect()),
        win5: Mutex::new(Vec::new()),
        created_builds: AtomicU64::new(0),
    });
    let mut bg = JoinSet::new();
    bg.spawn(sampler(w.clone(), plain.clone(), a.db_url.clone()));
    bg.spawn(overview_loop(
        w.clone(),
        admin.clone(),
        Duration::from_secs_f64(ia.overview_every_s.max(1.0)),
    ));
    bg.spawn(progress(
        w.clone(),
        Duration::from_secs_f64(a.progress_s.max(1.0)),
    ));
    let creator_task = tokio::spawn(creator(w.clone(), api.clone(), pipeline.to_owned()));

    let mut bounds: Vec<(usize, f64)> = Vec::new();
    let mut enter = |w: &World, p: usize| {
        w.phase.store(p, Ordering::Relaxed);
        bounds.push((p, w.t()));
        println!("[incident {:>5.0}s] --- phase {} ---", w.t(), PHASES[p]);
    };
    let sleep = |s: f64| tokio::time::sleep(Duration::from_secs_f64(s.max(0.0)));

    // 1. Baseline: the peak rate, no webhooks.
    sh.load_start_us.store(now_us(), Ordering::Relaxed);
    enter(&w, 0);
    w.set_rate(ia.builds_per_s);
    sleep(baseline_s).await;

    // 2. Peak: webhooks to healthy receivers. Events older than `counted_from` may
    // predate the fan-out's view of the new webhooks: left out of the ledger.
    r.create_webhooks(api).await?;
    sleep(2.0).await;
    let counted_from = Utc::now();
    enter(&w, 1);
    sleep(ia.peak_s).await;

    // 3. Degraded receivers.
    enter(&w, 2);
    r.set_health(Health::Degraded);
    sleep(ia.degraded_s).await;

    // 4. Outage: receivers down, the operator pauses webhooks.
    enter(&w, OUTAGE);
    r.set_health(Health::Down);
    let outage_started = Instant::now();
    let mut paused = false;
    loop {
        if !paused
            && ia.pause_after_s >= 0.0
            && outage_started.elapsed().as_secs_f64() >= ia.pause_after_s
        {
            set_webhook_mode(admin, "paused", "incident replay: receivers down").await?;
            println!("[incident {:>5.0}s] webhook type paused", w.t());
            paused = true;
        }
        if outage_started.elapsed().as_secs_f64() >= ia.outage_max_s {
            println!(
                "[incident {:>5.0}s] outage ends at --outage-max-s {:.0}",
                w.t(),
                ia.outage_max_s
            );
            break;
        }
        if w.last_overview()
            .and_then(|o| o.pending)
            .is_some_and(|p| p >= ia.backlog)
        {
            println!("[incident {:>5.0}s] backlog reached {}", w.t(), ia.backlog);
            break;
        }
        sleep(0.5).await;
    }
    let backlog_at_resume = w.last_overview().and_then(|o| o.pending);

    // 5. Drain: receivers back, webhooks enabled, off-peak build rate.
    enter(&w, DRAIN);
    w.set_rate(drain_rate);
    r.set_health(Health::Healthy);
    let resume_t = w.t();
    if paused {
        set_webhook_mode(admin, "enabled", "incident replay: receivers recovered").await?;
        println!("[incident {:>5.0}s] webhook type enabled", w.t());
    }
    // Three seconds of the off-peak offer, at least 1000.
    let in_flight = ((drain_rate * per_build as f64 * 3.0) as i64).max(1000);
    let drain_started = Instant::now();
    let mut drained_at: Option<f64> = None;
    while drain_started.elapsed().as_secs_f64() < ia.drain_max_s {
        sleep(1.0).await;
        let since = w.t() - 1.0;
        if let Some(o) = fresh_overview(&w, since.max(resume_t), Duration::from_secs(30)).await {
            if backlog_drained(&o, in_flight) {
                drained_at = Some(o.t);
                break;
            }
        }
    }
    let drain_end_t = w.t();
    match drained_at {
        Some(t) => println!(
            "[incident {:>5.0}s] backlog drained {:.0} s after the resume",
            w.t(),
            t - resume_t
        ),
        None => println!(
            "[incident {:>5.0}s] backlog NOT drained within --drain-max-s {:.0}",
            w.t(),
            ia.drain_max_s
        ),
    }

    // The end: no new builds; the last jobs finish and their notifications arrive.
    w.set_rate(0.0);
    w.stop_load.store(true, Ordering::Relaxed);
    let _ = creator_task.await;
    bounds.push((PHASES.len(), w.t()));
    w.phase.store(PHASES.len(), Ordering::Relaxed);
    let settle = Instant::now();
    let settle_limit = Duration::from_secs_f64(a.drain_s.max(0.0) + 60.0);
    while settle.elapsed() < settle_limit {
        sleep(1.0).await;
        let jobs_done =
            sh.tracker.lock().unwrap().pending.is_empty() && sh.busy.load(Ordering::Relaxed) == 0;
        let since = w.t();
        if jobs_done {
            if let Some(o) = fresh_overview(&w, since, Duration::from_secs(30)).await {
                if backlog_empty(&o) && o.github_pending.unwrap_or(0) == 0 {
                    break;
                }
            }
        }
    }
    // A last look for the final statuses still in flight.
    sleep(2.0).await;
    let end_t = w.t();
    w.stop_sampling.store(true, Ordering::Relaxed);
    while bg.join_next().await.is_some() {}
    println!("[incident {end_t:>5.0}s] load stopped; checking the ledger (every webhook-id) and commit statuses");

    let verify_started = Instant::now();
    let ledger = ledger(&r, api, a.db_url.as_deref(), counted_from).await;
    let builds = builds_finished(api, pipeline).await;
    let verify_s = verify_started.elapsed().as_secs_f64();

    // ----------------------------------------------------------------- figures
    let samples = w.samples.lock().unwrap().clone();
    let overviews = w.overviews.lock().unwrap().clone();
    let phase_hists = w.phase_hists.lock().unwrap().clone();
    let span = |p: usize| -> (f64, f64) {
        bounds
            .windows(2)
            .find(|b| b[0].0 == p)
            .map_or((0.0, 0.0), |b| (b[0].1, b[1].1))
    };

    // Commit statuses: latency per build from finished_at to the fake GitHub.
    let finals = github.final_at.lock().unwrap().clone();
    let mut status_lat: Vec<(f64, f64)> = Vec::new(); // (t finished, latency s)
    let mut missing_status = 0u64;
    let mut builds_total = 0usize;
    let mut unfinished = 0usize;
    if let Ok(bs) = &builds {
        builds_total = bs.len();
        for (id, fin) in bs {
            let Some(fin) = fin else {
                unfinished += 1;
                continue;
            };
            let t = (*fin - w.origin_utc).num_microseconds().unwrap_or(0) as f64 / 1e6;
            match finals.get(id) {
                Some(at) => {
                    let lat = (*at - *fin).num_microseconds().unwrap_or(0) as f64 / 1e6;
                    status_lat.push((t, lat));
                }
                None => missing_status += 1,
            }
        }
    }
    status_lat.sort_by(|x, y| x.0.total_cmp(&y.0));
    let status_q = |from: f64, to: f64, q: f64| {
        let mut v: Vec<f64> = status_lat
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|x| x.1)
            .collect();
        (quantile(&mut v, q), v.len())
    };

    // Steady delivery rate: the peak phase after 10 s of warm-up.
    let rate_over = |from: f64, to: f64| -> Option<f64> {
        let (s0, s1) = (from.ceil() as usize, to.floor() as usize);
        (s1 > s0).then(|| (s0..s1).map(|s| r.at_second(s).0).sum::<u64>() as f64 / (s1 - s0) as f64)
    };
    let (pk0, pk1) = span(1);
    let steady = rate_over(pk0 + 10.0_f64.min((pk1 - pk0) / 3.0), pk1);
    let drain_to = drained_at.unwrap_or(drain_end_t);
    let drain_rate_achieved = rate_over(resume_t, drain_to);
    // 10 s windows of the drain, the last (partial, emptying) one left out.
    let mut drain_windows: Vec<f64> = Vec::new();
    let mut s = resume_t.ceil() as usize;
    while (s + 20) as f64 <= drain_to {
        drain_windows.push(rate_over(s as f64, (s + 10) as f64).unwrap_or(0.0));
        s += 10;
    }
    let drain_min_window = drain_windows
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
    let max_backlog = overviews.iter().filter_map(|o| o.pending).max();
    let max_age = overviews
        .iter()
        .filter_map(|o| o.pending_age_s)
        .fold(0.0_f64, f64::max);

    // ----------------------------------------------------------------- report
    let mut out = String::new();
    let _ = writeln!(out, "```text");
    let _ = writeln!(
        out,
        "herald-loadtest {} incident replay at {} (setup {setup_s:.1} s, {} agents)",
        env!("CARGO_PKG_VERSION"),
        started_utc.format("%Y-%m-%d %H:%M UTC"),
        a.agents
    );
    let _ = writeln!(
        out,
        "load                  {:.1} builds/s x {} jobs at peak, {drain_rate:.1} builds/s draining; jobs {}-{} ms, {:.0}% fail; {} endpoints ({}) on {} hosts = {per_build} notifications/build; degraded: {:.0}% answer after {} ms, {:.0}% answer 500",
        ia.builds_per_s,
        a.jobs_per_build,
        a.job_min_ms,
        a.job_max_ms,
        a.fail_rate * 100.0,
        r.endpoints.len(),
        patterns.join(","),
        r.hosts.len(),
        na.slow_share.unwrap_or(0.2) * 100.0,
        na.slow_ms,
        na.fail_share.unwrap_or(0.05) * 100.0,
    );
    let _ = writeln!(
        out,
        "throttle              {}",
        crate::scenarios::webhooks::throttle_env()
    );
    let _ = writeln!(
        out,
        "{:<9} {:>6} {:>8} {:>14} {:>16} {:>10} {:>10} {:>8} {:>7} {:>9} {:>12} {:>7}",
        "phase",
        "secs",
        "builds/s",
        "dispatch p50/99",
        "status p50/p99 s",
        "deliv/s",
        "created/s",
        "WAL MB/s",
        "tx/s",
        "throttle",
        "backlog max",
        "CPU %"
    );
    let mut phase_rows: Vec<(usize, Option<f64>)> = Vec::new();
    for (p, name) in PHASES.iter().enumerate() {
        let (t0, t1) = span(p);
        if t1 <= t0 {
            continue;
        }
        let ss: Vec<&Sample> = samples.iter().filter(|s| s.t >= t0 && s.t < t1).collect();
        let h = &phase_hists[p];
        let p99 = (!h.is_empty()).then(|| ms(h.value_at_quantile(0.99)));
        phase_rows.push((p, p99));
        let disp = if h.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{:.1}/{:.1}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99))
            )
        };
        let (s50, n) = status_q(t0, t1, 0.5);
        let (s99, _) = status_q(t0, t1, 0.99);
        let st = match (s50, s99) {
            (Some(a), Some(b)) => format!("{a:.2}/{b:.2} (n={n})"),
            _ => "-".into(),
        };
        let avg = |f: &dyn Fn(&Sample) -> Option<f64>| mean(ss.iter().filter_map(|s| f(s)));
        let opt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        let thr_min = ss
            .iter()
            .filter_map(|s| s.throttle)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        let bl = overviews
            .iter()
            .filter(|o| o.t >= t0 && o.t < t1)
            .filter_map(|o| o.pending)
            .max();
        let achieved = {
            let made: f64 = ss.iter().map(|s| s.builds_per_s).sum::<f64>();
            made / ss.len().max(1) as f64
        };
        let _ = writeln!(
            out,
            "{:<9} {:>6.0} {:>8.1} {:>14} {:>16} {:>10} {:>10} {:>8} {:>7} {:>9} {:>12} {:>7}",
            name,
            t1 - t0,
            achieved,
            disp,
            st,
            opt(rate_over(t0, t1), 0),
            opt(
                avg(&|s| s.created_per_s.zip(s.scheduled_per_s).map(|(a, b)| a + b)),
                0
            ),
            opt(avg(&|s| s.wal_mb_s), 2),
            opt(avg(&|s| s.tx_s), 0),
            format!("{}/{}", opt(avg(&|s| s.throttle), 2), opt(thr_min, 2)),
            bl.map_or("-".into(), |v| v.to_string()),
            opt(avg(&|s| s.cpu_busy), 0),
        );
    }
    let _ = writeln!(
        out,
        "                      (dispatch ms from scheduled_at to the ping's return; status s from the build's finished_at to the fake GitHub; deliveries/s = distinct webhook-ids first received; created/s = herald_notify_deliveries_created_total + _scheduled_total; throttle mean/min; backlog = webhook.pending of /v1/ops/overview, every {:.0} s)",
        ia.overview_every_s
    );
    let builds_created = w.created_builds.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "builds                {builds_created} created, {builds_total} listed, {unfinished} not finished at the end; {} dispatched jobs; errors: {}",
        sh.dispatched.load(Ordering::Relaxed),
        sh.errors.line()
    );
    for e in sh.errors.last.lock().unwrap().iter() {
        let _ = writeln!(out, "  e.g. {e}");
    }
    let _ = writeln!(
        out,
        "backlog               {} at the resume, max {} (oldest {max_age:.0} s); drained {} (resume at {resume_t:.0} s)",
        backlog_at_resume.map_or("?".into(), |v| v.to_string()),
        max_backlog.map_or("?".into(), |v| v.to_string()),
        match drained_at {
            Some(t) => format!("{:.0} s after the resume", t - resume_t),
            None => format!("NOT within {:.0} s", ia.drain_max_s),
        }
    );
    let _ = writeln!(
        out,
        "delivery rate         steady (peak after 10 s) {}/s; drain {}/s over {:.0} s; slowest 10 s drain window {}/s",
        steady.map_or("?".into(), |v| format!("{v:.0}")),
        drain_rate_achieved.map_or("?".into(), |v| format!("{v:.0}")),
        drain_to - resume_t,
        drain_min_window.map_or("?".into(), |v| format!("{v:.0}"))
    );
    let _ = writeln!(
        out,
        "receivers             {} requests, {} distinct webhook-ids, {} refused while down, {} invalid, {} again after a 2xx; {} answered 2xx",
        r.requests.load(Ordering::Relaxed),
        r.first.load(Ordering::Relaxed),
        r.refused.load(Ordering::Relaxed),
        r.invalid.load(Ordering::Relaxed),
        r.dup_after_ok.load(Ordering::Relaxed),
        r.ok_count()
    );
    let _ = writeln!(
        out,
        "fake GitHub           {} requests, {} builds with a final status",
        github.requests.load(Ordering::Relaxed),
        finals.len()
    );
    match &ledger {
        Ok(l) => {
            let _ = writeln!(
                out,
                "ledger                {} deliveries expected (outbox events x matching endpoints since the webhooks), {} without a delivery row; {} rows, {} received at least once, {} answered 2xx, {} never received {:?} (checked in {verify_s:.0} s)",
                l.expected, l.without_row, l.rows, l.received, l.ok, l.lost, l.lost_by_status
            );
        }
        Err(e) => {
            let _ = writeln!(out, "ledger                FAILED: {e:#}");
        }
    }
    let loads: Vec<f64> = samples.iter().filter_map(|s| s.load1).collect();
    let rustc_max = samples.iter().map(|s| s.rustc).max().unwrap_or(0);
    let rustc_secs = samples.iter().filter(|s| s.rustc > 0).count();
    let _ = writeln!(
        out,
        "machine               2 cores shared: load average (1 min) mean {}, max {}; CPU busy mean {}%; other compilers (rustc) running in {rustc_secs} of {} seconds, up to {rustc_max} at once",
        mean(loads.iter().copied()).map_or("?".into(), |v| format!("{v:.1}")),
        loads.iter().copied().fold(0.0_f64, f64::max),
        mean(samples.iter().filter_map(|s| s.cpu_busy)).map_or("?".into(), |v| format!("{v:.0}")),
        samples.len()
    );
    let _ = writeln!(
        out,
        "overview reads        {} (mean {:.0} ms, max {:.0} ms each)",
        overviews.len(),
        mean(overviews.iter().map(|o| o.took_ms)).unwrap_or(0.0),
        overviews.iter().map(|o| o.took_ms).fold(0.0_f64, f64::max)
    );

    // Targets.
    let base_p99 = phase_rows.iter().find(|(p, _)| *p == 0).and_then(|x| x.1);
    let mut targets: Vec<String> = Vec::new();
    match base_p99 {
        Some(b) => {
            let worst = phase_rows
                .iter()
                .filter(|(p, _)| *p > 0)
                .filter_map(|(p, v)| v.map(|v| (*p, v)))
                .fold(None, |m: Option<(usize, f64)>, x| match m {
                    Some(m) if m.1 >= x.1 => Some(m),
                    _ => Some(x),
                });
            let list = phase_rows
                .iter()
                .filter(|(p, _)| *p > 0)
                .map(|(p, v)| {
                    format!(
                        "{} {}",
                        PHASES[*p],
                        v.map_or("-".into(), |v| format!("{:.2}x", v / b))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let ok = worst.is_none_or(|(_, v)| v <= b * TARGET_DISPATCH_RATIO);
            targets.push(format!(
                "{}  dispatch p99 within {TARGET_DISPATCH_RATIO}x the baseline's {b:.2} ms in every phase: {list}",
                pass(ok)
            ));
        }
        None => targets.push("MISS  dispatch p99: no baseline samples".into()),
    }
    let (o0, _) = span(OUTAGE);
    let (_, d1) = span(DRAIN);
    let (st99, stn) = status_q(o0, d1, 0.99);
    targets.push(format!(
        "{}  commit statuses p99 under {TARGET_STATUS_P99_S} s while webhooks are backlogged (builds finished in outage and drain): p99 {} s, n={stn}, {missing_status} finished builds without a final status",
        pass(st99.is_some_and(|v| v < TARGET_STATUS_P99_S) && missing_status == 0),
        st99.map_or("?".into(), |v| format!("{v:.2}"))
    ));
    let drain_ok = match (steady, drain_rate_achieved) {
        (Some(s), Some(d)) if s > 0.0 => d >= TARGET_DRAIN_SHARE * s,
        _ => false,
    };
    let cliff_ok = match (steady, drain_min_window) {
        (Some(s), Some(m)) => m >= CLIFF_SHARE * s,
        (Some(_), None) => true,
        _ => false,
    };
    targets.push(format!(
        "{}  backlog drains at >= {:.0}% of the steady delivery rate: drain {}/s vs steady {}/s = {}{}",
        pass(drain_ok && drained_at.is_some()),
        TARGET_DRAIN_SHARE * 100.0,
        drain_rate_achieved.map_or("?".into(), |v| format!("{v:.0}")),
        steady.map_or("?".into(), |v| format!("{v:.0}")),
        match (steady, drain_rate_achieved) {
            (Some(s), Some(d)) if s > 0.0 => format!("{:.0}%", d / s * 100.0),
            _ => "?".into(),
        },
        if drained_at.is_some() { "" } else { " (NOT drained)" }
    ));
    targets.push(format!(
        "{}  no cliff: every 10 s window of the drain >= {:.0}% of the steady rate (slowest {}/s)",
        pass(cliff_ok),
        CLIFF_SHARE * 100.0,
        drain_min_window.map_or("?".into(), |v| format!("{v:.0}"))
    ));
    match &ledger {
        Ok(l) => targets.push(format!(
            "{}  nothing lost: {} expected deliveries, {} without a row, {} of {} webhook-ids never received",
            pass(l.without_row == 0 && l.lost == 0 && l.rows >= l.expected),
            l.expected,
            l.without_row,
            l.lost,
            l.rows
        )),
        Err(_) => targets.push("MISS  nothing lost: the ledger could not be read".into()),
    }
    targets.push(format!(
        "{}  backlog of at least 1,000,000 deliveries reached (max {})",
        pass(max_backlog.is_some_and(|m| m >= 1_000_000)),
        max_backlog.map_or("?".into(), |v| v.to_string())
    ));
    for t in &targets {
        let _ = writeln!(out, "target                {t}");
    }
    let _ = writeln!(out, "```");

    // ----------------------------------------------------------------- files
    let phases: Vec<Phase> = bounds
        .windows(2)
        .map(|b| Phase {
            name: PHASES.get(b[0].0).copied().unwrap_or("end").to_string(),
            from_s: b[0].1,
            to_s: b[1].1,
        })
        .chain(std::iter::once(Phase {
            name: "end".into(),
            from_s: bounds.last().map_or(0.0, |b| b.1),
            to_s: end_t,
        }))
        .collect();
    let pts = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| f(s).map(|v| (s.t, v)))
            .collect()
    };
    let win5 = w.win5.lock().unwrap().clone();
    let disp5 = |p99: bool| -> Vec<(f64, f64)> {
        win5.iter()
            .map(|x| (x.0, if p99 { x.2 } else { x.1 }))
            .collect()
    };
    let status5 = |q: f64| -> Vec<(f64, f64)> {
        let mut outp = Vec::new();
        let mut t = 0.0;
        while t < end_t {
            let (v, _) = status_q(t, t + 5.0, q);
            if let Some(v) = v {
                outp.push((t + 2.5, v));
            }
            t += 5.0;
        }
        outp
    };
    let base_line = base_p99
        .map(|b| {
            vec![HLine {
                label: format!("1.5 x baseline p99 ({:.1} ms)", b * TARGET_DISPATCH_RATIO),
                y: b * TARGET_DISPATCH_RATIO,
            }]
        })
        .unwrap_or_default();
    let d99 = disp5(true);
    let d99_cap = base_p99.map(|b| {
        let m = d99.iter().map(|p| p.1).fold(0.0_f64, f64::max);
        m.min(b * TARGET_DISPATCH_RATIO * 4.0)
            .max(b * TARGET_DISPATCH_RATIO * 1.3)
    });
    let s99 = status5(0.99);
    let panels = vec![
        Panel {
            title: "Dispatch latency (scheduled_at -> ping returned), 5 s windows".into(),
            y_desc: "ms".into(),
            lines: vec![
                Line { label: "p99".into(), color: plot::RED_, points: d99 },
                Line { label: "p50".into(), color: plot::BLUE_, points: disp5(false) },
            ],
            hlines: base_line,
            y_max: d99_cap,
        },
        Panel {
            title: "Commit-status latency (build finished_at -> fake GitHub got the final state), by finish time, 5 s buckets".into(),
            y_desc: "seconds".into(),
            lines: vec![
                Line { label: "p99".into(), color: plot::RED_, points: s99 },
                Line { label: "p50".into(), color: plot::BLUE_, points: status5(0.5) },
            ],
            hlines: vec![HLine { label: "target 5 s".into(), y: TARGET_STATUS_P99_S }],
            y_max: None,
        },
        Panel {
            title: "Webhook backlog (GET /v1/ops/overview)".into(),
            y_desc: "deliveries / events".into(),
            lines: vec![
                Line {
                    label: "webhook.pending (deliveries)".into(),
                    color: plot::PURPLE_,
                    points: overviews.iter().filter_map(|o| o.pending.map(|v| (o.t, v as f64))).collect(),
                },
                Line {
                    label: "events waiting for fan-out (notify queue)".into(),
                    color: plot::ORANGE_,
                    points: overviews.iter().filter_map(|o| o.notify_msgs.map(|v| (o.t, v as f64))).collect(),
                },
            ],
            hlines: vec![],
            y_max: None,
        },
        Panel {
            title: "Oldest waiting delivery (webhook.pending oldest_age_s)".into(),
            y_desc: "seconds".into(),
            lines: vec![Line {
                label: "oldest age".into(),
                color: plot::PURPLE_,
                points: overviews.iter().filter_map(|o| o.pending_age_s.map(|v| (o.t, v))).collect(),
            }],
            hlines: vec![],
            y_max: None,
        },
        Panel {
            title: "Webhook deliveries per second".into(),
            y_desc: "per second".into(),
            lines: vec![
                Line { label: "received (distinct webhook-ids)".into(), color: plot::GREEN_, points: pts(&|s| Some(s.delivered)) },
                Line { label: "created + scheduled by Herald".into(), color: plot::ORANGE_, points: pts(&|s| s.created_per_s.zip(s.scheduled_per_s).map(|(a, b)| a + b)) },
            ],
            hlines: steady
                .map(|s| vec![HLine { label: format!("90% of steady ({:.0}/s)", s * TARGET_DRAIN_SHARE), y: s * TARGET_DRAIN_SHARE }])
                .unwrap_or_default(),
            y_max: None,
        },
        Panel {
            title: "Throttle factor (herald_notify_throttle_factor)".into(),
            y_desc: "factor".into(),
            lines: vec![Line { label: "factor".into(), color: plot::BLUE_, points: pts(&|s| s.throttle) }],
            hlines: vec![],
            y_max: Some(1.1),
        },
        Panel {
            title: "Primary WAL (pg_current_wal_lsn deltas, whole cluster: other people's tests write too)".into(),
            y_desc: "MB/s".into(),
            lines: vec![Line { label: "WAL MB/s".into(), color: plot::RED_, points: pts(&|s| s.wal_mb_s) }],
            hlines: vec![],
            y_max: None,
        },
        Panel {
            title: "Primary transactions of Herald's database (pg_stat_database xact_commit + rollback)".into(),
            y_desc: "per second".into(),
            lines: vec![Line { label: "tx/s".into(), color: plot::BLUE_, points: pts(&|s| s.tx_s) }],
            hlines: vec![],
            y_max: None,
        },
        Panel {
            title: "Machine: CPU busy (both cores) and other compilers running".into(),
            y_desc: "% / count x 10".into(),
            lines: vec![
                Line { label: "CPU busy %".into(), color: plot::RED_, points: pts(&|s| s.cpu_busy) },
                Line { label: "rustc processes x 10".into(), color: plot::PURPLE_, points: pts(&|s| Some(s.rustc as f64 * 10.0)) },
            ],
            hlines: vec![],
            y_max: Some(105.0),
        },
    ];
    let svg = out_dir.join("incident-timeline.svg");
    if let Err(e) = plot::timeline(
        &svg,
        &format!(
            "Herald incident replay, {} ({} endpoints, {per_build} notifications/build, {:.0} builds/s peak)",
            started_utc.format("%Y-%m-%d %H:%M UTC"),
            r.endpoints.len(),
            ia.builds_per_s
        ),
        &phases,
        &panels,
    ) {
        eprintln!("[incident] {e:#}");
    }
    let mut csv = String::from(
        "t_s,phase,builds_per_s,dispatch_n,dispatch_p50_ms,dispatch_p99_ms,delivered_per_s,requests_per_s,created_per_s,scheduled_per_s,throttle,wal_mb_s,tx_s,load1,cpu_busy_pct,rustc\n",
    );
    let o = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    for s in &samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.t,
            PHASES.get(s.phase).copied().unwrap_or("end"),
            s.builds_per_s,
            s.dispatch_n,
            o(s.dispatch_p50_ms),
            o(s.dispatch_p99_ms),
            s.delivered,
            s.requests,
            o(s.created_per_s),
            o(s.scheduled_per_s),
            o(s.throttle),
            o(s.wal_mb_s),
            o(s.tx_s),
            o(s.load1),
            o(s.cpu_busy),
            s.rustc
        );
    }
    let mut ocsv = String::from("t_s,webhook_pending,oldest_age_s,notify_queue_msgs,deliver_queue_msgs,github_pending,took_ms\n");
    for v in &overviews {
        let i = |x: Option<i64>| x.map_or(String::new(), |x| x.to_string());
        let _ = writeln!(
            ocsv,
            "{:.1},{},{},{},{},{},{:.0}",
            v.t,
            i(v.pending),
            o(v.pending_age_s),
            i(v.notify_msgs),
            i(v.deliver_msgs),
            i(v.github_pending),
            v.took_ms
        );
    }
    let mut scsv = String::from("finished_t_s,latency_s\n");
    for (t, l) in &status_lat {
        let _ = writeln!(scsv, "{t:.3},{l:.3}");
    }
    for (name, body) in [
        ("samples.csv", &csv),
        ("overview.csv", &ocsv),
        ("commit-status-latency.csv", &scsv),
        ("summary.txt", &out),
    ] {
        let p = out_dir.join(name);
        if let Err(e) = std::fs::write(&p, body) {
            eprintln!("[incident] writing {}: {e}", p.display());
        }
    }
    let _ = writeln!(
        out,
        "files: {} (incident-timeline.svg, samples.csv, overview.csv, commit-status-latency.csv, summary.txt)",
        out_dir.display()
    );
    Ok(out)
}

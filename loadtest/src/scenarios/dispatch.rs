//! Dispatch scenario (issue 2): the idle cost of parked agents, then dispatch latency
//! under load. The load phase is shared by the notification scenarios.

use crate::agents::{now_us, Shared};
use crate::builds::{create_builds, Pace};
use crate::metrics::{ms, scrape, server_report, TxProbe};
use crate::report::{summary, NotifyReport};
use anyhow::Result;
use hdrhistogram::Histogram;
use herald_client::Client;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct IdleResult {
    pub seconds: f64,
    pub primary: Option<(i64, f64)>,
    pub replica: Option<(i64, f64)>,
    pub parked_min: usize,
    pub parked_max: usize,
    pub parked_at_end: usize,
    pub agents: usize,
}

pub async fn idle_phase(
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

pub struct LoadResult {
    pub seconds: f64,
    pub dispatched_in_window: u64,
    pub builds: u64,
    pub jobs: u64,
    pub hist: Histogram<u64>,
    pub hist_roots: Histogram<u64>,
    pub hist_dependents: Histogram<u64>,
    pub api: Vec<(&'static str, Histogram<u64>)>,
    pub undispatched: usize,
    pub skipped: u64,
    /// Primary transactions during the load window: (count, per second).
    pub tx_load: Option<(i64, f64)>,
    /// WAL bytes, WAL flushes and the seconds they were counted over.
    pub wal_load: Option<(i64, i64, f64)>,
    pub drained: bool,
    pub metrics: Vec<String>,
}

/// A load phase at the rate, build size and drain of the command line.
pub async fn load_phase(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    pipeline: &str,
    primary: Option<&mut TxProbe>,
    seconds: f64,
) -> LoadResult {
    let pace = Pace::of(&sh.args);
    let pipelines = [pipeline.to_owned()];
    load_phase_at(sh, api, plain, &pipelines, primary, seconds, pace).await
}

pub async fn load_phase_at(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    pipelines: &[String],
    mut primary: Option<&mut TxProbe>,
    seconds: f64,
    pace: Pace,
) -> LoadResult {
    let a = &sh.args;
    let metrics_before = scrape(plain).await;
    let per_build = pace.jobs_per_build.clamp(1, 500);
    println!(
        "[load] {:.0} s at {} jobs/s ({:.2} builds/s of {} jobs), jobs sleep {}-{} ms, fail rate {}",
        seconds,
        pace.jobs_per_s,
        pace.jobs_per_s / per_build as f64,
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
        pipelines.to_vec(),
        sh.clone(),
        deadline,
        pace,
    ));
    let every = Duration::from_secs_f64(a.progress_s.max(1.0));
    let mut next = started + every;
    let mut last_dispatched = dispatched_before;
    let mut last_at = started;
    let mut dispatched_in_window = None;
    let drain_deadline = deadline + Duration::from_secs_f64(pace.drain_s.max(0.0));
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

/// The dispatch scenario: the idle phase, then the load phase (either may be skipped).
pub async fn run(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    pipeline: &str,
    primary: &mut Option<TxProbe>,
    replica: &mut Option<TxProbe>,
    setup_s: f64,
) -> Result<String> {
    let args = &sh.args;
    let idle = if args.idle_seconds > 0.0 {
        Some(idle_phase(sh, primary, replica).await?)
    } else {
        None
    };
    let load = if args.duration_s > 0.0 {
        Some(load_phase(sh, api, plain, pipeline, primary.as_mut(), args.duration_s).await)
    } else {
        None
    };
    let loads: Vec<(&str, &LoadResult)> = load.iter().map(|l| ("", l)).collect();
    Ok(summary(
        sh,
        setup_s,
        idle.as_ref(),
        &loads,
        &NotifyReport::default(),
    ))
}

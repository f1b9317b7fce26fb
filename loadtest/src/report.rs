//! The summary printed at the end of the dispatch and notification scenarios, and
//! the issue 2 targets it reports (never enforced through the exit status).

use crate::agents::Shared;
use crate::metrics::{ms, quantiles};
use crate::scenarios::dispatch::{IdleResult, LoadResult};
use chrono::Utc;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// Targets of issue 2; reported, never enforced through the exit status.
pub const TARGET_P99_MS: f64 = 25.0;
pub const TARGET_IDLE_TX_PER_S: f64 = 1.0;

/// The directory a scenario writes its files to: --out-dir, else
/// docs/bench-raw/<default_name>; created if missing.
pub fn out_dir(a: &crate::Args, default_name: String) -> anyhow::Result<std::path::PathBuf> {
    let dir = a
        .out_dir
        .clone()
        .unwrap_or_else(|| std::path::Path::new("docs/bench-raw").join(default_name));
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn met(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

/// Extra lines and target lines of the notification scenarios.
#[derive(Default)]
pub struct NotifyReport {
    pub lines: Vec<String>,
    pub targets: Vec<String>,
}

/// `loads`: one unlabelled load phase (the dispatch scenario), or labelled phases.
pub fn summary(
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

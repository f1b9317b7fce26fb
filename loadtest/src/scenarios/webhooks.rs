//! Webhooks scenario (issue 3 a, b): deliveries per second to local receivers and
//! event-to-receiver latency; also the pieces the storm scenario shares.

use crate::agents::Shared;
use crate::metrics::{quantiles, TxProbe};
use crate::receivers::{self, HeraldSample, Receivers};
use crate::report::{met, summary, NotifyReport};
use crate::scenarios::dispatch::load_phase;
use anyhow::Result;
use herald_client::{Client, Method};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn latest(samples: &Mutex<Vec<receivers::HeraldSample>>) -> Option<receivers::HeraldSample> {
    samples.lock().unwrap().last().copied()
}

/// Waits until every delivery Herald created has reached a receiver at least once
/// (fast endpoints only matter here: failing ones are reached on their first attempt).
pub async fn notify_drain(
    r: &Receivers,
    samples: &Mutex<Vec<receivers::HeraldSample>>,
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
pub async fn queues_line(admin: &Client) -> String {
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

pub fn throttle_env() -> String {
    match std::env::var("HERALD_NOTIFY__THROTTLE__ENABLED") {
        Ok(v) if v.eq_ignore_ascii_case("false") || v == "0" => "off".into(),
        Ok(v) => format!("on (HERALD_NOTIFY__THROTTLE__ENABLED={v})"),
        Err(_) => "on (default)".into(),
    }
}

/// What the receivers saw, and Herald's counters, over `[t0, t0 + seconds)`.
pub fn receiver_lines(
    r: &Receivers,
    samples: &[receivers::HeraldSample],
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
        receivers::nearest(samples, origin_s(s0)),
        receivers::nearest(samples, origin_s(w1)),
    ) {
        (Some(a), Some(b)) => Some(b.created - a.created),
        _ => None,
    };
    let created_window = match (
        receivers::nearest(samples, origin_s(w0)),
        receivers::nearest(samples, origin_s(w1)),
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

pub fn receiver_totals(r: &Receivers) -> Vec<String> {
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

/// What both notification scenarios start with: the receivers, the monitor of
/// Herald's counters, and the report's first lines.
pub struct NotifySetup {
    pub r: Arc<Receivers>,
    pub stop: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Vec<HeraldSample>>>,
    pub mon: tokio::task::JoinHandle<()>,
    pub report: NotifyReport,
}

pub async fn setup(sh: &Arc<Shared>, plain: &Client) -> Result<NotifySetup> {
    let na = &sh.args.notify;
    let per_build = sh.args.jobs_per_build;
    setup_sized(sh, plain, na.endpoints(), na.receiver_hosts, per_build).await
}

/// As [`setup`], with `endpoints` endpoints on `hosts` receivers and builds of
/// `jobs_per_build` jobs.
pub async fn setup_sized(
    sh: &Arc<Shared>,
    plain: &Client,
    endpoints: usize,
    hosts: usize,
    jobs_per_build: usize,
) -> Result<NotifySetup> {
    let a = &sh.args;
    let na = &a.notify;
    let r = Receivers::start(na, endpoints, hosts).await?;
    let pats: Vec<&str> = r.endpoints.iter().map(|e| e.pattern.as_str()).collect();
    let per_build = receivers::notifications_per_build(&pats, jobs_per_build.clamp(1, 500));
    let count = |b| r.endpoints.iter().filter(|e| e.behaviour == b).count();
    let hosts: Vec<String> = r.hosts.iter().map(ToString::to_string).collect();
    let layout = format!(
        "notify: endpoints     {} on {} receivers ({}); {} fast, {} answer after {} ms, {} answer 500; events {} (round-robin); {per_build} notifications per build expected",
        r.endpoints.len(),
        hosts.len(),
        hosts.join(" "),
        count(receivers::Behaviour::Fast),
        count(receivers::Behaviour::Slow),
        na.slow_ms,
        count(receivers::Behaviour::Fail),
        na.patterns().join(",")
    );
    println!("[notify] {}", layout.trim_start_matches("notify: "));
    println!("[notify] throttle {}", throttle_env());
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mon = tokio::spawn(receivers::monitor(
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
    Ok(NotifySetup {
        r,
        stop,
        samples,
        mon,
        report,
    })
}

/// The webhooks scenario: one load phase with every webhook in place, then a drain.
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
    let na = &a.notify;
    let NotifySetup {
        r,
        stop,
        samples,
        mon,
        mut report,
    } = setup(sh, plain).await?;
    r.create_webhooks(api, sh.args.notify.rotate_secrets)
        .await?;
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
    let (lines, rate) = receiver_lines(&r, &all, t0, a.duration_s, na.rate_warmup_s, load.builds);
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
            receivers::TARGET_DELIVERIES_PER_S,
            met(rate >= receivers::TARGET_DELIVERIES_PER_S)
        ));
    }
    Ok(summary(sh, setup_s, None, &[("", &load)], &report))
}

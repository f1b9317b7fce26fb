//! Notification scenarios (issue 3): webhook receivers spawned in this process, the
//! webhooks that point at them, and what they saw.
//!
//! Receivers are plain HTTP servers on loopback addresses 127.0.0.1..=127.0.0.N (one
//! listener each, port 0), with one path per endpoint. Distinct addresses matter:
//! Herald limits rate and concurrency per host, and a host is the address without the
//! port. Every request's Standard Webhooks signature is checked with the endpoint's
//! secret; latency is measured from the event's `timestamp` (taken by Herald inside the
//! transaction, just before its outbox insert, so at or before the commit) to the
//! moment the receiver got the request, on this machine's clock.

use anyhow::{anyhow, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use herald_client::{Client, Method};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Issue 3 targets; reported, never enforced through the exit status.
pub const TARGET_DELIVERIES_PER_S: f64 = 5000.0;
pub const TARGET_ISOLATION_RATIO: f64 = 1.5;

/// A `webhook-timestamp` further than this from our clock is counted as invalid.
const TIMESTAMP_TOLERANCE_S: i64 = 300;

/// Seconds of per-second receive counts kept.
const MAX_SECONDS: usize = 3600;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Issue 2: idle cost of parked agents, dispatch latency under load.
    Dispatch,
    /// Issue 3 (a, b): deliveries per second to fast receivers, event-to-receiver latency.
    Webhooks,
    /// Issue 3 (c): dispatch p99 without, then during, a notification storm.
    Storm,
    /// Issue 10: faults against a multi-process Herald, then a ledger.
    Chaos,
    /// Issue 13: the Buildkite 2023 incident replayed (peak, slow receivers, outage
    /// with a paused backlog, drain), sampled every second, plotted.
    Incident,
    /// Issue 14: the offered load ramps in steps until a target breaks (--phase
    /// jobs or webhooks); a table row per step, with per-unit costs.
    Ceilings,
}

#[derive(clap::Args, Debug, Clone)]
pub struct NotifyArgs {
    /// Scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::Dispatch)]
    pub scenario: Scenario,
    /// Webhook endpoints to create (0: 40 for webhooks, 20 for storm).
    #[arg(long, default_value_t = 0)]
    pub webhooks: usize,
    /// Rotate every endpoint's secret right after creating it, so that every delivery
    /// is signed twice (`v1,<new> v1,<old>`): measures the cost of the overlap.
    #[arg(long)]
    pub rotate_secrets: bool,
    /// Comma-separated event patterns, handed to the endpoints round-robin, one each
    /// (default: `*` for webhooks; the four job.* types for storm, i.e. 20 endpoints x
    /// 5 jobs = 100 notifications per build).
    #[arg(long)]
    pub webhook_events: Option<String>,
    /// Receiver listeners, one per loopback address 127.0.0.1..=127.0.0.N.
    #[arg(long, default_value_t = 4)]
    pub receiver_hosts: usize,
    /// Share of endpoints that answer only after --slow-ms (default 0, storm 0.2).
    #[arg(long)]
    pub slow_share: Option<f64>,
    /// Share of endpoints that always answer 500 (default 0, storm 0.05).
    #[arg(long)]
    pub fail_share: Option<f64>,
    /// How long a slow endpoint takes to answer, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub slow_ms: u64,
    /// Seconds at the start of the load phase left out of the sustained delivery rate.
    #[arg(long, default_value_t = 10.0)]
    pub rate_warmup_s: f64,
    /// After the load phase, seconds to wait for every created delivery to arrive.
    #[arg(long, default_value_t = 20.0)]
    pub notify_drain_s: f64,
    /// Storm: length of the baseline phase (no webhooks), seconds (default
    /// --duration-s).
    #[arg(long)]
    pub baseline_s: Option<f64>,
}

impl NotifyArgs {
    pub fn endpoints(&self) -> usize {
        match (self.webhooks, self.scenario) {
            (0, Scenario::Storm) => 20,
            (0, _) => 40,
            (n, _) => n,
        }
    }

    pub fn patterns(&self) -> Vec<String> {
        let default = match self.scenario {
            Scenario::Storm => "job.scheduled,job.assigned,job.started,job.finished",
            _ => "*",
        };
        let list: Vec<String> = self
            .webhook_events
            .as_deref()
            .unwrap_or(default)
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        if list.is_empty() {
            vec!["*".into()]
        } else {
            list
        }
    }

    pub fn slow_share(&self) -> f64 {
        let d = if self.scenario == Scenario::Storm {
            0.2
        } else {
            0.0
        };
        self.slow_share.unwrap_or(d).clamp(0.0, 1.0)
    }

    pub fn fail_share(&self) -> f64 {
        let d = if self.scenario == Scenario::Storm {
            0.05
        } else {
            0.0
        };
        self.fail_share.unwrap_or(d).clamp(0.0, 1.0)
    }
}

/// Events a build of `jobs` jobs produces, by type (no failures, no cancels).
fn events_per_build(jobs: usize) -> [(&'static str, usize); 7] {
    [
        ("build.scheduled", 1),
        ("build.running", 1),
        ("build.finished", 1),
        ("job.scheduled", jobs),
        ("job.assigned", jobs),
        ("job.started", jobs),
        ("job.finished", jobs),
    ]
}

pub fn matches(pattern: &str, event: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => event
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('.')),
        None => pattern == event,
    }
}

/// Notifications one build should cause, given each endpoint's pattern.
pub fn notifications_per_build(patterns: &[&str], jobs: usize) -> usize {
    patterns
        .iter()
        .map(|p| {
            events_per_build(jobs)
                .iter()
                .filter(|(e, _)| matches(p, e))
                .map(|(_, n)| n)
                .sum::<usize>()
        })
        .sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Fast,
    Slow,
    Fail,
}

pub struct Endpoint {
    pub url: String,
    pub pattern: String,
    pub behaviour: Behaviour,
    key: OnceLock<Vec<u8>>,
}

/// What every receiver saw.
pub struct Receivers {
    origin: Instant,
    slow: Duration,
    pub endpoints: Vec<Endpoint>,
    pub hosts: Vec<SocketAddr>,
    /// First receipts of a webhook-id, by second since `origin`.
    per_second: Vec<AtomicU64>,
    pub requests: AtomicU64,
    pub valid: AtomicU64,
    pub invalid: AtomicU64,
    /// Distinct webhook-ids seen.
    pub first: AtomicU64,
    /// Requests for a webhook-id seen before (retries after a 500 are expected).
    pub repeats: AtomicU64,
    /// A webhook-id received again after it had been answered 2xx.
    pub dup_after_ok: AtomicU64,
    /// The same event body reaching the same endpoint under another webhook-id.
    pub dup_event: AtomicU64,
    pub stale_or_future: AtomicU64,
    pub no_timestamp: AtomicU64,
    pub negative: AtomicU64,
    /// Per webhook-id: answered 2xx yet.
    seen: Mutex<HashMap<String, bool>>,
    /// (endpoint, hash of the body) → seen.
    events: Mutex<HashMap<(usize, u64), ()>>,
    /// Event timestamp → request received, first receipts only, microseconds.
    pub hist: Mutex<Histogram<u64>>,
    pub hist_fast: Mutex<Histogram<u64>>,
    pub window: Mutex<Histogram<u64>>,
    /// Latency samples are recorded only while this is set.
    pub measuring: AtomicBool,
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl Receivers {
    /// Binds `hosts` listeners on 127.0.0.1..=127.0.0.hosts and lays out `n` endpoints
    /// over them: the first `fail` answer 500, the next `slow` answer after `slow_ms`.
    pub async fn start(a: &NotifyArgs, n: usize, hosts: usize) -> Result<Arc<Receivers>> {
        let n = n.max(1);
        let hosts = hosts.clamp(1, 250);
        let mut listeners = Vec::new();
        for h in 0..hosts {
            let ip = Ipv4Addr::new(127, 0, 0, u8::try_from(h + 1).unwrap_or(1));
            let l = std::net::TcpListener::bind((ip, 0))
                .with_context(|| format!("binding a receiver on {ip}"))?;
            l.set_nonblocking(true)?;
            listeners.push(l);
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<_>>()?;
        let fail = (n as f64 * a.fail_share()).round() as usize;
        let slow = (n as f64 * a.slow_share()).round() as usize;
        let patterns = a.patterns();
        let endpoints = (0..n)
            .map(|i| Endpoint {
                url: format!("http://{}/hook/{i}", addrs[i % addrs.len()]),
                pattern: patterns[i % patterns.len()].clone(),
                behaviour: if i < fail {
                    Behaviour::Fail
                } else if i < fail + slow {
                    Behaviour::Slow
                } else {
                    Behaviour::Fast
                },
                key: OnceLock::new(),
            })
            .collect();
        let r = Arc::new(Receivers {
            origin: Instant::now(),
            slow: Duration::from_millis(a.slow_ms),
            endpoints,
            hosts: addrs,
            per_second: (0..MAX_SECONDS).map(|_| AtomicU64::new(0)).collect(),
            requests: AtomicU64::new(0),
            valid: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            first: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            dup_after_ok: AtomicU64::new(0),
            dup_event: AtomicU64::new(0),
            stale_or_future: AtomicU64::new(0),
            no_timestamp: AtomicU64::new(0),
            negative: AtomicU64::new(0),
            seen: Mutex::new(HashMap::new()),
            events: Mutex::new(HashMap::new()),
            hist: Mutex::new(new_hist()),
            hist_fast: Mutex::new(new_hist()),
            window: Mutex::new(new_hist()),
            measuring: AtomicBool::new(false),
        });
        // The receivers stand for other machines: they get a runtime (and threads) of
        // their own, so that thousands of webhook requests never queue in front of the
        // simulated agents' pings, whose return time is the dispatch latency measured.
        let state = r.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("receivers")
            .enable_all()
            .build()
            .context("the receivers' runtime")?;
        std::thread::Builder::new()
            .name("receivers".into())
            .spawn(move || {
                rt.block_on(async move {
                    for l in listeners {
                        let app = Router::new()
                            .route("/hook/{i}", post(receive))
                            .with_state(state.clone());
                        let l = match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => l,
                            Err(e) => {
                                eprintln!("[notify] receiver cannot listen: {e}");
                                continue;
                            }
                        };
                        tokio::spawn(async move {
                            if let Err(e) = axum::serve(l, app).await {
                                eprintln!("[notify] receiver stopped: {e}");
                            }
                        });
                    }
                    std::future::pending::<()>().await;
                });
            })
            .context("the receivers' thread")?;
        Ok(r)
    }

    /// Seconds since the receivers started, as a per-second slot.
    pub fn second(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.origin).as_secs() as usize
    }

    /// Distinct webhook-ids first received in seconds `[from, to)`.
    pub fn received_between(&self, from: usize, to: usize) -> u64 {
        self.per_second
            .get(from.min(MAX_SECONDS)..to.min(MAX_SECONDS))
            .map(|s| s.iter().map(|c| c.load(Ordering::Relaxed)).sum())
            .unwrap_or(0)
    }

    /// Lowest and highest `w`-second rate in seconds `[from, to)`.
    pub fn window_rates(&self, from: usize, to: usize, w: usize) -> Option<(f64, f64)> {
        let w = w.max(1);
        if to < from + w {
            return None;
        }
        let rates: Vec<f64> = (from..=to - w)
            .step_by(w)
            .map(|s| self.received_between(s, s + w) as f64 / w as f64)
            .collect();
        let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rates.iter().copied().fold(0.0, f64::max);
        Some((lo, hi))
    }

    /// Creates one webhook per endpoint through the org API and keeps its secret.
    /// Creates every endpoint's webhook; with `rotate`, rotates its secret at once
    /// (the receiver keeps the old key, whose signature still travels in the header).
    pub async fn create_webhooks(&self, api: &Client, rotate: bool) -> Result<()> {
        self.create_webhooks_of(api, 0..self.endpoints.len(), rotate)
            .await
    }

    /// Creates the webhooks of endpoints `range` only (the ceilings scenario adds
    /// endpoints step by step).
    pub async fn create_webhooks_of(
        &self,
        api: &Client,
        range: std::ops::Range<usize>,
        rotate: bool,
    ) -> Result<()> {
        for (i, e) in self
            .endpoints
            .iter()
            .enumerate()
            .skip(range.start)
            .take(range.len())
        {
            let body = json!({"url": e.url, "events": [e.pattern]});
            let v = api
                .expect(Method::POST, "/v1/webhooks", Some(&body), 201)
                .await
                .with_context(|| format!("creating webhook {i} ({})", e.url))?;
            let secret = v
                .get("secret")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("create webhook: no secret in {v}"))?;
            let key = secret
                .strip_prefix("whsec_")
                .and_then(|k| STANDARD.decode(k).ok())
                .filter(|k| !k.is_empty())
                .ok_or_else(|| anyhow!("create webhook: secret is not whsec_<base64>"))?;
            let _ = e.key.set(key);
            if rotate {
                let id = v
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("create webhook: no id in {v}"))?;
                api.expect(
                    Method::POST,
                    &format!("/v1/webhooks/{id}/rotate-secret"),
                    Some(&json!({"old_secret_valid_s": 86400})),
                    200,
                )
                .await
                .with_context(|| format!("rotating the secret of webhook {i}"))?;
            }
        }
        Ok(())
    }

    fn record_latency(&self, us: u64, behaviour: Behaviour) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        let us = us.max(1);
        self.hist.lock().unwrap().saturating_record(us);
        self.window.lock().unwrap().saturating_record(us);
        if behaviour == Behaviour::Fast {
            self.hist_fast.lock().unwrap().saturating_record(us);
        }
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Standard Webhooks: any `v1,<base64>` entry equal to HMAC-SHA256(key,
/// "{id}.{timestamp}.{body}").
pub fn signature_ok(key: &[u8], id: &str, ts: &str, body: &[u8], sig_header: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    sig_header.split_whitespace().any(|entry| {
        entry
            .strip_prefix("v1,")
            .and_then(|s| STANDARD.decode(s).ok())
            .is_some_and(|sig| mac.clone().verify_slice(&sig).is_ok())
    })
}

#[derive(serde::Deserialize)]
struct BodyHead {
    timestamp: Option<DateTime<Utc>>,
}

async fn receive(
    State(r): State<Arc<Receivers>>,
    Path(i): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let got = Utc::now();
    let got_at = Instant::now();
    r.requests.fetch_add(1, Ordering::Relaxed);
    let Some(e) = r.endpoints.get(i) else {
        r.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NOT_FOUND;
    };
    let (Some(id), Some(ts), Some(sig)) = (
        header(&headers, "webhook-id"),
        header(&headers, "webhook-timestamp"),
        header(&headers, "webhook-signature"),
    ) else {
        r.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    // The secret is stored when the create call returns; a delivery can race it.
    let mut key = e.key.get();
    for _ in 0..40 {
        if key.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        key = e.key.get();
    }
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (got.timestamp() - t).abs() <= TIMESTAMP_TOLERANCE_S);
    if !fresh {
        r.stale_or_future.fetch_add(1, Ordering::Relaxed);
    }
    let valid = fresh && key.is_some_and(|k| signature_ok(k, id, ts, &body, sig));
    if !valid {
        r.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    r.valid.fetch_add(1, Ordering::Relaxed);

    let first = {
        let mut seen = r.seen.lock().unwrap();
        match seen.get(id) {
            None => {
                seen.insert(id.to_owned(), false);
                true
            }
            Some(ok) => {
                if *ok {
                    r.dup_after_ok.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
        }
    };
    if first {
        r.first.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = r.per_second.get(r.second(got_at)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        if r.events
            .lock()
            .unwrap()
            .insert((i, hasher.finish()), ())
            .is_some()
        {
            r.dup_event.fetch_add(1, Ordering::Relaxed);
        }
        match serde_json::from_slice::<BodyHead>(&body)
            .ok()
            .and_then(|b| b.timestamp)
        {
            Some(at) => {
                let us = got.timestamp_micros() - at.timestamp_micros();
                if us < 0 {
                    r.negative.fetch_add(1, Ordering::Relaxed);
                }
                r.record_latency(u64::try_from(us).unwrap_or(0), e.behaviour);
            }
            None => {
                r.no_timestamp.fetch_add(1, Ordering::Relaxed);
            }
        }
    } else {
        r.repeats.fetch_add(1, Ordering::Relaxed);
    }
    let status = match e.behaviour {
        Behaviour::Fast => StatusCode::NO_CONTENT,
        Behaviour::Slow => {
            tokio::time::sleep(r.slow).await;
            StatusCode::NO_CONTENT
        }
        Behaviour::Fail => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_success() {
        if let Some(ok) = r.seen.lock().unwrap().get_mut(id) {
            *ok = true;
        }
    }
    status
}

// ---------------------------------------------------------------------------------
// Herald's counters and gauges, from GET /metrics.

/// Sum of every series of counter or gauge `name` whose labels contain `filter`.
pub fn parse_value(text: &str, name: &str, filter: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let Some(i) = rest.rfind(' ') else { continue };
        let (labels, value) = (&rest[..i], rest[i + 1..].trim());
        if !labels.contains(filter) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// One look at Herald's notification counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeraldSample {
    pub at_s: f64,
    pub created: f64,
    pub attempts: f64,
    pub throttle_factor: Option<f64>,
    pub webhook_concurrency: Option<f64>,
}

pub fn sample_of(text: &str, at_s: f64) -> HeraldSample {
    HeraldSample {
        at_s,
        created: parse_value(
            text,
            "herald_notify_deliveries_created_total",
            "type=\"webhook\"",
        )
        .unwrap_or(0.0),
        attempts: parse_value(text, "herald_webhook_attempts_total", "").unwrap_or(0.0),
        throttle_factor: parse_value(text, "herald_notify_throttle_factor", ""),
        webhook_concurrency: parse_value(
            text,
            "herald_notify_concurrency_limit",
            "type=\"webhook\"",
        ),
    }
}

/// Samples Herald's /metrics every second and prints a progress line every
/// `progress_s`, until `stop` is set.
pub async fn monitor(
    r: Arc<Receivers>,
    plain: Client,
    progress_s: f64,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<HeraldSample>>>,
) {
    let started = Instant::now();
    let every = Duration::from_secs_f64(progress_s.max(1.0));
    let mut next_line = started + every;
    let mut last = (
        started,
        r.first.load(Ordering::Relaxed),
        None::<HeraldSample>,
    );
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        let s = crate::metrics::scrape(&plain)
            .await
            .map(|t| sample_of(&t, r.origin.elapsed().as_secs_f64()));
        if let Some(s) = s {
            samples.lock().unwrap().push(s);
        }
        if now < next_line {
            continue;
        }
        next_line += every;
        let first = r.first.load(Ordering::Relaxed);
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
        let rate = (first - last.1) as f64 / dt;
        let created = s.map(|s| s.created);
        let (created_rate, attempt_rate) = match (s, last.2) {
            (Some(c), Some(p)) => (
                format!("{:.0}/s", (c.created - p.created) / dt),
                format!("{:.0}/s", (c.attempts - p.attempts) / dt),
            ),
            _ => ("?".into(), "?".into()),
        };
        last = (now, first, s);
        let window = {
            let mut w = r.window.lock().unwrap();
            let t = if w.is_empty() {
                "no samples".to_string()
            } else {
                format!(
                    "p50 {:.1} ms p99 {:.1} ms",
                    crate::metrics::ms(w.value_at_quantile(0.5)),
                    crate::metrics::ms(w.value_at_quantile(0.99))
                )
            };
            w.reset();
            t
        };
        let backlog = created.map_or("?".into(), |c| format!("{:.0}", c - first as f64));
        let throttle = s
            .and_then(|s| s.throttle_factor.zip(s.webhook_concurrency))
            .map_or("off".into(), |(f, c)| format!("factor {f:.2} slots {c:.0}"));
        println!(
            "[notify {:>4.0}s] received {first} ({rate:.0}/s) created {} ({created_rate}) not yet received {backlog} attempts {attempt_rate} | valid {} invalid {} repeats {} dup {} | latency {window} | throttle {throttle}",
            r.origin.elapsed().as_secs_f64(),
            created.map_or("?".into(), |c| format!("{c:.0}")),
            r.valid.load(Ordering::Relaxed),
            r.invalid.load(Ordering::Relaxed),
            r.repeats.load(Ordering::Relaxed),
            r.dup_after_ok.load(Ordering::Relaxed) + r.dup_event.load(Ordering::Relaxed),
        );
    }
}

/// The sample nearest to `at_s` seconds since the receivers started.
pub fn nearest(samples: &[HeraldSample], at_s: f64) -> Option<HeraldSample> {
    samples
        .iter()
        .min_by(|a, b| (a.at_s - at_s).abs().total_cmp(&(b.at_s - at_s).abs()))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_per_build_of_the_defaults() {
        let storm = [
            "job.scheduled",
            "job.assigned",
            "job.started",
            "job.finished",
        ];
        let pats: Vec<&str> = (0..20).map(|i| storm[i % 4]).collect();
        assert_eq!(notifications_per_build(&pats, 5), 100);
        assert_eq!(notifications_per_build(&["*"], 5), 23);
        assert_eq!(notifications_per_build(&["build.*", "job.finished"], 5), 8);
    }

    #[test]
    fn verifies_standard_webhooks_signatures() {
        // The example of the Standard Webhooks specification.
        let key = STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("key");
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(signature_ok(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            body,
            sig
        ));
        assert!(signature_ok(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            body,
            &format!("v1,bogus {sig}")
        ));
        assert!(!signature_ok(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265331",
            body,
            sig
        ));
    }

    #[test]
    fn parses_counters() {
        let text = "herald_notify_deliveries_created_total{type=\"webhook\"} 12\n\
            herald_webhook_attempts_total{outcome=\"success\"} 5\n\
            herald_webhook_attempts_total{outcome=\"retry\"} 2\n\
            herald_notify_throttle_factor 0.5\n";
        let s = sample_of(text, 1.0);
        assert_eq!(s.created, 12.0);
        assert_eq!(s.attempts, 7.0);
        assert_eq!(s.throttle_factor, Some(0.5));
        assert_eq!(s.webhook_concurrency, None);
    }
}

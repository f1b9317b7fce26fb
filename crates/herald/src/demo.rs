//! `herald demo`: migrate, start every role in this process, then drive it through the
//! public HTTP API with in-process agents and a stream of builds with real job graphs.
//! Prints one live line a second and a summary at the end.

use crate::app::{self, Role};
use crate::config::Config;
use anyhow::Context;
use chrono::Utc;
use hdrhistogram::Histogram;
use herald_client::Client;
use rand::Rng;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. 30s, 5m); runs until Ctrl-C without it.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// In-process agents.
    #[arg(long, default_value_t = 40)]
    pub agents: usize,
    /// Builds created per second.
    #[arg(long, default_value_t = 4.0)]
    pub builds_per_s: f64,
    /// Share of jobs that fail, 0.0-1.0.
    #[arg(long, default_value_t = 0.03)]
    pub failure_rate: f64,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s or 5m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("`{s}` is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Default)]
struct Stats {
    builds_created: AtomicU64,
    jobs_dispatched: AtomicU64,
    jobs_passed: AtomicU64,
    jobs_failed: AtomicU64,
    errors: AtomicU64,
}

struct Latency {
    window: Histogram<u64>,
    total: Histogram<u64>,
}

pub async fn run(mut cfg: Config, args: DemoArgs) -> anyhow::Result<()> {
    if cfg.auth.admin_token.as_deref().unwrap_or("").is_empty() {
        cfg.auth.admin_token = Some(herald_storage::tokens::generate("hrd_adm_"));
    }
    let admin = cfg.auth.admin_token.clone().unwrap_or_default();
    println!(
        "herald demo: migrating {}",
        redact(&cfg.database.primary_url)
    );
    app::migrate(&cfg).await?;
    crate::telemetry::metrics();
    let roles: std::collections::BTreeSet<Role> = [
        Role::Api,
        Role::Relay,
        Role::Dispatch,
        Role::Notify,
        Role::Maintenance,
    ]
    .into();
    let running = match app::start(cfg.clone(), roles.clone()).await {
        Ok(r) => r,
        Err(e) if format!("{e:#}").contains("cannot listen") => {
            println!(
                "herald demo: {} is taken, using a free port",
                cfg.http.listen
            );
            cfg.http.listen = "127.0.0.1:0".into();
            app::start(cfg.clone(), roles).await?
        }
        Err(e) => return Err(e),
    };
    let addr = running.addr.context("the API did not start")?;
    let base = format!("http://{addr}");
    println!("herald demo: API on {base}, admin token {admin}");
    println!(
        "herald demo: watch it on the on-call page {}",
        ops_url(&base, &admin)
    );
    println!(
        "herald demo: replica {}",
        cfg.database
            .replica_url
            .as_deref()
            .map(redact)
            .unwrap_or_else(|| "not configured (reads go to the primary)".into())
    );

    let client = Client::new(&base);
    let slug = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let org = client.with_token(&admin).create_org(&slug).await?;
    let api = client.with_token(org["api_token"].as_str().unwrap_or_default());
    let registration = client.with_token(org["agent_token"].as_str().unwrap_or_default());
    api.create_pipeline("web", &format!("{slug}/web")).await?;
    println!(
        "herald demo: org {slug}, pipeline web, {} agents, {} builds/s (Ctrl-C to stop)",
        args.agents, args.builds_per_s
    );

    let stop = CancellationToken::new();
    let stats = Arc::new(Stats::default());
    let latency = Arc::new(Mutex::new(Latency {
        window: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        total: Histogram::new_with_bounds(1, 600_000_000, 3)?,
    }));
    let mut workers = Vec::new();
    for i in 0..args.agents {
        let agent = registration
            .register_agent(&format!("demo-agent-{i}"), &["default"])
            .await?;
        let c = client.with_token(agent.access_token);
        workers.push(tokio::spawn(agent_loop(
            c,
            stop.clone(),
            stats.clone(),
            latency.clone(),
            args.failure_rate,
        )));
    }
    workers.push(tokio::spawn(build_loop(
        api.clone(),
        stop.clone(),
        stats.clone(),
        args.builds_per_s,
    )));

    let db = herald_storage::connect_pool(&herald_storage::PoolSettings {
        url: cfg.database.primary_url.clone(),
        max_connections: 1,
        acquire_timeout: Duration::from_secs(5),
        application_name: "herald-demo".into(),
        read_only: true,
    })?;
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let mut last_builds = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = app::shutdown_signal() => break,
        }
        let builds = stats.builds_created.load(Ordering::Relaxed);
        let (p50, p99) = {
            let mut l = latency
                .lock()
                .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?;
            let r = (
                l.window.value_at_quantile(0.5),
                l.window.value_at_quantile(0.99),
            );
            l.window.reset();
            r
        };
        let oldest: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - min(scheduled_at))::float8 FROM jobs WHERE state = 'scheduled'",
        )
        .fetch_one(&db)
        .await
        .unwrap_or(None);
        let retried = retried_jobs(&db).await;
        println!(
            "[{:>4}s] builds/s {:>3} | jobs dispatched {:>6} | dispatch p50 {:>6.1} ms p99 {:>6.1} ms | oldest queue age {:>5.1} s | passed {} failed {} retried {}",
            started.elapsed().as_secs(),
            builds - last_builds,
            stats.jobs_dispatched.load(Ordering::Relaxed),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            oldest.unwrap_or(0.0),
            stats.jobs_passed.load(Ordering::Relaxed),
            stats.jobs_failed.load(Ordering::Relaxed),
            retried,
        );
        last_builds = builds;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    println!("herald demo: stopping; agents finish the job in hand");
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    let retried = retried_jobs(&db).await;
    running.shutdown().await;
    let elapsed = started.elapsed().as_secs_f64();
    let l = latency
        .lock()
        .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?;
    let builds = stats.builds_created.load(Ordering::Relaxed);
    println!("== herald demo summary ==");
    println!("ran for            {elapsed:.1} s");
    println!(
        "builds created     {builds} ({:.1}/s)",
        builds as f64 / elapsed.max(0.001)
    );
    println!(
        "jobs dispatched    {}",
        stats.jobs_dispatched.load(Ordering::Relaxed)
    );
    println!(
        "jobs passed/failed {}/{}",
        stats.jobs_passed.load(Ordering::Relaxed),
        stats.jobs_failed.load(Ordering::Relaxed)
    );
    println!("jobs retried       {retried} (automatically, by their exit-status rules)");
    println!(
        "dispatch latency   p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (job runnable -> agent's ping returned it)",
        l.total.value_at_quantile(0.5) as f64 / 1000.0,
        l.total.value_at_quantile(0.99) as f64 / 1000.0,
        l.total.max() as f64 / 1000.0
    );
    println!(
        "client errors      {}",
        stats.errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Jobs that are retries (the demo's test shards retry a failure automatically).
async fn retried_jobs(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE retry_of IS NOT NULL")
        .fetch_one(db)
        .await
        .unwrap_or(0)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

async fn agent_loop(
    c: Client,
    stop: CancellationToken,
    stats: Arc<Stats>,
    latency: Arc<Mutex<Latency>>,
    failure_rate: f64,
) {
    while !stop.is_cancelled() {
        let ping = tokio::select! {
            p = c.ping(10) => p,
            _ = stop.cancelled() => break,
        };
        let job = match ping {
            Ok(Some(job)) => job,
            Ok(None) => continue,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "demo agent ping failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Some(at) = job.scheduled_at {
            let us = (Utc::now() - at).num_microseconds().unwrap_or(1).max(1) as u64;
            if let Ok(mut l) = latency.lock() {
                let _ = l.window.record(us);
                let _ = l.total.record(us);
            }
        }
        stats.jobs_dispatched.fetch_add(1, Ordering::Relaxed);
        let (work, fail) = {
            let mut rng = rand::thread_rng();
            (
                Duration::from_millis(rng.gen_range(20..400)),
                rng.gen_bool(failure_rate.clamp(0.0, 1.0)),
            )
        };
        match c.run_job(job.id, i32::from(fail), work).await {
            Ok(_) if fail => stats.jobs_failed.fetch_add(1, Ordering::Relaxed),
            Ok(_) => stats.jobs_passed.fetch_add(1, Ordering::Relaxed),
            Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
        };
    }
    let _ = c
        .call(herald_client::Method::POST, "/v1/agent/disconnect", None)
        .await;
}

/// A build graph like a small real one: lint and build, four test shards after build,
/// deploy after everything. A test shard that fails (flaky) is retried automatically,
/// up to twice.
pub fn demo_build(n: u64) -> serde_json::Value {
    let sha: String = (0..40)
        .map(|i| char::from(b"0123456789abcdef"[((n * 7 + i * 13) % 16) as usize]))
        .collect();
    let flaky = json!({"automatic": [{"exit_status": 1, "limit": 2}]});
    json!({
        "commit": sha,
        "branch": "main",
        "message": format!("demo build {n}"),
        "jobs": [
            {"key": "lint", "command": "make lint"},
            {"key": "build", "command": "make build", "priority": 1},
            {"key": "test-1", "command": "make test SHARD=1", "depends_on": ["build"], "retry": flaky},
            {"key": "test-2", "command": "make test SHARD=2", "depends_on": ["build"], "retry": flaky},
            {"key": "test-3", "command": "make test SHARD=3", "depends_on": ["build"], "retry": flaky},
            {"key": "test-4", "command": "make test SHARD=4", "depends_on": ["build"], "retry": flaky},
            {"key": "deploy", "command": "make deploy", "depends_on": ["lint", "test-1", "test-2", "test-3", "test-4"]}
        ]
    })
}

async fn build_loop(api: Client, stop: CancellationToken, stats: Arc<Stats>, per_s: f64) {
    if per_s <= 0.0 {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        n += 1;
        match api.create_build("web", &demo_build(n)).await {
            Ok(_) => stats.builds_created.fetch_add(1, Ordering::Relaxed),
            Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The on-call page with the admin token in the fragment: the page moves it into the
/// tab's sessionStorage and clears it from the address bar. A fragment never reaches
/// the server.
pub fn ops_url(base: &str, token: &str) -> String {
    let encoded: String = token
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("{base}/ops#token={encoded}")
}

#[cfg(test)]
mod ops_url_tests {
    #[test]
    fn the_token_rides_in_the_fragment_encoded() {
        assert_eq!(
            super::ops_url("http://127.0.0.1:8080", "hrd_adm_a+b/c="),
            "http://127.0.0.1:8080/ops#token=hrd_adm_a%2Bb%2Fc%3D"
        );
    }
}

//! The builds the load test creates: their shape (independent jobs and dependents),
//! and the creator that posts them at a steady rate.

use crate::agents::Shared;
use herald_client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub fn random_commit(rng: &mut StdRng) -> String {
    (0..40)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// How many of a build's `n` jobs have no dependency.
pub fn roots(n: usize) -> usize {
    let n = n.clamp(1, 500);
    (n.div_ceil(5) * 3).clamp(1, n)
}

/// A build of `n` jobs: the first ~60 % independent, each other job depending on one
/// of those (job k on job k - roots).
pub fn build_body(n: usize, queue: &str, rng: &mut StdRng) -> Value {
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

pub fn created_jobs(build: &Value) -> Vec<(String, Vec<String>)> {
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

/// How a load phase offers its builds.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub jobs_per_s: f64,
    pub jobs_per_build: usize,
    /// Creator tasks, each with its own schedule and in-flight limit, so that one
    /// task's pacing loop or semaphore is not what caps the offered rate.
    pub producers: usize,
    /// Seconds after the phase to wait for its jobs to be dispatched and finished.
    pub drain_s: f64,
}

impl Pace {
    pub fn of(a: &crate::Args) -> Pace {
        Pace {
            jobs_per_s: a.jobs_per_s,
            jobs_per_build: a.jobs_per_build,
            producers: 1,
            drain_s: a.drain_s,
        }
    }
}

/// Creates builds at `pace` until `deadline`, from `pace.producers` tasks; producer
/// k posts to `pipelines[k % len]`.
pub async fn create_builds(
    api: Client,
    pipelines: Vec<String>,
    sh: Arc<Shared>,
    deadline: Instant,
    pace: Pace,
) {
    let n = pace.producers.max(1);
    if pipelines.is_empty() {
        return;
    }
    let mut producers = JoinSet::new();
    for k in 0..n {
        let each = Pace {
            jobs_per_s: pace.jobs_per_s / n as f64,
            ..pace
        };
        // Spread the producers' schedules over one period.
        let offset = k as f64 / n as f64;
        producers.spawn(produce(
            api.clone(),
            pipelines[k % pipelines.len()].clone(),
            sh.clone(),
            deadline,
            each,
            offset,
        ));
    }
    while producers.join_next().await.is_some() {}
}

/// One producer: a build every period, the first `offset` periods in.
async fn produce(
    api: Client,
    pipeline: String,
    sh: Arc<Shared>,
    deadline: Instant,
    pace: Pace,
    offset: f64,
) {
    let a = &sh.args;
    let per_build = pace.jobs_per_build.clamp(1, 500);
    let builds_per_s = pace.jobs_per_s / per_build as f64;
    if !(builds_per_s.is_finite() && builds_per_s > 0.0) {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / builds_per_s);
    let sem = Arc::new(Semaphore::new(a.max_inflight_builds.max(1)));
    let mut rng = StdRng::from_entropy();
    let mut inflight = JoinSet::new();
    let start = Instant::now() + period.mul_f64(offset.clamp(0.0, 1.0));
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
}

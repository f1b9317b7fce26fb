//! Validation of a build's job graph: unique keys, known dependencies, no cycles.

use crate::input::{InputError, JobKey, QueueName};
use crate::retry::{parse_timeout, RawRetry, RetryPolicy};
use serde::Deserialize;
use std::collections::HashMap;

pub const MAX_JOBS_PER_BUILD: usize = 500;

/// A job as a client sends it.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub key: String,
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub env: HashMap<String, String>,
    #[serde(default)]
    pub timeout_s: Option<i64>,
    #[serde(default)]
    pub retry: Option<RawRetry>,
}

/// A validated job; `depends_on` holds indices into the validated list.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub key: JobKey,
    pub command: String,
    pub queue: QueueName,
    pub depends_on: Vec<usize>,
    pub priority: i32,
    pub label: Option<String>,
    pub env: HashMap<String, String>,
    /// `None`: the configured default.
    pub timeout_s: Option<i32>,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("a build needs at least one job")]
    Empty,
    #[error("a build has at most {MAX_JOBS_PER_BUILD} jobs, this one has {0}")]
    TooManyJobs(usize),
    #[error("job key `{0}` appears more than once")]
    DuplicateKey(String),
    #[error("job `{job}` depends on unknown job `{dependency}`")]
    UnknownDependency { job: String, dependency: String },
    #[error("the job graph has a cycle through `{0}`")]
    Cycle(String),
    #[error(transparent)]
    Input(#[from] InputError),
}

pub fn validate_jobs(raw: Vec<RawJob>) -> Result<Vec<JobSpec>, GraphError> {
    if raw.is_empty() {
        return Err(GraphError::Empty);
    }
    if raw.len() > MAX_JOBS_PER_BUILD {
        return Err(GraphError::TooManyJobs(raw.len()));
    }
    let mut index: HashMap<String, usize> = HashMap::with_capacity(raw.len());
    for (i, job) in raw.iter().enumerate() {
        JobKey::parse(&job.key)?;
        if index.insert(job.key.clone(), i).is_some() {
            return Err(GraphError::DuplicateKey(job.key.clone()));
        }
    }
    let mut specs = Vec::with_capacity(raw.len());
    for job in raw {
        let mut deps = Vec::with_capacity(job.depends_on.len());
        for dep in &job.depends_on {
            match index.get(dep) {
                Some(&d) if !deps.contains(&d) => deps.push(d),
                Some(_) => {}
                None => {
                    return Err(GraphError::UnknownDependency {
                        job: job.key.clone(),
                        dependency: dep.clone(),
                    })
                }
            }
        }
        crate::input::job_text(&job.command, job.label.as_deref(), &job.env)?;
        let queue = QueueName::parse("jobs[].queue", job.queue.as_deref().unwrap_or("default"))?;
        let timeout_s = parse_timeout(job.timeout_s)?;
        let retry = RetryPolicy::parse(job.retry.unwrap_or_default())?;
        specs.push(JobSpec {
            key: JobKey::parse(&job.key)?,
            command: job.command,
            queue,
            depends_on: deps,
            priority: job.priority,
            label: job.label,
            env: job.env,
            timeout_s,
            retry,
        });
    }
    if let Some(at) = find_cycle(&specs) {
        return Err(GraphError::Cycle(specs[at].key.to_string()));
    }
    Ok(specs)
}

/// Kahn's algorithm; returns a job on a cycle if there is one.
fn find_cycle(specs: &[JobSpec]) -> Option<usize> {
    let mut indegree: Vec<usize> = specs.iter().map(|s| s.depends_on.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); specs.len()];
    for (i, s) in specs.iter().enumerate() {
        for &d in &s.depends_on {
            dependents[d].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..specs.len()).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = ready.pop() {
        seen += 1;
        for &j in &dependents[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(j);
            }
        }
    }
    if seen == specs.len() {
        None
    } else {
        indegree.iter().position(|&d| d > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(key: &str, deps: &[&str]) -> RawJob {
        RawJob {
            key: key.into(),
            command: "true".into(),
            queue: None,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            priority: 0,
            label: None,
            env: HashMap::new(),
            timeout_s: None,
            retry: None,
        }
    }

    #[test]
    fn accepts_a_dag() {
        let specs = validate_jobs(vec![raw("build", &[]), raw("test", &["build"])]).expect("dag");
        assert_eq!(specs[1].depends_on, vec![0]);
        assert_eq!(specs[0].queue.as_str(), "default");
    }

    #[test]
    fn rejects_bad_graphs() {
        assert_eq!(validate_jobs(vec![]).err(), Some(GraphError::Empty));
        assert!(matches!(
            validate_jobs(vec![raw("a", &[]), raw("a", &[])]),
            Err(GraphError::DuplicateKey(_))
        ));
        assert!(matches!(
            validate_jobs(vec![raw("a", &["b"])]),
            Err(GraphError::UnknownDependency { .. })
        ));
        assert!(matches!(
            validate_jobs(vec![raw("a", &["c"]), raw("b", &["a"]), raw("c", &["b"])]),
            Err(GraphError::Cycle(_))
        ));
        assert!(matches!(
            validate_jobs(vec![raw("a", &["a"])]),
            Err(GraphError::Cycle(_))
        ));
        let many = (0..501).map(|i| raw(&format!("j{i}"), &[])).collect();
        assert_eq!(
            validate_jobs(many).err(),
            Some(GraphError::TooManyJobs(501))
        );
    }
}

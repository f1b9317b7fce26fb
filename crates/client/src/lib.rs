//! A small HTTP client for Herald's public API, used by `herald demo`, the `herald ops`
//! commands, the load test and the integration tests. Speaks only HTTP: it knows the
//! contract, nothing of Herald's insides.

use chrono::{DateTime, Utc};
pub use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{method} {path} returned {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A response whose status the caller checks.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PingJob {
    pub id: Uuid,
    pub build_id: Uuid,
    pub key: String,
    pub command: String,
    pub queue: String,
    pub state: String,
    #[serde(default)]
    pub env: Value,
    #[serde(default)]
    pub scheduled_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegisteredAgent {
    pub id: Uuid,
    pub access_token: String,
    pub heartbeat_interval_s: u64,
    pub ping_wait_max_s: u64,
}

impl Client {
    pub fn new(base: impl Into<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4096)
            .build()
            .unwrap_or_default();
        Client {
            http,
            base: base.into().trim_end_matches('/').to_owned(),
            token: None,
        }
    }

    /// The same connection pool, another bearer token.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            token: Some(token.into()),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Any call; the caller decides what a status means.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        self.call_with_headers(method, path, body, &[]).await
    }

    /// Any call with extra request headers (e.g. `Idempotency-Key`).
    pub async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply { status, body })
    }

    /// A call that must answer `expect`.
    pub async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        expect: u16,
    ) -> Result<Value, ClientError> {
        let m = method.to_string();
        let r = self.call(method, path, body).await?;
        if r.status.as_u16() == expect {
            Ok(r.body)
        } else {
            Err(ClientError::Status {
                method: m,
                path: path.to_owned(),
                status: r.status.as_u16(),
                body: r.body.to_string(),
            })
        }
    }

    pub async fn create_org(&self, slug: &str) -> Result<Value, ClientError> {
        self.expect(Method::POST, "/v1/orgs", Some(&json!({"slug": slug})), 201)
            .await
    }

    pub async fn create_pipeline(
        &self,
        slug: &str,
        repository: &str,
    ) -> Result<Value, ClientError> {
        self.expect(
            Method::POST,
            "/v1/pipelines",
            Some(&json!({"slug": slug, "repository": repository})),
            201,
        )
        .await
    }

    pub async fn create_build(&self, pipeline: &str, build: &Value) -> Result<Value, ClientError> {
        self.expect(
            Method::POST,
            &format!("/v1/pipelines/{pipeline}/builds"),
            Some(build),
            201,
        )
        .await
    }

    pub async fn get_build(&self, id: &str) -> Result<Value, ClientError> {
        self.expect(Method::GET, &format!("/v1/builds/{id}"), None, 200)
            .await
    }

    pub async fn register_agent(
        &self,
        name: &str,
        queues: &[&str],
    ) -> Result<RegisteredAgent, ClientError> {
        let v = self
            .expect(
                Method::POST,
                "/v1/agents/register",
                Some(&json!({"name": name, "queues": queues})),
                201,
            )
            .await?;
        serde_json::from_value(v.clone()).map_err(|e| ClientError::Status {
            method: "POST".into(),
            path: "/v1/agents/register".into(),
            status: 201,
            body: format!("unexpected body {v}: {e}"),
        })
    }

    /// The long poll: `Some(job)` on 200, `None` on 204.
    pub async fn ping(&self, wait_s: u64) -> Result<Option<PingJob>, ClientError> {
        let path = format!("/v1/agent/ping?wait={wait_s}");
        let r = self.call(Method::POST, &path, None).await?;
        match r.status.as_u16() {
            204 => Ok(None),
            200 => {
                let job = r.body.get("job").cloned().unwrap_or(Value::Null);
                serde_json::from_value(job)
                    .map(Some)
                    .map_err(|e| ClientError::Status {
                        method: "POST".into(),
                        path,
                        status: 200,
                        body: format!("unexpected body: {e}"),
                    })
            }
            s => Err(ClientError::Status {
                method: "POST".into(),
                path,
                status: s,
                body: r.body.to_string(),
            }),
        }
    }

    pub async fn job_call(
        &self,
        job: Uuid,
        action: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        self.expect(Method::PUT, &format!("/v1/jobs/{job}/{action}"), body, 200)
            .await
    }

    /// Accept, start and finish a job, as an agent does.
    pub async fn run_job(
        &self,
        job: Uuid,
        exit_status: i32,
        work: Duration,
    ) -> Result<Value, ClientError> {
        self.job_call(job, "accept", None).await?;
        self.job_call(job, "start", None).await?;
        if !work.is_zero() {
            tokio::time::sleep(work).await;
        }
        self.job_call(job, "finish", Some(&json!({"exit_status": exit_status})))
            .await
    }
}

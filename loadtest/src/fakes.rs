//! The chaos scenario's outside world: webhook receivers that verify every Standard
//! Webhooks signature and record, per webhook-id, how often it came and whether it
//! was answered 2xx (one of them can be told to hang); and a fake GitHub that records
//! every commit status posted to it.

use crate::receivers::signature_ok;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// What one webhook-id got.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub requests: u32,
    /// When it was first answered 2xx.
    pub ok_at: Option<DateTime<Utc>>,
    /// Requests after it had been answered 2xx.
    pub after_ok: u32,
    pub event_type: String,
    pub build_id: String,
}

pub struct Endpoint {
    pub url: String,
    key: OnceLock<Vec<u8>>,
    pub seen: Mutex<HashMap<String, Seen>>,
    /// Requests arriving before this instant hang until then and get a 503.
    hang_until: Mutex<Option<tokio::time::Instant>>,
}

pub struct ChaosReceivers {
    pub endpoints: Vec<Endpoint>,
    pub invalid: AtomicU64,
    pub requests: AtomicU64,
}

impl ChaosReceivers {
    /// `n` endpoints over two loopback listeners (127.0.0.1 and 127.0.0.2).
    pub async fn start(n: usize) -> Result<Arc<ChaosReceivers>> {
        let mut listeners = Vec::new();
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for h in 1..=2u8 {
            let l = tokio::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, h), 0))
                .await
                .context("binding a chaos receiver")?;
            addrs.push(l.local_addr()?);
            listeners.push(l);
        }
        let endpoints = (0..n.max(1))
            .map(|i| Endpoint {
                url: format!("http://{}/hook/{i}", addrs[i % addrs.len()]),
                key: OnceLock::new(),
                seen: Mutex::new(HashMap::new()),
                hang_until: Mutex::new(None),
            })
            .collect();
        let r = Arc::new(ChaosReceivers {
            endpoints,
            invalid: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        for l in listeners {
            let app = Router::new()
                .route("/hook/{i}", post(receive))
                .with_state(r.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    eprintln!("[chaos] receiver stopped: {e}");
                }
            });
        }
        Ok(r)
    }

    pub fn set_key(&self, i: usize, secret: &str) -> Result<()> {
        use base64::Engine;
        let key = secret
            .strip_prefix("whsec_")
            .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
            .filter(|k| !k.is_empty())
            .context("webhook secret is not whsec_<base64>")?;
        let _ = self.endpoints[i].key.set(key);
        Ok(())
    }

    /// Endpoint `i` hangs every request for `d` from now.
    pub fn hang(&self, i: usize, d: Duration) {
        *self.endpoints[i].hang_until.lock().unwrap() = Some(tokio::time::Instant::now() + d);
    }

    /// Whether every endpoint answered 2xx to `build.finished` of `build_id`.
    pub fn all_finished(&self, build_id: &str) -> bool {
        self.endpoints.iter().all(|e| {
            e.seen.lock().unwrap().values().any(|s| {
                s.ok_at.is_some() && s.event_type == "build.finished" && s.build_id == build_id
            })
        })
    }

    /// Builds whose `build.finished` endpoint 0 answered 2xx.
    pub fn finished_builds(&self) -> std::collections::HashSet<String> {
        self.endpoints[0]
            .seen
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.ok_at.is_some() && s.event_type == "build.finished")
            .map(|s| s.build_id.clone())
            .collect()
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn receive(
    State(r): State<Arc<ChaosReceivers>>,
    Path(i): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
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
    let Some(key) = e.key.get() else {
        // Not created yet from our side: Herald retries.
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    if !signature_ok(key, id, ts, &body, sig) {
        r.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let event_type = v["type"].as_str().unwrap_or_default().to_owned();
    let build_id = v["data"]["build"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    {
        let mut seen = e.seen.lock().unwrap();
        let s = seen.entry(id.to_owned()).or_insert_with(|| Seen {
            event_type,
            build_id,
            ..Default::default()
        });
        s.requests += 1;
        if s.ok_at.is_some() {
            s.after_ok += 1;
        }
    }
    let hang = *e.hang_until.lock().unwrap();
    if let Some(until) = hang {
        if tokio::time::Instant::now() < until {
            tokio::time::sleep_until(until).await;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    if let Some(s) = e.seen.lock().unwrap().get_mut(id) {
        s.ok_at.get_or_insert_with(Utc::now);
    }
    StatusCode::NO_CONTENT
}

/// One commit status as GitHub got it.
#[derive(Debug, Clone)]
pub struct Status {
    pub sha: String,
    pub context: String,
    pub state: String,
}

#[derive(Default)]
pub struct FakeGithub {
    pub statuses: Mutex<Vec<Status>>,
}

impl FakeGithub {
    pub async fn start() -> Result<(Arc<FakeGithub>, String)> {
        let g = Arc::new(FakeGithub::default());
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the fake GitHub")?;
        let url = format!("http://{}", l.local_addr()?);
        let app = Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(status))
            .with_state(g.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                eprintln!("[chaos] fake GitHub stopped: {e}");
            }
        });
        Ok((g, url))
    }

    /// The last state GitHub got for each (sha, context).
    pub fn last(&self) -> HashMap<(String, String), String> {
        let mut out = HashMap::new();
        for s in self.statuses.lock().unwrap().iter() {
            out.insert((s.sha.clone(), s.context.clone()), s.state.clone());
        }
        out
    }
}

async fn status(
    State(g): State<Arc<FakeGithub>>,
    Path((_owner, _repo, sha)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    g.statuses.lock().unwrap().push(Status {
        sha,
        context: body["context"].as_str().unwrap_or_default().to_owned(),
        state: body["state"].as_str().unwrap_or_default().to_owned(),
    });
    (StatusCode::CREATED, Json(json!({"id": 1})))
}

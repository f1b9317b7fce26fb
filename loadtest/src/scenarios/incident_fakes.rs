//! The incident scenario's outside world: webhook receivers whose health the scenario
//! switches (healthy, degraded: some slow, some failing, down), recording every
//! `webhook-id` compactly (a million of them fit), and a fake GitHub that records when
//! each build's final commit status arrived.

use crate::receivers::signature_ok;
use anyhow::{anyhow, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, Utc};
use herald_client::{Client, Method};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Seconds of per-second counts kept.
pub const MAX_SECONDS: usize = 7200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Every endpoint answers 204 at once.
    Healthy = 0,
    /// Slow endpoints answer after the delay, failing ones 500, the rest 204.
    Degraded = 1,
    /// Every request is refused with 503, as a receiver that is down (not counted as
    /// received).
    Down = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fast,
    Slow,
    Fail,
}

pub struct Endpoint {
    pub url: String,
    pub pattern: String,
    pub kind: Kind,
    key: OnceLock<Vec<u8>>,
    pub hook_id: OnceLock<String>,
}

/// What one webhook-id got: bit 0 received (by a receiver that was up), bit 1
/// answered 2xx.
const GOT: u8 = 1;
const OK: u8 = 2;

pub struct Receivers {
    pub origin: Instant,
    slow: Duration,
    health: AtomicU8,
    pub endpoints: Vec<Endpoint>,
    pub hosts: Vec<SocketAddr>,
    /// webhook-id (a UUID) → GOT | OK bits.
    seen: Mutex<HashMap<u128, u8>>,
    /// First receipts and all requests, per second since `origin`.
    first_per_s: Vec<AtomicU64>,
    requests_per_s: Vec<AtomicU64>,
    pub requests: AtomicU64,
    pub first: AtomicU64,
    pub refused: AtomicU64,
    pub invalid: AtomicU64,
    pub dup_after_ok: AtomicU64,
}

impl Receivers {
    /// `n` endpoints over `hosts` listeners 127.0.0.1..=127.0.0.hosts; patterns
    /// round-robin; the first `fail` endpoints fail and the next `slow` are slow when
    /// degraded.
    pub async fn start(
        n: usize,
        hosts: usize,
        patterns: &[String],
        slow_share: f64,
        fail_share: f64,
        slow_ms: u64,
    ) -> Result<Arc<Receivers>> {
        let n = n.max(1);
        let mut listeners = Vec::new();
        for h in 0..hosts.clamp(1, 250) {
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
        let fail = (n as f64 * fail_share.clamp(0.0, 1.0)).round() as usize;
        let slow = (n as f64 * slow_share.clamp(0.0, 1.0)).round() as usize;
        let endpoints = (0..n)
            .map(|i| Endpoint {
                url: format!("http://{}/hook/{i}", addrs[i % addrs.len()]),
                pattern: patterns[i % patterns.len().max(1)].clone(),
                kind: if i < fail {
                    Kind::Fail
                } else if i < fail + slow {
                    Kind::Slow
                } else {
                    Kind::Fast
                },
                key: OnceLock::new(),
                hook_id: OnceLock::new(),
            })
            .collect();
        let counters = || (0..MAX_SECONDS).map(|_| AtomicU64::new(0)).collect();
        let r = Arc::new(Receivers {
            origin: Instant::now(),
            slow: Duration::from_millis(slow_ms),
            health: AtomicU8::new(Health::Healthy as u8),
            endpoints,
            hosts: addrs,
            seen: Mutex::new(HashMap::new()),
            first_per_s: counters(),
            requests_per_s: counters(),
            requests: AtomicU64::new(0),
            first: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            dup_after_ok: AtomicU64::new(0),
        });
        // Their own runtime, as the other scenarios' receivers: a flood of webhook
        // requests must not queue in front of the agents' pings.
        let state = r.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("incident-receivers")
            .enable_all()
            .build()
            .context("the receivers' runtime")?;
        std::thread::Builder::new()
            .name("incident-receivers".into())
            .spawn(move || {
                rt.block_on(async move {
                    for l in listeners {
                        let app = Router::new()
                            .route("/hook/{i}", post(receive))
                            .with_state(state.clone());
                        let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                            eprintln!("[incident] a receiver cannot listen");
                            continue;
                        };
                        tokio::spawn(async move {
                            if let Err(e) = axum::serve(l, app).await {
                                eprintln!("[incident] receiver stopped: {e}");
                            }
                        });
                    }
                    std::future::pending::<()>().await;
                });
            })
            .context("the receivers' thread")?;
        Ok(r)
    }

    pub fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }

    fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Degraded,
            2 => Health::Down,
            _ => Health::Healthy,
        }
    }

    pub fn second(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.origin).as_secs() as usize
    }

    /// First receipts and requests in second `s`.
    pub fn at_second(&self, s: usize) -> (u64, u64) {
        let l = |v: &[AtomicU64]| v.get(s).map_or(0, |c| c.load(Ordering::Relaxed));
        (l(&self.first_per_s), l(&self.requests_per_s))
    }

    /// Whether webhook-id `id` was received (and answered 2xx).
    pub fn got(&self, id: u128) -> (bool, bool) {
        let f = self.seen.lock().unwrap().get(&id).copied().unwrap_or(0);
        (f & GOT != 0, f & OK != 0)
    }

    pub fn ok_count(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .values()
            .filter(|f| **f & OK != 0)
            .count()
    }

    /// Creates every endpoint's webhook through the org API and keeps its secret.
    pub async fn create_webhooks(&self, api: &Client) -> Result<()> {
        for (i, e) in self.endpoints.iter().enumerate() {
            let body = json!({"url": e.url, "events": [e.pattern]});
            let v = api
                .expect(Method::POST, "/v1/webhooks", Some(&body), 201)
                .await
                .with_context(|| format!("creating webhook {i} ({})", e.url))?;
            let key = v
                .get("secret")
                .and_then(Value::as_str)
                .and_then(|s| s.strip_prefix("whsec_"))
                .and_then(|k| STANDARD.decode(k).ok())
                .filter(|k| !k.is_empty())
                .ok_or_else(|| anyhow!("create webhook: no whsec_ secret in {v}"))?;
            let _ = e.key.set(key);
            let id = v
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("create webhook: no id in {v}"))?;
            let _ = e.hook_id.set(id.to_owned());
        }
        Ok(())
    }
}

/// A UUID's 128 bits (any hyphenation), without a uuid dependency.
pub fn uuid_bits(s: &str) -> Option<u128> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn receive(
    State(r): State<Arc<Receivers>>,
    Path(i): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    r.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = r.requests_per_s.get(r.second(at)) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    let health = r.health();
    if health == Health::Down {
        r.refused.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
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
    let Some(key) = e.key.get() else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    let Some(wid) = uuid_bits(id) else {
        r.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    if !signature_ok(key, id, ts, &body, sig) {
        r.invalid.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let first = {
        let mut seen = r.seen.lock().unwrap();
        let f = seen.entry(wid).or_insert(0);
        if *f & OK != 0 {
            r.dup_after_ok.fetch_add(1, Ordering::Relaxed);
        }
        let first = *f & GOT == 0;
        *f |= GOT;
        first
    };
    if first {
        r.first.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = r.first_per_s.get(r.second(at)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    let status = match (health, e.kind) {
        (Health::Degraded, Kind::Fail) => return StatusCode::INTERNAL_SERVER_ERROR,
        (Health::Degraded, Kind::Slow) => {
            tokio::time::sleep(r.slow).await;
            StatusCode::NO_CONTENT
        }
        _ => StatusCode::NO_CONTENT,
    };
    if let Some(f) = r.seen.lock().unwrap().get_mut(&wid) {
        *f |= OK;
    }
    status
}

/// A fake GitHub: per build (from the status's `target_url`, which ends in the build
/// id), when its first final state (success, failure, error) arrived.
pub struct Github {
    pub final_at: Mutex<HashMap<String, DateTime<Utc>>>,
    pub requests: AtomicU64,
}

impl Github {
    pub async fn start() -> Result<(Arc<Github>, String)> {
        let g = Arc::new(Github {
            final_at: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        });
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the fake GitHub")?;
        let url = format!("http://{}", l.local_addr()?);
        let app = Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(status))
            .with_state(g.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                eprintln!("[incident] fake GitHub stopped: {e}");
            }
        });
        Ok((g, url))
    }
}

async fn status(
    State(g): State<Arc<Github>>,
    Path((_owner, _repo, _sha)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let now = Utc::now();
    g.requests.fetch_add(1, Ordering::Relaxed);
    let state = body["state"].as_str().unwrap_or_default();
    if matches!(state, "success" | "failure" | "error") {
        if let Some(build) = body["target_url"]
            .as_str()
            .and_then(|u| u.rsplit('/').next())
        {
            g.final_at
                .lock()
                .unwrap()
                .entry(build.to_owned())
                .or_insert(now);
        }
    }
    (StatusCode::CREATED, Json(json!({"id": 1})))
}

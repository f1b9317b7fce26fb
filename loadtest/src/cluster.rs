//! The chaos scenario's Herald: several `herald serve` processes with split roles, each
//! on its own `http.listen` port, that the scenario kills, stops and replaces; and a
//! client that fails over between the `api` processes.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use herald_client::{Client, ClientError, Method, Reply};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One kind of process: its roles, and how many run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Api,
    RelayNotify,
    DispatchMaintenance,
}

impl Kind {
    pub fn roles(self) -> &'static str {
        match self {
            Kind::Api => "api",
            Kind::RelayNotify => "relay,notify",
            Kind::DispatchMaintenance => "dispatch,maintenance",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Api => "api",
            Kind::RelayNotify => "relay-notify",
            Kind::DispatchMaintenance => "dispatch-maint",
        }
    }
}

/// The process layout: two api, two relay+notify, one dispatch+maintenance.
pub const LAYOUT: &[Kind] = &[
    Kind::Api,
    Kind::Api,
    Kind::RelayNotify,
    Kind::RelayNotify,
    Kind::DispatchMaintenance,
];

/// A slot of the layout: the process running in it now, and its port.
pub struct Slot {
    pub kind: Kind,
    pub port: u16,
    pub child: Option<Child>,
    /// Processes started in this slot so far.
    pub generation: u32,
}

pub struct Cluster {
    bin: PathBuf,
    log_dir: PathBuf,
    pub slots: Vec<Slot>,
    /// Processes that exited without being told to (replaced by `watch`).
    pub unexpected_exits: Vec<String>,
}

impl Cluster {
    pub fn new(bin: PathBuf, log_dir: PathBuf, port_base: u16) -> Result<Cluster> {
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let slots = LAYOUT
            .iter()
            .enumerate()
            .map(|(i, k)| Slot {
                kind: *k,
                port: port_base + i as u16,
                child: None,
                generation: 0,
            })
            .collect();
        Ok(Cluster {
            bin,
            log_dir,
            slots,
            unexpected_exits: Vec::new(),
        })
    }

    pub fn api_urls(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.kind == Kind::Api)
            .map(|s| format!("http://127.0.0.1:{}", s.port))
            .collect()
    }

    /// Starts a fresh process in slot `i` (which must be empty).
    pub fn start(&mut self, i: usize) -> Result<()> {
        let bin = self.bin.clone();
        let s = &mut self.slots[i];
        s.generation += 1;
        let log = self
            .log_dir
            .join(format!("{}-{i}-{}.log", s.kind.name(), s.generation));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&bin)
            .args(["serve", "--roles", s.kind.roles()])
            .env("HERALD_HTTP__LISTEN", format!("127.0.0.1:{}", s.port))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        s.child = Some(child);
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            self.start(i)?;
        }
        Ok(())
    }

    /// kill -9, then a fresh process in the same slot.
    pub fn kill9_and_replace(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.slots[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start(i)
    }

    /// SIGTERM; waits up to `limit` for the exit (then SIGKILL). Returns how long the
    /// process took to exit, or None if it had to be killed.
    pub async fn term(&mut self, i: usize, limit: Duration) -> Option<Duration> {
        let mut c = self.slots[i].child.take()?;
        let started = Instant::now();
        let pid = c.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = c.try_wait() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Replaces every process that exited on its own since the last look.
    pub fn watch(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            let exited = match self.slots[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                let s = &self.slots[i];
                self.unexpected_exits.push(format!(
                    "{} (slot {i}, generation {}) exited on its own: {status}",
                    s.kind.name(),
                    s.generation
                ));
                self.slots[i].child = None;
                self.start(i)?;
            }
        }
        Ok(())
    }

    /// SIGTERM to every process, SIGKILL after 30 s.
    pub async fn stop_all(&mut self) {
        for i in 0..self.slots.len() {
            let _ = self.term(i, Duration::from_secs(30)).await;
        }
    }

    /// Lines of the processes' logs that show a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.log_dir) {
            for e in dir.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    for line in text.lines().filter(|l| l.contains("panicked at")) {
                        out.push(format!("{}: {}", e.file_name().to_string_lossy(), line));
                    }
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// 5xx answers and transport errors seen by every client, with their time.
#[derive(Default)]
pub struct HttpLedger {
    pub server_errors: Mutex<Vec<(DateTime<Utc>, String)>>,
    pub transport_errors: AtomicU64,
    pub failovers: AtomicU64,
}

/// A client over every api process: a call that cannot reach one, or gets 502/503
/// from it, goes to the next.
#[derive(Clone)]
pub struct Failover {
    clients: Arc<Vec<Client>>,
    next: Arc<AtomicUsize>,
    pub ledger: Arc<HttpLedger>,
}

impl Failover {
    pub fn new(urls: &[String], ledger: Arc<HttpLedger>) -> Failover {
        Failover {
            clients: Arc::new(urls.iter().map(Client::new).collect()),
            next: Arc::new(AtomicUsize::new(0)),
            ledger,
        }
    }

    pub fn with_token(&self, token: &str) -> Failover {
        Failover {
            clients: Arc::new(self.clients.iter().map(|c| c.with_token(token)).collect()),
            next: Arc::new(AtomicUsize::new(self.next.load(Ordering::Relaxed))),
            ledger: self.ledger.clone(),
        }
    }

    /// One pass over the api processes, starting with the last one that answered.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let n = self.clients.len().max(1);
        let first = self.next.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let r = self.clients[i]
                .call_with_headers(method.clone(), path, body, headers)
                .await;
            match r {
                Ok(reply) if reply.status.is_server_error() => {
                    self.ledger.server_errors.lock().unwrap().push((
                        Utc::now(),
                        format!(
                            "{method} {path} -> {} {}",
                            reply.status.as_u16(),
                            reply.body.to_string().chars().take(160).collect::<String>()
                        ),
                    ));
                    last = Some(Ok(reply));
                }
                Ok(reply) => {
                    self.next.store(i, Ordering::Relaxed);
                    return Ok(reply);
                }
                Err(e) => {
                    self.ledger.transport_errors.fetch_add(1, Ordering::Relaxed);
                    last = Some(Err(e));
                }
            }
            self.ledger.failovers.fetch_add(1, Ordering::Relaxed);
        }
        last.unwrap_or_else(|| {
            Err(ClientError::Status {
                method: method.to_string(),
                path: path.to_owned(),
                status: 0,
                body: "no api process".into(),
            })
        })
    }

    /// Retries `call` until an answer that is not 5xx, or `limit` passes.
    pub async fn call_until(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        let started = Instant::now();
        loop {
            let r = self.call(method.clone(), path, body, headers).await;
            match r {
                Ok(reply) if !reply.status.is_server_error() => return Ok(reply),
                other if started.elapsed() >= limit => return other,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

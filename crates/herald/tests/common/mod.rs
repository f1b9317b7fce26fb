//! Test harness: a fresh database per test, a unique broker prefix per test, the real
//! app on port 0 (or the real binary as a child process), and an event tap on the
//! broker.
#![allow(dead_code)]

use futures::StreamExt;
use herald::app::{self, Running};
use herald::config::Config;
use herald_bus::lapin;
use herald_client::{Client, Method};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub fn admin_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn replica_admin_url() -> String {
    std::env::var("HERALD_TEST_REPLICA_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5433/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn with_db(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) => format!("{}/{db}", &url[..i]),
        None => format!("{url}/{db}"),
    }
}

/// One test's world: its database (on the primary, streamed to the replica), its
/// broker prefix and its admin token.
pub struct TestEnv {
    pub db: String,
    pub primary_url: String,
    pub replica_url: String,
    pub prefix: String,
    pub admin_token: String,
    pub pool: sqlx::PgPool,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let id = Uuid::new_v4().simple().to_string();
        let db = format!("herald_test_{}", &id[..16]);
        let admin = sqlx::PgPool::connect(&admin_url())
            .await
            .expect("connect to the test PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let primary_url = with_db(&admin_url(), &db);
        let env = TestEnv {
            replica_url: with_db(&replica_admin_url(), &db),
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&primary_url)
                .await
                .expect("connect to the test database"),
            primary_url,
            prefix: format!("test_{}", &id[..12]),
            admin_token: format!("admin-{id}"),
            db,
        };
        app::migrate(&env.config(&[])).await.expect("migrate");
        env
    }

    /// `HERALD_*` variables for this environment, plus `extra`.
    pub fn vars(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut v: HashMap<String, String> = [
            ("HERALD_DATABASE__PRIMARY_URL", self.primary_url.as_str()),
            ("HERALD_DATABASE__REPLICA_URL", self.replica_url.as_str()),
            ("HERALD_AMQP__URL", &amqp_url()),
            ("HERALD_AMQP__PREFIX", self.prefix.as_str()),
            ("HERALD_HTTP__LISTEN", "127.0.0.1:0"),
            ("HERALD_AUTH__ADMIN_TOKEN", self.admin_token.as_str()),
            ("HERALD_DISPATCH__BACKSTOP_POLL_S", "1"),
            ("HERALD_RELAY__BACKSTOP_POLL_S", "1"),
            ("HERALD_MAINTENANCE__INTERVAL_S", "0.5"),
            ("HERALD_AGENTS__HEARTBEAT_FLUSH_S", "0.5"),
            ("HERALD_LOG__FILTER", "warn"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, val) in extra {
            v.insert(k.to_string(), val.to_string());
        }
        v
    }

    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        Config::load_from(None, &self.vars(extra)).expect("test config")
    }

    /// The real app, in this process, on port 0.
    pub async fn start(&self, roles: &str, extra: &[(&str, &str)]) -> TestApp {
        let running = app::start(
            self.config(extra),
            app::parse_roles(Some(roles)).expect("roles"),
        )
        .await
        .expect("start app");
        let base = running
            .addr
            .map(|a| format!("http://{a}"))
            .unwrap_or_default();
        let client = Client::new(&base);
        TestApp {
            admin: client.with_token(&self.admin_token),
            client,
            running: Some(running),
        }
    }

    /// The real binary, as a child process.
    pub fn spawn(&self, roles: &str, extra: &[(&str, &str)]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--roles", roles])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.vars(extra))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn herald")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count query")
    }

    /// Drops the database and the broker objects of this test.
    pub async fn cleanup(self) {
        self.pool.close().await;
        if let Ok(admin) = sqlx::PgPool::connect(&admin_url()).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
                .execute(&admin)
                .await;
        }
        let cfg = herald_bus::BusConfig::new(amqp_url(), self.prefix.clone());
        if let Ok(conn) = herald_bus::connect(&cfg).await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = herald_bus::delete_topology(&ch, &cfg.names(), &[]).await;
            }
            let _ = conn.close(0, "test done").await;
        }
    }
}

pub struct TestApp {
    pub client: Client,
    pub admin: Client,
    running: Option<Running>,
}

impl TestApp {
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// An org with a pipeline `web`: (org API client, agent registration client).
pub async fn org(app: &TestApp, slug: &str) -> (Client, Client) {
    let org = app.admin.create_org(slug).await.expect("create org");
    let api = app
        .client
        .with_token(org["api_token"].as_str().expect("api_token"));
    let reg = app
        .client
        .with_token(org["agent_token"].as_str().expect("agent_token"));
    api.create_pipeline("web", &format!("{slug}/web"))
        .await
        .expect("create pipeline");
    (api, reg)
}

pub async fn agent(app: &TestApp, reg: &Client, name: &str) -> (Client, Uuid) {
    let a = reg
        .register_agent(name, &["default"])
        .await
        .expect("register agent");
    (app.client.with_token(a.access_token), a.id)
}

pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

pub fn build_body(jobs: Value) -> Value {
    json!({"commit": SHA, "branch": "main", "jobs": jobs})
}

/// Polls until `f` returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn build_state(api: &Client, id: &str) -> Value {
    api.get_build(id).await.expect("get build")
}

pub async fn wait_build_state(api: &Client, id: &str, state: &str, timeout: Duration) -> Value {
    eventually(timeout, &format!("build {id} to be {state}"), || async {
        let b = build_state(api, id).await;
        (b["state"] == state).then_some(b)
    })
    .await
}

pub fn job_id(build: &Value, key: &str) -> Uuid {
    build["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["key"] == key))
        .and_then(|j| j["id"].as_str())
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("no job {key} in {build}"))
}

pub async fn call(c: &Client, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = c
        .call(method, path, body.as_ref())
        .await
        .expect("http call");
    (r.status.as_u16(), r.body)
}

/// A tap on `{prefix}.events`: an exclusive queue bound to `#`.
pub struct EventTap {
    pub events: Arc<Mutex<Vec<(String, String, Value)>>>,
    conn: lapin::Connection,
}

impl EventTap {
    pub async fn new(prefix: &str) -> EventTap {
        let cfg = herald_bus::BusConfig::new(amqp_url(), prefix.to_owned());
        let conn = herald_bus::connect(&cfg).await.expect("tap connect");
        let ch = conn.create_channel().await.expect("tap channel");
        herald_bus::declare_topology(&ch, &cfg.names())
            .await
            .expect("tap topology");
        let q = ch
            .queue_declare(
                "",
                lapin::options::QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("tap queue");
        ch.queue_bind(
            q.name().as_str(),
            &cfg.names().events_exchange(),
            "#",
            Default::default(),
            Default::default(),
        )
        .await
        .expect("tap bind");
        let mut consumer = ch
            .basic_consume(
                q.name().as_str(),
                "tap",
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("tap consume");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                if let Ok(mut e) = sink.lock() {
                    e.push((id, d.routing_key.to_string(), body));
                }
            }
        });
        EventTap { events, conn }
    }

    pub fn snapshot(&self) -> Vec<(String, String, Value)> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub async fn close(self) {
        let _ = self.conn.close(0, "tap done").await;
    }
}

pub fn kill9(child: &mut Child) {
    // SIGKILL: no chance to release anything; the database must notice on its own.
    let _ = child.kill();
    let _ = child.wait();
}

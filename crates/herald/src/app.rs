//! Roles, switched on in one binary. Each role gets its own database pool; shutdown is
//! driven by one `CancellationToken`: stop taking work, finish or hand back what is in
//! flight, then exit.

use crate::config::Config;
use anyhow::{bail, Context};
use herald_api::{ApiSettings, AppState, Probe};
use herald_bus::{BusConfig, Publisher};
use herald_dispatch::maintenance::SweepSettings;
use herald_storage::{connect_pool, PoolSettings, ReadRouter};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Api,
    Relay,
    Dispatch,
    Notify,
    Maintenance,
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Role> {
        Ok(match s.trim() {
            "api" => Role::Api,
            "relay" => Role::Relay,
            "dispatch" => Role::Dispatch,
            "notify" => Role::Notify,
            "maintenance" => Role::Maintenance,
            other => {
                bail!("unknown role `{other}`; roles are api, relay, dispatch, notify, maintenance")
            }
        })
    }
}

pub fn parse_roles(s: Option<&str>) -> anyhow::Result<BTreeSet<Role>> {
    match s {
        None => Ok(all_roles()),
        Some(s) => s
            .split(',')
            .filter(|r| !r.trim().is_empty())
            .map(Role::from_str)
            .collect(),
    }
}

pub fn all_roles() -> BTreeSet<Role> {
    [
        Role::Api,
        Role::Relay,
        Role::Dispatch,
        Role::Notify,
        Role::Maintenance,
    ]
    .into()
}

/// A running Herald: where the API listens, and how to stop it.
pub struct Running {
    pub addr: Option<SocketAddr>,
    pub cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Cancels every role and waits for them to finish their in-flight work.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.wait().await;
    }

    pub async fn wait(self) {
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(Duration::from_secs(45), all)
            .await
            .is_err()
        {
            tracing::warn!("some roles did not stop within 45 s");
        }
    }
}

fn pool(
    cfg: &Config,
    url: &str,
    max: u32,
    name: &str,
    read_only: bool,
) -> anyhow::Result<sqlx::PgPool> {
    connect_pool(&PoolSettings {
        url: url.to_owned(),
        max_connections: max,
        acquire_timeout: Duration::from_millis(cfg.database.acquire_timeout_ms),
        application_name: name.to_owned(),
        read_only,
    })
    .with_context(|| format!("invalid database URL for the {name} pool"))
}

pub async fn migrate(cfg: &Config) -> anyhow::Result<()> {
    let pool = pool(cfg, &cfg.database.primary_url, 2, "herald-migrate", false)?;
    herald_storage::migrate(&pool)
        .await
        .context("migrating the primary")?;
    pool.close().await;
    Ok(())
}

/// Starts the roles and returns once the API (if any) is listening.
pub async fn start(cfg: Config, roles: BTreeSet<Role>) -> anyhow::Result<Running> {
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut addr = None;
    let bus = BusConfig::new(cfg.amqp.url.clone(), cfg.amqp.prefix.clone());
    // One per process: the roles here hear each other's wake-ups in memory.
    let local = herald_storage::LocalWakes::default();

    if roles.contains(&Role::Api) {
        let Some(admin) = cfg.auth.admin_token.clone().filter(|t| !t.is_empty()) else {
            bail!("auth.admin_token is not set (HERALD_AUTH__ADMIN_TOKEN); refusing to start the API without an operator token");
        };
        let primary = pool(
            &cfg,
            &cfg.database.primary_url,
            cfg.database.api_pool_max,
            "herald-api",
            false,
        )?;
        let replica = match &cfg.database.replica_url {
            Some(url) => Some(pool(
                &cfg,
                url,
                cfg.database.replica_pool_max,
                "herald-api-replica",
                true,
            )?),
            None => None,
        };
        let router = ReadRouter::new(primary, replica);
        let probe_publisher = Arc::new(Publisher::lazy(bus.clone()));
        let probe_for_close = probe_publisher.clone();
        let broker: Probe = Arc::new(move || {
            let p = probe_publisher.clone();
            Box::pin(async move { p.ensure_connected().await.map_err(|e| e.to_string()) })
        });
        let queues_publisher = Arc::new(Publisher::lazy(bus.clone()));
        let queues_publisher_for_close = queues_publisher.clone();
        let mut state = AppState::new(
            router,
            ApiSettings {
                admin_token: Some(admin),
                allow_private_networks: cfg.webhooks.allow_private_networks,
                heartbeat_interval_s: cfg.agents.heartbeat_interval_s,
                ping_wait_max_s: cfg.agents.ping_wait_max_s,
                default_job_timeout_s: cfg.jobs.default_timeout_s,
                heartbeat_flush: Duration::from_secs_f64(cfg.agents.heartbeat_flush_s),
                // A tenth of the time to loss, at most 10 s: a lost-agent sweep never
                // mistakes a live agent for a lost one because of it.
                heartbeat_min_advance: Duration::from_secs_f64(
                    (cfg.agents.lost_after_s / 10.0).min(10.0),
                ),
            },
            crate::telemetry::metrics(),
            vec![("broker", broker)],
        );
        let names = bus.names();
        let queue_names = vec![
            names.dispatch_queue(),
            names.notify_queue(),
            names.delivery_queue("webhook"),
            names.delivery_queue("github_commit_status"),
            names.dead_letter_queue(),
        ];
        state.broker_queues = Some(Arc::new(move || {
            let p = queues_publisher.clone();
            let queue_names = queue_names.clone();
            Box::pin(async move {
                let mut out = Vec::new();
                for q in queue_names {
                    let depth = p.queue_depth(&q).await.ok().map(|(messages, _)| messages);
                    out.push(serde_json::json!({"name": q, "depth": depth, "oldest_age_s": null}));
                }
                out
            })
        }));
        state.local = local.clone();
        tasks.extend(state.spawn_background(&cancel));
        // Close the broker connections before the runtime goes: left open, their I/O
        // threads log errors at exit.
        let c = cancel.clone();
        let closing = [probe_for_close, queues_publisher_for_close];
        tasks.push(tokio::spawn(async move {
            c.cancelled().await;
            for p in closing {
                p.close().await;
            }
        }));
        let listen = cfg.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        addr = Some(listener.local_addr()?);
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = herald_api::serve(listener, state, c).await {
                tracing::error!(error = %e, "API server failed");
            }
        }));
        tracing::info!(addr = %addr.map(|a| a.to_string()).unwrap_or_default(), "API listening");
    }

    if roles.contains(&Role::Relay) {
        let pool = pool(
            &cfg,
            &cfg.database.primary_url,
            cfg.database.relay_pool_max,
            "herald-relay",
            false,
        )?;
        let publisher = Arc::new(Publisher::lazy(bus.clone()));
        let relay = tokio::spawn(herald_relay::run(
            cfg.database.primary_url.clone(),
            pool,
            publisher.clone(),
            cfg.relay.clone(),
            local.clone(),
            cancel.clone(),
        ));
        tasks.push(tokio::spawn(async move {
            let _ = relay.await;
            publisher.close().await;
        }));
    }

    if roles.contains(&Role::Dispatch) {
        let pool = pool(
            &cfg,
            &cfg.database.primary_url,
            cfg.database.dispatch_pool_max,
            "herald-dispatch",
            false,
        )?;
        let (waker, sender) =
            herald_storage::Waker::spawn(pool.clone(), local.clone(), cancel.clone());
        tasks.push(sender);
        tasks.push(tokio::spawn(herald_dispatch::dispatcher::run(
            pool.clone(),
            waker.clone(),
            cfg.dispatch.clone(),
            cancel.clone(),
        )));
        let spec = herald_dispatch::propagation::spec(
            bus.names().dispatch_queue(),
            cfg.dispatch.propagation_prefetch,
            cfg.dispatch.propagation_concurrency,
        );
        let c = cancel.clone();
        let b = bus.clone();
        tasks.push(tokio::spawn(async move {
            let handler =
                move |msg| herald_dispatch::propagation::handle(pool.clone(), waker.clone(), msg);
            if let Err(e) = herald_bus::run_consumer(b, spec, c, handler).await {
                tracing::error!(error = %e, "propagation consumer failed");
            }
        }));
    }

    if roles.contains(&Role::Notify) {
        // Its own pool, capped below dispatch's: notifications can never take
        // dispatch's connections.
        let pool = pool(
            &cfg,
            &cfg.database.primary_url,
            cfg.database.notify_pool_max,
            "herald-notify",
            false,
        )?;
        let dispatch_health: Option<herald_notify::DispatchHealth> =
            roles.contains(&Role::Dispatch).then(|| {
                Arc::new(herald_dispatch::dispatcher::health::recent)
                    as herald_notify::DispatchHealth
            });
        let role = herald_notify::NotifyRole {
            pool,
            primary_url: cfg.database.primary_url.clone(),
            bus: bus.clone(),
            settings: cfg.notify.clone(),
            allow_private_networks: cfg.webhooks.allow_private_networks,
            dispatch_health,
            local: local.clone(),
        };
        if role.settings.worker_threads == 0 {
            // On this process's runtime, with everything else.
            tasks.extend(herald_notify::start(role, cancel.clone()).await?);
        } else {
            tasks.push(start_notify_runtime(role, cancel.clone()).await?);
        }
    }

    if roles.contains(&Role::Maintenance) {
        tasks.push(tokio::spawn(herald_dispatch::maintenance::run(
            cfg.database.primary_url.clone(),
            SweepSettings {
                maintenance: cfg.maintenance.clone(),
                dispatch: cfg.dispatch.clone(),
                lost_after_s: cfg.agents.lost_after_s,
                jobs: cfg.jobs.clone(),
            },
            cancel.clone(),
        )));
    }

    Ok(Running {
        addr,
        cancel,
        tasks,
    })
}

/// Runs the notify role on a tokio runtime of its own, in threads that run at CPU
/// niceness `notify.nice`: notification work never waits in the same run queue as
/// dispatch's and the API's tasks, and when the machine is busy the kernel runs those
/// first. Resolves once the role has started; the returned task ends when it stopped.
async fn start_notify_runtime(
    role: herald_notify::NotifyRole,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (threads, nice) = (role.settings.worker_threads.max(1), role.settings.nice);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("herald-notify".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("herald-notify-rt")
                .on_thread_start(move || lower_priority(nice))
                .enable_all()
                .build();
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("notify runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                match herald_notify::start(role, cancel).await {
                    Ok(tasks) => {
                        let _ = ready_tx.send(Ok(()));
                        futures::future::join_all(tasks).await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("the notify runtime stopped while starting"))??;
    Ok(tokio::spawn(async move {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }))
}

/// Raises the calling thread's niceness (Linux: per thread). Best effort: a thread that
/// keeps its priority still works.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: plain system calls on the calling thread's own id.
        let r = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if r != 0 {
            tracing::debug!("cannot lower the notify thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

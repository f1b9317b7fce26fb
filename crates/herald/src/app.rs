//! Roles, switched on in one binary. Each role gets its own database pool; shutdown is
//! driven by one `CancellationToken`: stop taking work, finish or hand back what is in
//! flight, then exit.

use crate::config::Config;
use anyhow::{bail, Context};
use herald_api::readiness::{database_probe, Health, Liveness};
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

/// How long a stop waits for the roles' in-flight work.
pub const STOP_WITHIN: Duration = Duration::from_secs(25);

/// A running Herald: where it listens, and how to stop it.
pub struct Running {
    /// Always set: every process listens (see [`start`]).
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
        // Within the 30 s an orchestrator grants between SIGTERM and SIGKILL; what is
        // not done by then is handed back by the database and broker (leases, unacked
        // messages), not lost.
        if tokio::time::timeout(STOP_WITHIN, all).await.is_err() {
            tracing::warn!("some roles did not stop within {} s", STOP_WITHIN.as_secs());
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

/// Starts the roles and returns once the process listens on `http.listen` (every
/// process does: health, readiness and metrics; the API too with the `api` role).
pub async fn start(cfg: Config, roles: BTreeSet<Role>) -> anyhow::Result<Running> {
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let bus = BusConfig::new(cfg.amqp.url.clone(), cfg.amqp.prefix.clone());
    // One per process: the roles here hear each other's wake-ups in memory.
    let local = herald_storage::LocalWakes::default();
    let health = health(&cfg, &roles, &bus, &cancel, &mut tasks)?;
    let liveness = health.liveness.clone();
    // Every process listens, whatever its roles: health, readiness and metrics.
    let listen = cfg.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let mut listener = Some(listener);

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
        let queues_publisher = Arc::new(Publisher::lazy(bus.clone()));
        let queues_publisher_for_close = queues_publisher.clone();
        let mut state = AppState::new(
            router,
            ApiSettings {
                admin_token: Some(admin),
                allow_private_networks: cfg.webhooks.allow_private_networks,
                history_retention_s: cfg.notify.history_retention_s,
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
            health.clone(),
        );
        let names = bus.names();
        let queue_names = vec![
            names.dispatch_queue(),
            names.notify_queue(),
            names.commit_status_queue(),
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
        for task in state.spawn_background(&cancel) {
            tasks.push(liveness.watch("role:api", task));
        }
        // Close the broker connection before the runtime goes: left open, its I/O
        // threads log errors at exit.
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            c.cancelled().await;
            queues_publisher_for_close.close().await;
        }));
        if let Some(listener) = listener.take() {
            let c = cancel.clone();
            let server = tokio::spawn(async move {
                if let Err(e) = herald_api::serve(listener, state, c).await {
                    tracing::error!(error = %e, "API server failed");
                }
            });
            tasks.push(liveness.watch("role:api", server));
            tracing::info!(%addr, "API listening");
        }
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
        tasks.push(liveness.watch(
            "role:relay",
            tokio::spawn(async move {
                let _ = relay.await;
                publisher.close().await;
            }),
        ));
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
        tasks.push(liveness.watch(
            "role:dispatch",
            tokio::spawn(herald_dispatch::dispatcher::run(
                pool.clone(),
                waker.clone(),
                cfg.dispatch.clone(),
                cancel.clone(),
            )),
        ));
        let spec = herald_dispatch::propagation::spec(
            bus.names().dispatch_queue(),
            cfg.dispatch.propagation_prefetch,
            cfg.dispatch.propagation_concurrency,
        );
        let c = cancel.clone();
        let b = bus.clone();
        tasks.push(liveness.watch(
            "role:dispatch",
            tokio::spawn(async move {
                let handler = move |msg: herald_bus::Incoming| {
                    use tracing::Instrument;
                    // The events propagation writes (build.running, build.finished)
                    // join the trace of the event that moved the build.
                    let span = herald_trace::span(|| {
                        tracing::info_span!("propagate", otel.kind = "consumer",
                            event.r#type = %msg.routing_key)
                    });
                    herald_trace::set_parent(&span, herald_trace::from_headers(&msg.headers));
                    herald_dispatch::propagation::handle(pool.clone(), waker.clone(), msg)
                        .instrument(span)
                };
                if let Err(e) = herald_bus::run_consumer(b, spec, c, handler).await {
                    tracing::error!(error = %e, "propagation consumer failed");
                }
            }),
        ));
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
            disable: herald_notify::deliver::DisablePolicy::new(
                cfg.webhooks.disable_after_s,
                cfg.webhooks.disable_min_failures,
            ),
            dispatch_health,
            local: local.clone(),
        };
        if role.settings.worker_threads == 0 {
            // On this process's runtime, with everything else.
            for task in herald_notify::start(role, cancel.clone()).await? {
                tasks.push(liveness.watch("role:notify", task));
            }
        } else {
            let task = start_notify_runtime(role, cancel.clone()).await?;
            tasks.push(liveness.watch("role:notify", task));
        }
    }

    if roles.contains(&Role::Maintenance) {
        tasks.push(liveness.watch(
            "role:maintenance",
            tokio::spawn(herald_dispatch::maintenance::run(
                cfg.database.primary_url.clone(),
                SweepSettings {
                    maintenance: cfg.maintenance.clone(),
                    dispatch: cfg.dispatch.clone(),
                    lost_after_s: cfg.agents.lost_after_s,
                    jobs: cfg.jobs.clone(),
                },
                cancel.clone(),
            )),
        ));
    }

    if let Some(listener) = listener.take() {
        // No `api` role: health, readiness and metrics only.
        let router = herald_api::health_only(health);
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = herald_api::serve_router(listener, router, c).await {
                tracing::error!(error = %e, "health server failed");
            }
        }));
        tracing::info!(%addr, "health endpoints listening");
    }

    Ok(Running {
        addr: Some(addr),
        cancel,
        tasks,
    })
}

/// What `/readyz` checks in this process: the primary (every role writes to it), the
/// replica (the API reads from it, when configured; reported, but a replica that is down
/// leaves the process ready, as reads fall back to the primary), the broker (every role but
/// maintenance uses it), and each role's loops (registered as the roles start).
fn health(
    cfg: &Config,
    roles: &BTreeSet<Role>,
    bus: &BusConfig,
    cancel: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Health> {
    let mut probes: Vec<(String, Probe)> = Vec::new();
    let mut optional: Vec<(String, Probe)> = Vec::new();
    let primary = pool(cfg, &cfg.database.primary_url, 1, "herald-health", false)?;
    probes.push(("database:primary".into(), database_probe(primary)));
    if roles.contains(&Role::Api) {
        if let Some(url) = &cfg.database.replica_url {
            let replica = pool(cfg, url, 1, "herald-health-replica", true)?;
            // Reported, not required: reads fall back to the primary without it.
            optional.push(("database:replica".into(), database_probe(replica)));
        }
    }
    let needs_broker = roles
        .iter()
        .any(|r| matches!(r, Role::Api | Role::Relay | Role::Dispatch | Role::Notify));
    if needs_broker {
        let publisher = Arc::new(Publisher::lazy(bus.clone()));
        let p = publisher.clone();
        let broker: Probe = Arc::new(move || {
            let p = p.clone();
            Box::pin(async move { p.ensure_connected().await.map_err(|e| e.to_string()) })
        });
        probes.push(("broker".into(), broker));
        // Closed before the runtime goes: left open, its I/O threads log errors.
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            c.cancelled().await;
            publisher.close().await;
        }));
    }
    Ok(Health {
        probes,
        optional,
        liveness: Liveness::default(),
        metrics: crate::telemetry::metrics(),
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

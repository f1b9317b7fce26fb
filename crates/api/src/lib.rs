//! Herald's HTTP API: the operator, org and agent endpoints of the contract, health,
//! metrics and the OpenAPI description.
//!
//! Owns request validation, authentication and the mapping of errors to statuses.
//! Must not run slow work inline: a request changes rows in one short transaction (its
//! events ride along in the outbox) and returns. It never talks to RabbitMQ, and never
//! to a webhook receiver.

pub mod cache;
pub mod error;
pub mod extract;
pub mod heartbeat;
pub mod openapi;
pub mod ops_page;
pub mod parked;
mod routes;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use cache::TokenCache;
use heartbeat::Heartbeats;
use herald_storage::{LocalWakes, ReadRouter, Waker};
use metrics_exporter_prometheus::PrometheusHandle;
use parked::Parked;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub admin_token: Option<String>,
    pub allow_private_networks: bool,
    pub heartbeat_interval_s: u64,
    pub ping_wait_max_s: u64,
    pub heartbeat_flush: Duration,
    /// A heartbeat is written only when it moves the stored one forward by this much:
    /// agents that ping all the time do not rewrite their row at every flush.
    pub heartbeat_min_advance: Duration,
}

/// A readiness check of something outside the process (the broker, say).
pub type Probe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Depths of the broker's queues, for `GET /v1/ops/queues`.
pub type BrokerQueues =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<serde_json::Value>> + Send>> + Send + Sync>;

#[derive(Clone)]
pub struct AppState {
    pub router: ReadRouter,
    pub admin_token: Option<String>,
    pub settings: Arc<ApiSettings>,
    pub cache: Arc<TokenCache>,
    pub parked: Arc<Parked>,
    pub heartbeats: Arc<Heartbeats>,
    pub metrics: Option<PrometheusHandle>,
    pub probes: Arc<Vec<(&'static str, Probe)>>,
    pub broker_queues: Option<BrokerQueues>,
    /// Post-commit wake-ups (see `herald_storage::wake`); set by `spawn_background`.
    pub waker: Arc<OnceLock<Waker>>,
    /// This process's in-memory wake-ups; share one with the other roles.
    pub local: LocalWakes,
}

impl AppState {
    pub fn new(
        router: ReadRouter,
        settings: ApiSettings,
        metrics: Option<PrometheusHandle>,
        probes: Vec<(&'static str, Probe)>,
    ) -> Self {
        AppState {
            router,
            admin_token: settings.admin_token.clone(),
            settings: Arc::new(settings),
            cache: Arc::default(),
            parked: Arc::default(),
            heartbeats: Arc::default(),
            metrics,
            probes: Arc::new(probes),
            broker_queues: None,
            waker: Arc::default(),
            local: LocalWakes::default(),
        }
    }

    /// Wakes the listeners of `channels` after a commit on the hot path.
    pub fn wake(&self, channels: &[&'static str]) {
        if let Some(w) = self.waker.get() {
            for c in channels {
                w.wake(c);
            }
        }
    }

    /// Background work the API needs: the assignment listener and the heartbeat flusher.
    pub fn spawn_background(&self, cancel: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        let pool = self.router.primary().clone();
        let listener = tokio::spawn(parked::listen(
            pool.clone(),
            self.local.clone(),
            self.parked.clone(),
            self.cache.clone(),
            cancel.clone(),
        ));
        let heartbeats = self.heartbeats.clone();
        let every = self.settings.heartbeat_flush;
        let min_advance = self.settings.heartbeat_min_advance;
        let cancel = cancel.clone();
        let (waker, sender) = Waker::spawn(pool.clone(), self.local.clone(), cancel.clone());
        // Only the first call's waker is kept; a second one would only send duplicates.
        let _ = self.waker.set(waker);
        let flusher =
            tokio::spawn(async move { heartbeats.run(pool, every, min_advance, cancel).await });
        vec![listener, flusher, sender]
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(routes::health::openapi))
        .route("/v1/orgs", post(routes::orgs::create_org))
        .route("/v1/pipelines", post(routes::orgs::create_pipeline))
        .route("/v1/pipelines/{slug}", get(routes::orgs::get_pipeline))
        .route("/v1/pipelines/{slug}/builds", post(routes::builds::create))
        .route("/v1/builds", get(routes::builds::list))
        .route("/v1/builds/{id}", get(routes::builds::get))
        .route("/v1/builds/{id}/cancel", post(routes::builds::cancel))
        .route(
            "/v1/pipelines/{slug}/github",
            put(routes::webhooks::put_github),
        )
        .route(
            "/v1/webhooks",
            post(routes::webhooks::create).get(routes::webhooks::list),
        )
        .route(
            "/v1/webhooks/{id}",
            get(routes::webhooks::get).delete(routes::webhooks::delete),
        )
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(routes::webhooks::deliveries),
        )
        .route(
            "/v1/deliveries/{id}/redeliver",
            post(routes::webhooks::redeliver),
        )
        .route("/v1/ops/notification-types", get(routes::ops::list_types))
        .route(
            "/v1/ops/notification-types/{type}",
            put(routes::ops::put_type),
        )
        .route("/v1/ops/queues", get(routes::ops::queues))
        .route("/v1/ops/overview", get(routes::overview::overview))
        .route("/ops", get(ops_page::page))
        .route("/v1/ops/dead-letters/replay", post(routes::ops::replay))
        .route("/v1/agents/register", post(routes::agents::register))
        .route("/v1/agent/ping", post(routes::agents::ping))
        .route("/v1/agent/heartbeat", post(routes::agents::heartbeat))
        .route("/v1/agent/disconnect", post(routes::agents::disconnect))
        .route("/v1/jobs/{id}/accept", put(routes::agents::accept))
        .route("/v1/jobs/{id}/start", put(routes::agents::start))
        .route("/v1/jobs/{id}/finish", put(routes::agents::finish))
        .fallback(routes::health::not_found)
        .method_not_allowed_fallback(routes::health::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(routes::health::track))
        .with_state(state)
}

/// Serves until `cancel` fires, then stops accepting and lets in-flight requests end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

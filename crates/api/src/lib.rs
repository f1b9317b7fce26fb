//! Herald's HTTP API: the operator, org and agent endpoints of the contract, health,
//! metrics and the OpenAPI description.
//!
//! Owns request validation, authentication and the mapping of errors to statuses.
//! Must not run slow work inline: a request changes rows in one short transaction (its
//! events ride along in the outbox) and returns. It never talks to RabbitMQ, and never
//! to a webhook receiver.

pub mod cache;
pub mod error;
pub mod event_types;
pub mod extract;
pub mod heartbeat;
pub mod idempotency;
pub mod json_errors;
pub mod openapi;
pub mod ops_page;
pub mod parked;
pub mod readiness;
mod routes;
pub mod stops;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use cache::TokenCache;
use heartbeat::Heartbeats;
use herald_storage::{LocalWakes, ReadRouter, Waker};
use metrics_exporter_prometheus::PrometheusHandle;
use parked::Parked;
use readiness::Health;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

/// The largest request body. A build of 500 jobs at the domain's limits (64 KiB command
/// and 32 KiB env each, plus keys, labels and dependencies) is about 49 MB of JSON;
/// 64 MiB leaves room for escaping. Larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub admin_token: Option<String>,
    pub allow_private_networks: bool,
    /// How long delivery history is kept (`notify.history_retention_s`): a recover
    /// cannot reach further back.
    pub history_retention_s: f64,
    pub heartbeat_interval_s: u64,
    pub ping_wait_max_s: u64,
    /// `jobs.default_timeout_s`: `timeout_s` of a job whose spec names none.
    pub default_job_timeout_s: i32,
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
    /// The heartbeat's cancel lists.
    pub stops: Arc<stops::Stops>,
    pub metrics: Option<PrometheusHandle>,
    /// `/readyz`'s probes and loops, and `/metrics`.
    pub health: Arc<Health>,
    pub broker_queues: Option<BrokerQueues>,
    /// Post-commit wake-ups (see `herald_storage::wake`); set by `spawn_background`.
    pub waker: Arc<OnceLock<Waker>>,
    /// This process's in-memory wake-ups; share one with the other roles.
    pub local: LocalWakes,
    /// Fires when the process stops (set up by `spawn_background`): parked pings
    /// answer 204 at once instead of holding the shutdown for up to `wait` seconds.
    pub stopping: CancellationToken,
}

impl AppState {
    pub fn new(
        router: ReadRouter,
        settings: ApiSettings,
        metrics: Option<PrometheusHandle>,
        health: Health,
    ) -> Self {
        AppState {
            router,
            admin_token: settings.admin_token.clone(),
            settings: Arc::new(settings),
            cache: Arc::default(),
            parked: Arc::default(),
            heartbeats: Arc::default(),
            stops: Arc::default(),
            metrics,
            health: Arc::new(health),
            broker_queues: None,
            waker: Arc::default(),
            local: LocalWakes::default(),
            stopping: CancellationToken::new(),
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
            self.stops.clone(),
            cancel.clone(),
        ));
        let heartbeats = self.heartbeats.clone();
        let every = self.settings.heartbeat_flush;
        let min_advance = self.settings.heartbeat_min_advance;
        let stop_token = cancel.clone();
        let cancel = cancel.clone();
        let (waker, sender) = Waker::spawn(pool.clone(), self.local.clone(), cancel.clone());
        // Only the first call's waker is kept; a second one would only send duplicates.
        let _ = self.waker.set(waker);
        let flusher =
            tokio::spawn(async move { heartbeats.run(pool, every, min_advance, cancel).await });
        let stopping = self.stopping.clone();
        let cancelled = stop_token;
        let stop = tokio::spawn(async move {
            cancelled.cancelled().await;
            stopping.cancel();
        });
        vec![listener, flusher, sender, stop]
    }
}

/// The routes of the API. Each handler carries its method and path in its
/// `#[utoipa::path]`, and `routes!` registers it from there, so the router and the
/// paths of `/openapi.json` come from one table: a routed endpoint cannot be missing
/// from the description. Only `routes!` belongs here, never a plain `route`.
fn api_routes() -> OpenApiRouter<AppState> {
    use routes::{agents, builds, health, jobs, ops, orgs, overview, webhook_controls, webhooks};
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(health::openapi))
        .routes(utoipa_axum::routes!(orgs::create_org))
        .routes(utoipa_axum::routes!(orgs::create_pipeline))
        .routes(utoipa_axum::routes!(orgs::get_pipeline))
        .routes(utoipa_axum::routes!(builds::create))
        .routes(utoipa_axum::routes!(jobs::get))
        .routes(utoipa_axum::routes!(jobs::retry))
        .routes(utoipa_axum::routes!(builds::list))
        .routes(utoipa_axum::routes!(builds::get))
        .routes(utoipa_axum::routes!(builds::cancel))
        .routes(utoipa_axum::routes!(webhooks::put_github))
        .routes(utoipa_axum::routes!(
            idempotency::create_webhook,
            webhooks::list
        ))
        .routes(utoipa_axum::routes!(
            webhooks::get,
            webhooks::delete,
            webhook_controls::patch
        ))
        .routes(utoipa_axum::routes!(webhook_controls::deliveries))
        .routes(utoipa_axum::routes!(webhook_controls::rotate_secret))
        .routes(utoipa_axum::routes!(webhook_controls::recover))
        .routes(utoipa_axum::routes!(webhook_controls::get_delivery))
        .routes(utoipa_axum::routes!(webhook_controls::event_types))
        .routes(utoipa_axum::routes!(webhooks::redeliver))
        .routes(utoipa_axum::routes!(ops::list_types))
        .routes(utoipa_axum::routes!(ops::put_type))
        .routes(utoipa_axum::routes!(ops::queues))
        .routes(utoipa_axum::routes!(overview::overview))
        .routes(utoipa_axum::routes!(ops_page::page))
        .routes(utoipa_axum::routes!(ops::replay))
        .routes(utoipa_axum::routes!(agents::register))
        .routes(utoipa_axum::routes!(agents::ping))
        .routes(utoipa_axum::routes!(agents::heartbeat))
        .routes(utoipa_axum::routes!(agents::disconnect))
        .routes(utoipa_axum::routes!(agents::accept))
        .routes(utoipa_axum::routes!(agents::start))
        .routes(utoipa_axum::routes!(agents::finish))
}

/// The paths and operations the router serves (API and health), as `utoipa` records
/// them from the handlers' `#[utoipa::path]`: what `/openapi.json` is built on.
pub fn routed_operations() -> utoipa::openapi::OpenApi {
    let (_, mut api) = api_routes().split_for_parts();
    let (_, health) = health_routes().split_for_parts();
    api.merge(health);
    api
}

/// Every path the API routes (health endpoints aside), as the server routes them.
pub fn route_paths() -> Vec<String> {
    let (_, api) = api_routes().split_for_parts();
    api.paths.paths.into_keys().collect()
}

/// The most jobs of a build (the contract's 500).
pub const MAX_JOBS: usize = herald_domain::MAX_JOBS_PER_BUILD;

/// The paths every process serves, whatever its roles.
pub const HEALTH_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

fn health_routes() -> OpenApiRouter<Arc<Health>> {
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(routes::health::healthz))
        .routes(utoipa_axum::routes!(routes::health::readyz))
        .routes(utoipa_axum::routes!(routes::health::metrics))
}

/// What every router ends with: the JSON 404 and 405, the body limit, the JSON error
/// body on anything the framework answers, a caught panic as a JSON 500, and metrics.
fn finish(router: Router) -> Router {
    router
        .fallback(routes::health::not_found)
        .method_not_allowed_fallback(routes::health::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(json_errors::rewrite))
        .layer(axum::middleware::from_fn(routes::health::track))
        .layer(axum::middleware::from_fn(trace_request))
}

/// With traces on, each request runs in a span of its own (a child of the caller's
/// `traceparent`, if it sent one), so the events it writes carry the request's trace.
async fn trace_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    if !herald_trace::enabled() {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!("request", otel.name = %format!("{method} {route}"),
        otel.kind = "server", http.request.method = %method, http.route = %route,
        http.response.status_code = tracing::field::Empty);
    let parent = req
        .headers()
        .get(herald_trace::HEADER)
        .and_then(|v| v.to_str().ok());
    herald_trace::set_parent(&span, parent);
    let res = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", res.status().as_u16());
    res
}

/// The whole API, with the health endpoints.
pub fn app(state: AppState) -> Router {
    let health = state.health.clone();
    finish(
        Router::from(api_routes())
            .with_state(state)
            .merge(Router::from(health_routes()).with_state(health)),
    )
}

/// A process without the `api` role: health endpoints only, 404 for everything else.
pub fn health_only(health: Health) -> Router {
    finish(Router::from(health_routes()).with_state(Arc::new(health)))
}

/// Serves until `cancel` fires, then stops accepting and lets in-flight requests end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    serve_router(listener, app(state), cancel).await
}

/// Serves `router` until `cancel` fires, then lets in-flight requests end.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

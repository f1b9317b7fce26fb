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
use axum::routing::{get, post, put, MethodRouter};
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

/// The routes of the API, recorded as they are added: `route_paths` and the OpenAPI
/// test read the same table the server routes with, so they cannot drift apart.
pub struct RouteTable<S> {
    router: Router<S>,
    paths: Vec<&'static str>,
}

impl<S: Clone + Send + Sync + 'static> RouteTable<S> {
    fn new() -> Self {
        RouteTable {
            router: Router::new(),
            paths: Vec::new(),
        }
    }

    /// As `Router::route`, and records `path`.
    pub fn route(mut self, path: &'static str, methods: MethodRouter<S>) -> Self {
        if !self.paths.contains(&path) {
            self.paths.push(path);
        }
        self.router = self.router.route(path, methods);
        self
    }
}

fn api_routes() -> RouteTable<AppState> {
    RouteTable::new()
        .route("/openapi.json", get(routes::health::openapi))
        .route("/v1/orgs", post(routes::orgs::create_org))
        .route("/v1/pipelines", post(routes::orgs::create_pipeline))
        .route("/v1/pipelines/{slug}", get(routes::orgs::get_pipeline))
        .route("/v1/pipelines/{slug}/builds", post(routes::builds::create))
        .route("/v1/jobs/{id}", get(routes::jobs::get))
        .route("/v1/jobs/{id}/retry", post(routes::jobs::retry))
        .route("/v1/builds", get(routes::builds::list))
        .route("/v1/builds/{id}", get(routes::builds::get))
        .route("/v1/builds/{id}/cancel", post(routes::builds::cancel))
        .route(
            "/v1/pipelines/{slug}/github",
            put(routes::webhooks::put_github),
        )
        .route(
            "/v1/webhooks",
            post(idempotency::create_webhook).get(routes::webhooks::list),
        )
        .route(
            "/v1/webhooks/{id}",
            get(routes::webhooks::get)
                .delete(routes::webhooks::delete)
                .patch(routes::webhook_controls::patch),
        )
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(routes::webhook_controls::deliveries),
        )
        .route(
            "/v1/webhooks/{id}/rotate-secret",
            post(routes::webhook_controls::rotate_secret),
        )
        .route(
            "/v1/webhooks/{id}/recover",
            post(routes::webhook_controls::recover),
        )
        .route(
            "/v1/deliveries/{id}",
            get(routes::webhook_controls::get_delivery),
        )
        .route(
            "/v1/event-types",
            get(routes::webhook_controls::event_types),
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
}

/// Every path the API routes (health endpoints aside), as the server routes them.
pub fn route_paths() -> Vec<&'static str> {
    api_routes().paths
}

/// The most jobs of a build (the contract's 500).
pub const MAX_JOBS: usize = herald_domain::MAX_JOBS_PER_BUILD;

/// The paths every process serves, whatever its roles.
pub const HEALTH_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

fn health_routes(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .with_state(health)
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
        api_routes()
            .router
            .with_state(state)
            .merge(health_routes(health)),
    )
}

/// A process without the `api` role: health endpoints only, 404 for everything else.
pub fn health_only(health: Health) -> Router {
    finish(health_routes(Arc::new(health)))
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

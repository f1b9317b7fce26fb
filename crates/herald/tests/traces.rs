//! Traces end to end: the real binary exports over OTLP/HTTP to a receiver on port 0 in
//! this test, and the spans of one build's events share the trace of the request that
//! caused them, across the outbox, RabbitMQ and each delivery attempt.

mod common;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::*;
use herald_client::{Client, Method};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    attrs: HashMap<String, String>,
    service: String,
}

type Spans = Arc<Mutex<Vec<Span>>>;

async fn export(State(spans): State<Spans>, body: axum::body::Bytes) -> StatusCode {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut got = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|a| a.key == "service.name")
            .and_then(|a| a.value.as_ref().and_then(|v| v.value.as_ref()))
            .map(text)
            .unwrap_or_default();
        for s in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Span {
                trace: hex::encode(&s.trace_id),
                id: hex::encode(&s.span_id),
                parent: hex::encode(&s.parent_span_id),
                name: s.name,
                attrs: s
                    .attributes
                    .iter()
                    .filter_map(|a| {
                        let v = a.value.as_ref()?.value.as_ref()?;
                        Some((a.key.clone(), text(v)))
                    })
                    .collect(),
                service: service.clone(),
            });
        }
    }
    spans.lock().expect("lock").extend(got);
    StatusCode::OK
}

fn text(v: &Any) -> String {
    match v {
        Any::StringValue(s) => s.clone(),
        Any::IntValue(n) => n.to_string(),
        Any::BoolValue(b) => b.to_string(),
        Any::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP (protobuf) receiver on port 0: its base URL and what it was sent.
async fn otlp_receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), spans)
}

/// A webhook receiver on port 0 that accepts everything: its URL and the event types
/// it received.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = got.clone();
    let app = Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let kind = v["type"].as_str().unwrap_or_default().to_owned();
                sink.lock().expect("lock").push(kind);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), got)
}

/// A port that was free a moment ago, for the child's API.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The chain of span names from `span` up to its trace's root.
fn ancestry<'a>(spans: &'a [Span], span: &'a Span) -> Vec<&'a str> {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut names = vec![span.name.as_str()];
    let mut at = span;
    while let Some(p) = by_id.get(at.parent.as_str()) {
        names.push(p.name.as_str());
        at = p;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_builds_spans_share_the_trace_of_the_request_that_caused_them() {
    let env = TestEnv::new().await;
    let (otlp, spans) = otlp_receiver().await;
    let (hook_url, delivered) = webhook_receiver().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = env.spawn(
        "api,relay,dispatch,notify,maintenance",
        &[
            ("HERALD_TELEMETRY__OTLP_ENDPOINT", otlp.as_str()),
            ("HERALD_TELEMETRY__SERVICE_NAME", "herald-traces-test"),
            ("HERALD_HTTP__LISTEN", listen.as_str()),
            ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true"),
        ],
    );
    let base = format!("http://{listen}");
    let client = Client::new(&base);
    eventually(T, "the child to be ready", || async {
        let r = client.call(Method::GET, "/readyz", None).await.ok()?;
        (r.status.as_u16() == 200).then_some(())
    })
    .await;
    let admin = client.with_token(&env.admin_token);
    let org = admin.create_org("acme").await.expect("create org");
    let api = client.with_token(org["api_token"].as_str().expect("api_token"));
    let reg = client.with_token(org["agent_token"].as_str().expect("agent_token"));
    api.create_pipeline("web", "acme/web")
        .await
        .expect("create pipeline");
    let (s, hook) = call(
        &api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": hook_url, "events": ["build.scheduled", "job.finished", "build.finished"]})),
    )
    .await;
    assert_eq!(s, 201, "{hook}");
    let hook_id = hook["id"].as_str().expect("id").to_owned();
    let a = reg
        .register_agent("ci-1", &["default"])
        .await
        .expect("register agent");
    let agent = client.with_token(a.access_token);

    let build = api
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("create build");
    let build_id = build["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + T;
    while build_state(&api, &build_id).await["state"] != "passed" {
        assert!(Instant::now() < deadline, "the build did not pass");
        if let Ok(Some(job)) = agent.ping(1).await {
            agent
                .run_job(job.id, 0, Duration::ZERO)
                .await
                .expect("run job");
        }
    }
    eventually(T, "three deliveries", || async {
        let d = delivered.lock().map(|d| d.clone()).unwrap_or_default();
        (d.len() >= 3).then_some(())
    })
    .await;

    // SIGTERM: the process stops its roles, then flushes the spans it still holds.
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exited.success(), "herald stopped cleanly: {exited}");
    let spans = spans.lock().expect("lock").clone();
    assert!(!spans.is_empty(), "spans were exported");
    assert!(spans.iter().all(|s| s.service == "herald-traces-test"));

    let attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "webhook delivery attempt")
        .collect();
    let attempt_of = |kind: &str| -> &Span {
        // The attempt's event: the fan-out span above it names its type.
        attempts
            .iter()
            .copied()
            .find(|a| {
                spans.iter().any(|f| {
                    f.id == a.parent && f.attrs.get("event.type").map(String::as_str) == Some(kind)
                })
            })
            .unwrap_or_else(|| panic!("no traced delivery attempt of {kind}: {spans:#?}"))
    };

    // The build's creation: request -> outbox publish -> fan-out -> attempt, one trace.
    let scheduled = attempt_of("build.scheduled");
    assert_eq!(
        ancestry(&spans, scheduled),
        [
            "webhook delivery attempt",
            "fanout",
            "outbox publish",
            "POST /v1/pipelines/{slug}/builds"
        ]
    );
    assert_eq!(
        scheduled.attrs.get("webhook.id").map(String::as_str),
        Some(hook_id.as_str())
    );
    assert_eq!(
        scheduled
            .attrs
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );
    let request = spans
        .iter()
        .find(|s| s.name == "POST /v1/pipelines/{slug}/builds")
        .expect("the request span");
    assert_eq!(scheduled.trace, request.trace);
    assert_eq!(
        request
            .attrs
            .get("http.response.status_code")
            .map(String::as_str),
        Some("201")
    );

    // The job's end: the agent's finish request, and through propagation the build's.
    let finished = attempt_of("job.finished");
    assert_eq!(
        ancestry(&spans, finished),
        [
            "webhook delivery attempt",
            "fanout",
            "outbox publish",
            "PUT /v1/jobs/{id}/finish"
        ]
    );
    let build_finished = attempt_of("build.finished");
    assert_eq!(
        ancestry(&spans, build_finished),
        [
            "webhook delivery attempt",
            "fanout",
            "outbox publish",
            "propagate",
            "outbox publish",
            "PUT /v1/jobs/{id}/finish"
        ]
    );
    assert_eq!(build_finished.trace, finished.trace);
    assert_ne!(
        finished.trace, request.trace,
        "another request, another trace"
    );

    // Every span of a chain is in its root's trace.
    for a in [scheduled, finished, build_finished] {
        let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
        let mut at = a;
        while let Some(p) = by_id.get(at.parent.as_str()) {
            assert_eq!(p.trace, a.trace, "{} is in {}'s trace", p.name, a.name);
            at = p;
        }
    }
    env.cleanup().await;
}

//! A delivery is sent once even when its event reaches the fan-out twice (the relay
//! and the broker are at-least-once): the copy finds the first worker's claim.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::*;
use herald_bus::lapin;
use herald_client::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const T: Duration = Duration::from_secs(60);

/// Counts requests per webhook-id; holds every request until `release` turns true.
#[derive(Clone)]
struct Holding {
    seen: Arc<Mutex<HashMap<String, usize>>>,
    release: watch::Receiver<bool>,
}

async fn receive(State(r): State<Holding>, headers: HeaderMap) -> StatusCode {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *r.seen.lock().expect("lock").entry(id).or_default() += 1;
    let mut release = r.release.clone();
    let _ = release.wait_for(|go| *go).await;
    StatusCode::NO_CONTENT
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let r = app
        .client
        .call(Method::GET, "/metrics", None)
        .await
        .expect("metrics");
    r.body
        .as_str()
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_published_twice_while_its_delivery_is_in_flight_is_sent_once() {
    let env = TestEnv::new().await;
    let tap = EventTap::new(&env.prefix).await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify,maintenance",
            &[
                ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true"),
                ("HERALD_NOTIFY__WEBHOOK_TIMEOUT_S", "20"),
            ],
        )
        .await;
    let (api, _reg) = org(&app, "dup").await;

    let (go, release) = watch::channel(false);
    let r = Holding {
        seen: Arc::default(),
        release,
    };
    let router = Router::new()
        .route("/hook", post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let (s, hook) = call(
        &api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": ["build.scheduled"]})),
    )
    .await;
    assert_eq!(s, 201, "{hook}");

    let b = api
        .create_build("web", &build_body(json!([{"key": "a", "command": "true"}])))
        .await
        .expect("create build");
    let build_id = b["id"].as_str().expect("id").to_owned();
    // The delivery is in flight: the receiver holds its request.
    let webhook_id = eventually(T, "the first request", || async {
        r.seen.lock().expect("lock").keys().next().cloned()
    })
    .await;
    let (msg_id, key, event) = eventually(T, "build.scheduled on the tap", || async {
        tap.snapshot().into_iter().find(|(_, k, e)| {
            k.starts_with("build.scheduled") && e["data"]["build"]["id"] == build_id.as_str()
        })
    })
    .await;

    // The same event again, as a relay that died before marking it published sends it.
    let refused_before = metric(&app, "herald_notify_claim_refused_total").await;
    let cfg = herald_bus::BusConfig::new(amqp_url(), env.prefix.clone());
    let conn = herald_bus::connect(&cfg).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        &cfg.names().events_exchange(),
        &key,
        Default::default(),
        &serde_json::to_vec(&event).expect("body"),
        lapin::BasicProperties::default()
            .with_message_id(msg_id.as_str().into())
            .with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");

    // Either the copy reaches the receiver (the defect) or the copy finds the claim.
    eventually(T, "the copy to be handled", || async {
        let twice = r.seen.lock().expect("lock").get(&webhook_id).copied() > Some(1);
        let refused = metric(&app, "herald_notify_claim_refused_total").await > refused_before;
        (twice || refused).then_some(())
    })
    .await;
    let _ = go.send(true);
    let d = eventually(T, "the delivery to succeed", || async {
        let (_, list) = call(
            &api,
            Method::GET,
            &format!(
                "/v1/webhooks/{}/deliveries",
                hook["id"].as_str().unwrap_or("")
            ),
            None,
        )
        .await;
        list["items"]
            .as_array()
            .and_then(|i| i.first().cloned())
            .filter(|d: &Value| d["status"] == "succeeded")
    })
    .await;
    assert_eq!(d["id"].as_str(), Some(webhook_id.as_str()));
    assert_eq!(d["attempts"], 1, "{d}");
    assert_eq!(
        r.seen.lock().expect("lock").get(&webhook_id).copied(),
        Some(1),
        "the delivery reached the receiver more than once"
    );

    let _ = conn.close(0, "done").await;
    tap.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), app.stop()).await;
    env.cleanup().await;
}

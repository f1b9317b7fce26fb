//! Notifications end to end: real receivers and a fake GitHub, each an HTTP server on
//! port 0 in this test, against the real PostgreSQL and RabbitMQ.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;
use herald_client::{Client, Method};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct Received {
    id: String,
    body: Value,
    signature_ok: bool,
}

type Reply = (u16, Vec<(&'static str, String)>);
type Answer = dyn Fn(&str, usize) -> Reply + Send + Sync;

/// A receiver that verifies every signature itself, with the secret it is given.
#[derive(Clone)]
struct Receiver {
    secret: Arc<Mutex<String>>,
    got: Arc<Mutex<Vec<Received>>>,
    /// How to answer: (status, extra headers) by how many times this webhook-id was seen.
    answer: Arc<Answer>,
    delay: Duration,
}

fn verify(secret: &str, id: &str, ts: &str, body: &[u8], sig: &str) -> bool {
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
        return false;
    };
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    sig.split(' ').any(|s| s == expected)
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (id, ts, sig) = (
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    );
    let secret = r.secret.lock().map(|s| s.clone()).unwrap_or_default();
    let ok = verify(&secret, &id, &ts, &body, &sig) && h("content-type") == "application/json";
    let seen = {
        let mut got = r.got.lock().expect("lock");
        got.push(Received {
            id: id.clone(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            signature_ok: ok,
        });
        got.iter().filter(|g| g.id == id).count()
    };
    if !r.delay.is_zero() {
        tokio::time::sleep(r.delay).await;
    }
    let (status, extra) = (r.answer)(&id, seen);
    let mut res = (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), "ok").into_response();
    for (k, v) in extra {
        if let Ok(v) = v.parse() {
            res.headers_mut().insert(k, v);
        }
    }
    res
}

async fn spawn_receiver(
    answer: impl Fn(&str, usize) -> (u16, Vec<(&'static str, String)>) + Send + Sync + 'static,
    delay: Duration,
) -> (String, Receiver) {
    let r = Receiver {
        secret: Arc::default(),
        got: Arc::default(),
        answer: Arc::new(answer),
        delay,
    };
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(r.clone());
    (serve_hook(app).await, r)
}

/// Serves `app` on a port of its own; returns the URL of its `/hook`.
async fn serve_hook(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

fn ok_always(_: &str, _: usize) -> (u16, Vec<(&'static str, String)>) {
    (200, vec![])
}

const PRIVATE_OK: (&str, &str) = ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true");
const FAST_RETRY: (&str, &str) = ("HERALD_NOTIFY__RETRY_SCALE", "0.01");

async fn webhook(api: &Client, url: &str, events: Value, r: &Receiver) -> Value {
    let (s, w) = call(
        api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": events})),
    )
    .await;
    assert_eq!(s, 201, "{w}");
    let secret = w["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("whsec_"));
    *r.secret.lock().expect("lock") = secret;
    w
}

/// Runs every job of a build with one agent, passing them.
async fn run_build(api: &Client, agent: &Client, jobs: Value) -> Value {
    let b = api
        .create_build("web", &build_body(jobs))
        .await
        .expect("create");
    let id = b["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + T;
    loop {
        let s = build_state(api, &id).await;
        if matches!(s["state"].as_str(), Some("passed" | "failed" | "canceled")) {
            return s;
        }
        assert!(Instant::now() < deadline, "build did not finish");
        if let Ok(Some(job)) = agent.ping(1).await {
            agent
                .run_job(job.id, 0, Duration::ZERO)
                .await
                .expect("run job");
        }
    }
}

async fn deliveries(api: &Client, hook: &Value) -> Vec<Value> {
    let (s, d) = call(
        api,
        Method::GET,
        &format!(
            "/v1/webhooks/{}/deliveries?limit=500",
            hook["id"].as_str().unwrap_or("")
        ),
        None,
    )
    .await;
    assert_eq!(s, 200, "{d}");
    d["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_webhooks_reach_a_verifying_receiver() {
    let env = TestEnv::new().await;
    let mut app = env
        .start("api,relay,dispatch,notify,maintenance", &[PRIVATE_OK])
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let (url, r) = spawn_receiver(ok_always, Duration::ZERO).await;
    let hook = webhook(&api, &url, json!(["build.finished", "job.*"]), &r).await;
    assert_eq!(hook["events"], json!(["build.finished", "job.*"]));
    let (s, listed) = call(&api, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(s, 200);
    assert_eq!(listed["items"][0]["id"], hook["id"]);
    assert!(
        listed["items"][0].get("secret").is_none(),
        "the secret is shown once"
    );

    run_build(
        &api,
        &agent,
        json!([{"key": "a"}, {"key": "b", "depends_on": ["a"]}]),
    )
    .await;
    // 2 jobs × (scheduled, assigned, started, finished) + build.finished.
    let got = eventually(T, "9 deliveries", || async {
        let g = r.got.lock().map(|g| g.clone()).unwrap_or_default();
        (g.len() >= 9).then_some(g)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_now = r.got.lock().map(|g| g.clone()).unwrap_or_default();
    assert_eq!(got_now.len(), 9, "exactly the subscribed events, once each");
    assert!(
        got.iter().all(|g| g.signature_ok),
        "every signature verifies"
    );
    let ids: HashSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), 9, "one webhook-id per event × endpoint");
    let types: Vec<&str> = got.iter().filter_map(|g| g.body["type"].as_str()).collect();
    assert!(types.contains(&"build.finished"));
    assert!(!types.contains(&"build.scheduled"), "not subscribed");
    let finished = got
        .iter()
        .find(|g| g.body["type"] == "build.finished")
        .expect("build.finished");
    assert_eq!(finished.body["data"]["build"]["state"], "passed");
    assert!(finished.body["timestamp"].is_string());
    let job_event = got
        .iter()
        .find(|g| g.body["type"] == "job.finished")
        .expect("job.finished");
    assert!(job_event.body["data"]["job"]["id"].is_string());
    assert!(job_event.body["data"]["build"]["id"].is_string());

    let list = eventually(T, "deliveries recorded as succeeded", || async {
        let d = deliveries(&api, &hook).await;
        (d.len() == 9 && d.iter().all(|d| d["status"] == "succeeded")).then_some(d)
    })
    .await;
    assert!(list
        .iter()
        .all(|d| d["attempts"] == 1 && d["last_status_code"] == 200));

    // Redeliver one: the same webhook-id again.
    let one = list[0]["id"].as_str().expect("id").to_owned();
    let (s, _) = call(
        &api,
        Method::POST,
        &format!("/v1/deliveries/{one}/redeliver"),
        None,
    )
    .await;
    assert_eq!(s, 202);
    eventually(T, "the redelivery", || async {
        let g = r.got.lock().map(|g| g.clone()).unwrap_or_default();
        (g.len() == 10).then_some(())
    })
    .await;
    let g = r.got.lock().map(|g| g.clone()).unwrap_or_default();
    assert_eq!(g[9].id, one);
    assert!(g[9].signature_ok);

    let hook_id = hook["id"].as_str().expect("id");
    let (s, _) = call(
        &api,
        Method::DELETE,
        &format!("/v1/webhooks/{hook_id}"),
        None,
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(
        call(&api, Method::GET, &format!("/v1/webhooks/{hook_id}"), None)
            .await
            .0,
        404
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_receiver_is_retried_with_one_webhook_id_and_410_disables_it() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify,maintenance",
            &[PRIVATE_OK, FAST_RETRY],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    // Fails twice per delivery (a 500, then a 503 with Retry-After), then recovers.
    let (url, r) = spawn_receiver(
        |_, seen| match seen {
            1 => (500, vec![]),
            2 => (503, vec![("retry-after", "1".to_owned())]),
            _ => (200, vec![]),
        },
        Duration::ZERO,
    )
    .await;
    let hook = webhook(&api, &url, json!(["build.finished"]), &r).await;
    run_build(&api, &agent, json!([{"key": "a"}])).await;
    let d = eventually(T, "the delivery to succeed", || async {
        let d = deliveries(&api, &hook).await;
        (d.len() == 1 && d[0]["status"] == "succeeded").then(|| d[0].clone())
    })
    .await;
    assert_eq!(d["attempts"], 3);
    let got = r.got.lock().map(|g| g.clone()).unwrap_or_default();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|g| g.id == got[0].id),
        "every retry keeps the webhook-id"
    );
    assert!(got.iter().all(|g| g.signature_ok));
    // Retries come from PostgreSQL (the body is stored once per event), not the broker.
    assert!(
        got.iter()
            .all(|g| g.body == got[0].body && g.body["type"].is_string()),
        "every retry sends the same body: {:?}",
        got.iter().map(|g| &g.body).collect::<Vec<_>>()
    );
    let attempts: i64 = env.count("SELECT count(*) FROM delivery_attempts").await;
    assert_eq!(attempts, 3, "each attempt is logged");

    // 410 Gone disables the endpoint.
    let (gone_url, gone) = spawn_receiver(|_, _| (410, vec![]), Duration::ZERO).await;
    let gone_hook = webhook(&api, &gone_url, json!(["build.finished"]), &gone).await;
    run_build(&api, &agent, json!([{"key": "a"}])).await;
    let id = gone_hook["id"].as_str().expect("id").to_owned();
    eventually(T, "the endpoint to be disabled", || async {
        let (_, w) = call(&api, Method::GET, &format!("/v1/webhooks/{id}"), None).await;
        (w["disabled"] == true).then_some(())
    })
    .await;
    run_build(&api, &agent, json!([{"key": "a"}])).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        gone.got.lock().map(|g| g.len()).unwrap_or(0),
        1,
        "a disabled endpoint gets nothing more"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_to_private_addresses_are_refused() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, _) = org(&app, "acme").await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "ftp://example.com/hook",
        "not a url",
    ] {
        let (s, body) = call(
            &api,
            Method::POST,
            "/v1/webhooks",
            Some(json!({"url": url, "events": ["build.finished"]})),
        )
        .await;
        assert_eq!(s, 422, "{url}: {body}");
    }
    let (s, _) = call(
        &api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": "https://example.com/x", "events": ["nope"]})),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(env.count("SELECT count(*) FROM webhooks").await, 0);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_holds_everything_resume_delivers_it_and_disable_skips() {
    let env = TestEnv::new().await;
    let mut app = env
        .start("api,relay,dispatch,notify,maintenance", &[PRIVATE_OK])
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let (url, r) = spawn_receiver(ok_always, Duration::ZERO).await;
    let hook = webhook(&api, &url, json!(["build.*"]), &r).await;

    let (s, t) = call(
        &app.admin,
        Method::PUT,
        "/v1/ops/notification-types/webhook",
        Some(json!({"mode": "paused", "reason": "receiver maintenance"})),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["mode"], "paused");
    assert_eq!(t["reason"], "receiver maintenance");
    tokio::time::sleep(Duration::from_millis(1000)).await; // the contract's "within 1 s"
    for _ in 0..3 {
        run_build(&api, &agent, json!([{"key": "a"}])).await;
    }
    // 3 × (scheduled, running, finished), all held.
    eventually(T, "9 held deliveries", || async {
        let d = deliveries(&api, &hook).await;
        (d.len() == 9).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        r.got.lock().map(|g| g.len()).unwrap_or(0),
        0,
        "paused: nothing is sent"
    );
    assert!(deliveries(&api, &hook)
        .await
        .iter()
        .all(|d| d["status"] == "pending"));

    let (s, _) = call(
        &app.admin,
        Method::PUT,
        "/v1/ops/notification-types/webhook",
        Some(json!({"mode": "enabled", "reason": "back"})),
    )
    .await;
    assert_eq!(s, 200);
    eventually(T, "all 9 delivered after resume", || async {
        (r.got.lock().map(|g| g.len()).unwrap_or(0) == 9).then_some(())
    })
    .await;

    let (s, _) = call(
        &app.admin,
        Method::PUT,
        "/v1/ops/notification-types/webhook",
        Some(json!({"mode": "disabled", "reason": "storm"})),
    )
    .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    run_build(&api, &agent, json!([{"key": "a"}])).await;
    eventually(T, "3 skipped deliveries", || async {
        let d = deliveries(&api, &hook).await;
        (d.iter().filter(|d| d["status"] == "skipped").count() == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        r.got.lock().map(|g| g.len()).unwrap_or(0),
        9,
        "disabled: skipped, never sent"
    );

    // The audit trail and the list.
    let (_, types) = call(&app.admin, Method::GET, "/v1/ops/notification-types", None).await;
    let items = types["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert!(items
        .iter()
        .any(|t| t["type"] == "webhook" && t["mode"] == "disabled"));
    assert!(items
        .iter()
        .any(|t| t["type"] == "github_commit_status" && t["mode"] == "enabled"));
    assert_eq!(
        env.count("SELECT count(*) FROM notification_type_changes WHERE type = 'webhook'")
            .await,
        3
    );
    assert_eq!(
        call(
            &app.admin,
            Method::PUT,
            "/v1/ops/notification-types/sms",
            Some(json!({"mode": "paused", "reason": "x"}))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(
            &app.admin,
            Method::PUT,
            "/v1/ops/notification-types/webhook",
            Some(json!({"mode": "off", "reason": "x"}))
        )
        .await
        .0,
        422
    );
    assert_eq!(
        call(
            &app.admin,
            Method::PUT,
            "/v1/ops/notification-types/webhook",
            Some(json!({"mode": "enabled", "reason": "x", "rate_per_s": -1}))
        )
        .await
        .0,
        422
    );
    assert_eq!(
        call(&api, Method::GET, "/v1/ops/notification-types", None)
            .await
            .0,
        403
    );
    let (s, q) = call(&app.admin, Method::GET, "/v1/ops/queues", None).await;
    assert_eq!(s, 200);
    assert!(q["items"]
        .as_array()
        .is_some_and(|i| i.iter().any(|q| q["name"] == "jobs.runnable")));
    let (s, replay) = call(
        &app.admin,
        Method::POST,
        "/v1/ops/dead-letters/replay",
        Some(json!({"type": "webhook", "limit": 10})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(replay["replayed"], 0);

    // The CLI drives the same API.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "ops",
            "notifications",
            "pause",
            "github_commit_status",
            "--reason",
            "from the cli",
            "--url",
            app.client.base(),
            "--token",
            &env.admin_token,
        ])
        .output()
        .expect("herald ops");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, types) = call(&app.admin, Method::GET, "/v1/ops/notification-types", None).await;
    assert!(types["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|t| t["type"] == "github_commit_status"
            && t["mode"] == "paused"
            && t["reason"] == "from the cli"));
    app.stop().await;
    env.cleanup().await;
}

/// A fake GitHub: records statuses, and allows `limit` requests per window, answering
/// 403 with Retry-After beyond that.
#[derive(Clone, Default)]
struct FakeGithub {
    statuses: Arc<Mutex<Vec<(String, Value)>>>,
    window: Arc<Mutex<(Option<Instant>, u32)>>,
    rejected: Arc<Mutex<u32>>,
}

const GH_LIMIT: u32 = 5;
const GH_WINDOW: Duration = Duration::from_secs(2);

async fn github_status(
    State(g): State<FakeGithub>,
    axum::extract::Path((owner, repo, sha)): axum::extract::Path<(String, String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let ok_headers = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some("Bearer ghp_test")
        && headers.get("accept").and_then(|v| v.to_str().ok())
            == Some("application/vnd.github+json")
        && headers
            .get("x-github-api-version")
            .and_then(|v| v.to_str().ok())
            == Some("2022-11-28")
        && headers.contains_key("user-agent");
    if !ok_headers {
        return (StatusCode::UNAUTHORIZED, vec![]).into_response();
    }
    {
        let mut w = g.window.lock().expect("lock");
        let now = Instant::now();
        if w.0
            .is_none_or(|start| now.duration_since(start) >= GH_WINDOW)
        {
            *w = (Some(now), 0);
        }
        if w.1 >= GH_LIMIT {
            *g.rejected.lock().expect("lock") += 1;
            let left = GH_WINDOW
                .saturating_sub(now.duration_since(w.0.unwrap_or(now)))
                .as_secs()
                .max(1);
            return (
                StatusCode::FORBIDDEN,
                [("retry-after", left.to_string())],
                "rate limited",
            )
                .into_response();
        }
        w.1 += 1;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    g.statuses
        .lock()
        .expect("lock")
        .push((format!("{owner}/{repo}@{sha}"), v));
    (StatusCode::CREATED, "{}").into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_statuses_coalesce_respect_rate_limits_and_never_regress() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify,maintenance",
            &[
                PRIVATE_OK,
                ("HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE", "6000"),
            ],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let gh = FakeGithub::default();
    let router = Router::new()
        .route("/repos/{owner}/{repo}/statuses/{sha}", post(github_status))
        .with_state(gh.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let (s, g) = call(&api, Method::PUT, "/v1/pipelines/web/github", Some(json!({"api_url": format!("http://{addr}"), "token": "ghp_test", "job_statuses": false}))).await;
    assert_eq!(s, 200, "{g}");
    assert!(g.get("token").is_none());

    // 50 builds on one commit, each scheduled then canceled: 100 transitions, fast.
    let mut last = String::new();
    for _ in 0..50 {
        let b = api
            .create_build("web", &build_body(json!([{"key": "a"}])))
            .await
            .expect("create");
        last = b["id"].as_str().expect("id").to_owned();
        let (s, _) = call(
            &api,
            Method::POST,
            &format!("/v1/builds/{last}/cancel"),
            None,
        )
        .await;
        assert_eq!(s, 200);
    }
    // Then one that runs and passes: the final status is its success.
    let passed = run_build(&api, &agent, json!([{"key": "a"}])).await;
    let passed_id = passed["id"].as_str().expect("id").to_owned();
    let statuses = eventually(T, "the final success", || async {
        let s = gh.statuses.lock().map(|s| s.clone()).unwrap_or_default();
        s.last()
            .filter(|(_, v)| {
                v["state"] == "success"
                    && v["target_url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with(&passed_id))
            })
            .map(|_| s.clone())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let statuses_now = gh.statuses.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        statuses_now.len(),
        statuses.len(),
        "nothing after the final status"
    );
    let rejected = *gh.rejected.lock().expect("lock");
    eprintln!(
        "github: {} statuses sent for 102+ transitions, {} rejected by the rate limit",
        statuses.len(),
        rejected
    );
    assert!(
        statuses.len() < 40,
        "coalescing: far fewer requests than transitions ({})",
        statuses.len()
    );
    assert!(
        rejected > 0 || statuses.len() <= GH_LIMIT as usize,
        "the fake limit was exercised"
    );
    for (repo, v) in &statuses {
        assert_eq!(repo, &format!("acme/web@{SHA}"));
        assert_eq!(v["context"], "herald/web");
        assert!(v["description"]
            .as_str()
            .is_some_and(|d| d.chars().count() <= 140));
        assert!(
            ["pending", "success", "failure", "error"].contains(&v["state"].as_str().unwrap_or(""))
        );
    }
    // One send per status at a time: no version goes out twice.
    for pair in statuses.windows(2) {
        assert_ne!(pair[0], pair[1], "a status was sent twice in a row");
    }
    // Never back: once a build's status is final, no pending follows for that build.
    let mut finals: HashSet<String> = HashSet::new();
    let mut order: HashMap<String, usize> = HashMap::new();
    for (i, (_, v)) in statuses.iter().enumerate() {
        let url = v["target_url"].as_str().unwrap_or("").to_owned();
        if v["state"] == "pending" {
            assert!(
                !finals.contains(&url),
                "pending after a final status for {url}"
            );
        } else {
            finals.insert(url.clone());
        }
        order.insert(url, i);
    }
    let _ = last;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_notify_worker_mid_batch_loses_no_delivery() {
    let env = TestEnv::new().await;
    let mut app = env
        .start("api,relay,dispatch,maintenance", &[PRIVATE_OK])
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (url, r) = spawn_receiver(ok_always, Duration::from_millis(20)).await;
    // Three endpoints: each event's deliveries travel in one message, so the kill
    // also lands between the deliveries of one message.
    let mut hooks = Vec::new();
    for _ in 0..3 {
        hooks.push(webhook(&api, &url, json!(["job.*", "build.*"]), &r).await);
    }
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let _ = agent;
    let mut notify = env.spawn("notify", &[PRIVATE_OK]);
    for _ in 0..20 {
        api.create_build(
            "web",
            &build_body(json!([{"key": "a"}, {"key": "b"}, {"key": "c"}])),
        )
        .await
        .expect("create");
    }
    eventually(T, "some deliveries", || async {
        (r.got.lock().map(|g| g.len()).unwrap_or(0) > 5).then_some(())
    })
    .await;
    kill9(&mut notify);
    let mut notify = env.spawn("notify", &[PRIVATE_OK]);
    // Every event the hooks subscribe to has exactly one delivery per hook, and each
    // succeeds.
    let expected = 3 * env
        .count("SELECT count(*) FROM outbox WHERE event_type LIKE 'job.%' OR event_type LIKE 'build.%'")
        .await;
    let d = eventually(T, "every delivery to succeed", || async {
        let n = env
            .count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
            .await;
        (n == expected).then_some(n)
    })
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries").await,
        d,
        "exactly once per event × endpoint"
    );
    let ids: HashSet<String> = r
        .got
        .lock()
        .map(|g| g.iter().map(|x| x.id.clone()).collect())
        .unwrap_or_default();
    let rows: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM deliveries")
        .fetch_all(&env.pool)
        .await
        .expect("ids");
    assert!(
        rows.iter().all(|id| ids.contains(&id.to_string())),
        "every delivery reached the receiver"
    );
    let _ = hooks;
    kill9(&mut notify);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_at_a_time_sends_a_commit_status_and_newer_versions_come_due() {
    use herald_storage::notify as store;
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[PRIVATE_OK]).await;
    let (api, _) = org(&app, "acme").await;
    let (s, g) = call(
        &api,
        Method::PUT,
        "/v1/pipelines/web/github",
        Some(json!({"api_url": "http://127.0.0.1:9", "token": "ghp_test"})),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    let (org_id, pipeline_id): (uuid::Uuid, uuid::Uuid) =
        sqlx::query_as("SELECT org_id, id FROM pipelines WHERE slug = 'web'")
            .fetch_one(&env.pool)
            .await
            .expect("pipeline");
    let want = |build: uuid::Uuid, state: &str, rank: i16| store::WantedStatus {
        repository: "acme/web".into(),
        sha: SHA.into(),
        context: "herald/web".into(),
        org_id,
        pipeline_id,
        build_id: build,
        state: state.into(),
        rank,
        round: 0,
        description: format!("build is {state}"),
        target_url: format!("https://ci.example/{build}"),
    };
    let mut conn = env.pool.acquire().await.expect("conn");
    let lease = Duration::from_secs(30);
    let build = uuid::Uuid::now_v7();
    assert!(
        store::want_status(&mut conn, &want(build, "pending", 0), false, false)
            .await
            .expect("want")
    );
    let first = claim(&mut conn, lease)
        .await
        .expect("claim")
        .expect("claimable");
    assert_eq!((first.state.as_str(), first.version), ("pending", 1));
    assert!(
        claim(&mut conn, lease).await.expect("claim").is_none(),
        "a second worker must not send while the first one is"
    );
    // The final state arrives while the pending one is in flight.
    assert!(
        store::want_status(&mut conn, &want(build, "success", 1), false, false)
            .await
            .expect("want")
    );
    assert!(claim(&mut conn, lease).await.expect("claim").is_none());
    store::status_result(
        &mut conn,
        &first,
        store::StatusResult {
            status: "succeeded",
            sent: true,
            attempted: true,
            code: Some(201),
            ..Default::default()
        },
    )
    .await
    .expect("result");
    let due = store::due_statuses(&mut conn, 10).await.expect("due");
    assert_eq!(due.len(), 1, "the newer version is due at once");
    let second = claim(&mut conn, lease)
        .await
        .expect("claim")
        .expect("claimable");
    assert_eq!(
        (second.state.as_str(), second.version, second.sent_version),
        ("success", 2, 1)
    );
    // A claim whose worker died expires and can be taken again.
    sqlx::query("UPDATE commit_statuses SET sending_until = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .expect("expire");
    let third = claim(&mut conn, lease)
        .await
        .expect("claim")
        .expect("expired claims are free");
    assert_eq!(third.version, 2);
    drop(conn);
    app.stop().await;
    env.cleanup().await;
}

async fn claim(
    conn: &mut sqlx::PgConnection,
    lease: Duration,
) -> Result<Option<herald_storage::notify::StatusWork>, herald_storage::StorageError> {
    herald_storage::notify::claim_status(conn, "acme/web", SHA, "herald/web", lease).await
}

/// One unlabelled-or-fully-labelled series of this process's /metrics.
async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", app.client.base()))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn throttle_factor(app: &TestApp) -> Option<f64> {
    metric(app, "herald_notify_throttle_factor").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatch_latency_reported_by_another_process_throttles_notifications() {
    let env = TestEnv::new().await;
    // Any assignment latency counts as degraded here, so a dispatcher in another
    // process that assigns anything must slow this process's notifications.
    let tight = [
        PRIVATE_OK,
        ("HERALD_NOTIFY__THROTTLE__LATENCY_TARGET_MS", "0.001"),
        ("HERALD_NOTIFY__THROTTLE__INTERVAL_MS", "100"),
        // One build at a time reports once or twice a second, and the default step
        // (0.05 per 100 ms sample) won back each halving before the next report, so the
        // factor hovered near 0.6. A small step keeps it going down.
        ("HERALD_NOTIFY__THROTTLE__INCREASE", "0.01"),
    ];
    let mut app = env.start("api,relay,notify", &tight).await;
    let mut dispatch = env.spawn("dispatch", &tight);
    let (api, reg) = org(&app, "acme").await;
    let (url, r) = spawn_receiver(ok_always, Duration::ZERO).await;
    webhook(&api, &url, json!(["*"]), &r).await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    eventually(T, "an idle throttle at 1", || async {
        (throttle_factor(&app).await == Some(1.0)).then_some(())
    })
    .await;
    let (lowest, seen) = eventually(
        T,
        "dispatch's latency, seen across processes, throttles notifications",
        || async {
            run_build(
                &api,
                &agent,
                json!([{"key": "a"}, {"key": "b", "depends_on": ["a"]}]),
            )
            .await;
            let factor = throttle_factor(&app).await.filter(|f| *f < 0.5)?;
            let signal = r#"herald_notify_throttle_signal_seconds{signal="dispatch_latency"}"#;
            let seen = metric(&app, signal).await.filter(|v| *v > 0.0)?;
            Some((factor, seen))
        },
    )
    .await;
    eprintln!("throttle factor fell to {lowest}; dispatch latency seen {seen} s");
    // Webhooks are scaled by the factor; commit statuses no lower than
    // notify.throttle.commit_status_min_factor (0.5).
    let (_, types) = call(&app.admin, Method::GET, "/v1/ops/notification-types", None).await;
    let configured = |kind: &str| {
        types["items"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["type"] == kind))
            .and_then(|t| t["rate_per_s"].as_f64())
            .expect("configured rate")
    };
    let (web, gh) = (configured("webhook"), configured("github_commit_status"));
    let (web_now, gh_now) = eventually(T, "the webhook rate scaled below half", || async {
        let rate = |kind: &'static str| {
            let app = &app;
            async move {
                metric(app, &format!("herald_notify_rate_limit{{type=\"{kind}\"}}")).await
            }
        };
        let web_now = rate("webhook").await.filter(|r| *r < web * 0.5)?;
        Some((web_now, rate("github_commit_status").await?))
    })
    .await;
    assert!(
        gh_now >= gh * 0.5 - 1e-9,
        "commit statuses throttled to {gh_now}/s of {gh}/s while webhooks ran at {web_now}/s of {web}/s"
    );
    // Without dispatch activity there is no report, and the factor climbs back.
    eventually(
        T,
        "notifications recover once dispatch is quiet",
        || async { (throttle_factor(&app).await == Some(1.0)).then_some(()) },
    )
    .await;
    assert!(
        !r.got.lock().expect("lock").is_empty(),
        "deliveries went out"
    );
    kill9(&mut dispatch);
    app.stop().await;
    env.cleanup().await;
}

/// One webhook sender, one message at a time, and room for 100 waiting deliveries.
const ONE_SENDER_ROOM_FOR_100: [(&str, &str); 5] = [
    PRIVATE_OK,
    ("HERALD_NOTIFY__FANOUT_MAX_BACKLOG", "100"),
    ("HERALD_NOTIFY__WEBHOOK_PREFETCH", "1"),
    ("HERALD_NOTIFY__WEBHOOK_CONCURRENCY", "1"),
    ("HERALD_NOTIFY__THROTTLE__ENABLED", "false"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_backlog_waits_as_events_not_as_deliveries_and_all_arrive() {
    let env = TestEnv::new().await;
    // One slow sender and a backlog allowance of 100: the fan-out must stop creating
    // deliveries while 100 wait, and create the rest as the sender catches up.
    let mut app = env
        .start("api,relay,dispatch,notify", &ONE_SENDER_ROOM_FOR_100)
        .await;
    let (api, _) = org(&app, "acme").await;
    let (url, r) = spawn_receiver(ok_always, Duration::from_millis(5)).await;
    for _ in 0..5 {
        webhook(&api, &url, json!(["*"]), &r).await;
    }
    for _ in 0..20 {
        api.create_build(
            "web",
            &build_body(json!([{"key": "a"}, {"key": "b"}, {"key": "c"}])),
        )
        .await
        .expect("create");
    }
    let queue = format!("{}.deliver.webhook", env.prefix);
    let deepest = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let expected = eventually(T, "every delivery received", || async {
        let (_, q) = call(&app.admin, Method::GET, "/v1/ops/queues", None).await;
        let depth = q["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["name"] == queue.as_str()))
            .and_then(|i| i["depth"].as_i64())
            .unwrap_or(0);
        deepest.fetch_max(depth, std::sync::atomic::Ordering::Relaxed);
        let rows = env.count("SELECT count(*) FROM deliveries").await;
        let got: HashSet<String> = r
            .got
            .lock()
            .map(|g| g.iter().map(|x| x.id.clone()).collect())
            .unwrap_or_default();
        // 20 builds × (build.created + 3 × job.scheduled) × 5 endpoints, at least.
        (rows >= 400 && got.len() as i64 == rows).then_some(rows)
    })
    .await;
    let deepest = deepest.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{expected} deliveries; the webhook queue held at most {deepest}");
    assert!(
        deepest <= 100 + 8 * 5 + 5,
        "the fan-out kept creating deliveries past the allowed backlog ({deepest})"
    );
    assert!(deepest > 0, "the backlog was observed");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_expiry_removes_old_deliveries_their_attempts_and_their_bodies() {
    let env = TestEnv::new().await;
    let mut app = env.start("api,relay,dispatch,notify", &[PRIVATE_OK]).await;
    let (api, _) = org(&app, "acme").await;
    let (url, r) = spawn_receiver(ok_always, Duration::ZERO).await;
    webhook(&api, &url, json!(["*"]), &r).await;
    webhook(&api, &url, json!(["*"]), &r).await;
    api.create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("create");
    eventually(T, "every delivery succeeded", || async {
        let total = env.count("SELECT count(*) FROM deliveries").await;
        let done = env
            .count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
            .await;
        (total >= 4 && done == total).then_some(())
    })
    .await;
    let bodies = env.count("SELECT count(*) FROM delivery_payloads").await;
    let deliveries = env.count("SELECT count(*) FROM deliveries").await;
    assert_eq!(
        deliveries,
        2 * bodies,
        "one stored body per event, shared by its two endpoints"
    );
    // Age everything past a one-minute retention; expiry takes it in small batches.
    for sql in [
        "UPDATE deliveries SET created_at = now() - interval '2 minutes'",
        "UPDATE delivery_attempts SET attempted_at = now() - interval '2 minutes'",
        "UPDATE delivery_payloads SET created_at = now() - interval '2 minutes'",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect("age");
    }
    let mut conn = env.pool.acquire().await.expect("conn");
    let mut gone = 0;
    loop {
        let n = herald_storage::notify::expire_history(&mut conn, 60.0, 2)
            .await
            .expect("expire");
        if n == 0 {
            break;
        }
        gone += n;
    }
    drop(conn);
    // Attempts of a delivery deleted first go with it (ON DELETE CASCADE), uncounted.
    assert!(gone >= (deliveries + bodies) as u64, "expired {gone}");
    for table in ["deliveries", "delivery_attempts", "delivery_payloads"] {
        assert_eq!(
            env.count(&format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table} emptied"
        );
    }
    app.stop().await;
    env.cleanup().await;
}

/// Counts requests per webhook-id and holds each until `release` turns true, then
/// answers 204.
#[derive(Clone)]
struct Holding {
    seen: Arc<Mutex<HashMap<String, usize>>>,
    release: tokio::sync::watch::Receiver<bool>,
}

async fn hold(State(r): State<Holding>, headers: HeaderMap) -> StatusCode {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_a_delivery_in_flight_or_answered_2xx_are_not_sent_again() {
    let env = TestEnv::new().await;
    let tap = EventTap::new(&env.prefix).await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify,maintenance",
            &[PRIVATE_OK, ("HERALD_NOTIFY__WEBHOOK_TIMEOUT_S", "60")],
        )
        .await;
    let (api, _) = org(&app, "acme").await;
    let (go, release) = tokio::sync::watch::channel(false);
    let r = Holding {
        seen: Arc::default(),
        release,
    };
    let url = serve_hook(
        Router::new()
            .route("/hook", post(hold))
            .with_state(r.clone()),
    )
    .await;
    let (s, hook) = call(
        &api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": ["build.scheduled"]})),
    )
    .await;
    assert_eq!(s, 201, "{hook}");
    let b = api
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("create build");
    let build_id = b["id"].as_str().expect("id").to_owned();
    // The delivery is in flight: the receiver holds its request.
    let webhook_id = eventually(T, "the first request", || async {
        r.seen.lock().expect("lock").keys().next().cloned()
    })
    .await;
    let twice = || r.seen.lock().expect("lock").get(&webhook_id).copied() > Some(1);
    // Longer than a claim lasts unless its worker renews it: the scheduler would send a
    // delivery whose claim ran out.
    tokio::time::sleep(Duration::from_secs(18)).await;
    let (msg_id, key, event) = eventually(T, "build.scheduled on the tap", || async {
        tap.snapshot().into_iter().find(|(_, k, e)| {
            k.starts_with("build.scheduled") && e["data"]["build"]["id"] == build_id.as_str()
        })
    })
    .await;
    let cfg = herald_bus::BusConfig::new(amqp_url(), env.prefix.clone());
    let publisher = herald_bus::Publisher::new(cfg.clone())
        .await
        .expect("publisher");

    // 1. The event again, as a relay that died before marking it published sends it:
    // the fan-out runs again over a delivery that is in flight.
    let events = "herald_notify_events_total";
    publisher
        .publish_events(&[herald_bus::OutgoingMessage {
            routing_key: key,
            message_id: msg_id,
            body: serde_json::to_vec(&event).expect("body"),
            headers: Vec::new(),
        }])
        .await
        .expect("publish the event again");
    eventually(T, "the fan-out to handle the copy of the event", || async {
        let outbox = env.count("SELECT count(*) FROM outbox").await as f64;
        let handled = metric(&app, events).await.unwrap_or(0.0);
        (twice() || handled > outbox).then_some(())
    })
    .await;

    // 2. The delivery message itself again, fresh (not flagged redelivered).
    let copy = herald_bus::OutgoingMessage {
        routing_key: cfg.names().delivery_queue("webhook"),
        message_id: format!("copy:{webhook_id}"),
        body: serde_json::to_vec(&json!({
            "event_id": event["id"],
            "event_type": "build.scheduled",
            "payload": {
                "type": "build.scheduled",
                "timestamp": event["timestamp"],
                "data": event["data"],
            },
            "deliveries": [{"delivery_id": webhook_id, "webhook_id": hook["id"], "attempts": 0}],
        }))
        .expect("body"),
        headers: Vec::new(),
    };
    let dropped = "herald_notify_copies_dropped_total{type=\"webhook\"}";
    publisher
        .publish_batch("", std::slice::from_ref(&copy))
        .await
        .expect("publish the delivery again");
    eventually(T, "the copy of the delivery to be handled", || async {
        let n = metric(&app, dropped).await.unwrap_or(0.0);
        (twice() || n >= 1.0).then_some(())
    })
    .await;

    // The first request answers 2xx.
    let _ = go.send(true);
    let d = eventually(T, "the delivery to succeed", || async {
        deliveries(&api, &hook)
            .await
            .into_iter()
            .find(|d| d["status"] == "succeeded")
    })
    .await;
    assert_eq!(d["id"].as_str(), Some(webhook_id.as_str()));
    assert_eq!(d["attempts"], 1, "{d}");

    // 3. A copy after the 2xx.
    publisher
        .publish_batch("", &[copy])
        .await
        .expect("publish the delivery after its 2xx");
    eventually(T, "the late copy to be handled", || async {
        let n = metric(&app, dropped).await.unwrap_or(0.0);
        (twice() || n >= 2.0).then_some(())
    })
    .await;
    let requests = r.seen.lock().expect("lock").get(&webhook_id).copied();
    assert_eq!(
        requests,
        Some(1),
        "the delivery reached the receiver more than once"
    );
    let d = deliveries(&api, &hook).await;
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["attempts"], 1, "{d:?}");

    publisher.close().await;
    tap.close().await;
    app.stop().await;
    env.cleanup().await;
}

/// `(target_url, state)` of each status a fake GitHub got.
type Statuses = Arc<Mutex<Vec<(String, String)>>>;

/// A GitHub that accepts every status.
async fn accept_status(State(got): State<Statuses>, body: axum::body::Bytes) -> StatusCode {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    got.lock()
        .expect("lock")
        .push((field("target_url"), field("state")));
    StatusCode::CREATED
}

/// The Buildkite incident's lesson for commit statuses: while webhook receivers hold a
/// backlog, the webhook fan-out waits for room, and a build's status must not wait
/// with it (it did, before the commit-status fan-out had a queue of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_statuses_arrive_while_the_webhook_fan_out_waits_for_room() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify",
            &[
                ONE_SENDER_ROOM_FOR_100.as_slice(),
                &[
                    ("HERALD_NOTIFY__WEBHOOK_TIMEOUT_S", "60"),
                    ("HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE", "6000"),
                ],
            ]
            .concat(),
        )
        .await;
    let (api, _) = org(&app, "acme").await;
    // Receivers that hold every request: the webhook queue only grows.
    let (go, release) = tokio::sync::watch::channel(false);
    let held = Holding {
        seen: Arc::default(),
        release,
    };
    let url = serve_hook(
        Router::new()
            .route("/hook", post(hold))
            .with_state(held.clone()),
    )
    .await;
    for _ in 0..5 {
        let (s, w) = call(
            &api,
            Method::POST,
            "/v1/webhooks",
            Some(json!({"url": url, "events": ["*"]})),
        )
        .await;
        assert_eq!(s, 201, "{w}");
    }
    let statuses: Statuses = Arc::default();
    let gh = Router::new()
        .route("/repos/{owner}/{repo}/statuses/{sha}", post(accept_status))
        .with_state(statuses.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, gh).await;
    });
    let (s, g) = call(
        &api,
        Method::PUT,
        "/v1/pipelines/web/github",
        Some(json!({"api_url": format!("http://{addr}"), "token": "ghp_test"})),
    )
    .await;
    assert_eq!(s, 200, "{g}");

    // 40 builds × 4 events × 5 endpoints = 800 deliveries owed, against room for 100.
    for _ in 0..40 {
        api.create_build(
            "web",
            &build_body(json!([{"key": "a"}, {"key": "b"}, {"key": "c"}])),
        )
        .await
        .expect("create");
    }
    eventually(T, "the webhook fan-out to wait for room", || async {
        metric(&app, "herald_notify_fanout_paused_total")
            .await
            .filter(|&p| p > 0.0)
    })
    .await;

    // A build canceled now: its `error` status arrives while the webhooks still wait.
    let b = api
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("create");
    let id = b["id"].as_str().expect("id").to_owned();
    let (s, _) = call(&api, Method::POST, &format!("/v1/builds/{id}/cancel"), None).await;
    assert_eq!(s, 200);
    eventually(
        Duration::from_secs(20),
        "the canceled build's status",
        || async {
            statuses
                .lock()
                .expect("lock")
                .iter()
                .any(|(target, state)| target.ends_with(&id) && state == "error")
                .then_some(())
        },
    )
    .await;
    let rows = env.count("SELECT count(*) FROM deliveries").await;
    assert!(
        rows < 800,
        "the webhook backlog had drained ({rows} deliveries), so this proved nothing"
    );
    // The commit-status fan-out's queue is an operator's queue like the others.
    let (_, q) = call(&app.admin, Method::GET, "/v1/ops/queues", None).await;
    let name = format!("{}.notify.commit_status", env.prefix);
    assert!(
        q["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["name"] == name.as_str())),
        "{q}"
    );
    let _ = go.send(true);
    app.stop().await;
    env.cleanup().await;
}

/// A PostgreSQL restart ends every session: a worker that sent a delivery and got its
/// 2xx may need longer than its 15 s claim to reconnect and write the result (the chaos
/// runs saw 25 s), and the scheduler used to send such a delivery again as soon as the
/// claim ran out. The scheduler elected after a restart now honours claims renewed
/// before the server started until `notify.claim_restart_grace_s` after the start. The
/// shared server here started long ago, so a grace longer than its uptime stands in
/// for a restart a moment ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_from_before_a_database_restart_are_honoured_not_sent_again() {
    let env = TestEnv::new().await;
    let mut app = env.start("api,relay,dispatch,notify", &[PRIVATE_OK]).await;
    let (api, reg) = org(&app, "acme").await;
    let (url, r) = spawn_receiver(ok_always, Duration::ZERO).await;
    webhook(&api, &url, json!(["*"]), &r).await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    run_build(&api, &agent, json!([{"key": "a"}])).await;
    eventually(T, "every delivery answered", || async {
        let open = env
            .count("SELECT count(*) FROM deliveries WHERE status <> 'succeeded'")
            .await;
        let all = env.count("SELECT count(*) FROM deliveries").await;
        (open == 0 && all >= 2).then_some(())
    })
    .await;
    app.stop().await;
    let rows: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM deliveries ORDER BY id LIMIT 2")
        .fetch_all(&env.pool)
        .await
        .expect("deliveries");
    let (held, due) = (rows[0].0, rows[1].0);
    // Held: claimed, and last renewed a second before the server started (its holder
    // lost its connection to the restart). Due: a plain retry, due now.
    for (id, sql) in [
        (
            held,
            "UPDATE deliveries SET status = 'pending', \
             claimed_until = pg_postmaster_start_time() - interval '1 second', \
             next_attempt_at = pg_postmaster_start_time() - interval '1 second' WHERE id = $1",
        ),
        (
            due,
            "UPDATE deliveries SET status = 'pending', claimed_until = NULL, \
             next_attempt_at = now() WHERE id = $1",
        ),
    ] {
        sqlx::query(sql)
            .bind(id)
            .execute(&env.pool)
            .await
            .expect("set up the delivery");
    }
    let uptime: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8")
            .fetch_one(&env.pool)
            .await
            .expect("uptime");
    let grace = format!("{}", uptime.ceil() + 3600.0);
    let before = r.got.lock().expect("lock").len();
    let mut app = env
        .start(
            "api,relay,notify",
            &[PRIVATE_OK, ("HERALD_NOTIFY__CLAIM_RESTART_GRACE_S", &grace)],
        )
        .await;
    let attempts = |id: uuid::Uuid| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT attempts FROM deliveries WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("attempts")
        }
    };
    eventually(T, "the due delivery sent again", || async {
        (attempts(due).await == 2).then_some(())
    })
    .await;
    // The scheduler's pass that sent the due row left the held one alone: still
    // pending, still claimed (until start + grace), never marked for the broker.
    let (status, claimed_for_s): (String, Option<f64>) = sqlx::query_as(
        "SELECT status, extract(epoch FROM claimed_until - now())::float8 FROM deliveries WHERE id = $1",
    )
    .bind(held)
    .fetch_one(&env.pool)
    .await
    .expect("held row");
    assert_eq!(status, "pending");
    assert!(
        claimed_for_s.is_some_and(|s| s > 3000.0),
        "the claim from before the restart must hold until start + grace: {claimed_for_s:?}"
    );
    assert_eq!(
        attempts(held).await,
        1,
        "the held delivery was not sent again"
    );
    assert_eq!(
        r.got.lock().expect("lock").len(),
        before + 1,
        "only the due delivery reached the receiver again"
    );
    app.stop().await;
    env.cleanup().await;
}

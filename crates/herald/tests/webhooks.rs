//! Webhooks receivers can live with (contract v1.1): update, secret rotation with two
//! signatures, auto-disable, recover by time window (also across a kill -9 of the
//! notify process), delivery search, one delivery's attempts, the event catalog and a
//! per-endpoint rate. Over HTTP, against real receivers on port 0, the real
//! PostgreSQL and RabbitMQ.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::*;
use herald_client::{Client, Method};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);
const PRIVATE_OK: (&str, &str) = ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true");
const FAST_RETRY: (&str, &str) = ("HERALD_NOTIFY__RETRY_SCALE", "0.01");
const ALL_ROLES: &str = "api,relay,dispatch,notify,maintenance";

#[derive(Clone, Debug)]
struct Got {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    at: Instant,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// A receiver that records everything and answers with `status` (changeable).
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start(status: u16) -> Receiver {
        Self::start_slow(status, Duration::ZERO).await
    }

    async fn start_slow(status: u16, delay: Duration) -> Receiver {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(status));
        let state = (got.clone(), status.clone(), delay);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            got,
            status,
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn count(&self) -> usize {
        self.got.lock().map(|g| g.len()).unwrap_or(0)
    }

    fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

type ReceiverState = (Arc<Mutex<Vec<Got>>>, Arc<AtomicU16>, Duration);

async fn receive(
    State((got, status, delay)): State<ReceiverState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if let Ok(mut g) = got.lock() {
        g.push(Got {
            id: h("webhook-id"),
            timestamp: h("webhook-timestamp"),
            signature: h("webhook-signature"),
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
        });
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK)
}

async fn create_hook(api: &Client, url: &str, events: Value) -> Value {
    let (s, w) = call(
        api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": events})),
    )
    .await;
    assert_eq!(s, 201, "{w}");
    w
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

async fn get_hook(api: &Client, id: &str) -> Value {
    let (s, w) = call(api, Method::GET, &format!("/v1/webhooks/{id}"), None).await;
    assert_eq!(s, 200, "{w}");
    w
}

async fn patch(api: &Client, id: &str, body: Value) -> (u16, Value) {
    call(
        api,
        Method::PATCH,
        &format!("/v1/webhooks/{id}"),
        Some(body),
    )
    .await
}

async fn recover(api: &Client, hook: &str, since: chrono::DateTime<chrono::Utc>) -> (u16, Value) {
    call(
        api,
        Method::POST,
        &format!("/v1/webhooks/{hook}/recover"),
        Some(json!({"since": since.to_rfc3339()})),
    )
    .await
}

async fn list(api: &Client, id: &str, query: &str) -> (u16, Value) {
    call(
        api,
        Method::GET,
        &format!("/v1/webhooks/{id}/deliveries?{query}"),
        None,
    )
    .await
}

async fn items(api: &Client, id: &str, query: &str) -> Vec<Value> {
    let (s, d) = list(api, id, query).await;
    assert_eq!(s, 200, "{d}");
    d["items"].as_array().cloned().unwrap_or_default()
}

/// Runs a build of `jobs` with one agent, passing every job.
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

fn assert_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{body}"
    );
}

// ------------------------------------------------------------------------------------
// Python helpers: the official Standard Webhooks library and jsonschema, pinned and
// installed by scripts/python-deps.sh.
// ------------------------------------------------------------------------------------

fn python() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/python-deps.sh"))
        .output()
        .expect("run scripts/python-deps.sh");
    assert!(
        out.status.success(),
        "scripts/python-deps.sh could not install the pinned Python libraries (standardwebhooks, \
         jsonschema); this test needs them and does not pass without them:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let venv = std::env::var("HERALD_VENV").unwrap_or_else(|_| "/var/tmp/herald-venv".into());
    format!("{venv}/bin/python")
}

/// Runs `script` with `input` as JSON on stdin; returns its JSON output.
fn run_python(script: &str, input: &Value) -> Value {
    use std::io::Write;
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

const VERIFY_PY: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
req = json.load(sys.stdin)
out = []
for m in req["messages"]:
    headers = {"webhook-id": m["id"], "webhook-timestamp": m["timestamp"],
               "webhook-signature": m["signature"]}
    row = []
    for secret in req["secrets"]:
        try:
            Webhook(secret).verify(m["body"], headers)
            row.append(True)
        except Exception:
            row.append(False)
    out.append(row)
print(json.dumps(out))
"#;

/// For each message, whether the official library verifies it with each secret.
fn standardwebhooks_verify(messages: &[Got], secrets: &[&str]) -> Vec<Vec<bool>> {
    let msgs: Vec<Value> = messages
        .iter()
        .map(|g| json!({"id": g.id, "timestamp": g.timestamp, "signature": g.signature, "body": g.body}))
        .collect();
    let out = run_python(VERIFY_PY, &json!({"messages": msgs, "secrets": secrets}));
    serde_json::from_value(out).expect("rows of booleans")
}

const SCHEMA_PY: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
req = json.load(sys.stdin)
errors = []
for item in req["payloads"]:
    schema = req["schemas"][item["type"]]
    Draft202012Validator.check_schema(schema)
    for e in Draft202012Validator(schema).iter_errors(item["data"]):
        errors.append("%s: %s at %s" % (item["type"], e.message, list(e.path)))
print(json.dumps(errors))
"#;

// ------------------------------------------------------------------------------------
// 1. PATCH
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_moves_an_endpoint_and_every_notify_process_follows() {
    let env = TestEnv::new().await;
    // Two notify processes of their own besides the in-process app (which runs none):
    // both must drop their cached subscription.
    let mut app = env
        .start("api,relay,dispatch,maintenance", &[PRIVATE_OK])
        .await;
    let mut notify_a = env.spawn("notify", &[PRIVATE_OK]);
    let mut notify_b = env.spawn("notify", &[PRIVATE_OK]);
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let old = Receiver::start(200).await;
    let new = Receiver::start(200).await;
    let hook = create_hook(&api, &old.url, json!(["job.finished"])).await;
    let id = id_of(&hook);
    assert_eq!(hook["enabled"], true);
    assert_eq!(hook["disabled_reason"], Value::Null);
    assert_eq!(hook["rate_per_s"], Value::Null);
    assert!(hook["created_at"].is_string());
    // Warm both processes' caches: many jobs, spread over both fan-outs.
    let jobs: Vec<Value> = (0..8).map(|i| json!({"key": format!("j{i}")})).collect();
    run_build(&api, &agent, json!(jobs)).await;
    eventually(T, "the old URL to get every job.finished", || async {
        (old.count() >= 8).then_some(())
    })
    .await;

    let (s, w) = patch(
        &api,
        &id,
        json!({"url": new.url, "events": ["job.*", "build.finished"], "rate_per_s": 50.5}),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(w["url"], new.url.as_str());
    assert_eq!(w["events"], json!(["job.*", "build.finished"]));
    assert_eq!(w["rate_per_s"], 50.5);
    assert!(w.get("secret").is_none());
    assert_eq!(get_hook(&api, &id).await, w);
    // The contract's promise: every process follows within 1 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = old.count();
    run_build(&api, &agent, json!(jobs)).await;
    eventually(T, "the new URL to get the build's events", || async {
        let got = new.got();
        let finished = got
            .iter()
            .filter(|g| g.json()["type"] == "build.finished")
            .count();
        (finished == 1 && got.len() > 8 * 4).then_some(())
    })
    .await;
    assert_eq!(old.count(), before, "nothing more reached the old URL");

    // Back to every pipeline's events, then scoped to one, then null again.
    let (s, w) = patch(&api, &id, json!({"pipeline": "web"})).await;
    assert_eq!((s, w["pipeline"].clone()), (200, json!("web")), "{w}");
    let (s, w) = patch(&api, &id, json!({"pipeline": null, "rate_per_s": null})).await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(w["pipeline"], Value::Null);
    assert_eq!(w["rate_per_s"], Value::Null);
    assert_eq!(w["url"], new.url.as_str(), "fields not sent stay");
    kill9(&mut notify_a);
    kill9(&mut notify_b);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_refuses_bad_input_private_urls_and_other_orgs() {
    let env = TestEnv::new().await;
    // No private networks here: the SSRF guard is on.
    let mut app = env.start("api", &[]).await;
    let (api, _) = org(&app, "acme").await;
    let (other, _) = org(&app, "other").await;
    let hook = create_hook(&api, "https://93.184.216.34/hook", json!(["build.*"])).await;
    let id = id_of(&hook);
    for (body, code) in [
        (json!({"url": "http://127.0.0.1:9/hook"}), "invalid_url"),
        (
            json!({"url": "http://169.254.169.254/latest"}),
            "invalid_url",
        ),
        (json!({"url": "http://[::1]/"}), "invalid_url"),
        (json!({"url": "ftp://example.com/"}), "invalid_url"),
        (json!({"events": []}), "validation_failed"),
        (json!({"events": ["build.done"]}), "validation_failed"),
        (json!({"rate_per_s": 0}), "validation_failed"),
        (json!({"rate_per_s": -1.5}), "validation_failed"),
        (json!({"rate_per_s": "fast"}), "invalid_body"),
        (json!({"enabled": "yes"}), "invalid_body"),
        (json!({"pipeline": "nope"}), "validation_failed"),
        (json!({"secret": "whsec_AAAA"}), "invalid_body"),
    ] {
        let (s, e) = patch(&api, &id, body.clone()).await;
        assert_error(s, &e, 422);
        assert_eq!(e["error"]["code"], code, "{body}: {e}");
    }
    assert_eq!(get_hook(&api, &id).await, hook_without_secret(&hook));
    // Another org's webhook, a malformed id and an unknown one: 404.
    for (client, path_id) in [
        (&other, id.clone()),
        (&api, "not-a-uuid".to_owned()),
        (&api, Uuid::now_v7().to_string()),
    ] {
        let (s, e) = patch(client, &path_id, json!({"enabled": false})).await;
        assert_error(s, &e, 404);
        for path in [
            format!("/v1/webhooks/{path_id}/rotate-secret"),
            format!("/v1/webhooks/{path_id}/recover"),
        ] {
            let (s, e) = call(
                client,
                Method::POST,
                &path,
                Some(json!({"since": chrono::Utc::now().to_rfc3339()})),
            )
            .await;
            // rotate-secret refuses the unknown field `since` first (422) unless the
            // id cannot name a webhook of this org.
            assert!(
                s == 404 || (s == 422 && path.ends_with("rotate-secret")),
                "{path}: {s} {e}"
            );
        }
        let (s, e) = call(
            client,
            Method::POST,
            &format!("/v1/webhooks/{path_id}/rotate-secret"),
            Some(json!({})),
        )
        .await;
        assert_error(s, &e, 404);
        let (s, e) = list(client, &path_id, "").await;
        assert_error(s, &e, 404);
    }
    assert_eq!(
        get_hook(&api, &id).await["enabled"],
        true,
        "the other org changed nothing"
    );
    // Manual disable and enable.
    let (s, w) = patch(&api, &id, json!({"enabled": false})).await;
    assert_eq!(s, 200);
    assert_eq!(
        (w["enabled"].clone(), w["disabled_reason"].clone()),
        (json!(false), json!("manual"))
    );
    let (s, w) = patch(&api, &id, json!({"enabled": true})).await;
    assert_eq!(s, 200);
    assert_eq!(
        (w["enabled"].clone(), w["disabled_reason"].clone()),
        (json!(true), Value::Null)
    );
    app.stop().await;
    env.cleanup().await;
}

fn hook_without_secret(created: &Value) -> Value {
    let mut v = created.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("secret");
    }
    v
}

// ------------------------------------------------------------------------------------
// 2. Rotation
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_secret_signs_with_both_until_the_old_one_expires() {
    let py = python(); // fails here, clearly, if the pinned library cannot be installed
    assert!(!py.is_empty());
    let env = TestEnv::new().await;
    let mut app = env.start(ALL_ROLES, &[PRIVATE_OK]).await;
    let (api, reg) = org(&app, "acme").await;
    let (other, _) = org(&app, "other").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let r = Receiver::start(200).await;
    let hook = create_hook(&api, &r.url, json!(["job.finished"])).await;
    let id = id_of(&hook);
    let s1 = hook["secret"].as_str().expect("secret").to_owned();
    let rotate = |client: Client, body: Value| {
        let id = id.clone();
        async move {
            call(
                &client,
                Method::POST,
                &format!("/v1/webhooks/{id}/rotate-secret"),
                Some(body),
            )
            .await
        }
    };
    for bad in [
        json!({"old_secret_valid_s": -1}),
        json!({"old_secret_valid_s": 604801}),
        json!({"old_secret_valid_s": 1.5}),
        json!({"old_secret_valid_s": "1h"}),
    ] {
        let (s, e) = rotate(api.clone(), bad.clone()).await;
        assert_error(s, &e, 422);
    }
    let (s, e) = rotate(other.clone(), json!({})).await;
    assert_error(s, &e, 404);

    let (s, rot) = rotate(api.clone(), json!({"old_secret_valid_s": 3600})).await;
    assert_eq!(s, 200, "{rot}");
    let s2 = rot["secret"].as_str().expect("secret").to_owned();
    assert!(s2.starts_with("whsec_") && s2 != s1);
    let expires = chrono::DateTime::parse_from_rfc3339(
        rot["old_secret_expires_at"].as_str().expect("expires"),
    )
    .expect("rfc3339");
    let ahead = expires.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        ahead > chrono::Duration::minutes(55) && ahead <= chrono::Duration::minutes(60),
        "{ahead}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // the 1 s promise of propagation
    let jobs = json!([{"key": "a"}, {"key": "b"}, {"key": "c"}]);
    run_build(&api, &agent, jobs.clone()).await;
    let during = eventually(T, "three deliveries", || async {
        let g = r.got();
        (g.len() >= 3).then_some(g)
    })
    .await;
    for g in &during {
        let ts: i64 = g.timestamp.parse().expect("timestamp");
        let sigs: Vec<&str> = g.signature.split(' ').collect();
        assert_eq!(sigs.len(), 2, "two signatures: {}", g.signature);
        for secret in [&s1, &s2] {
            assert!(
                herald_notify::webhook::verify(secret, &g.id, ts, g.body.as_bytes(), &g.signature),
                "Herald's verifier with one secret alone"
            );
        }
        assert!(!herald_notify::webhook::verify(
            &herald_notify::webhook::generate_secret(),
            &g.id,
            ts,
            g.body.as_bytes(),
            &g.signature
        ));
        // The new signature comes first.
        assert_eq!(
            sigs[0],
            herald_notify::webhook::sign(&s2, &g.id, ts, g.body.as_bytes()).expect("sign")
        );
    }
    let unrelated = herald_notify::webhook::generate_secret();
    let official = standardwebhooks_verify(&during, &[&s1, &s2, &unrelated]);
    assert_eq!(official.len(), during.len());
    for row in &official {
        assert_eq!(
            row,
            &vec![true, true, false],
            "standardwebhooks: old alone, new alone, neither"
        );
    }

    // A rotation with no overlap: only the newest secret signs.
    let (s, rot) = rotate(api.clone(), json!({"old_secret_valid_s": 0})).await;
    assert_eq!(s, 200, "{rot}");
    let s3 = rot["secret"].as_str().expect("secret").to_owned();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = r.count();
    run_build(&api, &agent, jobs).await;
    let after = eventually(T, "three more deliveries", || async {
        let g = r.got();
        (g.len() >= seen + 3).then(|| g[seen..].to_vec())
    })
    .await;
    for g in &after {
        assert_eq!(g.signature.split(' ').count(), 1, "{}", g.signature);
    }
    for row in standardwebhooks_verify(&after, &[&s3, &s2, &s1]) {
        assert_eq!(row, vec![true, false, false]);
    }
    app.stop().await;
    env.cleanup().await;
}

// ------------------------------------------------------------------------------------
// 3. Auto-disable, 410, manual; skipping; re-enable; recover's 409 and 422
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_endpoint_is_disabled_announced_skipped_and_recovered_after_enable() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            ALL_ROLES,
            &[
                PRIVATE_OK,
                FAST_RETRY,
                ("HERALD_WEBHOOKS__DISABLE_AFTER_S", "1"),
                ("HERALD_WEBHOOKS__DISABLE_MIN_FAILURES", "3"),
            ],
        )
        .await;
    let started = chrono::Utc::now();
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let failing = Receiver::start(500).await;
    let gone = Receiver::start(410).await;
    let watcher = Receiver::start(200).await;
    let hook = create_hook(&api, &failing.url, json!(["build.finished"])).await;
    let id = id_of(&hook);
    let gone_hook = create_hook(&api, &gone.url, json!(["build.finished"])).await;
    let watch = create_hook(&api, &watcher.url, json!(["webhook.*"])).await;

    run_build(&api, &agent, json!([{"key": "a"}])).await;
    let w = eventually(T, "the failing endpoint to be disabled", || async {
        let w = get_hook(&api, &id).await;
        (w["enabled"] == false).then_some(w)
    })
    .await;
    assert_eq!(w["disabled_reason"], "failing");
    assert_eq!(w["disabled"], true);
    let g = eventually(T, "the 410 endpoint to be disabled", || async {
        let w = get_hook(&api, &id_of(&gone_hook)).await;
        (w["enabled"] == false).then_some(w)
    })
    .await;
    assert_eq!(g["disabled_reason"], "gone");
    let attempts_at_disable = failing.count();
    assert!(attempts_at_disable >= 3, "{attempts_at_disable}");

    // Both disables were announced to the org's other webhook, once each.
    let events = eventually(T, "two webhook.disabled events", || async {
        let got = watcher.got();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let mut reasons: Vec<(String, String)> = events
        .iter()
        .map(|g| {
            let v = g.json();
            assert_eq!(v["type"], "webhook.disabled");
            (
                v["data"]["webhook"]["id"].as_str().unwrap_or("").to_owned(),
                v["data"]["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    reasons.sort();
    let mut want = vec![
        (id.clone(), "failing".to_owned()),
        (id_of(&gone_hook), "gone".to_owned()),
    ];
    want.sort();
    assert_eq!(reasons, want);
    assert!(events
        .iter()
        .all(|g| g.json()["data"]["webhook"].get("secret").is_none()));
    assert_eq!(
        metric(&app, "herald_webhooks_disabled_total{reason=\"failing\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&app, "herald_webhooks_disabled_total{reason=\"gone\"}").await,
        Some(1.0)
    );

    // Disabled: new deliveries are recorded skipped; the pending retry becomes skipped.
    run_build(&api, &agent, json!([{"key": "a"}])).await;
    let rows = eventually(T, "both deliveries to be skipped", || async {
        let d = items(&api, &id, "").await;
        (d.len() == 2 && d.iter().all(|d| d["status"] == "skipped")).then_some(d)
    })
    .await;
    assert_eq!(
        failing.count(),
        attempts_at_disable,
        "no attempt while disabled"
    );
    let (s, e) = recover(&api, &id.to_string(), started).await;
    assert_error(s, &e, 409);

    // Re-enable: the reason and the streak are cleared; a recover sends both again,
    // once each, with their original webhook-id.
    failing.answer(200);
    let (s, w) = patch(&api, &id, json!({"enabled": true})).await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(
        (w["enabled"].clone(), w["disabled_reason"].clone()),
        (json!(true), Value::Null)
    );
    let (s, q) = recover(&api, &id.to_string(), started).await;
    assert_eq!((s, q["queued"].clone()), (202, json!(2)), "{q}");
    eventually(T, "both recovered deliveries to succeed", || async {
        let d = items(&api, &id, "").await;
        d.iter().all(|d| d["status"] == "succeeded").then_some(())
    })
    .await;
    let got = failing.got();
    let recovered: Vec<&Got> = got[attempts_at_disable..].iter().collect();
    let mut ids: Vec<String> = recovered.iter().map(|g| g.id.clone()).collect();
    ids.sort();
    let mut want: Vec<String> = rows
        .iter()
        .map(|d| d["id"].as_str().unwrap_or("").to_owned())
        .collect();
    want.sort();
    assert_eq!(
        ids, want,
        "each sent once more, with its original webhook-id"
    );
    // Nothing is left to recover.
    let (s, q) = recover(&api, &id.to_string(), started).await;
    assert_eq!((s, q["queued"].clone()), (202, json!(0)));

    // A manual disable is announced too.
    let (s, _) = patch(&api, &id, json!({"enabled": false})).await;
    assert_eq!(s, 200);
    eventually(T, "the manual webhook.disabled", || async {
        watcher
            .got()
            .iter()
            .any(|g| g.json()["data"]["reason"] == "manual")
            .then_some(())
    })
    .await;
    assert_eq!(
        metric(&app, "herald_webhooks_disabled_total{reason=\"manual\"}").await,
        Some(1.0)
    );
    let _ = watch;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_refuses_bad_windows_and_history_it_no_longer_has() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api",
            &[PRIVATE_OK, ("HERALD_NOTIFY__HISTORY_RETENTION_S", "3600")],
        )
        .await;
    let (api, _) = org(&app, "acme").await;
    let hook = create_hook(&api, "http://127.0.0.1:9/hook", json!(["build.*"])).await;
    let id = id_of(&hook);
    let now = chrono::Utc::now();
    let path = format!("/v1/webhooks/{id}/recover");
    for (body, code) in [
        (
            json!({"since": (now - chrono::Duration::hours(2)).to_rfc3339()}),
            "since_out_of_history",
        ),
        (
            json!({"since": now.to_rfc3339(), "until": (now - chrono::Duration::minutes(1)).to_rfc3339()}),
            "validation_failed",
        ),
        (
            json!({"since": now.to_rfc3339(), "until": now.to_rfc3339()}),
            "validation_failed",
        ),
        (json!({}), "invalid_body"),
        (json!({"since": "yesterday"}), "invalid_body"),
        (
            json!({"since": now.to_rfc3339(), "limit": 5}),
            "invalid_body",
        ),
    ] {
        let (s, e) = call(&api, Method::POST, &path, Some(body.clone())).await;
        assert_error(s, &e, 422);
        assert_eq!(e["error"]["code"], code, "{body}: {e}");
    }
    let (s, q) = call(
        &api,
        Method::POST,
        &path,
        Some(json!({"since": (now - chrono::Duration::minutes(59)).to_rfc3339()})),
    )
    .await;
    assert_eq!((s, q), (202, json!({"queued": 0})));
    app.stop().await;
    env.cleanup().await;
}

// ------------------------------------------------------------------------------------
// 4. Recover across a kill -9 of the notify process
// ------------------------------------------------------------------------------------

/// `n` dead deliveries of `webhook`, created `age` ago, with one stored body.
async fn dead_deliveries(env: &TestEnv, org: Uuid, webhook: Uuid, n: i64, age_s: i64) {
    let event = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO delivery_payloads (event_id, payload) VALUES ($1, $2)",
    )
    .bind(event)
    .bind(json!({"type": "build.finished", "timestamp": "2026-01-01T00:00:00Z", "data": {"n": 1}}))
    .execute(&env.pool)
    .await
    .expect("payload");
    // One event per row would be the real shape; the unique key is (event, webhook),
    // so each row gets an event id of its own and points at the one stored body.
    sqlx::query(
        "INSERT INTO delivery_payloads (event_id, payload) \
         SELECT e, p.payload FROM generate_series(1, $2) g, delivery_payloads p, \
              LATERAL (SELECT md5(p.event_id::text || g)::uuid AS e) x WHERE p.event_id = $1",
    )
    .bind(event)
    .bind(n)
    .execute(&env.pool)
    .await
    .expect("payloads");
    sqlx::query(
        "INSERT INTO deliveries (id, org_id, webhook_id, event_id, event_type, status, attempts, created_at) \
         SELECT gen_random_uuid(), $1, $2, md5($3::text || g)::uuid, 'build.finished', 'dead', 9, \
                now() - make_interval(secs => $5) + g * interval '1 millisecond' \
         FROM generate_series(1, $4) g",
    )
    .bind(org)
    .bind(webhook)
    .bind(event)
    .bind(n)
    .bind(age_s as f64)
    .execute(&env.pool)
    .await
    .expect("deliveries");
}

async fn org_id(env: &TestEnv, slug: &str) -> Uuid {
    sqlx::query_scalar("SELECT id FROM orgs WHERE slug = $1")
        .bind(slug)
        .fetch_one(&env.pool)
        .await
        .expect("org id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recover_survives_a_kill_of_notify_losing_nothing_and_repeating_no_success() {
    let env = TestEnv::new().await;
    let mut app = env
        .start("api,relay,dispatch,maintenance", &[PRIVATE_OK])
        .await;
    // Small batches and a small allowed backlog: the recover takes many steps, so the
    // kill lands in the middle of it.
    let notify_vars = [
        PRIVATE_OK,
        ("HERALD_NOTIFY__SCHEDULER_BATCH", "100"),
        ("HERALD_NOTIFY__FANOUT_MAX_BACKLOG", "100"),
    ];
    let (api, _) = org(&app, "acme").await;
    let r = Receiver::start_slow(200, Duration::from_millis(2)).await;
    let hook = create_hook(&api, &r.url, json!(["build.finished"])).await;
    let hook_id = Uuid::parse_str(&id_of(&hook)).expect("uuid");
    const N: i64 = 3000;
    dead_deliveries(&env, org_id(&env, "acme").await, hook_id, N, 600).await;
    let mut notify = env.spawn("notify", &notify_vars);
    let since = chrono::Utc::now() - chrono::Duration::minutes(15);
    let (s, q) = recover(&api, &hook_id.to_string(), since).await;
    assert_eq!((s, q["queued"].clone()), (202, json!(N)), "{q}");
    eventually(T, "part of the recover to arrive", || async {
        (r.count() > 300).then_some(())
    })
    .await;
    kill9(&mut notify);
    let got_at_kill = r.count();
    // What was recorded as a success must never be sent again.
    let succeeded: HashSet<String> =
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM deliveries WHERE status = 'succeeded'")
            .fetch_all(&env.pool)
            .await
            .expect("succeeded")
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    assert!(
        (succeeded.len() as i64) < N,
        "the kill landed before the recover finished ({} of {N})",
        succeeded.len()
    );
    let mut notify = env.spawn("notify", &notify_vars);
    eventually(
        Duration::from_secs(120),
        "every recovered delivery to succeed",
        || async {
            let n = env
                .count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
                .await;
            (n == N).then_some(())
        },
    )
    .await;
    let got = r.got();
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM deliveries")
        .fetch_all(&env.pool)
        .await
        .expect("ids");
    let seen: HashSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert!(
        ids.iter().all(|id| seen.contains(id.to_string().as_str())),
        "every delivery reached the receiver with its own webhook-id"
    );
    let repeated: Vec<&Got> = got[got_at_kill..]
        .iter()
        .filter(|g| succeeded.contains(&g.id))
        .collect();
    assert!(
        repeated.is_empty(),
        "{} deliveries recorded as succeeded were sent again",
        repeated.len()
    );
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for g in &got {
        *per_id.entry(g.id.as_str()).or_default() += 1;
    }
    // Only one caught between its 2xx and the commit of its result can come twice.
    let twice = per_id.values().filter(|&&c| c > 1).count();
    assert!(twice <= 256, "{twice} sent twice");
    eventually(T, "the recover to be finished", || async {
        (env.count("SELECT count(*) FROM webhook_recoveries WHERE finished_at IS NULL")
            .await
            == 0)
            .then_some(())
    })
    .await;
    kill9(&mut notify);
    app.stop().await;
    env.cleanup().await;
}

// ------------------------------------------------------------------------------------
// 5, 6. Delivery search, one delivery with its attempts
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_are_filtered_paginated_and_shown_with_their_attempts() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL_ROLES, &[PRIVATE_OK, FAST_RETRY]).await;
    let (api, reg) = org(&app, "acme").await;
    let (other, _) = org(&app, "other").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let r = Receiver::start(200).await;
    let hook = create_hook(&api, &r.url, json!(["build.*", "job.finished"])).await;
    let id = id_of(&hook);
    let t0 = chrono::Utc::now();
    run_build(&api, &agent, json!([{"key": "a"}, {"key": "b"}])).await;
    // build.scheduled, build.running, build.finished, 2 × job.finished.
    eventually(T, "five deliveries to succeed", || async {
        let d = items(&api, &id, "status=succeeded").await;
        (d.len() == 5).then_some(())
    })
    .await;
    let t1 = chrono::Utc::now();
    // Then a receiver that fails twice, then succeeds.
    r.answer(500);
    run_build(&api, &agent, json!([{"key": "c"}])).await;
    eventually(T, "failed deliveries", || async {
        let d = items(&api, &id, "status=failed").await;
        (!d.is_empty()).then_some(())
    })
    .await;
    r.answer(200);
    eventually(T, "all nine to succeed", || async {
        let d = items(&api, &id, "status=succeeded").await;
        (d.len() == 9).then_some(())
    })
    .await;

    let all = items(&api, &id, "").await;
    assert_eq!(all.len(), 9);
    let created: Vec<String> = all
        .iter()
        .map(|d| d["created_at"].as_str().unwrap_or("").to_owned())
        .collect();
    let mut sorted = created.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(created, sorted, "newest first");
    let finished = items(&api, &id, "event_type=job.finished").await;
    assert_eq!(finished.len(), 3);
    assert!(finished.iter().all(|d| d["event_type"] == "job.finished"));
    let q = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339().replace('+', "%2B");
    let first = items(&api, &id, &format!("since={}&until={}", q(t0), q(t1))).await;
    assert_eq!(first.len(), 5);
    let second = items(&api, &id, &format!("since={}", q(t1))).await;
    assert_eq!(second.len(), 4);
    let combined = items(
        &api,
        &id,
        &format!("since={}&event_type=job.finished&status=succeeded", q(t1)),
    )
    .await;
    assert_eq!(combined.len(), 1);
    assert_eq!(
        items(&api, &id, &format!("until={}&status=failed", q(t1)))
            .await
            .len(),
        0
    );
    // Keyset pages of 2 walk the same list.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=2&cursor={c}"),
            None => "limit=2".to_owned(),
        };
        let (s, page) = list(&api, &id, &query).await;
        assert_eq!(s, 200, "{page}");
        walked.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, all);
    let (s, page) = list(
        &api,
        &id,
        "limit=1&status=succeeded&event_type=build.finished",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    let c = page["next_cursor"].as_str().expect("cursor").to_owned();
    let (s, rest) = list(
        &api,
        &id,
        &format!("limit=1&status=succeeded&event_type=build.finished&cursor={c}"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(1));
    assert_ne!(rest["items"][0]["id"], page["items"][0]["id"]);
    assert_eq!(rest["next_cursor"], Value::Null);
    for bad in [
        "status=lost",
        "event_type=build.done",
        "since=yesterday",
        "until=12",
        "limit=0",
        "cursor=zz",
    ] {
        let (s, e) = list(&api, &id, bad).await;
        assert!(s == 422 || s == 400, "{bad}: {s} {e}");
        assert!(e["error"]["code"].is_string(), "{e}");
    }

    // One delivery: its attempts, newest first.
    let retried = all
        .iter()
        .find(|d| d["attempts"].as_i64().unwrap_or(0) >= 2)
        .expect("a retried delivery");
    let did = retried["id"].as_str().expect("id");
    let (s, one) = call(&api, Method::GET, &format!("/v1/deliveries/{did}"), None).await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["id"], did);
    assert_eq!(one["status"], "succeeded");
    let attempts = one["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len() as i64,
        retried["attempts"].as_i64().unwrap_or(0)
    );
    assert_eq!(attempts[0]["status_code"], 200, "newest first: {one}");
    assert_eq!(attempts[0]["error"], Value::Null);
    let last = &attempts[attempts.len() - 1];
    assert_eq!(last["status_code"], 500);
    assert!(
        last["error"].as_str().is_some_and(|e| e.contains("500")),
        "{last}"
    );
    for a in attempts {
        assert!(a["at"].is_string() && a["duration_ms"].is_i64(), "{a}");
    }
    let ats: Vec<&str> = attempts.iter().filter_map(|a| a["at"].as_str()).collect();
    let mut sorted = ats.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ats, sorted);
    for (client, path_id) in [
        (&other, did.to_owned()),
        (&api, Uuid::now_v7().to_string()),
        (&api, "nope".to_owned()),
    ] {
        let (s, e) = call(
            client,
            Method::GET,
            &format!("/v1/deliveries/{path_id}"),
            None,
        )
        .await;
        assert_error(s, &e, 404);
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivery_filter_uses_an_index_on_100000_deliveries() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[PRIVATE_OK]).await;
    let (api, _) = org(&app, "acme").await;
    let mut hooks = Vec::new();
    for i in 0..10 {
        let h = create_hook(&api, &format!("http://127.0.0.1:9/hook{i}"), json!(["*"])).await;
        hooks.push(Uuid::parse_str(&id_of(&h)).expect("uuid"));
    }
    let org = org_id(&env, "acme").await;
    sqlx::query(
        "INSERT INTO deliveries (id, org_id, webhook_id, event_id, event_type, status, attempts, created_at) \
         SELECT gen_random_uuid(), $1, ($2::uuid[])[1 + g % 10], gen_random_uuid(), \
                (ARRAY['build.scheduled','build.running','build.finished','job.scheduled','job.assigned', \
                       'job.started','job.finished','agent.connected'])[1 + floor(random() * 8)::int], \
                (ARRAY['succeeded','succeeded','succeeded','succeeded','succeeded','succeeded','failed','dead','skipped','pending'])[1 + floor(random() * 10)::int], \
                1, now() - g * interval '1 second' \
         FROM generate_series(1, 100000) g",
    )
    .bind(org)
    .bind(&hooks)
    .execute(&env.pool)
    .await
    .expect("insert 100000 deliveries");
    sqlx::query("ANALYZE deliveries")
        .execute(&env.pool)
        .await
        .expect("analyze");
    let some = sqlx::query_scalar::<_, Uuid>(
        "SELECT id FROM deliveries WHERE webhook_id = $1 ORDER BY created_at DESC LIMIT 1 OFFSET 500",
    )
    .bind(hooks[3])
    .fetch_one(&env.pool)
    .await
    .expect("a cursor");
    let now = chrono::Utc::now();
    use herald_storage::notify::{explain_list_deliveries, DeliveryFilter};
    let filters = [
        DeliveryFilter::default(),
        DeliveryFilter {
            status: Some("failed".into()),
            ..Default::default()
        },
        DeliveryFilter {
            status: Some("succeeded".into()),
            ..Default::default()
        },
        DeliveryFilter {
            event_type: Some("job.finished".into()),
            ..Default::default()
        },
        DeliveryFilter {
            since: Some(now - chrono::Duration::hours(3)),
            ..Default::default()
        },
        DeliveryFilter {
            until: Some(now - chrono::Duration::hours(20)),
            ..Default::default()
        },
        DeliveryFilter {
            since: Some(now - chrono::Duration::hours(10)),
            until: Some(now - chrono::Duration::hours(9)),
            ..Default::default()
        },
        DeliveryFilter {
            status: Some("dead".into()),
            event_type: Some("build.finished".into()),
            since: Some(now - chrono::Duration::hours(20)),
            until: Some(now - chrono::Duration::hours(1)),
            before: Some(some),
        },
        DeliveryFilter {
            status: Some("skipped".into()),
            before: Some(some),
            ..Default::default()
        },
        DeliveryFilter {
            event_type: Some("agent.connected".into()),
            before: Some(some),
            ..Default::default()
        },
    ];
    let mut conn = env.pool.acquire().await.expect("conn");
    for f in &filters {
        let plan = explain_list_deliveries(&mut conn, hooks[3], f, 50)
            .await
            .expect("explain");
        assert!(!plan.contains("Seq Scan"), "{f:?}:\n{plan}");
        assert!(plan.contains("Index"), "{f:?}:\n{plan}");
    }
    // And the API answers them (from the replica once it has caught up).
    let hook = hooks[3].to_string();
    let d = items(
        &api,
        &hook,
        "status=dead&event_type=build.finished&limit=500",
    )
    .await;
    assert!(!d.is_empty());
    assert!(d
        .iter()
        .all(|x| x["status"] == "dead" && x["event_type"] == "build.finished"));
    drop(conn);
    app.stop().await;
    env.cleanup().await;
}

// ------------------------------------------------------------------------------------
// 7. The event catalog against real payloads
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_event_catalog_s_schemas_accept_real_payloads_of_every_type() {
    let _ = python();
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            ALL_ROLES,
            &[PRIVATE_OK, ("HERALD_AGENTS__LOST_AFTER_S", "3")],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (s, catalog) = call(&api, Method::GET, "/v1/event-types", None).await;
    assert_eq!(s, 200, "{catalog}");
    let (s, _) = call(&app.client, Method::GET, "/v1/event-types", None).await;
    assert_eq!(s, 401);
    let items = catalog["items"].as_array().expect("items");
    let types: Vec<&str> = items.iter().filter_map(|i| i["type"].as_str()).collect();
    let all: Vec<&str> = herald_domain::EventType::ALL
        .iter()
        .map(|e| e.as_str())
        .collect();
    assert_eq!(types, all);
    assert!(types.contains(&"webhook.disabled"));
    let schemas: serde_json::Map<String, Value> = items
        .iter()
        .map(|i| {
            (
                i["type"].as_str().unwrap_or("").to_owned(),
                i["schema"].clone(),
            )
        })
        .collect();

    let r = Receiver::start(200).await;
    create_hook(&api, &r.url, json!(["*"])).await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    run_build(
        &api,
        &agent,
        json!([{"key": "a"}, {"key": "b", "depends_on": ["a"]}]),
    )
    .await;
    // job.canceling: a running job whose build is canceled.
    let b = api
        .create_build("web", &build_body(json!([{"key": "c"}])))
        .await
        .expect("create");
    let j = eventually(T, "a job", || async { agent.ping(1).await.expect("ping") }).await;
    agent.job_call(j.id, "accept", None).await.expect("accept");
    agent.job_call(j.id, "start", None).await.expect("start");
    let (s, _) = call(
        &api,
        Method::POST,
        &format!("/v1/builds/{}/cancel", id_of(&b)),
        None,
    )
    .await;
    assert_eq!(s, 200);
    // agent.lost: one that never heartbeats; agent.disconnected: one that leaves.
    let _ = common::agent(&app, &reg, "silent").await;
    let (leaving, _) = common::agent(&app, &reg, "leaving").await;
    let (s, _) = call(&leaving, Method::POST, "/v1/agent/disconnect", None).await;
    assert_eq!(s, 204);
    // webhook.disabled: another endpoint disabled by hand.
    let spare = create_hook(&api, "http://127.0.0.1:9/spare", json!(["build.*"])).await;
    let (s, _) = patch(&api, &id_of(&spare), json!({"enabled": false})).await;
    assert_eq!(s, 200);
    let got = eventually(T, "an event of every type", || async {
        let got = r.got();
        let seen: HashSet<String> = got
            .iter()
            .filter_map(|g| g.json()["type"].as_str().map(str::to_owned))
            .collect();
        all.iter().all(|t| seen.contains(*t)).then_some(got)
    })
    .await;
    let payloads: Vec<Value> = got
        .iter()
        .map(|g| {
            let v = g.json();
            json!({"type": v["type"], "data": v["data"]})
        })
        .collect();
    let errors = run_python(
        SCHEMA_PY,
        &json!({"schemas": schemas, "payloads": payloads}),
    );
    assert_eq!(errors, json!([]), "payloads that break their schema");
    // The schemas can fail: a build without its id does not pass.
    let broken = json!([{"type": "build.finished", "data": {"build": {"number": 1}}},
                        {"type": "webhook.disabled", "data": {"webhook": {}, "reason": "bored"}}]);
    let errors = run_python(SCHEMA_PY, &json!({"schemas": schemas, "payloads": broken}));
    assert!(errors.as_array().is_some_and(|e| e.len() >= 3), "{errors}");
    app.stop().await;
    env.cleanup().await;
}

// ------------------------------------------------------------------------------------
// 8. A per-endpoint rate
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_s_own_rate_limits_it_and_not_the_others() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL_ROLES, &[PRIVATE_OK]).await;
    let (api, _) = org(&app, "acme").await;
    let slow = Receiver::start(200).await;
    let fast = Receiver::start(200).await;
    let hook = create_hook(&api, &slow.url, json!(["job.scheduled"])).await;
    create_hook(&api, &fast.url, json!(["job.scheduled"])).await;
    let (s, w) = patch(&api, &id_of(&hook), json!({"rate_per_s": 4})).await;
    assert_eq!((s, w["rate_per_s"].clone()), (200, json!(4.0)), "{w}");
    tokio::time::sleep(Duration::from_secs(1)).await; // propagation, as promised
                                                      // 16 job.scheduled events at once, in the build's own transaction.
    let jobs: Vec<Value> = (0..16).map(|i| json!({"key": format!("j{i}")})).collect();
    api.create_build("web", &build_body(json!(jobs)))
        .await
        .expect("create");
    eventually(T, "16 deliveries to each", || async {
        (slow.count() >= 16 && fast.count() >= 16).then_some(())
    })
    .await;
    let got = slow.got();
    // 4/s with a burst of 4: the 16th delivery comes at least (16 - 4) / 4 = 3 s after
    // the first (a lower bound only: a slow machine is never too fast).
    let span = got[15].at.duration_since(got[0].at);
    assert!(span >= Duration::from_millis(2700), "{span:?}");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recover_waits_while_the_webhook_type_is_paused() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL_ROLES, &[PRIVATE_OK]).await;
    let (api, _) = org(&app, "acme").await;
    let r = Receiver::start(200).await;
    let hook = create_hook(&api, &r.url, json!(["build.finished"])).await;
    let hook_id = Uuid::parse_str(&id_of(&hook)).expect("uuid");
    dead_deliveries(&env, org_id(&env, "acme").await, hook_id, 50, 60).await;
    let set = |mode: &'static str| {
        let admin = app.admin.clone();
        async move {
            let (s, t) = call(
                &admin,
                Method::PUT,
                "/v1/ops/notification-types/webhook",
                Some(json!({"mode": mode, "reason": "recover test"})),
            )
            .await;
            assert_eq!(s, 200, "{t}");
        }
    };
    set("paused").await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the switch's "within 1 s"
    let since = chrono::Utc::now() - chrono::Duration::minutes(5);
    let (s, q) = recover(&api, &hook_id.to_string(), since).await;
    assert_eq!((s, q["queued"].clone()), (202, json!(50)), "{q}");
    // Paused: nothing is marked, nothing is sent (a scheduler pass runs at once on
    // the recover's wake-up and again on this wait's polls).
    for _ in 0..20 {
        assert_eq!(r.count(), 0, "sent while paused");
        assert_eq!(
            env.count("SELECT count(*) FROM deliveries WHERE status = 'dead'")
                .await,
            50,
            "marked while paused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set("enabled").await;
    eventually(T, "the recovered deliveries to succeed", || async {
        (env.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
            .await
            == 50)
            .then_some(())
    })
    .await;
    assert_eq!(r.count(), 50);
    app.stop().await;
    env.cleanup().await;
}

//! The on-call side: `GET /v1/ops/overview` with figures from other roles (through the
//! database), `GET /ops` as served, and the alert rules under promtool.

mod common;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::*;
use herald_client::{Client, Method};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const PRIVATE_OK: (&str, &str) = ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true");

/// A receiver on port 0 that answers every request with `status`; counts them.
async fn receiver(status: u16) -> (String, Arc<AtomicUsize>) {
    let got = Arc::new(AtomicUsize::new(0));
    let count = got.clone();
    let app = Router::new().route(
        "/hook",
        post(move || {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                StatusCode::from_u16(status).unwrap_or(StatusCode::OK)
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

async fn hook(api: &Client, url: &str) -> Value {
    let (s, w) = call(
        api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": ["*"]})),
    )
    .await;
    assert_eq!(s, 201, "{w}");
    w
}

/// Creates a build of `n` independent jobs and runs them all with `agent`.
/// Runs `n` jobs one after another, each depending on the one before: the finish that
/// frees the agent makes the next job runnable, so each is assigned in the first round
/// after it became runnable. Only those count in dispatch's latency (a job that waited
/// for a busy agent says nothing about dispatch), so independent jobs taken by one
/// agent could leave the figure at zero.
async fn run_jobs(api: &Client, agent: &Client, n: usize) {
    let jobs: Vec<Value> = (0..n)
        .map(|i| match i {
            0 => json!({"key": "j0"}),
            _ => json!({"key": format!("j{i}"), "depends_on": [format!("j{}", i - 1)]}),
        })
        .collect();
    let b = api
        .create_build("web", &build_body(json!(jobs)))
        .await
        .expect("create build");
    let id = b["id"].as_str().expect("id").to_owned();
    let mut done = 0;
    while done < n {
        if let Some(job) = agent.ping(5).await.expect("ping") {
            agent
                .run_job(job.id, 0, Duration::ZERO)
                .await
                .expect("run job");
            done += 1;
        }
    }
    wait_build_state(api, &id, "passed", T).await;
}

async fn overview(app: &TestApp) -> Value {
    let (s, o) = call(&app.admin, Method::GET, "/v1/ops/overview", None).await;
    assert_eq!(s, 200, "{o}");
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overview_shows_what_other_roles_measure_through_the_database() {
    let env = TestEnv::new().await;
    // The API alone in this process; dispatch and notify elsewhere: every figure of
    // theirs must come through the database.
    let mut app = env.start("api", &[PRIVATE_OK]).await;
    let mut others = env.spawn("relay,dispatch,notify,maintenance", &[PRIVATE_OK]);
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let (ok_url, ok_got) = receiver(200).await;
    let (gone_url, _) = receiver(410).await;
    hook(&api, &ok_url).await;
    let gone = hook(&api, &gone_url).await;

    let (s, e) = call(&app.client, Method::GET, "/v1/ops/overview", None).await;
    assert_eq!(s, 401, "no token: {e}");
    assert!(e["error"]["code"].is_string());

    run_jobs(&api, &agent, 5).await;
    let last = std::sync::Mutex::new(Value::Null);
    let o = eventually(T, "dispatch, throttle and delivery figures", || async {
        let o = overview(&app).await;
        if let Ok(mut l) = last.lock() {
            if *l != o["dispatch"] {
                eprintln!("overview so far: {o}");
                *l = o["dispatch"].clone();
            }
        }
        let assigned = o["dispatch"]["assigned_last_minute"]
            .as_f64()
            .unwrap_or(0.0);
        let rate = o["webhooks"]["deliveries_per_s"].as_f64().unwrap_or(0.0);
        let disabled = o["disabled_endpoints"].as_array().map_or(0, Vec::len);
        (assigned >= 1.0 && rate > 0.0 && o["throttle"]["factor"].is_number() && disabled == 1)
            .then_some(o)
    })
    .await;
    eprintln!("{}", serde_json::to_string_pretty(&o).unwrap_or_default());
    assert!(ok_got.load(Ordering::SeqCst) > 0);
    let d = &o["dispatch"];
    assert!(d["p50_ms"].as_f64().expect("p50") <= d["p99_ms"].as_f64().expect("p99"));
    assert_eq!(d["dispatchers"], 1);
    assert_eq!(o["disabled_endpoints"][0]["id"], gone["id"]);
    assert_eq!(o["disabled_endpoints"][0]["org"], "acme");
    let kinds: Vec<&str> = o["notification_types"]
        .as_array()
        .expect("types")
        .iter()
        .filter_map(|t| t["type"].as_str())
        .collect();
    assert_eq!(kinds, ["webhook", "github_commit_status"]);
    let queues: Vec<&str> = o["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert!(
        queues.contains(&"jobs.runnable") && queues.contains(&"outbox"),
        "{queues:?}"
    );
    assert!(o["dead_letters"]["webhook"].is_number());

    // A pause shows at once (the switches are read from the primary).
    let (s, _) = call(
        &app.admin,
        Method::PUT,
        "/v1/ops/notification-types/webhook",
        Some(json!({"mode": "paused", "reason": "overview test"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        overview(&app).await["notification_types"][0]["mode"],
        "paused"
    );

    kill9(&mut others);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_ops_page_is_self_contained_html() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let r = reqwest::get(format!("{}/ops", app.client.base()))
        .await
        .expect("GET /ops");
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let csp = r
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let body = r.text().await.expect("body");
    for needle in ["/v1/ops/overview", "sessionStorage", "Authorization"] {
        assert!(body.contains(needle), "page lacks {needle}");
    }
    // Nothing from elsewhere: no absolute URL in any src/href, no external fetch.
    for bad in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "url(http",
        "fetch(\"http",
    ] {
        assert!(!body.contains(bad), "page loads an outside asset: {bad}");
    }
    app.stop().await;
    env.cleanup().await;
}

/// `promtool check rules` and `promtool test rules` on the shipped alert rules: every
/// alert has a unit test there (config/prometheus/alerts_test.yml).
#[test]
fn alert_rules_pass_promtool() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("config/prometheus");
    let promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    assert!(
        promtool.is_ok(),
        "promtool is missing: run scripts/prometheus-deps.sh (Debian's prometheus package)"
    );
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert is unit-tested and names a runbook that exists.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).expect("alerts_test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}")),
            "alert {a} has no unit test"
        );
    }
    let runbooks: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook:"))
        .map(|r| r.trim().trim_matches('"'))
        .collect();
    assert_eq!(runbooks.len(), alerts.len(), "each alert names its runbook");
    for r in runbooks {
        assert!(root.join(r).is_file(), "runbook {r} does not exist");
    }
}

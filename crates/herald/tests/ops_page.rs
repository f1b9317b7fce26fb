//! `/ops` in a real browser: Debian's chromium, headless, driven through chromedriver
//! (installed by scripts/browser-deps.sh, which scripts/test.sh runs first). The page
//! pauses `webhook` and deliveries to a real receiver stop; it resumes it and the held
//! deliveries arrive. A screenshot is kept as a test artefact.

mod common;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use herald_client::{Client, Method};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Every body a receiver on port 0 got.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State(got): State<Arc<Mutex<Vec<Value>>>>, Json(body): Json<Value>| async move {
                    got.lock().expect("lock").push(body);
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), got)
}

fn of_build(got: &Mutex<Vec<Value>>, build: &str) -> usize {
    got.lock()
        .expect("lock")
        .iter()
        .filter(|b| b["data"]["build"]["id"] == build)
        .count()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn browser() -> (Driver, Browser, PathBuf) {
    let (Some(chromium), Some(chromedriver)) = (on_path("chromium"), on_path("chromedriver"))
    else {
        panic!(
            "chromium and chromedriver are required for the /ops browser test: \
             run `bash scripts/browser-deps.sh` (apt-get install chromium chromium-driver)"
        );
    };
    let port = free_port();
    let driver = Driver {
        child: Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
        url: format!("http://127.0.0.1:{port}"),
    };
    let profile = std::env::temp_dir().join(format!("herald-chromium-{}", uuid::Uuid::new_v4()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1440,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = eventually(T, "chromedriver to start a session", || async {
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
            .ok()
    })
    .await;
    (driver, client, profile)
}

async fn text(b: &Browser, css: &str) -> String {
    match b.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn wait_text(b: &Browser, css: &str, want: &str) {
    eventually(T, &format!("{css} to show {want}"), || async {
        (text(b, css).await == want).then_some(())
    })
    .await;
}

async fn type_into(b: &Browser, css: &str, s: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(s)
        .await
        .expect("type");
}

async fn click(b: &Browser, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

async fn webhook_type(admin: &Client) -> Value {
    let (s, v) = call(admin, Method::GET, "/v1/ops/notification-types", None).await;
    assert_eq!(s, 200);
    v["items"]
        .as_array()
        .and_then(|i| i.iter().find(|t| t["type"] == "webhook").cloned())
        .expect("webhook type")
}

fn artefact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("artefacts");
    std::fs::create_dir_all(&dir).expect("artefacts dir");
    dir.join(name)
}

async fn screenshot(b: &Browser, name: &str) {
    let png = b.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = artefact(name);
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot of /ops: {}", path.display());
    eprintln!("screenshot of /ops: {}", path.display());
}

/// Creates a build of one job and runs it; returns its id.
async fn run_build(api: &Client, agent: &Client) -> String {
    let b = api
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("create build");
    let id = b["id"].as_str().expect("id").to_owned();
    let job = eventually(T, "the job to reach the agent", || async {
        agent.ping(5).await.ok().flatten()
    })
    .await;
    agent
        .run_job(job.id, 0, Duration::ZERO)
        .await
        .expect("run job");
    wait_build_state(api, &id, "passed", T).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ops_page_pauses_and_resumes_webhooks_in_a_real_browser() {
    let (driver, b, profile) = browser().await;
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify,maintenance",
            &[("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true")],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let (url, got) = receiver().await;
    let (s, _) = call(
        &api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": ["build.*"]})),
    )
    .await;
    assert_eq!(s, 201);
    let before = run_build(&api, &agent).await;
    eventually(T, "deliveries while enabled", || async {
        (of_build(&got, &before) == 3).then_some(())
    })
    .await;

    // No token yet: the page asks for it.
    b.goto(&format!("{}/ops", app.client.base()))
        .await
        .expect("open /ops");
    type_into(&b, "#token", &env.admin_token).await;
    click(&b, "#save-token").await;
    wait_text(&b, "#mode-webhook", "enabled").await;

    // A click without a reason asks for one and changes nothing.
    click(&b, "#pause-webhook").await;
    eventually(T, "the page to ask for a reason", || async {
        text(&b, "#type-msg-webhook")
            .await
            .contains("Say why")
            .then_some(())
    })
    .await;
    assert_eq!(webhook_type(&app.admin).await["mode"], "enabled");

    type_into(&b, "#reason-webhook", "browser test: receiver outage").await;
    click(&b, "#pause-webhook").await;
    wait_text(&b, "#mode-webhook", "paused").await;
    let t = webhook_type(&app.admin).await;
    assert_eq!(t["mode"], "paused");
    assert_eq!(t["reason"], "browser test: receiver outage");
    tokio::time::sleep(Duration::from_millis(1100)).await; // the contract's "within 1 s"

    // Deliveries stop: a new build's are held, none reaches the receiver.
    let during = run_build(&api, &agent).await;
    eventually(T, "the new build's deliveries to be held", || async {
        let n = env
            .count(&format!(
                "SELECT count(*) FROM deliveries d \
                 LEFT JOIN delivery_payloads p ON p.event_id = d.event_id \
                 WHERE d.status = 'pending' \
                   AND coalesce(d.payload, p.payload)->'data'->'build'->>'id' = '{during}'"
            ))
            .await;
        (n == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(of_build(&got, &during), 0, "paused: nothing is sent");
    screenshot(&b, "ops-page-paused.png").await;

    // Resume from the page: the held deliveries arrive.
    type_into(&b, "#reason-webhook", "browser test: receiver back").await;
    click(&b, "#enable-webhook").await;
    wait_text(&b, "#mode-webhook", "enabled").await;
    assert_eq!(webhook_type(&app.admin).await["mode"], "enabled");
    eventually(T, "the held deliveries after resume", || async {
        (of_build(&got, &during) == 3).then_some(())
    })
    .await;
    // The page's figures follow: deliveries/s counted from the attempts.
    eventually(T, "deliveries/s on the page", || async {
        let v = text(&b, "#deliveries-per-s").await;
        (v != "–" && v.parse::<f64>().is_ok_and(|x| x > 0.0)).then_some(())
    })
    .await;
    screenshot(&b, "ops-page.png").await;

    let _ = b.close().await;
    drop(driver);
    let _ = std::fs::remove_dir_all(profile);
    app.stop().await;
    env.cleanup().await;
}

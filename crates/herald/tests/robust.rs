//! Nothing a client sends gets a 500, every error has the contract's JSON body, a lost
//! database connection is a 503, tokens are checked as the contract says, every
//! process can be watched, and the OpenAPI document covers every route.

mod common;

use common::*;
use herald_client::{Client, Method};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const PRIVATE: &[(&str, &str)] = &[("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true")];

/// A raw answer: status, headers, body bytes.
struct Raw {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Asserts the contract's error body and returns its code.
    fn error_code(&self, what: &str) -> String {
        let ct = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "{what}: {} with content-type `{ct}`: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
        assert!(
            !code.is_empty() && v["error"]["message"].is_string(),
            "{what}: not the error body: {v}"
        );
        code
    }
}

async fn raw(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Raw {
    let http = reqwest::Client::new();
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.expect("http call");
    Raw {
        status: res.status().as_u16(),
        headers: res.headers().clone(),
        body: res.bytes().await.expect("body").to_vec(),
    }
}

async fn send(c: &Client, method: Method, path: &str, body: Value) -> Raw {
    let bytes = serde_json::to_vec(&body).expect("json");
    raw(
        c.base(),
        method,
        path,
        c.token(),
        Some("application/json"),
        Some(bytes),
    )
    .await
}

fn job(extra: Value) -> Value {
    let mut j = json!({"key": "test", "command": "make test"});
    if let (Some(j), Some(e)) = (j.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            j.insert(k.clone(), v.clone());
        }
    }
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_control_characters_are_422_not_500() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", PRIVATE).await;
    let (api, reg) = org(&app, "acme").await;
    let nul = "a\u{0000}b";
    let build = |b: Value| ("POST", "/v1/pipelines/web/builds".to_owned(), b);
    let cases: Vec<(&str, String, Value)> = vec![
        ("POST", "/v1/orgs".into(), json!({"slug": nul})),
        (
            "POST",
            "/v1/pipelines".into(),
            json!({"slug": nul, "repository": "a/b"}),
        ),
        (
            "POST",
            "/v1/pipelines".into(),
            json!({"slug": "x", "repository": nul}),
        ),
        build(build_body(json!([job(json!({"command": nul}))]))),
        build(build_body(json!([job(json!({"label": nul}))]))),
        build(build_body(json!([job(json!({"env": {"A": nul}}))]))),
        build(build_body(json!([job(json!({"env": {nul: "1"}}))]))),
        build(build_body(json!([job(json!({"key": nul}))]))),
        build(build_body(json!([job(json!({"queue": nul}))]))),
        build(build_body(json!([job(json!({"depends_on": [nul]}))]))),
        build(json!({"commit": SHA, "branch": nul, "jobs": [job(json!({}))]})),
        build(json!({"commit": SHA, "branch": "a\nb", "jobs": [job(json!({}))]})),
        build(json!({"commit": SHA, "branch": "a\u{7f}b", "jobs": [job(json!({}))]})),
        build(json!({"commit": SHA, "message": nul, "jobs": [job(json!({}))]})),
        build(json!({"commit": nul, "jobs": [job(json!({}))]})),
        (
            "POST",
            "/v1/webhooks".into(),
            json!({"url": format!("http://127.0.0.1:9/{nul}"), "events": ["*"]}),
        ),
        (
            "POST",
            "/v1/webhooks".into(),
            json!({"url": "http://127.0.0.1:9/", "events": [nul]}),
        ),
        (
            "POST",
            "/v1/webhooks".into(),
            json!({"url": "http://127.0.0.1:9/", "events": [""]}),
        ),
        (
            "POST",
            "/v1/webhooks".into(),
            json!({"url": "http://127.0.0.1:9/", "events": ["*"], "pipeline": nul}),
        ),
        (
            "PUT",
            "/v1/pipelines/web/github".into(),
            json!({"token": nul}),
        ),
        (
            "PUT",
            "/v1/pipelines/web/github".into(),
            json!({"token": "t", "api_url": format!("https://x/{nul}")}),
        ),
    ];
    for (method, path, body) in cases {
        let client = if path == "/v1/orgs" { &app.admin } else { &api };
        let method: Method = method.parse().expect("method");
        let r = send(client, method.clone(), &path, body.clone()).await;
        assert_eq!(r.status, 422, "{method} {path} {body}: {}", r.json());
        r.error_code(&path);
    }
    // A filter no build can match: an empty page, without asking the database.
    for path in ["/v1/builds?pipeline=a%00b", "/v1/builds?branch=a%00b"] {
        let r = send(&api, Method::GET, path, json!({})).await;
        assert_eq!(r.status, 200, "{path}: {}", r.json());
        assert_eq!(r.json()["items"], json!([]), "{path}");
    }
    // In a path, a string that cannot be a slug names no pipeline.
    for path in ["/v1/pipelines/a%00b", "/v1/pipelines/a%00b/builds"] {
        let method = if path.ends_with("/builds") {
            Method::POST
        } else {
            Method::GET
        };
        let r = send(&api, method, path, build_body(json!([job(json!({}))]))).await;
        assert!(
            r.status == 404 || r.status == 422,
            "{path}: {} {}",
            r.status,
            r.json()
        );
        r.error_code(path);
    }
    let r = send(
        &api,
        Method::PUT,
        "/v1/pipelines/a%00b/github",
        json!({"token": "t"}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.json());
    // Agents: name and queues.
    for body in [json!({"name": nul}), json!({"name": "ci", "queues": [nul]})] {
        let r = send(&reg, Method::POST, "/v1/agents/register", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {}", r.json());
    }
    // The operator's reason.
    let r = send(
        &app.admin,
        Method::PUT,
        "/v1/ops/notification-types/webhook",
        json!({"mode": "enabled", "reason": nul}),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.json());
    // A reason of white space alone says nothing (the fuzzer sent "\u000b"): 422. Its
    // limit counts characters, as the schema's maxLength does.
    for (reason, status) in [
        ("\u{b}".to_owned(), 422),
        (" \u{a0}\t".to_owned(), 422),
        ("\u{20ac}".repeat(1000), 200),
        ("x".repeat(1001), 422),
    ] {
        let r = send(
            &app.admin,
            Method::PUT,
            "/v1/ops/notification-types/webhook",
            json!({"mode": "enabled", "reason": reason}),
        )
        .await;
        assert_eq!(r.status, status, "{reason:?}: {}", r.json());
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_rates_outside_their_range_are_422() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let path = "/v1/ops/notification-types/github_commit_status";
    let bad: &[&str] = &[
        r#""rate_per_s": 1e308"#,
        r#""rate_per_s": -1"#,
        r#""rate_per_s": 0"#,
        r#""rate_per_s": 1e-300"#,
        r#""rate_per_s": 1e400"#,
        r#""rate_per_s": "10""#,
        r#""burst": 0"#,
        r#""burst": -5"#,
        r#""burst": 2147483648"#,
        r#""burst": 99999999999999999999999"#,
        r#""burst": 1.5"#,
        r#""burst": 1000001"#,
    ];
    for field in bad {
        let body = format!(r#"{{"mode": "enabled", "reason": "test", {field}}}"#);
        let r = raw(
            app.admin.base(),
            Method::PUT,
            path,
            app.admin.token(),
            Some("application/json"),
            Some(body.into_bytes()),
        )
        .await;
        assert!(
            r.status == 422 || r.status == 400,
            "{field}: {} {}",
            r.status,
            r.json()
        );
        r.error_code(field);
    }
    for (rate, burst) in [(0.001, 1), (1_000_000.0, 1_000_000), (20.5, 40)] {
        let r = send(
            &app.admin,
            Method::PUT,
            path,
            json!({"mode": "enabled", "rate_per_s": rate, "burst": burst, "reason": "test"}),
        )
        .await;
        assert_eq!(r.status, 200, "{rate} {burst}: {}", r.json());
        assert_eq!(r.json()["burst"], burst);
    }
    app.stop().await;
    env.cleanup().await;
}

/// Method, path, content type, body, expected status.
type ErrorCase = (
    Method,
    &'static str,
    Option<&'static str>,
    Option<Vec<u8>>,
    u16,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_json_body() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, _reg) = org(&app, "acme").await;
    let base = api.base().to_owned();
    let tok = api.token().map(str::to_owned);
    let tok = tok.as_deref();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let cases: Vec<ErrorCase> = vec![
        (Method::GET, "/v1/builds/%ff%fe", None, None, 400),
        (Method::GET, "/v1/pipelines/%ff", None, None, 400),
        (Method::GET, "/v1/builds?limit=%ff", None, None, 422),
        (Method::GET, "/v1/builds?limit=abc", None, None, 422),
        (Method::GET, "/v1/builds?limit=100000", None, None, 422),
        (Method::GET, "/v1/builds?limit=-1", None, None, 422),
        (Method::GET, "/v1/builds?cursor=%%%garbage", None, None, 400),
        (Method::GET, "/v1/builds?cursor=AAAA", None, None, 400),
        (Method::GET, "/v1/builds?state=nope", None, None, 422),
        (Method::GET, "/v1/nope", None, None, 404),
        (Method::GET, "/", None, None, 404),
        (Method::DELETE, "/v1/builds", None, None, 405),
        (Method::PATCH, "/v1/orgs", None, None, 405),
        (
            Method::POST,
            "/v1/pipelines",
            Some("application/json"),
            Some(b"{not json".to_vec()),
            400,
        ),
        (
            Method::POST,
            "/v1/pipelines",
            Some("application/json"),
            Some(vec![0xff, 0xfe, 0x00]),
            400,
        ),
        (
            Method::POST,
            "/v1/pipelines",
            Some("application/json"),
            Some(deep.into_bytes()),
            422,
        ),
        (
            Method::POST,
            "/v1/pipelines",
            Some("text/plain"),
            Some(b"slug=web".to_vec()),
            400,
        ),
        (
            Method::POST,
            "/v1/pipelines",
            Some("application/json"),
            Some(br#"{"slug": 5, "repository": "a/b"}"#.to_vec()),
            422,
        ),
        (
            Method::POST,
            "/v1/pipelines",
            Some("application/json"),
            Some(br#"{"slug": "x", "repository": "a/b", "extra": 1}"#.to_vec()),
            422,
        ),
        (
            Method::POST,
            "/v1/pipelines/web/builds",
            Some("application/json"),
            Some(
                serde_json::to_vec(
                    &json!({"commit": SHA, "jobs": [{"key": "a", "priority": 1e300}]}),
                )
                .expect("json"),
            ),
            422,
        ),
        (
            Method::POST,
            "/v1/pipelines/web/builds",
            Some("application/json"),
            Some(
                br#"{"commit": "0123", "jobs": [{"key": "a", "priority": 99999999999}]}"#.to_vec(),
            ),
            422,
        ),
    ];
    for (method, path, ct, body, want) in cases {
        let r = raw(&base, method.clone(), path, tok, ct, body).await;
        assert_eq!(
            r.status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.error_code(path);
    }
    // Above the body limit: 413, with the body.
    let big = vec![b' '; herald_api::MAX_BODY_BYTES + 1024];
    let r = raw(
        &base,
        Method::POST,
        "/v1/pipelines",
        tok,
        Some("application/json"),
        Some(big),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code("too large"), "payload_too_large");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_job_build_with_long_commands_fits() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, _reg) = org(&app, "acme").await;
    let command = "x".repeat(8 * 1024);
    let env_vars: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("VAR_{i}"), json!("v".repeat(512))))
        .collect();
    let jobs: Vec<Value> = (0..500)
        .map(|i| {
            json!({"key": format!("job-{i}"), "command": command, "env": env_vars,
                   "label": "l".repeat(255)})
        })
        .collect();
    let body = build_body(json!(jobs));
    let size = serde_json::to_vec(&body).expect("json").len();
    assert!(
        size > 1024 * 1024,
        "the body must exceed the old 1 MiB limit"
    );
    let r = send(&api, Method::POST, "/v1/pipelines/web/builds", body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["jobs"].as_array().map(Vec::len), Some(500));
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_token_is_401_and_a_valid_one_without_rights_is_403() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let base = app.client.base().to_owned();
    let endpoints = [
        (Method::GET, "/v1/ops/queues"),
        (Method::GET, "/v1/ops/notification-types"),
        (Method::POST, "/v1/orgs"),
        (Method::POST, "/v1/ops/dead-letters/replay"),
    ];
    let body = || Some(br#"{"slug": "other"}"#.to_vec());
    for (method, path) in endpoints {
        for bad in [
            "hrd_api_garbage",
            "hrd_reg_garbage",
            "hrd_agt_garbage",
            "nonsense",
        ] {
            let r = raw(&base, method.clone(), path, Some(bad), None, body()).await;
            assert_eq!(r.status, 401, "{bad} on {path}");
            assert_eq!(r.error_code(path), "unauthorized");
        }
        for valid in [&api, &reg, &agent] {
            let r = raw(&base, method.clone(), path, valid.token(), None, body()).await;
            assert_eq!(r.status, 403, "valid token on {path}");
            assert_eq!(r.error_code(path), "forbidden");
        }
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_api_role_serves_health_readiness_and_metrics() {
    let env = TestEnv::new().await;
    let mut app = env.start("relay,notify", &[]).await;
    let base = app.client.base().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "it listens: {base}");
    let r = raw(&base, Method::GET, "/healthz", None, None, None).await;
    assert_eq!(r.status, 200);
    let ready = eventually(T, "readyz to be 200", || async {
        let r = raw(&base, Method::GET, "/readyz", None, None, None).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    assert_eq!(ready["ready"], true);
    for name in ["database:primary", "broker", "role:relay", "role:notify"] {
        assert_eq!(ready["checks"][name], "ok", "{name} in {ready}");
    }
    assert!(ready["checks"].get("role:api").is_none(), "{ready}");
    assert!(ready["checks"].get("database:replica").is_none(), "{ready}");
    let r = raw(&base, Method::GET, "/metrics", None, None, None).await;
    assert_eq!(r.status, 200);
    for path in ["/v1/builds", "/v1/orgs", "/openapi.json", "/ops"] {
        let r = raw(&base, Method::GET, path, Some(&env.admin_token), None, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error_code(path), "not_found");
    }
    app.stop().await;

    // With the api role: the replica is checked too, and the role's loop.
    let mut app = env.start("api", &[]).await;
    let base = app.client.base().to_owned();
    let ready = eventually(T, "readyz to be 200", || async {
        let r = raw(&base, Method::GET, "/readyz", None, None, None).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    for name in ["database:primary", "database:replica", "broker", "role:api"] {
        assert_eq!(ready["checks"][name], "ok", "{name} in {ready}");
    }
    app.stop().await;

    // A broker that does not answer: 503, naming it.
    let mut app = env
        .start(
            "relay",
            &[("HERALD_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
        )
        .await;
    let base = app.client.base().to_owned();
    let r = raw(&base, Method::GET, "/readyz", None, None, None).await;
    assert_eq!(r.status, 503);
    let v = r.json();
    assert_eq!(v["ready"], false);
    assert_eq!(v["checks"]["database:primary"], "ok", "{v}");
    assert_ne!(v["checks"]["broker"], "ok", "{v}");
    app.stop().await;
    env.cleanup().await;
}

/// Ends this test database's API connections, as a primary restart does.
async fn terminate_api_backends(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'herald-api') t",
    )
    .bind(&env.db)
    .fetch_one(&env.pool)
    .await
    .expect("terminate backends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_database_connections_is_503_or_retried_never_500() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, _reg) = org(&app, "acme").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let api = api.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut seen: Vec<(u16, bool)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body = build_body(json!([{"key": format!("k{w}-{i}"), "command": "true"}]));
                let r = send(&api, Method::POST, "/v1/pipelines/web/builds", body).await;
                seen.push((r.status, r.headers.contains_key("retry-after")));
                let id = r.json()["id"].as_str().map(str::to_owned);
                if let Some(id) = id {
                    let r = raw(
                        api.base(),
                        Method::GET,
                        &format!("/v1/builds/{id}"),
                        api.token(),
                        None,
                        None,
                    )
                    .await;
                    seen.push((r.status, r.headers.contains_key("retry-after")));
                }
            }
            seen
        }));
    }
    let mut terminated = 0;
    for _ in 0..20 {
        terminated += terminate_api_backends(&env).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("worker"));
    }
    assert!(terminated > 0, "no backend was terminated");
    let ok = seen.iter().filter(|(s, _)| *s == 200 || *s == 201).count();
    assert!(ok > 0, "no request succeeded");
    for (status, retry_after) in &seen {
        assert!(
            matches!(status, 200 | 201 | 503),
            "a lost connection answered {status}"
        );
        if *status == 503 {
            assert!(retry_after, "503 without Retry-After");
        }
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_retried_once_when_its_connection_was_lost() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, _reg) = org(&app, "acme").await;
    // Warm the pool: every connection it holds is then killed while idle.
    for i in 0..4 {
        api.create_build("web", &build_body(json!([{"key": format!("w{i}")}])))
            .await
            .expect("warm-up build");
    }
    assert!(terminate_api_backends(&env).await > 0);
    let r = send(
        &api,
        Method::POST,
        "/v1/pipelines/web/builds",
        build_body(json!([{"key": "after"}])),
    )
    .await;
    // The org token is cached: the first query is the build's, on a dead connection.
    assert_eq!(r.status, 201, "{}", r.json());
    app.stop().await;
    env.cleanup().await;
}

/// Every path the server routes, with every method it answers (anything but 405),
/// is in `/openapi.json`; and every documented operation is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routed_endpoint_is_in_the_openapi_document() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let base = app.client.base().to_owned();
    let doc = raw(&base, Method::GET, "/openapi.json", None, None, None)
        .await
        .json();
    let fill = |path: &str| {
        path.split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/")
    };
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ];
    let mut paths = herald_api::route_paths();
    paths.extend(herald_api::HEALTH_PATHS.iter().map(|p| (*p).to_owned()));
    assert!(paths.len() > 20, "the route table is read: {paths:?}");
    for path in &paths {
        for m in &methods {
            let r = raw(&base, m.clone(), &fill(path), None, None, None).await;
            let routed = r.status != 405;
            let documented = doc["paths"][path][m.as_str().to_lowercase()].is_object();
            assert_eq!(
                routed, documented,
                "{m} {path}: routed {routed} ({}), documented {documented}",
                r.status
            );
            if routed {
                assert!(
                    !(r.status == 404 && r.json()["error"]["message"] == "route not found"),
                    "{m} {path} hit the fallback"
                );
            }
        }
    }
    let documented: Vec<&String> = doc["paths"].as_object().expect("paths").keys().collect();
    for path in documented {
        assert!(paths.contains(path), "{path} is documented but not routed");
    }
    app.stop().await;
    env.cleanup().await;
}

/// Another org's tokens, agent tokens, no token and malformed tokens, on every
/// documented endpoint, aimed at org A's resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenancy_matrix_on_every_endpoint() {
    let env = TestEnv::new().await;
    let mut app = env.start("api,relay,dispatch,notify", PRIVATE).await;
    let base = app.client.base().to_owned();
    // Org A: a pipeline, a build, a job, a webhook, a delivery, an agent.
    let a = app.admin.create_org("org-a").await.expect("org a");
    let a_api = app
        .client
        .with_token(a["api_token"].as_str().expect("token"));
    let a_reg = app
        .client
        .with_token(a["agent_token"].as_str().expect("token"));
    a_api
        .create_pipeline("a-web", "org-a/secret-repo")
        .await
        .expect("pipeline a");
    let a_sha = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let hook = send(
        &a_api,
        Method::POST,
        "/v1/webhooks",
        json!({"url": "http://127.0.0.1:9/a-hook", "events": ["*"]}),
    )
    .await
    .json();
    let hook_id = hook["id"].as_str().expect("webhook id").to_owned();
    let a_secret = hook["secret"].as_str().expect("secret").to_owned();
    let build = a_api
        .create_build(
            "a-web",
            &json!({"commit": a_sha, "branch": "a-branch", "message": "org a message",
                    "jobs": [{"key": "a-job", "command": "a-command", "env": {"A_SECRET": "a-env"}}]}),
        )
        .await
        .expect("build a");
    let build_id = build["id"].as_str().expect("build id").to_owned();
    let job = job_id(&build, "a-job").to_string();
    let (a_agent, a_agent_id) = agent(&app, &a_reg, "a-agent").await;
    let delivery_id = eventually(T, "a delivery of org a", || async {
        let r = send(
            &a_api,
            Method::GET,
            &format!("/v1/webhooks/{hook_id}/deliveries"),
            json!({}),
        )
        .await;
        r.json()["items"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    // Org B, whose tokens try A's resources.
    let b = app.admin.create_org("org-b").await.expect("org b");
    let b_api = app
        .client
        .with_token(b["api_token"].as_str().expect("token"));
    let b_reg = app
        .client
        .with_token(b["agent_token"].as_str().expect("token"));
    b_api
        .create_pipeline("b-web", "org-b/web")
        .await
        .expect("pipeline b");
    let (b_agent, _) = agent(&app, &b_reg, "b-agent").await;
    // Nothing of A may appear in an answer to B's tokens.
    let a_bytes: Vec<String> = vec![
        build_id.clone(),
        job.clone(),
        hook_id.clone(),
        delivery_id.clone(),
        a_agent_id.to_string(),
        a_secret.clone(),
        a_sha.into(),
        "secret-repo".into(),
        "a-branch".into(),
        "org a message".into(),
        "a-command".into(),
        "a-env".into(),
        "a-hook".into(),
        a["id"].as_str().expect("org id").into(),
        a["api_token"].as_str().expect("token").into(),
        a["agent_token"].as_str().expect("token").into(),
        a_agent.token().expect("token").into(),
    ];
    let doc = raw(&base, Method::GET, "/openapi.json", None, None, None)
        .await
        .json();
    let fill = |path: &str| -> String {
        let id = if path.starts_with("/v1/builds/") {
            build_id.clone()
        } else if path.starts_with("/v1/webhooks/") {
            hook_id.clone()
        } else if path.starts_with("/v1/deliveries/") {
            delivery_id.clone()
        } else if path.starts_with("/v1/jobs/") {
            job.clone()
        } else {
            "00000000-0000-0000-0000-000000000000".into()
        };
        path.replace("{id}", &id)
            .replace("{slug}", "a-web")
            .replace("{type}", "webhook")
    };
    let body_for = |method: &str, path: &str| -> (Value, bool) {
        let known = match (method, path) {
            ("post", "/v1/orgs") => json!({"slug": "org-c"}),
            ("post", "/v1/pipelines") => json!({"slug": "c-web", "repository": "c/web"}),
            ("post", "/v1/pipelines/{slug}/builds") => build_body(json!([{"key": "k"}])),
            ("put", "/v1/pipelines/{slug}/github") => json!({"token": "t"}),
            ("post", "/v1/webhooks") => json!({"url": "http://127.0.0.1:9/b", "events": ["*"]}),
            ("put", "/v1/ops/notification-types/{type}") => {
                json!({"mode": "enabled", "reason": "matrix"})
            }
            ("post", "/v1/agents/register") => json!({"name": "c-agent"}),
            ("put", "/v1/jobs/{id}/finish") => json!({"exit_status": 0}),
            _ => return (json!({}), false),
        };
        (known, true)
    };
    let tokens: Vec<(&str, Option<String>, Option<&str>)> = vec![
        ("no token", None, None),
        ("malformed api token", Some("hrd_api_garbage".into()), None),
        ("malformed token", Some("garbage".into()), None),
        (
            "org b api token",
            b_api.token().map(str::to_owned),
            Some("OrgApiToken"),
        ),
        (
            "org b agent registration token",
            b_reg.token().map(str::to_owned),
            Some("AgentRegistrationToken"),
        ),
        (
            "org b agent access token",
            b_agent.token().map(str::to_owned),
            Some("AgentAccessToken"),
        ),
    ];
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operation") {
            let schemes: Vec<&str> = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_object())
                .flat_map(|r| r.keys().map(String::as_str))
                .collect();
            if schemes.is_empty() {
                continue;
            }
            // Disconnecting B's agent would end the matrix for its token.
            if path == "/v1/agent/disconnect" {
                continue;
            }
            let m: Method = method.to_uppercase().parse().expect("method");
            let url = fill(path);
            let url = if path == "/v1/agent/ping" {
                format!("{url}?wait=0")
            } else {
                url
            };
            let (body, known_body) = body_for(method, path);
            let addresses_a = path.contains('{');
            for (who, token, scheme) in &tokens {
                let r = raw(
                    &base,
                    m.clone(),
                    &url,
                    token.as_deref(),
                    Some("application/json"),
                    Some(serde_json::to_vec(&body).expect("json")),
                )
                .await;
                let what = format!("{who} on {method} {path}: {}", r.status);
                assert!(r.status < 500, "{what}");
                let text = String::from_utf8_lossy(&r.body);
                for secret in &a_bytes {
                    assert!(
                        !text.contains(secret.as_str()),
                        "{what} shows `{secret}`: {text}"
                    );
                }
                let allowed = scheme.is_some_and(|s| schemes.contains(&s));
                match scheme {
                    None => assert_eq!(r.status, 401, "{what}"),
                    Some(_) if schemes.contains(&"AdminToken") => {
                        assert_eq!(r.status, 403, "{what}")
                    }
                    Some(_) if !allowed => assert_eq!(r.status, 401, "{what}"),
                    Some(_) if addresses_a && !path.starts_with("/v1/ops/") => {
                        let ok = r.status == 404 || (!known_body && r.status == 422);
                        assert!(ok, "{what}: another org's resource must be a 404");
                    }
                    Some(_) => assert!(r.status < 400, "{what}: its own org's call"),
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} calls checked");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_stored_only_as_hashes() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let created = app.admin.create_org("acme").await.expect("org");
    let api = app
        .client
        .with_token(created["api_token"].as_str().expect("token"));
    let reg = app
        .client
        .with_token(created["agent_token"].as_str().expect("token"));
    api.create_pipeline("web", "acme/web")
        .await
        .expect("pipeline");
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    // Used once each, so any cache or audit trail has seen them.
    api.create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("build");
    let _ = agent.ping(0).await.expect("ping");
    let _ = send(
        &app.admin,
        Method::PUT,
        "/v1/ops/notification-types/webhook",
        json!({"mode": "enabled", "reason": "audit"}),
    )
    .await;
    let plaintext = [
        created["api_token"].as_str().expect("token").to_owned(),
        created["agent_token"].as_str().expect("token").to_owned(),
        agent.token().expect("token").to_owned(),
        env.admin_token.clone(),
    ];
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&env.pool)
    .await
    .expect("tables");
    assert!(tables.len() > 5, "{tables:?}");
    for table in &tables {
        let dump: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(string_agg(t::text, ' '), '') FROM \"{table}\" t"
        ))
        .fetch_one(&env.pool)
        .await
        .expect("dump");
        for token in &plaintext {
            assert!(
                !dump.contains(token.as_str()),
                "{table} holds a plaintext token"
            );
            // Nor its random part without the `hrd_xxx_` prefix.
            let secret = if token.starts_with("hrd_") {
                token.get(8..).unwrap_or(token)
            } else {
                token
            };
            assert!(
                !dump.contains(secret),
                "{table} holds a token's secret part"
            );
        }
    }
    let hashes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM org_tokens WHERE token_hash = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(&plaintext[0])
    .fetch_one(&env.pool)
    .await
    .expect("hash lookup");
    assert_eq!(hashes, 1, "the api token is stored as its SHA-256");
    app.stop().await;
    env.cleanup().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends SIGTERM and waits (at most 30 s) for the process to exit.
fn terminate(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -TERM {what}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_ready(base: &str) {
    eventually(T, &format!("{base}/readyz to be 200"), || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// Three processes with split roles; SIGTERM to each while a build is in flight and an
/// agent is parked: each exits within 30 s, cleanly, and after a restart the build
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_every_role_within_30_s_and_the_build_completes_after_a_restart() {
    let env = TestEnv::new().await;
    let groups = ["api", "relay,notify", "dispatch,maintenance"];
    let listens: Vec<String> = groups
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let spawn_all = || -> Vec<std::process::Child> {
        groups
            .iter()
            .zip(&listens)
            .map(|(roles, listen)| env.spawn(roles, &[("HERALD_HTTP__LISTEN", listen.as_str())]))
            .collect()
    };
    let mut children = spawn_all();
    for listen in &listens {
        wait_ready(&format!("http://{listen}")).await;
    }
    let client = Client::new(format!("http://{}", listens[0]));
    let admin = client.with_token(&env.admin_token);
    let created = admin.create_org("acme").await.expect("org");
    let api = client.with_token(created["api_token"].as_str().expect("token"));
    let reg = client.with_token(created["agent_token"].as_str().expect("token"));
    api.create_pipeline("web", "acme/web")
        .await
        .expect("pipeline");
    let a = reg
        .register_agent("ci-1", &["default"])
        .await
        .expect("agent");
    let agent = client.with_token(a.access_token);
    let idle = reg.register_agent("ci-2", &["idle"]).await.expect("agent");
    let idle = client.with_token(idle.access_token);
    let build = api
        .create_build(
            "web",
            &build_body(json!([
                {"key": "first", "command": "true"},
                {"key": "second", "command": "true", "depends_on": ["first"]}
            ])),
        )
        .await
        .expect("build");
    let id = build["id"].as_str().expect("id").to_owned();
    let job = agent.ping(10).await.expect("ping").expect("a job");
    agent
        .job_call(job.id, "accept", None)
        .await
        .expect("accept");
    agent.job_call(job.id, "start", None).await.expect("start");
    // Parked for up to 30 s: the stop must not wait for it.
    let parked = tokio::spawn(async move { idle.ping(30).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    for (child, roles) in children.iter_mut().zip(groups) {
        let status = terminate(child, roles);
        assert!(status.success(), "{roles} exited with {status}");
    }
    let parked = parked.await.expect("parked ping");
    assert!(
        matches!(parked, Ok(None)),
        "the parked ping is answered 204 at shutdown: {parked:?}"
    );

    // Restarted: the running job is still the agent's, and the build goes on.
    let mut children = spawn_all();
    for listen in &listens {
        wait_ready(&format!("http://{listen}")).await;
    }
    agent
        .job_call(job.id, "finish", Some(&json!({"exit_status": 0})))
        .await
        .expect("finish after the restart");
    let next = eventually(T, "the second job", || async {
        agent.ping(5).await.ok().flatten()
    })
    .await;
    assert_eq!(next.key, "second");
    for call in ["accept", "start"] {
        agent.job_call(next.id, call, None).await.expect(call);
    }
    agent
        .job_call(next.id, "finish", Some(&json!({"exit_status": 0})))
        .await
        .expect("finish");
    wait_build_state(&api, &id, "passed", T).await;
    for (child, roles) in children.iter_mut().zip(groups) {
        let status = terminate(child, roles);
        assert!(status.success(), "{roles} exited with {status}");
    }
    env.cleanup().await;
}

//! The contract over HTTP, against the real PostgreSQL (primary and replica) and RabbitMQ.

mod common;

use common::*;
use herald_client::Method;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_build_life_cycle_over_http() {
    let env = TestEnv::new().await;
    let tap = EventTap::new(&env.prefix).await;
    let mut app = env.start("api,relay,dispatch,maintenance", &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, agent_id) = agent(&app, &reg, "ci-1").await;

    let build = api
        .create_build(
            "web",
            &build_body(json!([
                {"key": "build", "command": "make"},
                {"key": "test", "command": "make test", "depends_on": ["build"]}
            ])),
        )
        .await
        .expect("create build");
    assert_eq!(build["number"], 1);
    assert_eq!(build["state"], "scheduled");
    assert_eq!(build["pipeline"], "web");
    assert_eq!(build["jobs"][0]["state"], "scheduled");
    assert_eq!(build["jobs"][1]["state"], "waiting");
    assert_eq!(build["jobs"][1]["depends_on"], json!(["build"]));
    let id = build["id"].as_str().expect("id").to_owned();
    // Read-your-writes through the replica.
    assert_eq!(api.get_build(&id).await.expect("get")["id"], build["id"]);

    let job = agent.ping(10).await.expect("ping").expect("a job");
    assert_eq!(job.id, job_id(&build, "build"));
    assert_eq!(job.state, "assigned");
    assert_eq!(job.command, "make");

    let accepted = agent
        .job_call(job.id, "accept", None)
        .await
        .expect("accept");
    assert_eq!(accepted["state"], "accepted");
    assert_eq!(accepted["agent_id"], json!(agent_id));
    // Retrying a call that took effect returns the same job.
    assert_eq!(
        agent
            .job_call(job.id, "accept", None)
            .await
            .expect("accept again")["state"],
        "accepted"
    );
    assert_eq!(build_state(&api, &id).await["state"], "running");
    agent.job_call(job.id, "start", None).await.expect("start");
    let done = agent
        .job_call(job.id, "finish", Some(&json!({"exit_status": 0})))
        .await
        .expect("finish");
    assert_eq!(done["state"], "passed");
    assert_eq!(done["exit_status"], 0);
    let again = agent
        .job_call(job.id, "finish", Some(&json!({"exit_status": 0})))
        .await
        .expect("finish again");
    assert_eq!(again["finished_at"], done["finished_at"]);
    let (status, err) = call(
        &agent,
        Method::PUT,
        &format!("/v1/jobs/{}/finish", job.id),
        Some(json!({"exit_status": 3})),
    )
    .await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "conflict");

    // The dependent is released off the request path, then dispatched.
    let next = eventually(T, "the dependent job", || async {
        agent.ping(5).await.ok().flatten()
    })
    .await;
    assert_eq!(next.id, job_id(&build, "test"));
    agent
        .run_job(next.id, 0, Duration::ZERO)
        .await
        .expect("run test job");
    let finished = wait_build_state(&api, &id, "passed", T).await;
    assert!(finished["finished_at"].is_string());

    // Every state change reached the broker, in order for this build.
    let events = eventually(T, "build.finished on the broker", || async {
        let e = tap.snapshot();
        e.iter().any(|(_, k, _)| k == "build.finished").then_some(e)
    })
    .await;
    let types: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    for t in [
        "build.scheduled",
        "job.scheduled",
        "job.assigned",
        "build.running",
        "job.started",
        "job.finished",
        "agent.connected",
    ] {
        assert!(types.contains(&t), "missing {t} in {types:?}");
    }
    let finished_event = events
        .iter()
        .find(|(_, k, _)| k == "build.finished")
        .map(|(_, _, b)| b.clone())
        .expect("event");
    assert_eq!(finished_event["data"]["build"]["state"], "passed");
    assert_eq!(finished_event["type"], "build.finished");
    let build_events: Vec<&str> = events
        .iter()
        .filter(|(_, k, _)| k.starts_with("build."))
        .map(|(_, k, _)| k.as_str())
        .collect();
    assert_eq!(
        build_events,
        vec!["build.scheduled", "build.running", "build.finished"]
    );
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "each event has its own message id");
    // The first job's start and finish events show it as the call left it: what the
    // agent was answered, which is what the row says.
    let of_job = |kind: &str| {
        events
            .iter()
            .find(|(_, k, b)| k == kind && b["data"]["job"]["id"] == job.id.to_string())
            .map(|(_, _, b)| b["data"]["job"].clone())
            .expect(kind)
    };
    let (started, finished_job) = (of_job("job.started"), of_job("job.finished"));
    assert_eq!(started["state"], "running");
    assert!(started["started_at"].is_string());
    assert_eq!(finished_job["state"], "passed");
    assert_eq!(finished_job["exit_status"], 0);
    assert_eq!(finished_job["finished_at"], done["finished_at"]);
    assert_eq!(finished_job["started_at"], started["started_at"]);
    let row_finished: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT finished_at FROM jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&env.pool)
            .await
            .expect("row");
    let said: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(finished_job["finished_at"].clone()).expect("finished_at");
    assert_eq!(said, row_finished);

    // Agent disconnect.
    let (status, _) = call(&agent, Method::POST, "/v1/agent/disconnect", None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&agent, Method::POST, "/v1/agent/heartbeat", None).await;
    assert_eq!(status, 401);

    tap.close().await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_marks_waiting_jobs_canceled_and_running_ones_canceling() {
    let env = TestEnv::new().await;
    let mut app = env.start("api,relay,dispatch,maintenance", &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let build = api
        .create_build(
            "web",
            &build_body(json!([
                {"key": "a", "command": "x"},
                {"key": "b", "command": "x"},
                {"key": "c", "command": "x", "depends_on": ["a"]}
            ])),
        )
        .await
        .expect("create");
    let id = build["id"].as_str().expect("id").to_owned();
    let job = agent.ping(10).await.expect("ping").expect("job");
    agent
        .job_call(job.id, "accept", None)
        .await
        .expect("accept");
    agent.job_call(job.id, "start", None).await.expect("start");

    let (status, canceled) =
        call(&api, Method::POST, &format!("/v1/builds/{id}/cancel"), None).await;
    assert_eq!(status, 200, "{canceled}");
    let states: Vec<(String, String)> = canceled["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| {
            (
                j["key"].as_str().unwrap_or("").to_owned(),
                j["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let running_key = job.key.clone();
    for (key, state) in &states {
        if *key == running_key {
            assert_eq!(state, "canceling");
        } else {
            assert_eq!(state, "canceled", "{key}");
        }
    }
    assert_ne!(canceled["state"], "canceled", "a job is still canceling");
    // Cancel is idempotent.
    let (status, _) = call(&api, Method::POST, &format!("/v1/builds/{id}/cancel"), None).await;
    assert_eq!(status, 200);
    let finished = agent
        .job_call(job.id, "finish", Some(&json!({"exit_status": 1})))
        .await
        .expect("finish");
    assert_eq!(finished["state"], "canceled");
    wait_build_state(&api, &id, "canceled", T).await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_case_answers_with_a_clear_status() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (other, _) = org(&app, "other").await;
    let nobody = app.client.with_token("hrd_api_not-a-token");

    // Auth.
    let (s, body) = call(
        &app.client,
        Method::POST,
        "/v1/pipelines",
        Some(json!({"slug": "x", "repository": "a/b"})),
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body["error"]["message"].is_string());
    assert_eq!(call(&nobody, Method::GET, "/v1/builds", None).await.0, 401);
    assert_eq!(
        call(&api, Method::POST, "/v1/orgs", Some(json!({"slug": "x"})))
            .await
            .0,
        403
    );
    assert_eq!(
        call(&reg, Method::GET, "/v1/builds", None).await.0,
        401,
        "an agent token is not an API token"
    );

    // Orgs and pipelines.
    assert_eq!(
        call(
            &app.admin,
            Method::POST,
            "/v1/orgs",
            Some(json!({"slug": "Bad Slug"}))
        )
        .await
        .0,
        422
    );
    assert_eq!(
        call(
            &app.admin,
            Method::POST,
            "/v1/orgs",
            Some(json!({"slug": "acme"}))
        )
        .await
        .0,
        409
    );
    assert_eq!(
        call(
            &api,
            Method::POST,
            "/v1/pipelines",
            Some(json!({"slug": "web", "repository": "acme/web"}))
        )
        .await
        .0,
        409
    );
    assert_eq!(
        call(
            &api,
            Method::POST,
            "/v1/pipelines",
            Some(json!({"slug": "api", "repository": "nope"}))
        )
        .await
        .0,
        422
    );

    // Malformed bodies.
    let r = api
        .call(Method::POST, "/v1/pipelines/web/builds", None)
        .await
        .expect("call");
    assert_eq!(
        r.status.as_u16(),
        422,
        "an empty body lacks the fields: {}",
        r.body
    );
    let raw = reqwest::Client::new()
        .post(format!("{}/v1/pipelines/web/builds", app.client.base()))
        .bearer_auth(api_token(&api))
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status().as_u16(), 400);
    let big = "x".repeat(herald_api::MAX_BODY_BYTES + 1);
    let raw = reqwest::Client::new()
        .post(format!("{}/v1/pipelines/web/builds", app.client.base()))
        .bearer_auth(api_token(&api))
        .body(format!("{{\"commit\": \"{big}\"}}"))
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status().as_u16(), 413);

    // Build validation: 422 for each.
    let cases = [
        json!({"commit": "abc", "jobs": [{"key": "a"}]}),
        json!({"commit": SHA, "jobs": []}),
        json!({"commit": SHA, "jobs": [{"key": "a"}, {"key": "a"}]}),
        json!({"commit": SHA, "jobs": [{"key": "a", "depends_on": ["zzz"]}]}),
        json!({"commit": SHA, "jobs": [{"key": "a", "depends_on": ["b"]}, {"key": "b", "depends_on": ["a"]}]}),
        json!({"commit": SHA, "jobs": (0..501).map(|i| json!({"key": format!("j{i}")})).collect::<Vec<_>>()}),
        json!({"commit": SHA, "jobs": [{"key": "a", "priority": "high"}]}),
    ];
    for case in cases {
        let (s, body) = call(
            &api,
            Method::POST,
            "/v1/pipelines/web/builds",
            Some(case.clone()),
        )
        .await;
        assert_eq!(s, 422, "{case} -> {body}");
        assert!(body["error"]["code"].is_string());
    }
    assert_eq!(
        call(
            &api,
            Method::POST,
            "/v1/pipelines/nope/builds",
            Some(build_body(json!([{"key": "a"}])))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        count_builds(&env).await,
        0,
        "nothing was written by rejected requests"
    );

    // 500 jobs is fine; numbers count up per pipeline.
    let ok = api
        .create_build(
            "web",
            &build_body(json!((0..500)
                .map(|i| json!({"key": format!("j{i}")}))
                .collect::<Vec<_>>())),
        )
        .await
        .expect("500 jobs");
    assert_eq!(ok["number"], 1);
    let second = api
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("second");
    assert_eq!(second["number"], 2);
    let id = second["id"].as_str().expect("id").to_owned();

    // Another org's build is a 404, and so is a malformed id.
    assert_eq!(
        call(&other, Method::GET, &format!("/v1/builds/{id}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(
            &other,
            Method::POST,
            &format!("/v1/builds/{id}/cancel"),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(&api, Method::GET, "/v1/builds/not-a-uuid", None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(&api, Method::GET, "/v1/nothing-here", None).await.0,
        404
    );

    // Lists: keyset pagination, filters, limits.
    let (s, page1) = call(&api, Method::GET, "/v1/builds?limit=1", None).await;
    assert_eq!(s, 200);
    assert_eq!(page1["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(page1["items"][0]["number"], 2, "newest first");
    let cursor = page1["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, page2) = call(
        &api,
        Method::GET,
        &format!("/v1/builds?limit=1&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(page2["items"][0]["number"], 1);
    assert!(page2["next_cursor"].is_null());
    assert_eq!(
        call(&api, Method::GET, "/v1/builds?limit=501", None)
            .await
            .0,
        422
    );
    assert_eq!(
        call(&api, Method::GET, "/v1/builds?limit=0", None).await.0,
        422
    );
    assert_eq!(
        call(&api, Method::GET, "/v1/builds?cursor=%%%", None)
            .await
            .0,
        400
    );
    assert_eq!(
        call(&api, Method::GET, "/v1/builds?state=weird", None)
            .await
            .0,
        422
    );
    let (_, filtered) = call(
        &api,
        Method::GET,
        "/v1/builds?state=scheduled&pipeline=web&branch=main",
        None,
    )
    .await;
    assert_eq!(filtered["items"].as_array().map(Vec::len), Some(2));
    let (_, none) = call(&other, Method::GET, "/v1/builds", None).await;
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));

    // Agent API.
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    assert_eq!(
        call(
            &reg,
            Method::POST,
            "/v1/agents/register",
            Some(json!({"name": ""}))
        )
        .await
        .0,
        422
    );
    assert_eq!(
        call(
            &reg,
            Method::POST,
            "/v1/agents/register",
            Some(json!({"name": "x", "queues": ["bad queue"]}))
        )
        .await
        .0,
        422
    );
    assert_eq!(
        call(
            &api,
            Method::POST,
            "/v1/agents/register",
            Some(json!({"name": "x"}))
        )
        .await
        .0,
        401
    );
    assert_eq!(
        call(&agent, Method::POST, "/v1/agent/ping?wait=31", None)
            .await
            .0,
        422
    );
    assert_eq!(
        call(&agent, Method::POST, "/v1/agent/ping?wait=abc", None)
            .await
            .0,
        422
    );
    assert_eq!(
        call(&agent, Method::POST, "/v1/agent/ping?wait=0", None)
            .await
            .0,
        204,
        "no dispatcher runs here"
    );
    let (s, hb) = call(&agent, Method::POST, "/v1/agent/heartbeat", None).await;
    assert_eq!(s, 200);
    assert!(hb["received_at"].is_string());
    let job = job_id(&second, "a");
    assert_eq!(
        call(&agent, Method::PUT, &format!("/v1/jobs/{job}/accept"), None)
            .await
            .0,
        404,
        "not assigned to this agent"
    );
    assert_eq!(
        call(&agent, Method::PUT, "/v1/jobs/nope/accept", None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(&api, Method::PUT, &format!("/v1/jobs/{job}/accept"), None)
            .await
            .0,
        401
    );

    app.stop().await;
    env.cleanup().await;
}

fn api_token(c: &herald_client::Client) -> String {
    // The client does not expose its token; the tests keep it simple by re-reading it.
    c.token().unwrap_or_default().to_owned()
}

async fn count_builds(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM builds").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_see_writes_and_survive_a_missing_replica() {
    let env = TestEnv::new().await;
    let mut app = env.start("api", &[]).await;
    let (api, _) = org(&app, "acme").await;
    for _ in 0..20 {
        let b = api
            .create_build("web", &build_body(json!([{"key": "a"}])))
            .await
            .expect("create");
        let id = b["id"].as_str().expect("id");
        let got = api.get_build(id).await.expect("read right after the write");
        assert_eq!(got["state"], "scheduled");
        let (_, c) = call(&api, Method::POST, &format!("/v1/builds/{id}/cancel"), None).await;
        assert_eq!(c["state"], "canceled");
        assert_eq!(
            api.get_build(id).await.expect("read the cancel")["state"],
            "canceled"
        );
    }
    app.stop().await;

    // A replica that is down: reads go to the primary.
    let mut app = env
        .start(
            "api",
            &[(
                "HERALD_DATABASE__REPLICA_URL",
                "postgres://postgres@127.0.0.1:1/nothing",
            )],
        )
        .await;
    let org2 = app.admin.create_org("second").await.expect("org");
    let api2 = app
        .client
        .with_token(org2["api_token"].as_str().expect("token"));
    api2.create_pipeline("web", "second/web")
        .await
        .expect("pipeline");
    let b = api2
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("create");
    let id = b["id"].as_str().expect("id");
    assert_eq!(
        api2.get_build(id).await.expect("read via the primary")["id"],
        b["id"]
    );
    let (s, list) = call(&api2, Method::GET, "/v1/builds", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    let (s, _) = call(&app.client, Method::GET, "/healthz", None).await;
    assert_eq!(s, 200);
    let (s, ready) = call(&app.client, Method::GET, "/readyz", None).await;
    assert_eq!(s, 200, "{ready}");
    let metrics = reqwest::get(format!("{}/metrics", app.client.base()))
        .await
        .expect("metrics");
    assert_eq!(metrics.status().as_u16(), 200);
    let (s, doc) = call(&app.client, Method::GET, "/openapi.json", None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_without_a_broker() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api",
            &[("HERALD_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
        )
        .await;
    let (s, body) = call(&app.client, Method::GET, "/readyz", None).await;
    assert_eq!(s, 503, "{body}");
    assert_ne!(body["checks"]["broker"], "ok", "{body}");
    assert_eq!(body["checks"]["database:primary"], "ok", "{body}");
    app.stop().await;
    env.cleanup().await;
}

//! The job life cycle over HTTP against the real services: cancel that reaches the
//! agent, timeouts, automatic and manual retries, `GET /v1/jobs/{id}`, idempotent
//! creation, and a race of all of them.

mod common;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use common::*;
use herald_client::{Client, Method};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);
const ALL: &str = "api,relay,dispatch,notify,maintenance";
const FAST_SWEEP: (&str, &str) = ("HERALD_MAINTENANCE__INTERVAL_S", "0.2");

async fn create(api: &Client, jobs: Value) -> Value {
    api.create_build("web", &build_body(jobs))
        .await
        .expect("create build")
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

async fn job(c: &Client, id: impl std::fmt::Display) -> (u16, Value) {
    call(c, Method::GET, &format!("/v1/jobs/{id}"), None).await
}

async fn heartbeat_cancel(agent: &Client) -> Vec<String> {
    let (s, hb) = call(agent, Method::POST, "/v1/agent/heartbeat", None).await;
    assert_eq!(s, 200, "{hb}");
    assert!(hb["received_at"].is_string(), "{hb}");
    hb["cancel"]
        .as_array()
        .expect("cancel list")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Pings until a job comes, then accepts and starts it.
async fn take_job(agent: &Client) -> Uuid {
    let job = eventually(T, "a job for the agent", || async {
        agent.ping(1).await.expect("ping")
    })
    .await;
    agent
        .job_call(job.id, "accept", None)
        .await
        .expect("accept");
    agent.job_call(job.id, "start", None).await.expect("start");
    job.id
}

async fn finish(agent: &Client, job: Uuid, exit_status: i32) -> (u16, Value) {
    call(
        agent,
        Method::PUT,
        &format!("/v1/jobs/{job}/finish"),
        Some(json!({"exit_status": exit_status})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_polling_heartbeats_stops_its_job_on_cancel() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL, &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let tap = EventTap::new(&env.prefix).await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let b = create(&api, json!([{"key": "a", "command": "sleep 600"}])).await;
    let id = take_job(&agent).await;
    assert!(heartbeat_cancel(&agent).await.is_empty());
    let (s, c) = call(
        &api,
        Method::POST,
        &format!("/v1/builds/{}/cancel", id_of(&b)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{c}");
    // The agent's loop: heartbeat until told to stop.
    let told = eventually(T, "the job in the cancel list", || async {
        let cancel = heartbeat_cancel(&agent).await;
        (!cancel.is_empty()).then_some(cancel)
    })
    .await;
    assert_eq!(told, vec![id.to_string()]);
    let (s, j) = job(&agent, id).await;
    assert_eq!((s, j["state"].as_str()), (200, Some("canceling")), "{j}");
    // It stops the job; any exit status makes it canceled.
    let (s, j) = finish(&agent, id, 143).await;
    assert_eq!((s, j["state"].as_str()), (200, Some("canceled")), "{j}");
    eventually(T, "an empty cancel list", || async {
        heartbeat_cancel(&agent).await.is_empty().then_some(())
    })
    .await;
    wait_build_state(&api, &id_of(&b), "canceled", T).await;
    // Each change has its event: job.canceling, then job.finished (canceled).
    let job_events = |e: &[(String, String, Value)]| -> Vec<(String, String)> {
        e.iter()
            .filter(|(_, _, v)| v["data"]["job"]["id"] == id.to_string())
            .map(|(_, t, v)| {
                let state = v["data"]["job"]["state"].as_str().unwrap_or("").to_owned();
                (t.clone(), state)
            })
            .collect()
    };
    let events = eventually(T, "the job's events", || async {
        let e = job_events(&tap.snapshot());
        e.iter().any(|(t, _)| t == "job.finished").then_some(e)
    })
    .await;
    let tail: Vec<(&str, &str)> = events
        .iter()
        .skip_while(|(t, _)| t != "job.canceling")
        .map(|(t, s)| (t.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        tail,
        vec![("job.canceling", "canceling"), ("job.finished", "canceled")],
        "{events:?}"
    );
    tap.close().await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_outliving_its_grace_ends_canceled_with_minus_one() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(ALL, &[FAST_SWEEP, ("HERALD_JOBS__CANCEL_GRACE_S", "1")])
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let b = create(&api, json!([{"key": "a"}])).await;
    let id = take_job(&agent).await;
    call(
        &api,
        Method::POST,
        &format!("/v1/builds/{}/cancel", id_of(&b)),
        None,
    )
    .await;
    let j = eventually(T, "the grace to run out", || async {
        let (_, j) = job(&api, id).await;
        (j["state"] == "canceled").then_some(j)
    })
    .await;
    assert_eq!(j["exit_status"], -1, "{j}");
    // Ended by Herald while the agent held it: still in the agent's cancel list.
    assert_eq!(heartbeat_cancel(&agent).await, vec![id.to_string()]);
    wait_build_state(&api, &id_of(&b), "canceled", T).await;
    // The agent's late finish changes nothing, and takes it off the list.
    let (s, late) = finish(&agent, id, 0).await;
    assert_eq!(s, 200, "{late}");
    assert_eq!(
        (late["state"].as_str(), late["exit_status"].as_i64()),
        (Some("canceled"), Some(-1))
    );
    eventually(T, "an empty cancel list", || async {
        heartbeat_cancel(&agent).await.is_empty().then_some(())
    })
    .await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_running_past_its_timeout_fails_with_minus_two() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL, &[FAST_SWEEP]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let b = create(
        &api,
        json!([{"key": "slow", "timeout_s": 1}, {"key": "next", "depends_on": ["slow"]}]),
    )
    .await;
    assert_eq!(b["jobs"][0]["timeout_s"], 1, "{b}");
    assert_eq!(b["jobs"][1]["timeout_s"], 3600, "the default: {b}");
    let id = take_job(&agent).await;
    let j = eventually(T, "the timeout", || async {
        let (_, j) = job(&api, id).await;
        (j["state"] == "failed").then_some(j)
    })
    .await;
    assert_eq!(
        (j["exit_status"].as_i64(), j["timed_out"].as_bool()),
        (Some(-2), Some(true)),
        "{j}"
    );
    assert_eq!(heartbeat_cancel(&agent).await, vec![id.to_string()]);
    let done = wait_build_state(&api, &id_of(&b), "failed", T).await;
    assert_eq!(done["jobs"][1]["state"], "skipped", "{done}");
    // Late finishes of a job Herald ended: 200, the job unchanged.
    for exit in [0, 1] {
        let (s, late) = finish(&agent, id, exit).await;
        assert_eq!(s, 200, "{late}");
        assert_eq!(
            (late["state"].as_str(), late["exit_status"].as_i64()),
            (Some("failed"), Some(-2))
        );
    }
    assert!(heartbeat_cancel(&agent).await.is_empty());

    // A job the agent finished itself keeps its exit status: another one is 409.
    let b2 = create(&api, json!([{"key": "a"}])).await;
    let id2 = take_job(&agent).await;
    assert_eq!(finish(&agent, id2, 1).await.0, 200);
    assert_eq!(finish(&agent, id2, 1).await.0, 200, "a repeat is safe");
    let (s, e) = finish(&agent, id2, 2).await;
    assert_eq!(s, 409, "{e}");
    wait_build_state(&api, &id_of(&b2), "failed", T).await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_agents_job_retries_automatically_and_passes_on_another_agent() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            ALL,
            &[
                FAST_SWEEP,
                ("HERALD_AGENTS__LOST_AFTER_S", "2"),
                ("HERALD_AGENTS__HEARTBEAT_FLUSH_S", "0.2"),
            ],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let tap = EventTap::new(&env.prefix).await;
    let (lost, _) = agent(&app, &reg, "ci-lost").await;
    let b = create(
        &api,
        json!([
            {"key": "a", "retry": {"automatic": [{"exit_status": -1, "limit": 2}]}},
            {"key": "b", "depends_on": ["a"]}
        ]),
    )
    .await;
    let first = take_job(&lost).await;
    // The first agent goes silent; a second one keeps polling.
    let (good, good_id) = agent(&app, &reg, "ci-good").await;
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (good, stop) = (good.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ran = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(Some(j)) = good.ping(1).await {
                    good.run_job(j.id, 0, Duration::ZERO).await.expect("run");
                    ran.push(j.id);
                }
            }
            ran
        })
    };
    let done = wait_build_state(&api, &id_of(&b), "passed", T).await;
    stop.store(true, Ordering::SeqCst);
    let ran = runner.await.expect("runner");
    let jobs = done["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 3, "a, its retry and b: {done}");
    let failed = jobs
        .iter()
        .find(|j| j["id"] == first.to_string())
        .expect("first attempt");
    assert_eq!(
        (failed["state"].as_str(), failed["exit_status"].as_i64()),
        (Some("failed"), Some(-1))
    );
    let retry = jobs
        .iter()
        .find(|j| j["key"] == "a" && j["attempt"] == 2)
        .expect("the retry");
    assert_eq!(failed["retried_by"], retry["id"]);
    assert_eq!(retry["retry_of"], failed["id"]);
    assert_eq!(retry["state"], "passed");
    assert_eq!(retry["agent_id"], good_id.to_string());
    assert_eq!(ran.len(), 2, "the retry and b ran on the good agent");
    // job.finished of the failure, then job.scheduled of its retry.
    let events = eventually(T, "the events", || async {
        let e = tap.snapshot();
        e.iter()
            .any(|(_, t, v)| t == "build.finished" && v["data"]["build"]["id"] == done["id"])
            .then_some(e)
    })
    .await;
    let at = |ty: &str, job: &Value| {
        events
            .iter()
            .position(|(_, t, v)| t == ty && v["data"]["job"]["id"] == job["id"])
            .unwrap_or_else(|| panic!("no {ty} for {job}"))
    };
    assert!(at("job.finished", failed) < at("job.scheduled", retry));
    let fin = &events
        .iter()
        .find(|(_, t, v)| t == "job.finished" && v["data"]["job"]["id"] == failed["id"])
        .expect("finished")
        .2;
    assert_eq!(fin["data"]["job"]["retried_by"], retry["id"], "{fin}");
    tap.close().await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn automatic_retries_follow_exit_status_rules_and_limits() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL, &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let b = create(
        &api,
        json!([
            {"key": "a", "retry": {"automatic": [{"exit_status": 3, "limit": 1}, {"exit_status": "*", "limit": 1}]}},
            {"key": "b", "depends_on": ["a"]}
        ]),
    )
    .await;
    // 3: the first rule; 5: the second; 3 again: both used up.
    for (attempt, exit) in [(1, 3), (2, 5), (3, 3)] {
        let id = take_job(&agent).await;
        let (s, j) = finish(&agent, id, exit).await;
        assert_eq!((s, j["attempt"].as_i64()), (200, Some(attempt)), "{j}");
        assert_eq!(j["state"], "failed");
        if attempt < 3 {
            assert!(j["retried_by"].is_string(), "{j}");
            let (_, b_now) = call(
                &api,
                Method::GET,
                &format!("/v1/builds/{}", id_of(&b)),
                None,
            )
            .await;
            assert_ne!(
                b_now["state"], "failed",
                "the build waits for the retry: {b_now}"
            );
        } else {
            assert!(j["retried_by"].is_null(), "{j}");
        }
    }
    let done = wait_build_state(&api, &id_of(&b), "failed", T).await;
    assert_eq!(done["attempt"], 1, "{done}");
    let b_job = done["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["key"] == "b")
        .cloned()
        .expect("b");
    assert_eq!(b_job["state"], "skipped");
    app.stop().await;
    env.cleanup().await;
}

#[derive(Clone, Default)]
struct FakeGithub {
    statuses: Arc<Mutex<Vec<Value>>>,
}

async fn github_status(State(g): State<FakeGithub>, body: axum::body::Bytes) -> impl IntoResponse {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    g.statuses.lock().expect("lock").push(v);
    (StatusCode::CREATED, "{}").into_response()
}

impl FakeGithub {
    fn states(&self) -> Vec<String> {
        self.statuses
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|v| v["context"] == "herald/web")
                    .filter_map(|v| v["state"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_last(&self, state: &str) {
        eventually(T, &format!("GitHub to show {state}"), || async {
            (self.states().last().map(String::as_str) == Some(state)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manual_retry_reopens_a_failed_build_and_its_statuses_start_a_new_round() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            ALL,
            &[("HERALD_NOTIFY__GITHUB_PER_TOKEN_PER_MINUTE", "6000")],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let tap = EventTap::new(&env.prefix).await;
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
    let (s, g) = call(
        &api,
        Method::PUT,
        "/v1/pipelines/web/github",
        Some(
            json!({"api_url": format!("http://{addr}"), "token": "ghp_test", "job_statuses": true}),
        ),
    )
    .await;
    assert_eq!(s, 200, "{g}");

    let b = create(
        &api,
        json!([{"key": "a"}, {"key": "b", "depends_on": ["a"]}]),
    )
    .await;
    let bid = id_of(&b);
    gh.wait_last("pending").await;
    let a1 = take_job(&agent).await;
    assert_eq!(finish(&agent, a1, 1).await.0, 200);
    let failed = wait_build_state(&api, &bid, "failed", T).await;
    assert_eq!(failed["attempt"], 1);
    assert_eq!(failed["jobs"][1]["state"], "skipped");
    gh.wait_last("failure").await;

    let (s, r) = call(&api, Method::POST, &format!("/v1/jobs/{a1}/retry"), None).await;
    assert_eq!(s, 201, "{r}");
    assert_eq!(
        (r["attempt"].as_i64(), r["retry_of"].as_str()),
        (Some(2), Some(a1.to_string().as_str())),
        "{r}"
    );
    assert_eq!(r["state"], "scheduled");
    // Once only.
    let (s, e) = call(&api, Method::POST, &format!("/v1/jobs/{a1}/retry"), None).await;
    assert_eq!(s, 409, "{e}");
    let reopened = build_state(&api, &bid).await;
    assert_eq!(reopened["state"], "running", "{reopened}");
    let b_job = reopened["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["key"] == "b")
        .cloned()
        .expect("b");
    assert_eq!(
        b_job["state"], "waiting",
        "skipped because of a, waiting again"
    );
    gh.wait_last("pending").await;

    for _ in 0..2 {
        let id = take_job(&agent).await;
        assert_eq!(finish(&agent, id, 0).await.0, 200);
    }
    let passed = wait_build_state(&api, &bid, "passed", T).await;
    assert_eq!(passed["attempt"], 2);
    gh.wait_last("success").await;
    let mut seq = gh.states();
    seq.dedup();
    assert_eq!(seq, ["pending", "failure", "pending", "success"]);
    // Nothing pending comes after the final success (let the pipeline drain a while).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gh.states().last().map(String::as_str), Some("success"));
    // Job statuses too: `b` was skipped (error) in the first round and passes in the
    // second; `a` failed, then its retry passed.
    for context in ["herald/web/a", "herald/web/b"] {
        eventually(T, &format!("{context} to end in success"), || async {
            let last = gh
                .statuses
                .lock()
                .ok()
                .and_then(|s| s.iter().rev().find(|v| v["context"] == context).cloned());
            last.filter(|v| v["state"] == "success").map(|_| ())
        })
        .await;
    }
    let finished: Vec<i64> = eventually(T, "two build.finished", || async {
        let f: Vec<i64> = tap
            .snapshot()
            .iter()
            .filter(|(_, t, _)| t == "build.finished")
            .filter_map(|(_, _, v)| v["data"]["attempt"].as_i64())
            .collect();
        (f.len() == 2).then_some(f)
    })
    .await;
    assert_eq!(finished, [1, 2]);
    let running = tap
        .snapshot()
        .iter()
        .filter(|(_, t, _)| t == "build.running")
        .count();
    assert_eq!(running, 2, "running again after the retry");
    tap.close().await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_job_answers_its_org_and_the_agent_holding_it_only() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL, &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (other_api, other_reg) = org(&app, "other").await;
    let (holder, _) = agent(&app, &reg, "ci-1").await;
    let b = create(&api, json!([{"key": "a"}])).await;
    let id = job_id(&b, "a");
    let (s, j) = job(&api, id).await;
    assert_eq!(s, 200, "{j}");
    for field in [
        "attempt",
        "retry_of",
        "retried_by",
        "timed_out",
        "exit_status",
        "timeout_s",
    ] {
        assert!(j.get(field).is_some(), "{field} in {j}");
    }
    assert_eq!(
        (j["attempt"].as_i64(), j["timed_out"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(job(&other_api, id).await.0, 404, "another org");
    assert_eq!(job(&api, "not-a-uuid").await.0, 404);
    assert_eq!(job(&api, Uuid::now_v7()).await.0, 404);
    take_job(&holder).await;
    let (other_agent, _) = agent(&app, &reg, "ci-2").await;
    let (foreign_agent, _) = agent(&app, &other_reg, "ci-x").await;
    let (s, j) = job(&holder, id).await;
    assert_eq!((s, j["state"].as_str()), (200, Some("running")), "{j}");
    assert_eq!(job(&other_agent, id).await.0, 404, "not this agent's job");
    assert_eq!(job(&foreign_agent, id).await.0, 404, "another org's agent");
    assert_eq!(job(&app.client.with_token("nope"), id).await.0, 401);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_range_specs_are_422_and_bad_retries_409() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL, &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    for bad in [
        json!({"key": "a", "timeout_s": 0}),
        json!({"key": "a", "timeout_s": 86401}),
        json!({"key": "a", "timeout_s": "60"}),
        json!({"key": "a", "retry": {"automatic": [{"exit_status": 1, "limit": 0}]}}),
        json!({"key": "a", "retry": {"automatic": [{"exit_status": 1, "limit": 11}]}}),
        json!({"key": "a", "retry": {"automatic": [{"exit_status": "any", "limit": 1}]}}),
        json!({"key": "a", "retry": {"automatic": [{"exit_status": 1}]}}),
        json!({"key": "a", "retry": {"manual": "no"}}),
        json!({"key": "a", "retry": {"sometimes": true}}),
    ] {
        let (s, e) = call(
            &api,
            Method::POST,
            "/v1/pipelines/web/builds",
            Some(build_body(json!([bad]))),
        )
        .await;
        assert_eq!(s, 422, "{bad} → {e}");
        assert!(e["error"]["code"].is_string(), "{e}");
    }
    let ok = create(&api, json!([{"key": "a", "timeout_s": 86400, "retry": {"automatic": [{"exit_status": -1, "limit": 10}], "manual": false}}])).await;
    assert_eq!(ok["jobs"][0]["timeout_s"], 86400);
    // Manual retry: not of a passed job, not when manual is false.
    let id = take_job(&agent).await;
    assert_eq!(finish(&agent, id, 1).await.0, 200);
    let (s, e) = call(&api, Method::POST, &format!("/v1/jobs/{id}/retry"), None).await;
    assert_eq!(s, 409, "manual: false → {e}");
    let b = create(&api, json!([{"key": "p"}])).await;
    let id = take_job(&agent).await;
    assert_eq!(finish(&agent, id, 0).await.0, 200);
    wait_build_state(&api, &id_of(&b), "passed", T).await;
    let (s, e) = call(&api, Method::POST, &format!("/v1/jobs/{id}/retry"), None).await;
    assert_eq!(s, 409, "a passed job → {e}");
    let (other_api, _) = org(&app, "other").await;
    let (s, _) = call(
        &other_api,
        Method::POST,
        &format!("/v1/jobs/{id}/retry"),
        None,
    )
    .await;
    assert_eq!(s, 404, "another org's job");
    app.stop().await;
    env.cleanup().await;
}

async fn post_with_key(
    base: &str,
    token: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> (u16, Value) {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_return_the_first_response_even_under_concurrency() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(ALL, &[("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true")])
        .await;
    let (api, _) = org(&app, "acme").await;
    let base = app.client.base().to_owned();
    let token = api.token().expect("token").to_owned();
    let body = build_body(json!([{"key": "a"}]));
    let path = "/v1/pipelines/web/builds";
    let (s1, r1) = post_with_key(&base, &token, path, "k-1", &body).await;
    assert_eq!(s1, 201, "{r1}");
    let (s2, r2) = post_with_key(&base, &token, path, "k-1", &body).await;
    assert_eq!((s2, &r2), (201, &r1), "the first response again");
    assert_eq!(env.count("SELECT count(*) FROM builds").await, 1);
    let other = build_body(json!([{"key": "b"}]));
    let (s, e) = post_with_key(&base, &token, path, "k-1", &other).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{e}"
    );
    let (s, e) = post_with_key(&base, &token, path, &"x".repeat(256), &body).await;
    assert_eq!(s, 422, "{e}");
    let (s, e) = post_with_key(&base, &token, path, "tab\tkey", &body).await;
    assert_eq!(s, 422, "{e}");

    // Ten at once with one key (each waiter holds one of the API's 16 connections):
    // one build, ten identical answers.
    let answers = futures::future::join_all((0..10).map(|_| {
        let (base, token, body) = (base.clone(), token.clone(), body.clone());
        async move { post_with_key(&base, &token, path, "k-race", &body).await }
    }))
    .await;
    let first = &answers[0];
    assert_eq!(first.0, 201, "{}", first.1);
    assert!(answers.iter().all(|a| a == first), "{answers:?}");
    assert_eq!(env.count("SELECT count(*) FROM builds").await, 2);

    // Webhooks: the same, also at once.
    let hook = json!({"url": "http://127.0.0.1:9/hook", "events": ["build.finished"]});
    let answers = futures::future::join_all((0..5).map(|_| {
        let (base, token, hook) = (base.clone(), token.clone(), hook.clone());
        async move { post_with_key(&base, &token, "/v1/webhooks", "w-1", &hook).await }
    }))
    .await;
    assert_eq!(answers[0].0, 201, "{}", answers[0].1);
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert_eq!(env.count("SELECT count(*) FROM webhooks").await, 1);
    let (s, e) = post_with_key(
        &base,
        &token,
        "/v1/webhooks",
        "w-1",
        &json!({"url": "http://127.0.0.1:9/other", "events": ["build.finished"]}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{e}"
    );
    // Without a key, nothing changes.
    let (s, _) = call(&api, Method::POST, "/v1/webhooks", Some(hook.clone())).await;
    assert_eq!(s, 201);
    assert_eq!(env.count("SELECT count(*) FROM webhooks").await, 2);
    app.stop().await;
    env.cleanup().await;
}

/// Cancels, finishes of the same builds' jobs, timeouts and manual retries, with 50
/// agents at once: no deadlock, no 500, and every build ends terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn cancel_finish_timeouts_and_retries_race_without_deadlock() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(ALL, &[FAST_SWEEP, ("HERALD_JOBS__CANCEL_GRACE_S", "1")])
        .await;
    let (api, reg) = org(&app, "acme").await;
    let mut builds = Vec::new();
    for i in 0..30 {
        let jobs: Vec<Value> = (0..6)
            .map(|k| {
                let mut j = json!({"key": format!("j{k}"), "timeout_s": if k == 5 { 1 } else { 3600 },
                    "retry": {"automatic": [{"exit_status": "*", "limit": 1}]}});
                if k >= 3 {
                    j["depends_on"] = json!([format!("j{}", k - 3)]);
                }
                j
            })
            .collect();
        let b = create(&api, Value::Array(jobs)).await;
        builds.push((i, id_of(&b)));
    }
    let errors = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    // Registered first, so that the race below is all job calls.
    let mut clients = Vec::new();
    for n in 0..50 {
        clients.push(agent(&app, &reg, &format!("ci-{n}")).await.0);
    }
    for (n, a) in clients.into_iter().enumerate() {
        let (stop, errors) = (stop.clone(), errors.clone());
        agents.push(tokio::spawn(async move {
            let mut i = n;
            while !stop.load(Ordering::SeqCst) {
                let Ok(Some(j)) = a.ping(1).await else {
                    continue;
                };
                i += 1;
                for step in ["accept", "start"] {
                    let (s, _) =
                        call(&a, Method::PUT, &format!("/v1/jobs/{}/{step}", j.id), None).await;
                    if s == 500 {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Some jobs outlive their timeout; some fail; most pass.
                if j.key == "j5" && i % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                let exit = if i % 4 == 0 { 1 } else { 0 };
                let (s, _) = finish(&a, j.id, exit).await;
                if s == 500 {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
                let _ = call(&a, Method::POST, "/v1/agent/heartbeat", None).await;
            }
        }));
    }
    // Meanwhile: cancel a third of the builds, and retry failed jobs by hand.
    for (i, id) in &builds {
        if i % 3 == 0 {
            let (s, _) = call(&api, Method::POST, &format!("/v1/builds/{id}/cancel"), None).await;
            assert!(s < 500);
        }
    }
    for _round in 0..5 {
        for (_, id) in &builds {
            let b = build_state(&api, id).await;
            for j in b["jobs"].as_array().into_iter().flatten() {
                if j["state"] == "failed" && j["retried_by"].is_null() {
                    let (s, _) = call(
                        &api,
                        Method::POST,
                        &format!("/v1/jobs/{}/retry", j["id"].as_str().unwrap_or_default()),
                        None,
                    )
                    .await;
                    assert!(s == 201 || s == 409, "retry answered {s}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (_, id) in &builds {
        eventually(
            Duration::from_secs(120),
            &format!("build {id} to end"),
            || async {
                let b = build_state(&api, id).await;
                matches!(b["state"].as_str(), Some("passed" | "failed" | "canceled")).then_some(())
            },
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for a in agents {
        let _ = a.await;
    }
    assert_eq!(
        errors.load(Ordering::SeqCst),
        0,
        "no 500 (a deadlock) from agent calls"
    );
    let deadlocks: i64 = sqlx::query_scalar(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&env.pool)
    .await
    .expect("deadlocks");
    assert_eq!(deadlocks, 0, "deadlock detected");
    assert!(
        env.count("SELECT count(*) FROM jobs WHERE timed_out").await > 0,
        "some timed out"
    );
    assert!(
        env.count("SELECT count(*) FROM jobs WHERE retry_of IS NOT NULL")
            .await
            > 0,
        "some retried"
    );
    app.stop().await;
    env.cleanup().await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn cancel_list_reads(app: &TestApp) -> f64 {
    let r = reqwest::get(format!("{}/metrics", app.client.base()))
        .await
        .expect("metrics");
    metric(
        &r.text().await.expect("text"),
        "herald_cancel_list_reads_total",
    )
}

/// The cancel list costs a query per change (or per backstop period), not per
/// heartbeat: 1,000 heartbeats of 50 idle agents read it a handful of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_heartbeats_share_one_cancel_list_read() {
    let env = TestEnv::new().await;
    let mut app = env.start(ALL, &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let mut agents = Vec::new();
    for n in 0..50 {
        agents.push(agent(&app, &reg, &format!("ci-{n}")).await.0);
    }
    let before = cancel_list_reads(&app).await;
    // Ten at a time: the first heartbeat of each agent authenticates on the primary.
    for _ in 0..20 {
        for chunk in agents.chunks(10) {
            futures::future::join_all(chunk.iter().map(heartbeat_cancel)).await;
        }
    }
    let idle = cancel_list_reads(&app).await - before;
    eprintln!("1000 idle heartbeats: {idle} cancel-list reads");
    assert!(idle <= 10.0, "{idle} reads for 1000 heartbeats");
    // A cancel marks the list stale: the next heartbeat sees it.
    let b = create(&api, json!([{"key": "a"}])).await;
    let id = take_job(&agents[0]).await;
    call(
        &api,
        Method::POST,
        &format!("/v1/builds/{}/cancel", id_of(&b)),
        None,
    )
    .await;
    eventually(T, "the cancel", || async {
        let cancel = heartbeat_cancel(&agents[0]).await;
        (cancel == vec![id.to_string()]).then_some(())
    })
    .await;
    app.stop().await;
    env.cleanup().await;
}

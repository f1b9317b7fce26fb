//! Dispatch, propagation and maintenance against the real services, across processes.

mod common;

use common::*;
use herald_client::{Client, Method};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// Runs jobs until `stop` is set: ping, accept, start, finish (failing the keys in `fail`).
async fn work(agent: Client, stop: Arc<AtomicBool>, fail: Arc<HashSet<String>>) -> Vec<Uuid> {
    let mut ran = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match agent.ping(1).await {
            Ok(Some(job)) => {
                let exit = i32::from(fail.contains(&job.key));
                agent
                    .run_job(job.id, exit, Duration::ZERO)
                    .await
                    .expect("run job");
                ran.push(job.id);
            }
            Ok(None) => {}
            Err(e) => panic!("ping failed: {e}"),
        }
    }
    ran
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_in_of_200_jobs_finished_by_50_agents_at_once() {
    let env = TestEnv::new().await;
    // No backstop polling within the test's time: commits must wake the relay and the
    // dispatcher.
    let mut app = env
        .start(
            "api,relay,dispatch,maintenance",
            &[
                ("HERALD_DISPATCH__BACKSTOP_POLL_S", "600"),
                ("HERALD_RELAY__BACKSTOP_POLL_S", "600"),
            ],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;

    let mut jobs: Vec<_> = (0..200)
        .map(|i| json!({"key": format!("j{i}"), "command": "true"}))
        .collect();
    let deps: Vec<String> = (0..200).map(|i| format!("j{i}")).collect();
    jobs.push(json!({"key": "final", "command": "true", "depends_on": deps}));
    let passing = api
        .create_build("web", &build_body(json!(jobs)))
        .await
        .expect("create");

    // A second build where one job fails: the final job is skipped, the build fails.
    let mut jobs: Vec<_> = (0..20)
        .map(|i| json!({"key": format!("k{i}"), "command": "true"}))
        .collect();
    let deps: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    jobs.push(json!({"key": "final", "command": "true", "depends_on": deps}));
    jobs.push(json!({"key": "after", "command": "true", "depends_on": ["final"]}));
    let failing = api
        .create_build("web", &build_body(json!(jobs)))
        .await
        .expect("create");

    let stop = Arc::new(AtomicBool::new(false));
    let fail: Arc<HashSet<String>> = Arc::new(["k7".to_owned()].into());
    let mut workers = Vec::new();
    for i in 0..50 {
        let (a, _) = agent(&app, &reg, &format!("ci-{i}")).await;
        workers.push(tokio::spawn(work(a, stop.clone(), fail.clone())));
    }
    let pid = passing["id"].as_str().expect("id").to_owned();
    let fid = failing["id"].as_str().expect("id").to_owned();
    let passed = wait_build_state(&api, &pid, "passed", T).await;
    let failed = wait_build_state(&api, &fid, "failed", T).await;
    stop.store(true, Ordering::Relaxed);
    let mut ran = Vec::new();
    for w in workers {
        ran.extend(w.await.expect("worker"));
    }

    let jobs = passed["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 201);
    assert!(
        jobs.iter().all(|j| j["state"] == "passed"),
        "every job passed"
    );
    let states: HashMap<&str, &str> = failed["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| {
            (
                j["key"].as_str().unwrap_or(""),
                j["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(states["k7"], "failed");
    assert_eq!(states["final"], "skipped");
    assert_eq!(states["after"], "skipped");
    assert_eq!(states.values().filter(|s| **s == "passed").count(), 19);

    // No job ran twice, none was lost: exactly the 201 + 20 runnable jobs ran once.
    let unique: HashSet<Uuid> = ran.iter().copied().collect();
    assert_eq!(unique.len(), ran.len(), "a job went to two agents");
    assert_eq!(ran.len(), 221);
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE event_type = 'build.finished'")
            .await,
        2,
        "one build.finished per build, however many propagations ran"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE event_type = 'build.running'")
            .await,
        2,
        "one build.running per build, however many first accepts raced"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM builds WHERE started_at IS NULL")
            .await,
        0
    );
    // Propagation's events show the jobs as it committed them: the released final job
    // runnable since the moment its row says, the skipped ones finished.
    type At = Option<chrono::DateTime<chrono::Utc>>;
    let events: Vec<(String, serde_json::Value, At, At)> =
        sqlx::query_as(
            "SELECT o.event_type, o.payload, j.scheduled_at, j.finished_at FROM outbox o \
             JOIN jobs j ON j.id = (o.payload #>> '{data,job,id}')::uuid \
             WHERE j.key IN ('final', 'after') \
               AND (o.event_type = 'job.scheduled' OR o.payload #>> '{data,job,state}' = 'skipped')",
        )
        .fetch_all(&env.pool)
        .await
        .expect("propagation events");
    let micros = |v: &serde_json::Value| {
        serde_json::from_value::<chrono::DateTime<chrono::Utc>>(v.clone())
            .map(|t| t.timestamp_micros())
            .ok()
    };
    // The passing build's final job released; the failing build's final and after
    // skipped.
    assert_eq!(events.len(), 3, "{events:?}");
    for (kind, payload, scheduled_at, finished_at) in &events {
        let j = &payload["data"]["job"];
        if kind == "job.scheduled" {
            assert_eq!(j["state"], "scheduled");
            assert_eq!(
                micros(&j["scheduled_at"]),
                scheduled_at.map(|t| t.timestamp_micros())
            );
        } else {
            assert_eq!(kind, "job.finished");
            assert_eq!(j["state"], "skipped");
            assert_eq!(
                micros(&j["finished_at"]),
                finished_at.map(|t| t.timestamp_micros())
            );
        }
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ping_parked_in_one_process_gets_a_job_assigned_by_another() {
    let env = TestEnv::new().await;
    // This process serves the API only; the dispatcher runs in a child process.
    let mut app = env.start("api", &[]).await;
    let mut dispatcher = env.spawn("dispatch,relay,maintenance", &[]);
    let (api, reg) = org(&app, "acme").await;
    let (agent, agent_id) = agent(&app, &reg, "ci-1").await;

    let parked = tokio::spawn(async move { agent.ping(20).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let build = api
        .create_build("web", &build_body(json!([{"key": "a", "command": "x"}])))
        .await
        .expect("create");
    let job = parked
        .await
        .expect("join")
        .expect("ping")
        .expect("the parked ping got the job");
    assert_eq!(job.id, job_id(&build, "a"));
    let row: (String, Option<Uuid>) =
        sqlx::query_as("SELECT state, agent_id FROM jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&env.pool)
            .await
            .expect("job row");
    assert_eq!(row, ("assigned".to_owned(), Some(agent_id)));
    kill9(&mut dispatcher);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_finishes_gets_the_job_waiting_for_it_without_a_poll() {
    let env = TestEnv::new().await;
    // No backstop poll within the test: only the agent's own finish can wake dispatch.
    let mut app = env
        .start(
            "api,relay,dispatch",
            &[("HERALD_DISPATCH__BACKSTOP_POLL_S", "600")],
        )
        .await;
    let started = tokio::time::Instant::now();
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "only").await;
    api.create_build(
        "web",
        &build_body(json!([{"key": "a", "command": "x"}, {"key": "b", "command": "x"}])),
    )
    .await
    .expect("create");
    let first = agent.ping(10).await.expect("ping").expect("a job");
    // The other job waits for the one agent.
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'scheduled'")
            .await,
        1
    );
    // Past the listeners' one late resync, which would also wake the dispatcher.
    tokio::time::sleep_until(
        started + herald_storage::wake::LATE_RESYNC + Duration::from_millis(500),
    )
    .await;
    agent
        .run_job(first.id, 0, Duration::ZERO)
        .await
        .expect("run the first job");
    let second = agent
        .ping(20)
        .await
        .expect("ping")
        .expect("the waiting job, well before any backstop poll");
    assert_ne!(second.id, first.id);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unaccepted_assignment_returns_to_the_queue() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,maintenance",
            &[("HERALD_DISPATCH__ACCEPT_TIMEOUT_S", "1")],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (slow, _) = agent(&app, &reg, "slow").await;
    let build = api
        .create_build("web", &build_body(json!([{"key": "a", "command": "x"}])))
        .await
        .expect("create");
    let job = slow.ping(10).await.expect("ping").expect("job");
    // The slow agent never accepts. Another agent gets the job after the timeout.
    let (fast, fast_id) = agent(&app, &reg, "fast").await;
    let again = eventually(T, "reassignment", || async {
        fast.ping(2).await.ok().flatten()
    })
    .await;
    assert_eq!(again.id, job.id);
    assert_eq!(
        call(
            &slow,
            Method::PUT,
            &format!("/v1/jobs/{}/accept", job.id),
            None
        )
        .await
        .0,
        404
    );
    let accepted = fast.job_call(job.id, "accept", None).await.expect("accept");
    assert_eq!(accepted["agent_id"], json!(fast_id));
    assert!(
        env.count("SELECT count(*) FROM outbox WHERE event_type = 'job.scheduled'")
            .await
            >= 2
    );
    let _ = build;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_agent_fails_its_running_job_with_exit_status_minus_one() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,maintenance",
            &[("HERALD_AGENTS__LOST_AFTER_S", "2")],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, agent_id) = agent(&app, &reg, "ci-1").await;
    let build = api
        .create_build("web", &build_body(json!([{"key": "a", "command": "x"}, {"key": "b", "command": "x", "depends_on": ["a"]}])))
        .await
        .expect("create");
    let job = agent.ping(10).await.expect("ping").expect("job");
    agent
        .job_call(job.id, "accept", None)
        .await
        .expect("accept");
    agent.job_call(job.id, "start", None).await.expect("start");
    // The agent goes silent.
    let id = build["id"].as_str().expect("id").to_owned();
    let failed = wait_build_state(&api, &id, "failed", T).await;
    let a = &failed["jobs"][0];
    assert_eq!(a["state"], "failed");
    assert_eq!(a["exit_status"], -1);
    assert_eq!(failed["jobs"][1]["state"], "skipped");
    let state: String = sqlx::query_scalar("SELECT state FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_one(&env.pool)
        .await
        .expect("agent");
    assert_eq!(state, "lost");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE event_type = 'agent.lost'")
            .await,
        1
    );
    assert_eq!(
        call(&agent, Method::POST, "/v1/agent/heartbeat", None)
            .await
            .0,
        401
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_an_agent_connected() {
    let env = TestEnv::new().await;
    let mut app = env
        .start("api,maintenance", &[("HERALD_AGENTS__LOST_AFTER_S", "2")])
        .await;
    let (_, reg) = org(&app, "acme").await;
    let (agent, agent_id) = agent(&app, &reg, "ci-1").await;
    for _ in 0..8 {
        assert_eq!(
            call(&agent, Method::POST, "/v1/agent/heartbeat", None)
                .await
                .0,
            200
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let state: String = sqlx::query_scalar("SELECT state FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_one(&env.pool)
        .await
        .expect("agent");
    assert_eq!(
        state, "connected",
        "4 s of heartbeats with lost_after_s = 2"
    );
    app.stop().await;
    env.cleanup().await;
}

/// Which child holds the maintenance lock, by the pid in its application name.
async fn maintenance_leader(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = $1 \
           AND a.application_name LIKE 'herald-maintenance%'",
    )
    .bind(&env.db)
    .fetch_all(&env.pool)
    .await
    .expect("pg_locks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_maintenance_leader_and_a_fast_takeover_after_kill_9() {
    let env = TestEnv::new().await;
    let mut first = env.spawn("maintenance", &[]);
    let mut second = env.spawn("maintenance", &[]);
    let leader = eventually(T, "a leader", || async {
        let l = maintenance_leader(&env).await;
        (l.len() == 1).then(|| l[0].clone())
    })
    .await;
    // Both stand; only one holds the lock while the other waits.
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = $1",
    )
    .bind(&env.db)
    .fetch_one(&env.pool)
    .await
    .expect("waiters");
    let waiting = if waiting == 1 {
        waiting
    } else {
        eventually(T, "the standby to wait", || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = $1",
            )
            .bind(&env.db)
            .fetch_one(&env.pool)
            .await
            .ok()?;
            (n == 1).then_some(n)
        })
        .await
    };
    assert_eq!(waiting, 1);
    assert_eq!(maintenance_leader(&env).await.len(), 1);

    let first_pid = first.id().to_string();
    let (victim, survivor_pid) = if leader.ends_with(&format!("-{first_pid}")) {
        (&mut first, second.id().to_string())
    } else {
        (&mut second, first_pid)
    };
    kill9(victim);
    let started = std::time::Instant::now();
    let new_leader = eventually(
        Duration::from_secs(15),
        "the standby to take over",
        || async {
            let l = maintenance_leader(&env).await;
            (l.len() == 1 && l[0] != leader).then(|| l[0].clone())
        },
    )
    .await;
    assert!(
        new_leader.ends_with(&format!("-{survivor_pid}")),
        "{new_leader} vs {survivor_pid}"
    );
    eprintln!("takeover after kill -9 took {:?}", started.elapsed());
    kill9(&mut first);
    kill9(&mut second);
    env.cleanup().await;
}

/// Jobs go out by priority, then age; each queue finds its own agents, however many
/// idle agents of other queues come first and however small the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_go_by_priority_then_age_and_each_queue_finds_its_agents() {
    let env = TestEnv::new().await;
    // Backstop polls far beyond the pings' wait: only post-commit wake-ups can move
    // the work along in time.
    let mut app = env
        .start(
            "api,relay,dispatch",
            &[
                ("HERALD_DISPATCH__BATCH_AGENTS", "5"),
                ("HERALD_DISPATCH__BACKSTOP_POLL_S", "600"),
                ("HERALD_RELAY__BACKSTOP_POLL_S", "600"),
            ],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;

    // Twenty idle "default" agents, never assigned, registered first.
    for i in 0..20 {
        agent(&app, &reg, &format!("cpu-{i}")).await;
    }
    let first = api
        .create_build(
            "web",
            &build_body(json!([
                {"key": "low-old", "command": "true", "queue": "solo"},
                {"key": "high", "command": "true", "queue": "solo", "priority": 5},
            ])),
        )
        .await
        .expect("create");
    let second = api
        .create_build(
            "web",
            &build_body(json!([
                {"key": "low-new", "command": "true", "queue": "solo"},
                {"key": "gpu", "command": "true", "queue": "gpu"},
            ])),
        )
        .await
        .expect("create");

    let g = reg
        .register_agent("gpu-0", &["gpu"])
        .await
        .expect("gpu agent");
    let gpu = app.client.with_token(g.access_token);
    let got = gpu.ping(10).await.expect("ping").expect("gpu job");
    assert_eq!(got.id, job_id(&second, "gpu"));

    // The only "solo" agent gets its jobs one at a time: priority first, then the older.
    let s = reg
        .register_agent("solo-0", &["solo"])
        .await
        .expect("solo agent");
    let solo = app.client.with_token(s.access_token);
    let mut order = Vec::new();
    for _ in 0..3 {
        let job = solo.ping(10).await.expect("ping").expect("a job");
        order.push(job.id);
        solo.run_job(job.id, 0, Duration::ZERO).await.expect("run");
    }
    assert_eq!(
        order,
        vec![
            job_id(&first, "high"),
            job_id(&first, "low-old"),
            job_id(&second, "low-new"),
        ]
    );
    let on_default = env
        .count("SELECT count(*) FROM jobs j JOIN agents a ON a.id = j.agent_id WHERE a.name LIKE 'cpu-%'")
        .await;
    assert_eq!(on_default, 0, "no job went to an agent of another queue");

    // Each assignment wrote one job.assigned event, committed with it, showing the job
    // as the assignment left it (agent, time) inside its build.
    let events: Vec<(
        serde_json::Value,
        uuid::Uuid,
        uuid::Uuid,
        chrono::DateTime<chrono::Utc>,
        i32,
    )> = sqlx::query_as(
        "SELECT o.payload, j.id, j.agent_id, j.assigned_at, b.number FROM outbox o \
             JOIN jobs j ON j.id = (o.payload #>> '{data,job,id}')::uuid \
             JOIN builds b ON b.id = j.build_id \
             WHERE o.event_type = 'job.assigned' ORDER BY o.id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("assigned events");
    assert_eq!(events.len(), 4, "one event per assignment: {events:?}");
    for (payload, job, agent, assigned_at, number) in &events {
        assert_eq!(payload["type"], "job.assigned");
        let j = &payload["data"]["job"];
        assert_eq!(j["state"], "assigned", "{payload}");
        assert_eq!(j["agent_id"], agent.to_string(), "{payload}");
        let at: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(j["assigned_at"].clone()).expect("assigned_at");
        assert_eq!(
            at.timestamp_micros(),
            assigned_at.timestamp_micros(),
            "{payload}"
        );
        assert_eq!(payload["data"]["build"]["number"], *number, "{payload}");
        assert_eq!(payload["data"]["build"]["pipeline"], "web", "{payload}");
        assert!(events.iter().filter(|e| e.1 == *job).count() == 1);
    }
    app.stop().await;
    env.cleanup().await;
}

/// The maintenance leader vacuums a hot table once it has enough dead rows, so
/// dispatch's index scans stay short where autovacuum is off (as on CI here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_maintenance_leader_vacuums_hot_tables_with_dead_rows() {
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,maintenance",
            &[("HERALD_MAINTENANCE__VACUUM_MIN_DEAD_ROWS", "5")],
        )
        .await;
    let (api, reg) = org(&app, "acme").await;
    let (a, _) = agent(&app, &reg, "ci-0").await;
    let jobs: Vec<_> = (0..5)
        .map(|i| json!({"key": format!("j{i}"), "command": "true"}))
        .collect();
    let build = api
        .create_build("web", &build_body(json!(jobs)))
        .await
        .expect("create");
    for _ in 0..5 {
        let job = a.ping(10).await.expect("ping").expect("a job");
        a.run_job(job.id, 0, Duration::ZERO).await.expect("run");
    }
    let id = build["id"].as_str().expect("id").to_owned();
    wait_build_state(&api, &id, "passed", T).await;
    // Each job row was rewritten four times: its old versions are dead rows.
    eventually(T, "a vacuum of jobs", || async {
        let n = env
            .count("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'jobs'")
            .await;
        (n > 0).then_some(())
    })
    .await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_ups_reach_this_process_in_memory_once_and_other_processes_through_postgres() {
    use herald_storage::{channels, wake, Heard, LocalWakes, Waker};
    use tokio_util::sync::CancellationToken;
    let env = TestEnv::new().await;
    let cancel = CancellationToken::new();
    let local = LocalWakes::default();
    let (waker, sender) = Waker::spawn(env.pool.clone(), local.clone(), cancel.clone());
    let mut heard = wake::listen(
        env.pool.clone(),
        &local,
        &[channels::ASSIGNED],
        cancel.clone(),
    );
    assert_eq!(
        heard.recv().await,
        Some(Heard::Resync),
        "a new listener resyncs first"
    );
    // Another process: its own in-memory wake-ups and its own named listener.
    let elsewhere = LocalWakes::default();
    let mut other = wake::listen(
        env.pool.clone(),
        &elsewhere,
        &[channels::ASSIGNED],
        cancel.clone(),
    );
    assert_eq!(other.recv().await, Some(Heard::Resync));

    waker.send(channels::ASSIGNED, "a1 j1".into());
    assert_eq!(
        heard.recv().await,
        Some(Heard::Notice {
            channel: channels::ASSIGNED.into(),
            payload: "a1 j1".into()
        })
    );
    let notice = |payload: &str| {
        Some(Heard::Notice {
            channel: channels::ASSIGNED.into(),
            payload: payload.into(),
        })
    };
    assert_eq!(
        tokio::time::timeout(T, other.recv())
            .await
            .expect("other processes hear it"),
        notice("a1 j1")
    );
    // The echo has reached PostgreSQL's listeners; this process must not hear it again,
    // so the next thing it hears is another process's notification (or the late resync
    // every listener does a few seconds after it connects).
    sqlx::query("SELECT pg_notify($1, 'from elsewhere')")
        .bind(channels::ASSIGNED)
        .execute(&env.pool)
        .await
        .expect("notify");
    let mut next = tokio::time::timeout(T, heard.recv()).await.expect("heard");
    if next == Some(Heard::Resync) {
        next = tokio::time::timeout(T, heard.recv()).await.expect("heard");
    }
    assert_eq!(next, notice("from elsewhere"));
    // And every listener resyncs once more after connecting, for what a waker skipped
    // while it did not know the listener yet.
    let mut resynced = false;
    while let Ok(Some(h)) = tokio::time::timeout(T, other.recv()).await {
        if h == Heard::Resync {
            resynced = true;
            break;
        }
    }
    assert!(resynced, "the late resync");
    cancel.cancel();
    let _ = sender.await;
    env.cleanup().await;
}

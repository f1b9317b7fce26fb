//! The outbox relay and the broker: nothing committed is ever lost.

mod common;

use common::*;
use herald_client::Method;
use serde_json::json;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

async fn unpublished(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_between_commit_and_publish_loses_no_event() {
    let env = TestEnv::new().await;
    let tap = EventTap::new(&env.prefix).await;
    let mut app = env.start("api", &[]).await;
    let (api, _) = org(&app, "acme").await;

    // Events committed while no relay runs wait in the outbox.
    for _ in 0..10 {
        api.create_build("web", &build_body(json!([{"key": "a"}, {"key": "b"}])))
            .await
            .expect("create");
    }
    assert!(unpublished(&env).await >= 30);

    // A relay starts, and is killed with -9 while builds keep committing.
    let mut relay = env.spawn("relay", &[]);
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            for _ in 0..60 {
                api.create_build(
                    "web",
                    &build_body(json!([{"key": "a"}, {"key": "b"}, {"key": "c"}])),
                )
                .await
                .expect("create");
            }
        })
    };
    eventually(T, "the relay to publish something", || async {
        (!tap.snapshot().is_empty()).then_some(())
    })
    .await;
    kill9(&mut relay);
    writer.await.expect("writer");
    // The writer may have finished before the kill; these commit with no relay alive.
    for _ in 0..5 {
        api.create_build("web", &build_body(json!([{"key": "a"}])))
            .await
            .expect("create");
    }
    assert!(unpublished(&env).await > 0, "the kill left work behind");

    // A new relay publishes everything that was committed.
    let mut relay = env.spawn("relay", &[]);
    eventually(T, "the outbox to drain", || async {
        (unpublished(&env).await == 0).then_some(())
    })
    .await;
    let committed: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox")
        .fetch_all(&env.pool)
        .await
        .expect("outbox");
    let want: HashSet<String> = committed.iter().map(|id| id.to_string()).collect();
    let got = eventually(T, "every event on the broker", || async {
        let got: HashSet<String> = tap.snapshot().into_iter().map(|(id, _, _)| id).collect();
        want.is_subset(&got).then_some(got)
    })
    .await;
    assert!(want.len() >= 10 * 3 + 60 * 4);
    assert_eq!(got.len(), want.len(), "no event the database does not have");
    kill9(&mut relay);
    tap.close().await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirmed_rows_are_marked_in_batches_and_at_shutdown() {
    let env = TestEnv::new().await;
    let tap = EventTap::new(&env.prefix).await;
    // Marks wait up to an hour (or 256 rows): only a graceful stop writes them.
    let mut relay = env
        .start(
            "api,relay",
            &[("HERALD_RELAY__MARK_INTERVAL_MS", "3600000")],
        )
        .await;
    let (api, _) = org(&relay, "acme").await;
    for _ in 0..5 {
        api.create_build("web", &build_body(json!([{"key": "a"}, {"key": "b"}])))
            .await
            .expect("create");
    }
    let committed: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox")
            .fetch_all(&env.pool)
            .await
            .expect("outbox")
            .iter()
            .map(|id| id.to_string())
            .collect();
    assert!(committed.len() >= 15);
    eventually(T, "every event on the broker", || async {
        let got: HashSet<String> = tap.snapshot().into_iter().map(|(id, _, _)| id).collect();
        committed.is_subset(&got).then_some(())
    })
    .await;
    // Published, not yet marked; and not published twice while they wait.
    assert_eq!(unpublished(&env).await, committed.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tap.snapshot().len(), committed.len(), "no event twice");

    relay.stop().await;
    assert_eq!(
        unpublished(&env).await,
        0,
        "a graceful stop marks what the broker has"
    );
    tap.close().await;
    env.cleanup().await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Restarts the shared broker: run on its own (see scripts/test.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_loses_nothing_and_consumers_come_back() {
    let env = TestEnv::new().await;
    let mut app = env.start("api,relay,dispatch,maintenance", &[]).await;
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let two_step =
        json!([{"key": "a", "command": "x"}, {"key": "b", "command": "x", "depends_on": ["a"]}]);
    let before = api
        .create_build("web", &build_body(two_step.clone()))
        .await
        .expect("create");
    let job = agent.ping(10).await.expect("ping").expect("job");
    agent
        .job_call(job.id, "accept", None)
        .await
        .expect("accept");

    rabbitmqctl(&["stop_app"]);
    let restarted = scopeguard(|| {
        let _ = Command::new("rabbitmqctl").args(["start_app"]).status();
    });
    // While the broker is down, work goes on and events wait in the outbox.
    agent.job_call(job.id, "start", None).await.expect("start");
    agent
        .job_call(job.id, "finish", Some(&json!({"exit_status": 0})))
        .await
        .expect("finish");
    let during = api
        .create_build("web", &build_body(two_step.clone()))
        .await
        .expect("create while down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(unpublished(&env).await > 0, "events wait for the broker");
    let (s, ready) = call(&app.client, Method::GET, "/readyz", None).await;
    assert_eq!(s, 503, "{ready}");

    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    drop(restarted);

    // Publisher and consumers reconnect; propagation resumes; both builds finish.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(Some(job)) = agent.ping(1).await {
                    agent.run_job(job.id, 0, Duration::ZERO).await.expect("run");
                }
            }
        })
    };
    for b in [&before, &during] {
        wait_build_state(
            &api,
            b["id"].as_str().expect("id"),
            "passed",
            Duration::from_secs(90),
        )
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    worker.await.expect("worker");
    eventually(T, "the outbox to drain", || async {
        (unpublished(&env).await == 0).then_some(())
    })
    .await;
    app.stop().await;
    env.cleanup().await;
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// Commit statuses follow only the builds of pipelines with a GitHub integration, so
/// the relay copies only their events to `{prefix}.status`, the commit-status queue's
/// exchange; the webhook fan-out's queue still gets every event. Without it, every
/// event of every installation was a quorum-queue write, a delivery and an ack for a
/// fan-out with nothing to do (RabbitMQ's CPU under the dispatch load test: +35 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_events_of_pipelines_with_a_github_integration_reach_the_commit_status_queue() {
    let env = TestEnv::new().await;
    // No notify role: the queues keep what the relay sends them.
    let private_ok = ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true");
    let mut app = env.start("api,relay", &[private_ok]).await;
    let (api, _) = org(&app, "acme").await;
    let (s, g) = call(
        &api,
        Method::PUT,
        "/v1/pipelines/web/github",
        Some(json!({"api_url": "http://127.0.0.1:9", "token": "ghp_test", "job_statuses": true})),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    let (s, p) = call(
        &api,
        Method::POST,
        "/v1/pipelines",
        Some(json!({"slug": "docs", "repository": "acme/docs"})),
    )
    .await;
    assert_eq!(s, 201, "{p}");
    api.create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("web build");
    api.create_build("docs", &build_body(json!([{"key": "a"}, {"key": "b"}])))
        .await
        .expect("docs build");
    eventually(T, "every event published and marked", || async {
        let waiting = env
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await;
        (waiting == 0).then_some(())
    })
    .await;
    let per_pipeline = |slug: &'static str| {
        let env = &env;
        async move {
            env.count(&format!(
                "SELECT count(*) FROM outbox o JOIN builds b ON b.id = o.build_id \
                 JOIN pipelines p ON p.id = b.pipeline_id WHERE p.slug = '{slug}'"
            ))
            .await
        }
    };
    let (web, docs) = (per_pipeline("web").await, per_pipeline("docs").await);
    let all = env.count("SELECT count(*) FROM outbox").await;
    // build.scheduled and one job.scheduled for web, and for docs two.
    assert_eq!((web, docs), (2, 3), "events per pipeline");
    let cfg = herald_bus::BusConfig::new(amqp_url(), env.prefix.clone());
    let publisher = herald_bus::Publisher::new(cfg.clone())
        .await
        .expect("publisher");
    let names = cfg.names();
    let depth = |q: String| {
        let publisher = &publisher;
        async move { publisher.queue_depth(&q).await.expect("queue depth").0 }
    };
    assert_eq!(
        i64::from(depth(names.commit_status_queue()).await),
        web,
        "the commit-status queue holds the web pipeline's events and no others"
    );
    assert_eq!(
        i64::from(depth(names.notify_queue()).await),
        all,
        "the webhook fan-out's queue holds every event"
    );
    publisher.close().await;
    app.stop().await;
    env.cleanup().await;
}

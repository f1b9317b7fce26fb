//! Tests against a real RabbitMQ (`HERALD_TEST_AMQP_URL`, default the local broker).
//! Every test uses its own prefix `test_<uuid>` and deletes what it declared.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context};
use herald_bus::{
    connect, declare_queue, declare_topology, delete_topology,
    lapin::options::{BasicAckOptions, BasicGetOptions},
    queue_depth, run_consumer, BusConfig, BusError, ConsumerSpec, Incoming, Names, Outcome,
    OutgoingMessage, Publisher,
};
use tokio_util::sync::CancellationToken;

fn config() -> BusConfig {
    let url = std::env::var("HERALD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    BusConfig {
        url,
        prefix: format!("test_{}", uuid::Uuid::new_v4().simple()),
    }
}

/// Runs `body`, then deletes the topology of `cfg` plus `extra_queues`, whatever happened.
async fn with_cleanup<Fut>(cfg: &BusConfig, extra_queues: Vec<String>, body: Fut)
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    let res = body.await;
    let cleanup = async {
        let conn = connect(cfg).await?;
        let ch = conn.create_channel().await?;
        let extra: Vec<&str> = extra_queues.iter().map(String::as_str).collect();
        delete_topology(&ch, &cfg.names(), &extra).await?;
        conn.close(200, "bye").await?;
        Ok::<_, BusError>(())
    }
    .await;
    if let Err(e) = res {
        panic!("test failed: {e:#}");
    }
    if let Err(e) = cleanup {
        panic!("cleanup failed: {e}");
    }
}

fn message(i: usize, routing_key: &str) -> OutgoingMessage {
    OutgoingMessage {
        routing_key: routing_key.to_string(),
        message_id: uuid::Uuid::new_v4().to_string(),
        body: format!("{{\"n\":{i}}}").into_bytes(),
        headers: vec![("x-herald-n".to_string(), i.to_string())],
    }
}

fn spec(queue: &str, bindings: &[&str], prefetch: u16, concurrency: usize) -> ConsumerSpec {
    ConsumerSpec {
        queue: queue.to_string(),
        bindings: bindings.iter().map(|b| b.to_string()).collect(),
        prefetch,
        concurrency,
        consumer_tag: format!("test-{}", uuid::Uuid::new_v4().simple()),
    }
}

/// Declares the topology and `queue` so that messages published before the consumer starts
/// are kept.
async fn prepare_queue(cfg: &BusConfig, queue: &str, bindings: &[&str]) -> anyhow::Result<()> {
    let conn = connect(cfg).await?;
    let ch = conn.create_channel().await?;
    declare_topology(&ch, &cfg.names()).await?;
    declare_queue(&ch, &cfg.names(), queue, bindings).await?;
    conn.close(200, "bye").await?;
    Ok(())
}

async fn wait_until<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn depth_eventually(
    publisher: &Publisher,
    queue: &str,
    expected: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (messages, _) = publisher.queue_depth(queue).await?;
        if messages == expected {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("queue {queue} holds {messages} messages, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn names_are_derived_from_the_prefix() {
    let n = Names::new("herald");
    assert_eq!(n.events_exchange(), "herald.events");
    assert_eq!(n.dead_letter_exchange(), "herald.dlx");
    assert_eq!(n.dead_letter_queue(), "herald.dead");
    assert_eq!(n.dispatch_queue(), "herald.dispatch");
    assert_eq!(n.notify_queue(), "herald.notify");
    assert_eq!(n.commit_status_queue(), "herald.notify.commit_status");
    assert_eq!(n.delivery_queue("webhook"), "herald.deliver.webhook");
}

#[tokio::test]
async fn topology_declaration_is_idempotent() {
    let cfg = config();
    let names = cfg.names();
    let extra = names.delivery_queue("webhook");
    with_cleanup(&cfg, vec![extra.clone()], async {
        let conn = connect(&cfg).await?;
        let ch = conn.create_channel().await?;
        for _ in 0..2 {
            declare_topology(&ch, &names).await?;
            declare_queue(&ch, &names, &extra, &["job.*", "build.finished"]).await?;
        }
        for q in [
            names.dead_letter_queue(),
            names.dispatch_queue(),
            names.notify_queue(),
            names.commit_status_queue(),
            extra.clone(),
        ] {
            assert_eq!(queue_depth(&ch, &q).await?, (0, 0), "{q}");
        }
        // A second connection declaring the same topology succeeds as well.
        let publisher = Publisher::new(cfg.clone()).await?;
        assert!(publisher.is_connected());
        // A missing queue is reported as such, and only closes the probing channel.
        let missing = publisher
            .queue_depth(&format!("{}.missing", cfg.prefix))
            .await;
        assert!(
            matches!(missing, Err(BusError::QueueNotFound(_))),
            "{missing:?}"
        );
        assert!(publisher.is_connected());
        publisher.close().await;
        conn.close(200, "bye").await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_thousand_published_messages_are_consumed_exactly_as_sent() {
    let cfg = config();
    let names = cfg.names();
    let queue = names.delivery_queue("bulk");
    with_cleanup(&cfg, vec![queue.clone()], async {
        prepare_queue(&cfg, &queue, &["bulk.#"]).await?;
        let publisher = Publisher::new(cfg.clone()).await?;
        let sent: Vec<OutgoingMessage> = (0..1000).map(|i| message(i, "bulk.item")).collect();
        publisher.publish_events(&sent).await?;

        let received: Arc<Mutex<Vec<Incoming>>> = Arc::default();
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(run_consumer(
            cfg.clone(),
            spec(&queue, &["bulk.#"], 50, 16),
            cancel.clone(),
            {
                let received = received.clone();
                move |msg: Incoming| {
                    let received = received.clone();
                    async move {
                        if let Ok(mut r) = received.lock() {
                            r.push(msg);
                        }
                        Outcome::Ack
                    }
                }
            },
        ));
        let lock = || received.lock().map(|r| r.len()).unwrap_or(0);
        wait_until("1000 deliveries", Duration::from_secs(60), || {
            lock() >= 1000
        })
        .await?;
        // Give duplicates, if any, a chance to show up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(40), consumer).await???;

        let received = received.lock().map_err(|_| anyhow!("poisoned"))?.clone();
        ensure!(received.len() == 1000, "received {}", received.len());
        let by_id: HashMap<&str, &OutgoingMessage> =
            sent.iter().map(|m| (m.message_id.as_str(), m)).collect();
        let mut seen = HashSet::new();
        for msg in &received {
            let id = msg.message_id.as_deref().context("message without id")?;
            ensure!(seen.insert(id.to_string()), "duplicate {id}");
            let original = by_id.get(id).context("unknown id")?;
            ensure!(msg.body == original.body, "body of {id} differs");
            ensure!(msg.routing_key == "bulk.item");
            ensure!(!msg.redelivered);
            ensure!(msg.header("x-herald-n") == Some(original.headers[0].1.as_str()));
        }
        ensure!(seen.len() == 1000);
        depth_eventually(&publisher, &queue, 0, Duration::from_secs(5)).await?;
        publisher.close().await;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn requeue_redelivers_with_the_redelivered_flag() {
    let cfg = config();
    let queue = cfg.names().delivery_queue("requeue");
    with_cleanup(&cfg, vec![queue.clone()], async {
        prepare_queue(&cfg, &queue, &["rq.*"]).await?;
        let publisher = Publisher::new(cfg.clone()).await?;
        let msg = message(1, "rq.one");
        publisher.publish_events(std::slice::from_ref(&msg)).await?;

        let seen: Arc<Mutex<Vec<Incoming>>> = Arc::default();
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(run_consumer(
            cfg.clone(),
            spec(&queue, &["rq.*"], 10, 2),
            cancel.clone(),
            {
                let seen = seen.clone();
                move |m: Incoming| {
                    let seen = seen.clone();
                    async move {
                        let mut seen = match seen.lock() {
                            Ok(s) => s,
                            Err(_) => return Outcome::Ack,
                        };
                        seen.push(m);
                        if seen.len() == 1 {
                            Outcome::Requeue
                        } else {
                            Outcome::Ack
                        }
                    }
                }
            },
        ));
        let count = || seen.lock().map(|s| s.len()).unwrap_or(0);
        wait_until("the redelivery", Duration::from_secs(20), || count() >= 2).await?;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(40), consumer).await???;

        let seen = seen.lock().map_err(|_| anyhow!("poisoned"))?.clone();
        ensure!(seen.len() == 2, "seen {}", seen.len());
        ensure!(!seen[0].redelivered);
        ensure!(seen[1].redelivered);
        for m in &seen {
            ensure!(m.message_id.as_deref() == Some(msg.message_id.as_str()));
            ensure!(m.body == msg.body);
        }
        depth_eventually(&publisher, &queue, 0, Duration::from_secs(5)).await?;
        publisher.close().await;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_panicking_handler_requeues_and_the_consumer_keeps_going() {
    let cfg = config();
    let queue = cfg.names().delivery_queue("panic");
    with_cleanup(&cfg, vec![queue.clone()], async {
        prepare_queue(&cfg, &queue, &["panic.*"]).await?;
        let publisher = Publisher::new(cfg.clone()).await?;
        let msgs: Vec<_> = (0..3).map(|i| message(i, "panic.x")).collect();
        publisher.publish_events(&msgs).await?;

        let calls = Arc::new(AtomicUsize::new(0));
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(run_consumer(
            cfg.clone(),
            spec(&queue, &["panic.*"], 10, 1),
            cancel.clone(),
            {
                let calls = calls.clone();
                let acked = acked.clone();
                move |m: Incoming| {
                    let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                    let acked = acked.clone();
                    async move {
                        if first {
                            panic!("handler blew up on purpose");
                        }
                        if let (Ok(mut a), Some(id)) = (acked.lock(), m.message_id) {
                            a.insert(id);
                        }
                        Outcome::Ack
                    }
                }
            },
        ));
        let count = || acked.lock().map(|a| a.len()).unwrap_or(0);
        wait_until("all messages acked", Duration::from_secs(20), || {
            count() == 3
        })
        .await?;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(40), consumer).await???;
        ensure!(calls.load(Ordering::SeqCst) == 4);
        depth_eventually(&publisher, &queue, 0, Duration::from_secs(5)).await?;
        publisher.close().await;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn dead_letter_lands_in_the_dead_queue() {
    let cfg = config();
    let names = cfg.names();
    let queue = names.delivery_queue("dl");
    with_cleanup(&cfg, vec![queue.clone()], async {
        prepare_queue(&cfg, &queue, &["dl.*"]).await?;
        let publisher = Publisher::new(cfg.clone()).await?;
        let msg = message(7, "dl.poison");
        publisher.publish_events(std::slice::from_ref(&msg)).await?;

        let handled = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(run_consumer(
            cfg.clone(),
            spec(&queue, &["dl.*"], 10, 2),
            cancel.clone(),
            {
                let handled = handled.clone();
                move |_m: Incoming| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    async { Outcome::DeadLetter }
                }
            },
        ));
        let dead = names.dead_letter_queue();
        depth_eventually(&publisher, &dead, 1, Duration::from_secs(20)).await?;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(40), consumer).await???;
        ensure!(handled.load(Ordering::SeqCst) == 1);
        depth_eventually(&publisher, &queue, 0, Duration::from_secs(5)).await?;

        let ch = publisher.open_channel().await?;
        let got = ch
            .basic_get(&dead, BasicGetOptions::default())
            .await?
            .context("dead queue is empty")?;
        ensure!(
            got.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str())
                == Some(msg.message_id.as_str())
        );
        ensure!(got.delivery.routing_key.as_str() == "dl.poison");
        ensure!(got.delivery.data == msg.body);
        got.delivery.acker.ack(BasicAckOptions::default()).await?;
        ch.close(200, "bye").await?;
        publisher.close().await;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn cancel_finishes_in_flight_work_and_returns_the_rest() {
    let cfg = config();
    let queue = cfg.names().delivery_queue("cancel");
    with_cleanup(&cfg, vec![queue.clone()], async {
        prepare_queue(&cfg, &queue, &["slow.*"]).await?;
        let publisher = Publisher::new(cfg.clone()).await?;
        let msgs: Vec<_> = (0..10).map(|i| message(i, "slow.job")).collect();
        publisher.publish_events(&msgs).await?;

        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(run_consumer(
            cfg.clone(),
            // Prefetch above concurrency: some deliveries sit in the client when cancelled.
            spec(&queue, &["slow.*"], 8, 3),
            cancel.clone(),
            {
                let started = started.clone();
                let finished = finished.clone();
                move |_m: Incoming| {
                    let started = started.clone();
                    let finished = finished.clone();
                    async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(800)).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                        Outcome::Ack
                    }
                }
            },
        ));
        wait_until("3 handlers running", Duration::from_secs(20), || {
            started.load(Ordering::SeqCst) == 3
        })
        .await?;
        cancel.cancel();
        let t0 = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(40), consumer).await???;
        let waited = t0.elapsed();

        // In-flight handlers finished (the consumer waited for them) and no new one started.
        ensure!(
            started.load(Ordering::SeqCst) == 3,
            "no handler starts after cancel"
        );
        ensure!(
            finished.load(Ordering::SeqCst) == 3,
            "in-flight handlers finished"
        );
        ensure!(
            waited >= Duration::from_millis(300),
            "returned after {waited:?}"
        );
        // The 3 were acked; the 7 others, prefetched or not, are back in the queue.
        depth_eventually(&publisher, &queue, 7, Duration::from_secs(5)).await?;
        let (_, consumers) = publisher.queue_depth(&queue).await?;
        ensure!(consumers == 0, "consumer still attached");
        publisher.close().await;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn publisher_reports_failures_and_recovers_on_the_next_call() {
    let cfg = config();
    let queue = cfg.names().delivery_queue("recover");
    with_cleanup(&cfg, vec![queue.clone()], async {
        prepare_queue(&cfg, &queue, &["rec.*"]).await?;
        let publisher = Publisher::new(cfg.clone()).await?;
        // Publishing to a missing exchange makes the broker close the channel.
        let missing = format!("{}.nope", cfg.prefix);
        let err = publisher
            .publish_batch(&missing, &[message(0, "rec.a")])
            .await;
        ensure!(err.is_err(), "publish to a missing exchange succeeded");
        // The next call reconnects lazily.
        publisher
            .publish_events(&[message(1, "rec.a"), message(2, "rec.b")])
            .await?;
        ensure!(publisher.is_connected());
        depth_eventually(&publisher, &queue, 2, Duration::from_secs(5)).await?;
        // An empty batch is a no-op.
        publisher.publish_events(&[]).await?;
        publisher.close().await;
        ensure!(!publisher.is_connected());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn consumer_with_an_empty_queue_name_is_rejected() {
    let res = run_consumer(
        config(),
        spec("", &[], 1, 1),
        CancellationToken::new(),
        |_m: Incoming| async { Outcome::Ack },
    )
    .await;
    assert!(matches!(res, Err(BusError::Invalid(_))));
}

#[tokio::test]
async fn consumer_keeps_retrying_an_unreachable_broker_and_stops_on_cancel() {
    // Nothing listens on port 1 of localhost: every attempt is refused.
    let cfg = BusConfig {
        url: "amqp://guest:guest@127.0.0.1:1/%2f".to_string(),
        prefix: format!("test_{}", uuid::Uuid::new_v4().simple()),
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let consumer = tokio::spawn(run_consumer(
        cfg.clone(),
        spec(&cfg.names().notify_queue(), &["#"], 1, 1),
        cancel.clone(),
        {
            let calls = calls.clone();
            move |_m: Incoming| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Outcome::Ack }
            }
        },
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!consumer.is_finished(), "the consumer gave up");
    cancel.cancel();
    let res = tokio::time::timeout(Duration::from_secs(5), consumer)
        .await
        .expect("consumer did not stop on cancel")
        .expect("consumer task panicked");
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The publisher reports the failure instead of hanging.
    let publisher = Publisher::lazy(cfg);
    let err = tokio::time::timeout(
        Duration::from_secs(15),
        publisher.publish_events(&[message(0, "x")]),
    )
    .await
    .expect("publish hung");
    assert!(err.is_err());
    assert!(Publisher::new(publisher.config().clone()).await.is_err());
}

#[tokio::test]
async fn consumer_redeclares_its_queue_after_the_broker_cancels_it() {
    let cfg = config();
    let names = cfg.names();
    let queue = names.delivery_queue("gone");
    with_cleanup(&cfg, vec![queue.clone()], async {
        let received = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let consumer = tokio::spawn(run_consumer(
            cfg.clone(),
            spec(&queue, &["gone.*"], 10, 2),
            cancel.clone(),
            {
                let received = received.clone();
                move |_m: Incoming| {
                    received.fetch_add(1, Ordering::SeqCst);
                    async { Outcome::Ack }
                }
            },
        ));
        let publisher = Publisher::new(cfg.clone()).await?;
        // Wait for the consumer to attach, then delete its queue under it.
        let attached = || async { matches!(publisher.queue_depth(&queue).await, Ok((_, 1))) };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !attached().await {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "consumer never attached"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ch = publisher.open_channel().await?;
        ch.queue_delete(&queue, Default::default()).await?;
        ch.close(200, "bye").await?;
        // The consumer notices the server-side cancel, reconnects and re-declares the queue.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !attached().await {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "consumer never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        publisher.publish_events(&[message(1, "gone.a")]).await?;
        wait_until("the delivery", Duration::from_secs(20), || {
            received.load(Ordering::SeqCst) == 1
        })
        .await?;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(40), consumer).await???;
        publisher.close().await;
        Ok(())
    })
    .await;
}

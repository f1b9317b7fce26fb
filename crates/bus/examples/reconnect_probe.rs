//! Manual check of the reconnect paths (not part of the test suite):
//! `cargo run -p herald-bus --example reconnect_probe`, then, while it runs, close its
//! connections from the broker side (e.g. `rabbitmqctl close_connection <pid> test`).
//! It publishes a numbered message every 20 ms (retrying a failed one, like a relay) and
//! reports at the end whether every number was consumed (at least once).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use herald_bus::{
    connect, delete_topology, run_consumer, BusConfig, ConsumerSpec, Incoming, Outcome,
    OutgoingMessage, Publisher,
};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let cfg = BusConfig::new(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        format!("test_{}", uuid::Uuid::new_v4().simple()),
    );
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!("prefix {}", cfg.prefix);
    let queue = cfg.names().delivery_queue("probe");
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let cancel = CancellationToken::new();
    let consumer = tokio::spawn(run_consumer(
        cfg.clone(),
        ConsumerSpec::new(queue.clone(), &["probe.#"]),
        cancel.clone(),
        {
            let seen = seen.clone();
            move |m: Incoming| {
                let seen = seen.clone();
                async move {
                    if let Ok(n) = String::from_utf8_lossy(&m.body).parse::<u64>() {
                        if let Ok(mut s) = seen.lock() {
                            s.push(n);
                        }
                    }
                    Outcome::Ack
                }
            }
        },
    ));
    // Let the consumer declare its queue first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let publisher = Publisher::lazy(cfg.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    let mut failures = 0;
    while tokio::time::Instant::now() < deadline {
        let msg = OutgoingMessage {
            routing_key: "probe.n".into(),
            message_id: n.to_string(),
            body: n.to_string().into_bytes(),
            headers: vec![],
        };
        match publisher.publish_events(&[msg]).await {
            Ok(()) => n += 1,
            Err(e) => {
                failures += 1;
                println!("publish {n} failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    cancel.cancel();
    consumer.await??;
    let seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let distinct: BTreeSet<u64> = seen.iter().copied().collect();
    let missing: Vec<u64> = (0..n).filter(|i| !distinct.contains(i)).collect();
    println!(
        "published {n} (publish failures {failures}), consumed {} ({} distinct), missing {:?}",
        seen.len(),
        distinct.len(),
        missing
    );
    let conn = connect(&cfg).await?;
    let ch = conn.create_channel().await?;
    delete_topology(&ch, &cfg.names(), &[&queue]).await?;
    conn.close(200, "bye").await?;
    Ok(())
}

//! Storm scenario (issue 3 c): dispatch p99 without, then during, a notification
//! storm with slow and failing receivers.

use crate::agents::Shared;
use crate::metrics::{ms, TxProbe};
use crate::receivers;
use crate::report::{met, summary};
use crate::scenarios::dispatch::load_phase;
use crate::scenarios::webhooks::{
    queues_line, receiver_lines, receiver_totals, setup, throttle_env, NotifySetup,
};
use anyhow::Result;
use herald_client::Client;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A baseline load phase without webhooks, then the same load with every webhook.
pub async fn run(
    sh: &Arc<Shared>,
    api: &Client,
    plain: &Client,
    admin: &Client,
    pipeline: &str,
    mut primary: Option<&mut TxProbe>,
    setup_s: f64,
) -> Result<String> {
    let a = &sh.args;
    let na = &a.notify;
    let NotifySetup {
        r,
        stop,
        samples,
        mon,
        mut report,
    } = setup(sh, plain).await?;
    let base_s = na.baseline_s.unwrap_or(a.duration_s);
    println!("[storm] baseline: {base_s:.0} s of dispatch load, no webhooks");
    let base = load_phase(sh, api, plain, pipeline, primary.as_deref_mut(), base_s).await;
    sh.reset_samples();
    r.create_webhooks(api, sh.args.notify.rotate_secrets)
        .await?;
    println!(
        "[storm] {} webhooks created; storm: {:.0} s of the same dispatch load",
        r.endpoints.len(),
        a.duration_s
    );
    // Let every process drop its cached subscriptions.
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let storm = load_phase(sh, api, plain, pipeline, primary, a.duration_s).await;
    let (lines, _) = receiver_lines(
        &r,
        &samples.lock().unwrap(),
        t0,
        a.duration_s,
        na.rate_warmup_s,
        storm.builds,
    );
    report.lines.extend(lines);
    report.lines.extend(receiver_totals(&r));
    report.lines.push(format!(
        "notify: backlog       at the end: {}",
        queues_line(admin).await
    ));
    if let (false, false) = (base.hist.is_empty(), storm.hist.is_empty()) {
        let (b, st) = (
            ms(base.hist.value_at_quantile(0.99)),
            ms(storm.hist.value_at_quantile(0.99)),
        );
        let ratio = st / b;
        report.lines.push(format!(
                "isolation             dispatch p99 storm {st:.2} ms / baseline {b:.2} ms = {ratio:.2} (throttle {})",
                throttle_env()
            ));
        let on = !throttle_env().starts_with("off");
        report.targets.push(format!(
            "isolation ratio {ratio:.2} <= {} with throttle {}: {}",
            receivers::TARGET_ISOLATION_RATIO,
            if on { "on" } else { "off" },
            if on {
                met(ratio <= receivers::TARGET_ISOLATION_RATIO)
            } else {
                "(the target applies with the throttle on; reference run)"
            }
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = mon.await;
    Ok(summary(
        sh,
        setup_s,
        None,
        &[("baseline", &base), ("storm", &storm)],
        &report,
    ))
}

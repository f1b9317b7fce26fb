//! The dispatchers' latency over the last minute, for the on-call page: this process's
//! dispatcher records each fresh assignment's runnable → committed time here, and a
//! task writes the window's p50/p99 to `ops_stats` every 2 s (only when it changed),
//! where the API of any process reads it.

use herald_storage::ops_stats::{self, kinds};
use serde_json::json;
use sqlx::PgPool;
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The window is kept as 12 slots of 5 s.
const SLOT: Duration = Duration::from_secs(5);
const SLOTS: usize = 12;
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

struct Slot {
    started: Instant,
    micros: Vec<u32>,
}

/// At most this many samples per slot: beyond it every other sample is dropped, which
/// keeps the percentiles and bounds the memory under any load.
const SLOT_CAP: usize = 20_000;

static WINDOW: Mutex<VecDeque<Slot>> = Mutex::new(VecDeque::new());

/// Records one assignment's runnable → committed time.
pub fn record(d: Duration) {
    let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let mut w = WINDOW.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    if w.back()
        .is_none_or(|s| now.duration_since(s.started) >= SLOT)
    {
        w.push_back(Slot {
            started: now,
            micros: Vec::new(),
        });
        while w.len() > SLOTS {
            w.pop_front();
        }
    }
    if let Some(slot) = w.back_mut() {
        if slot.micros.len() >= SLOT_CAP {
            // Thin the slot by half rather than stop recording its tail.
            let kept: Vec<u32> = slot.micros.iter().step_by(2).copied().collect();
            slot.micros = kept;
        }
        slot.micros.push(us);
    }
}

/// (count, p50, p99) of the last minute, in microseconds.
pub fn snapshot() -> (usize, Option<u32>, Option<u32>) {
    let mut all: Vec<u32> = {
        let w = WINDOW.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        w.iter()
            .filter(|s| now.duration_since(s.started) < SLOT * SLOTS as u32)
            .flat_map(|s| s.micros.iter().copied())
            .collect()
    };
    if all.is_empty() {
        return (0, None, None);
    }
    all.sort_unstable();
    // Nearest rank: the smallest sample with at least q of them at or below it.
    let at = |q: f64| all[((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1];
    (all.len(), Some(at(0.5)), Some(at(0.99)))
}

/// Milliseconds, to 0.1 ms: finer would make every write a change.
fn ms(us: Option<u32>) -> Option<f64> {
    us.map(|u| (f64::from(u) / 100.0).round() / 10.0)
}

/// Writes this process's window to `ops_stats` until `cancel`, then removes its row.
pub async fn publish(pool: PgPool, cancel: CancellationToken) {
    let mut last = ops_stats::LastWritten::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            _ = cancel.cancelled() => break,
        }
        let (n, p50, p99) = snapshot();
        let value = json!({"assigned": n, "p50_ms": ms(p50), "p99_ms": ms(p99)});
        if !last.due(&value) {
            continue;
        }
        let written = match pool.acquire().await {
            Ok(mut c) => ops_stats::publish(&mut c, kinds::DISPATCH, &value).await,
            Err(e) => Err(e.into()),
        };
        match written {
            Ok(_) => last.wrote(value),
            Err(e) => {
                tracing::debug!(error = %e, "cannot write dispatch figures for /ops");
            }
        }
    }
    if let Ok(mut c) = pool.acquire().await {
        let _ = ops_stats::retire(&mut c, kinds::DISPATCH).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_the_window() {
        for us in 1..=100u64 {
            record(Duration::from_micros(us * 1000));
        }
        let (n, p50, p99) = snapshot();
        assert!(n >= 100);
        assert_eq!(ms(p50), Some(50.0));
        assert_eq!(ms(p99), Some(99.0));
    }
}

//! Rate and concurrency limits for the notification pools.
//!
//! The Buildkite incident (seed 002) was a feedback loop: a notification backlog pushed
//! more concurrent work onto the database that dispatch needed, which slowed everything,
//! which grew the backlog. The fixes were rate limits on notifications and automatic
//! throttling. This module holds the pieces:
//!
//! * [`TypeLimiter`]: one rate per notification type (webhook, commit status), set by
//!   operators at runtime and scaled by the throttle. A token bucket whose state is kept
//!   across changes, so a change neither hands out a fresh burst nor loses the progress
//!   towards the next cell. The throttle changes the factor every sample while dispatch is
//!   unhealthy. If each change swapped in a new `governor` limiter, every change would
//!   either grant a full burst or, with slow rates, delay the next cell forever.
//! * [`DestinationLimiter`]: per-endpoint and per-host rates (keyed `governor` limiters).
//!   Keys are swept so memory stays flat however many endpoints are seen.
//! * [`Throttle`]: AIMD on the health of dispatch. Halve at once when dispatch degrades;
//!   recover by one step per healthy sample.
//! * [`AdjustableSemaphore`]: the pools' concurrency, resized by the throttle.
//!
//! Rates are clamped to `[MIN_RATE_PER_S, MAX_RATE_PER_S]`. A rate of zero would hold
//! deliveries forever without anyone noticing, so it is not a valid limit; pausing a type
//! is what the per-type switch is for.

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// The smallest rate a limit can have (one cell per 100 s).
pub const MIN_RATE_PER_S: f64 = 0.01;
/// The largest rate a limit can have. `f64::INFINITY` means this.
pub const MAX_RATE_PER_S: f64 = 1e9;
/// Waiters re-read the current limit at least this often.
const MAX_WAIT_SLICE: Duration = Duration::from_millis(100);
/// How often [`DestinationLimiter`] sweeps its keys by itself, unless told otherwise.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The data behind these mutexes is valid after every statement, so a poisoned lock (a
/// panic elsewhere while holding it) is still safe to use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// NaN and anything below the minimum (zero, negative) become [`MIN_RATE_PER_S`];
/// `+inf` and anything above the maximum become [`MAX_RATE_PER_S`].
fn clamp_rate(rate_per_s: f64) -> f64 {
    if rate_per_s.is_nan() {
        MIN_RATE_PER_S
    } else {
        rate_per_s.clamp(MIN_RATE_PER_S, MAX_RATE_PER_S)
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(MAX_WAIT_SLICE)
}

/// A governor quota of `rate_per_s` (clamped) with a burst of `burst` (at least 1).
fn quota(rate_per_s: f64, burst: u32) -> Quota {
    let period = secs(1.0 / clamp_rate(rate_per_s)).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

#[derive(Debug)]
struct Bucket {
    /// As configured (clamped).
    rate: f64,
    burst: u32,
    /// From the throttle, `0..=1`.
    factor: f64,
    /// `rate * factor`, clamped.
    eff_rate: f64,
    /// `burst * factor`, rounded, at least 1.
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate_per_s: f64, burst: u32, now: Instant) -> Self {
        let mut b = Bucket {
            rate: clamp_rate(rate_per_s),
            burst,
            factor: 1.0,
            eff_rate: MIN_RATE_PER_S,
            capacity: 1.0,
            tokens: 0.0,
            last: now,
        };
        b.derive();
        b.tokens = b.capacity;
        b
    }

    fn derive(&mut self) {
        self.eff_rate = clamp_rate(self.rate * self.factor);
        self.capacity = (f64::from(self.burst) * self.factor).round().max(1.0);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.eff_rate).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// Applies a new rate, burst or factor. Tokens earned so far at the old rate,
    /// including the fraction towards the next one, are kept (up to the new capacity).
    /// Returns whether the effective limit changed.
    fn reconfigure(&mut self, rate: f64, burst: u32, factor: f64, now: Instant) -> bool {
        let rate = clamp_rate(rate);
        if (rate, burst, factor) == (self.rate, self.burst, self.factor) {
            return false;
        }
        self.refill(now);
        let before = (self.eff_rate, self.capacity);
        (self.rate, self.burst, self.factor) = (rate, burst, factor);
        self.derive();
        self.tokens = self.tokens.min(self.capacity);
        before != (self.eff_rate, self.capacity)
    }

    /// Takes one cell, or says how long until one is there at the current rate.
    fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(secs((1.0 - self.tokens) / self.eff_rate))
        }
    }
}

/// A per-type rate limit that can change at runtime: the ops API sets `rate_per_s` and
/// `burst`; the throttle controller scales both by a factor in `0..=1`.
///
/// `rate_per_s` must be > 0. Values below [`MIN_RATE_PER_S`] (including zero, negative
/// and NaN) become 0.01/s; `+inf` becomes [`MAX_RATE_PER_S`]. A burst of 0 means 1.
/// The limiter starts with a full burst. After that, changes keep the tokens earned
/// so far, up to the new burst. Waiters use the new limit at once.
#[derive(Debug)]
pub struct TypeLimiter {
    bucket: Mutex<Bucket>,
    changed: Notify,
}

impl TypeLimiter {
    pub fn new(rate_per_s: f64, burst: u32) -> Self {
        TypeLimiter {
            bucket: Mutex::new(Bucket::new(rate_per_s, burst, Instant::now())),
            changed: Notify::new(),
        }
    }

    fn reconfigure(&self, f: impl FnOnce(&Bucket) -> (f64, u32, f64)) {
        let changed = {
            let mut b = lock(&self.bucket);
            let (rate, burst, factor) = f(&b);
            b.reconfigure(rate, burst, factor, Instant::now())
        };
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Sets the configured rate and burst; the current factor still applies.
    pub fn set(&self, rate_per_s: f64, burst: u32) {
        self.reconfigure(|b| (rate_per_s, burst, b.factor));
    }

    /// Effective rate = `rate_per_s * factor` (at least 0.01/s). The burst is scaled
    /// too (at least 1). `factor` is clamped to `0..=1`; NaN is ignored.
    pub fn set_factor(&self, factor: f64) {
        if factor.is_nan() {
            tracing::warn!("ignoring a NaN throttle factor");
            return;
        }
        self.reconfigure(|b| (b.rate, b.burst, factor.clamp(0.0, 1.0)));
    }

    /// Cells per second that pass now.
    pub fn effective_rate(&self) -> f64 {
        lock(&self.bucket).eff_rate
    }

    /// The burst that applies now (the configured burst scaled by the factor, at least 1).
    pub fn effective_burst(&self) -> u32 {
        // capacity is in 1..=u32::MAX (burst * factor with factor <= 1), so the cast is exact.
        lock(&self.bucket).capacity as u32
    }

    /// Takes one cell now if there is one.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        lock(&self.bucket).try_take(Instant::now())
    }

    /// Waits until one cell is allowed. Waits in slices of at most 100 ms, and also
    /// wakes up when `set`/`set_factor` changes the limit. A raised limit therefore
    /// releases current waiters at once. Cancel-safe: a dropped future takes nothing.
    pub async fn acquire(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between check and sleep wakes us.
            changed.as_mut().enable();
            let wait = match self.try_acquire() {
                Ok(()) => return,
                Err(wait) => wait,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.min(MAX_WAIT_SLICE)) => {}
                _ = &mut changed => {}
            }
        }
    }
}

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;
type Direct = governor::DefaultDirectRateLimiter;

/// An endpoint's own rate (`rate_per_s` of the webhook), rebuilt when it changes.
#[derive(Debug)]
struct OwnRate {
    rate_per_s: f64,
    limiter: Arc<Direct>,
}

/// Per-destination limits: one keyed `governor` limiter by endpoint and one by host.
///
/// Each key costs memory until its bucket is full again. [`retain_recent`] drops those
/// keys. `check` also calls it by itself once per sweep interval (60 s by default; see
/// [`with_sweep_interval`]), so memory stays flat even if nobody calls it. That sweep runs
/// inline in the `check` call that triggers it. It takes some milliseconds per
/// 100 000 keys.
///
/// [`retain_recent`]: DestinationLimiter::retain_recent
/// [`with_sweep_interval`]: DestinationLimiter::with_sweep_interval
#[derive(Debug)]
pub struct DestinationLimiter {
    endpoints: Keyed,
    hosts: Keyed,
    /// Endpoints with a rate of their own, on top of the two above.
    own: Mutex<std::collections::HashMap<String, OwnRate>>,
    born: Instant,
    last_sweep_ms: AtomicU64,
    sweep_every_ms: u64,
}

impl DestinationLimiter {
    /// Rates follow the same rules as [`TypeLimiter::new`] (at least 0.01/s, burst at
    /// least 1).
    pub fn new(
        per_endpoint_per_s: f64,
        per_endpoint_burst: u32,
        per_host_per_s: f64,
        per_host_burst: u32,
    ) -> Self {
        DestinationLimiter {
            endpoints: RateLimiter::keyed(quota(per_endpoint_per_s, per_endpoint_burst)),
            hosts: RateLimiter::keyed(quota(per_host_per_s, per_host_burst)),
            own: Mutex::default(),
            born: Instant::now(),
            last_sweep_ms: AtomicU64::new(0),
            sweep_every_ms: millis(DEFAULT_SWEEP_INTERVAL),
        }
    }

    /// How often `check` sweeps idle keys by itself. `Duration::MAX` turns this off
    /// (then call [`retain_recent`](Self::retain_recent) yourself).
    #[must_use]
    pub fn with_sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_every_ms = millis(every).max(1);
        self
    }

    /// `Ok(())` when both the endpoint and the host allow a delivery now (one cell is
    /// taken from each). Otherwise `Err(wait)` with how long until the refusing limit
    /// might allow.
    ///
    /// `governor` cannot test a key without taking from it. So the endpoint is asked
    /// first, and when the host then refuses, the endpoint has still spent one cell.
    /// That errs on the slow side and only affects this endpoint. [`acquire`] never wastes
    /// a cell this way.
    ///
    /// [`acquire`]: DestinationLimiter::acquire
    pub fn check(&self, endpoint: &str, host: &str) -> Result<(), Duration> {
        self.maybe_sweep();
        self.check_one(&self.endpoints, endpoint)?;
        self.check_one(&self.hosts, host)
    }

    fn check_one(&self, limiter: &Keyed, key: &str) -> Result<(), Duration> {
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Waits for the endpoint's cell, then the host's. The endpoint's cell is taken
    /// for a delivery that goes ahead, so nothing is wasted while the host makes us
    /// wait. Cancel-safe except that a cancelled wait for the host has spent the
    /// endpoint's cell.
    pub async fn acquire(&self, endpoint: &str, host: &str) {
        self.maybe_sweep();
        for (limiter, key) in [(&self.endpoints, endpoint), (&self.hosts, host)] {
            while let Err(wait) = self.check_one(limiter, key) {
                tokio::time::sleep(wait.clamp(Duration::from_millis(1), MAX_WAIT_SLICE)).await;
            }
        }
    }

    /// [`acquire`](Self::acquire), plus the endpoint's own rate when it has one (burst:
    /// one second's worth, at least 1). The global per-endpoint and per-host limits
    /// still apply.
    pub async fn acquire_with(&self, endpoint: &str, host: &str, own_rate: Option<f64>) {
        if let Some(rate) = own_rate {
            let limiter = self.own_limiter(endpoint, rate);
            while let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(limiter.clock().now());
                tokio::time::sleep(wait.clamp(Duration::from_millis(1), MAX_WAIT_SLICE)).await;
            }
        }
        self.acquire(endpoint, host).await;
    }

    fn own_limiter(&self, endpoint: &str, rate: f64) -> Arc<Direct> {
        let rate = clamp_rate(rate);
        let mut own = lock(&self.own);
        if let Some(o) = own.get(endpoint).filter(|o| o.rate_per_s == rate) {
            return o.limiter.clone();
        }
        if own.len() >= 100_000 {
            // Only limiters nobody waits on; the others keep their state.
            own.retain(|_, o| Arc::strong_count(&o.limiter) > 1);
        }
        let burst = u32::try_from(rate.ceil() as u64).unwrap_or(u32::MAX).max(1);
        let limiter = Arc::new(RateLimiter::direct(quota(rate, burst)));
        own.insert(
            endpoint.to_owned(),
            OwnRate {
                rate_per_s: rate,
                limiter: limiter.clone(),
            },
        );
        limiter
    }

    /// Forgets every key whose bucket is full again (indistinguishable from a new key),
    /// then gives the memory back.
    pub fn retain_recent(&self) {
        self.last_sweep_ms.store(self.age_ms(), Ordering::Relaxed);
        let started = Instant::now();
        let before = self.len();
        for limiter in [&self.endpoints, &self.hosts] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        tracing::debug!(before, after = self.len(), took = ?started.elapsed(), "swept destination rate limits");
    }

    /// Keys held: endpoints plus hosts.
    pub fn len(&self) -> usize {
        self.endpoints.len() + self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.hosts.is_empty()
    }

    fn age_ms(&self) -> u64 {
        millis(self.born.elapsed())
    }

    fn maybe_sweep(&self) {
        let now = self.age_ms();
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.sweep_every_ms {
            return;
        }
        // One caller sweeps; the others go on.
        if self
            .last_sweep_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.retain_recent();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Settings of the automatic throttling of notifications by the health of dispatch
/// (AIMD).
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    pub enabled: bool,
    /// The factor never goes below this (e.g. 0.05).
    pub min_factor: f64,
    /// Nor above this (e.g. 1.0; at most 1).
    pub max_factor: f64,
    /// Multiplies the factor on an unhealthy sample (e.g. 0.5).
    pub decrease: f64,
    /// Added to the factor per healthy sample (e.g. 0.05).
    pub increase: f64,
    /// Dispatch p99 and query latency above this are unhealthy (e.g. 25 ms).
    pub latency_target: Duration,
    /// Waiting for a database connection longer than this is unhealthy (e.g. 10 ms).
    pub acquire_target: Duration,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            enabled: true,
            min_factor: 0.05,
            max_factor: 1.0,
            decrease: 0.5,
            increase: 0.05,
            latency_target: Duration::from_millis(25),
            acquire_target: Duration::from_millis(10),
        }
    }
}

impl ThrottleSettings {
    /// Replaces out-of-range values: max_factor in (0, 1] (else 1), min_factor in
    /// [0, max_factor], decrease in [0, 1] (else 0.5), increase >= 0 (else 0.05).
    fn sanitized(mut self) -> Self {
        let d = ThrottleSettings::default();
        if !(self.max_factor > 0.0 && self.max_factor <= 1.0) {
            self.max_factor = d.max_factor;
        }
        self.min_factor = if self.min_factor.is_nan() {
            d.min_factor
        } else {
            self.min_factor
        };
        self.min_factor = self.min_factor.clamp(0.0, self.max_factor);
        if !(0.0..=1.0).contains(&self.decrease) {
            self.decrease = d.decrease;
        }
        if !(self.increase.is_finite() && self.increase >= 0.0) {
            self.increase = d.increase;
        }
        self
    }
}

/// One sample of the health of dispatch. `None` means "not measured" and counts as
/// healthy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Health {
    pub dispatch_p99: Option<Duration>,
    pub db_acquire_wait: Option<Duration>,
    pub query_latency: Option<Duration>,
    pub lock_waiters: u32,
}

/// Automatic throttling of notifications by the health of dispatch (AIMD): cut the
/// factor at once when dispatch suffers, give it back slowly while dispatch is healthy.
/// Sets the gauge `herald_notify_throttle_factor` on each sample.
#[derive(Debug)]
pub struct Throttle {
    settings: ThrottleSettings,
    factor: Mutex<f64>,
}

impl Throttle {
    /// Starts at `max_factor`. Out-of-range settings are replaced (see the fields).
    pub fn new(settings: ThrottleSettings) -> Self {
        let settings = settings.sanitized();
        let factor = Mutex::new(settings.max_factor);
        Throttle { settings, factor }
    }

    pub fn settings(&self) -> &ThrottleSettings {
        &self.settings
    }

    /// One sample. Unhealthy means any signal above its target, or `lock_waiters > 0`.
    /// An unhealthy sample multiplies the factor by `decrease` at once (not below
    /// `min_factor`). A healthy sample adds `increase` (not above `max_factor`). When
    /// disabled, the factor is always `max_factor`. Returns the new factor.
    pub fn observe(&self, h: Health) -> f64 {
        let s = &self.settings;
        let over = |v: Option<Duration>, target: Duration| v.is_some_and(|v| v > target);
        let unhealthy = s.enabled
            && (over(h.dispatch_p99, s.latency_target)
                || over(h.query_latency, s.latency_target)
                || over(h.db_acquire_wait, s.acquire_target)
                || h.lock_waiters > 0);
        let (before, after) = {
            let mut f = lock(&self.factor);
            let before = *f;
            *f = if !s.enabled {
                s.max_factor
            } else if unhealthy {
                (before * s.decrease).max(s.min_factor)
            } else {
                (before + s.increase).min(s.max_factor)
            };
            (before, *f)
        };
        metrics::gauge!("herald_notify_throttle_factor").set(after);
        if unhealthy && before >= s.max_factor {
            tracing::warn!(
                factor = after,
                dispatch_p99 = ?h.dispatch_p99,
                db_acquire_wait = ?h.db_acquire_wait,
                query_latency = ?h.query_latency,
                lock_waiters = h.lock_waiters,
                "dispatch is unhealthy; throttling notifications"
            );
        } else if unhealthy {
            tracing::debug!(factor = after, ?h, "dispatch still unhealthy");
        } else if after >= s.max_factor && before < s.max_factor {
            tracing::info!(factor = after, "notifications no longer throttled");
        }
        after
    }

    pub fn factor(&self) -> f64 {
        *lock(&self.factor)
    }

    /// Concurrency limit for a pool whose configured maximum is `max`:
    /// `max(1, round(max * factor))`.
    pub fn concurrency(&self, max: usize) -> usize {
        scaled_concurrency(max, self.factor())
    }
}

/// `max` scaled by `factor`, rounded, in `1..=max`.
pub fn scaled_concurrency(max: usize, factor: f64) -> usize {
    // usize -> f64 is exact for any realistic pool size.
    ((max as f64 * factor).round() as usize).clamp(1, max.max(1))
}

#[derive(Debug)]
struct SemState {
    limit: usize,
    /// Permits that exist: available in the semaphore plus held by a `Permit`.
    issued: usize,
}

#[derive(Debug)]
struct SemInner {
    sem: Semaphore,
    state: Mutex<SemState>,
    in_use: AtomicUsize,
}

/// A semaphore whose size can change at runtime. The throttle uses it to set the
/// notification pools' concurrency.
///
/// Growing adds permits at once. Shrinking takes idle permits away at once. Busy permits
/// are forgotten when they come back, so the limit applies as soon as enough holders
/// finish. A limit of 0 means 1: a pool that can never run anything is the type switch's
/// job.
#[derive(Debug, Clone)]
pub struct AdjustableSemaphore {
    inner: Arc<SemInner>,
}

/// A slot from an [`AdjustableSemaphore`]. It is given back on drop, unless the limit has
/// been lowered below the slots that exist.
#[derive(Debug)]
#[must_use = "the slot is given back when the permit is dropped"]
pub struct Permit {
    inner: Arc<SemInner>,
    /// False only if the semaphore was closed, which never happens.
    held: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.in_use.fetch_sub(1, Ordering::AcqRel);
        if !self.held {
            return;
        }
        let mut st = lock(&self.inner.state);
        if st.issued > st.limit {
            st.issued -= 1;
        } else {
            self.inner.sem.add_permits(1);
        }
    }
}

impl AdjustableSemaphore {
    pub fn new(n: usize) -> Self {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        AdjustableSemaphore {
            inner: Arc::new(SemInner {
                sem: Semaphore::new(n),
                state: Mutex::new(SemState {
                    limit: n,
                    issued: n,
                }),
                in_use: AtomicUsize::new(0),
            }),
        }
    }

    /// Sets the number of slots (at least 1).
    pub fn set_limit(&self, n: usize) {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        let mut st = lock(&self.inner.state);
        st.limit = n;
        if n > st.issued {
            self.inner.sem.add_permits(n - st.issued);
            st.issued = n;
        } else {
            while st.issued > n {
                match self.inner.sem.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        st.issued -= 1;
                    }
                    // The rest are busy; they are forgotten as they come back.
                    Err(_) => break,
                }
            }
        }
    }

    pub fn limit(&self) -> usize {
        lock(&self.inner.state).limit
    }

    /// Slots held now. This can be above `limit()` for a while after the limit was
    /// lowered.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.load(Ordering::Acquire)
    }

    /// Waits for a slot (FIFO). Cancel-safe.
    pub async fn acquire(&self) -> Permit {
        let held = match self.inner.sem.acquire().await {
            Ok(p) => {
                // Given back by `Permit::drop`, which also honours a smaller limit.
                p.forget();
                true
            }
            Err(_) => false,
        };
        self.inner.in_use.fetch_add(1, Ordering::AcqRel);
        Permit {
            inner: self.inner.clone(),
            held,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn limiters_are_send_and_sync() {
        assert_send_sync::<TypeLimiter>();
        assert_send_sync::<DestinationLimiter>();
        assert_send_sync::<Throttle>();
        assert_send_sync::<AdjustableSemaphore>();
        assert_send_sync::<Permit>();
    }

    #[tokio::test]
    async fn type_limiter_paces_and_changes_at_runtime() {
        let l = TypeLimiter::new(20.0, 1);
        let start = Instant::now();
        for _ in 0..10 {
            l.acquire().await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(350), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");

        l.set(1000.0, 1000);
        let start = Instant::now();
        for _ in 0..10 {
            l.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
        // A full bucket at the new burst is immediate.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let start = Instant::now();
        for _ in 0..100 {
            l.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn raising_the_rate_releases_a_waiter() {
        let l = Arc::new(TypeLimiter::new(0.5, 1));
        l.acquire().await;
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !waiter.is_finished(),
            "0.5/s must make the second acquire wait"
        );
        let raised = Instant::now();
        l.set(1000.0, 10);
        tokio::time::timeout(Duration::from_millis(500), waiter)
            .await
            .expect("a raised rate releases the waiter")
            .expect("join");
        assert!(
            raised.elapsed() < Duration::from_millis(150),
            "{:?}",
            raised.elapsed()
        );
    }

    #[tokio::test]
    async fn factor_scales_rate_and_burst() {
        let l = TypeLimiter::new(1000.0, 10);
        l.set_factor(0.5);
        assert_eq!(l.effective_rate(), 500.0);
        assert_eq!(l.effective_burst(), 5);
        l.set_factor(0.01);
        assert_eq!(l.effective_rate(), 10.0);
        assert_eq!(l.effective_burst(), 1);
        // 1 left in the bucket (capped to the new burst), then 10/s.
        let start = Instant::now();
        for _ in 0..4 {
            l.acquire().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(250),
            "{:?}",
            start.elapsed()
        );
        l.set_factor(0.0);
        assert_eq!(l.effective_rate(), MIN_RATE_PER_S);
        l.set_factor(f64::NAN);
        assert_eq!(l.effective_rate(), MIN_RATE_PER_S, "NaN is ignored");
        l.set_factor(7.0);
        assert_eq!(l.effective_rate(), 1000.0, "clamped to 1");
        // The configured rate keeps the factor.
        l.set_factor(0.5);
        l.set(200.0, 4);
        assert_eq!(l.effective_rate(), 100.0);
        assert_eq!(l.effective_burst(), 2);
    }

    #[test]
    fn out_of_range_rates_are_clamped() {
        for bad in [0.0, -5.0, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(
                TypeLimiter::new(bad, 0).effective_rate(),
                MIN_RATE_PER_S,
                "{bad}"
            );
        }
        let l = TypeLimiter::new(f64::INFINITY, 0);
        assert_eq!(l.effective_rate(), MAX_RATE_PER_S);
        assert_eq!(l.effective_burst(), 1);
        assert!(l.try_acquire().is_ok());
        let d = DestinationLimiter::new(f64::NAN, 0, f64::INFINITY, 0);
        assert!(d.check("e", "h").is_ok());
        let wait = d.check("e", "h").expect_err("burst 1 at 0.01/s");
        assert!(wait > Duration::from_secs(90), "{wait:?}");
    }

    /// The throttle changes the factor every sample (500 ms) while dispatch is
    /// unhealthy. A limiter that started over on each change would never let a slow
    /// type through.
    #[tokio::test]
    async fn frequent_factor_changes_keep_progress() {
        let l = Arc::new(TypeLimiter::new(4.0, 1));
        l.acquire().await;
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await })
        };
        // 1.6–2.0 cells/s: the next cell is due within about 0.6 s.
        for i in 0..20 {
            l.set_factor(if i % 2 == 0 { 0.4 } else { 0.5 });
            tokio::time::sleep(Duration::from_millis(100)).await;
            if waiter.is_finished() {
                break;
            }
        }
        assert!(
            waiter.is_finished(),
            "progress towards the next cell survives factor changes"
        );
    }

    #[test]
    fn destination_limits_per_endpoint_and_per_host() {
        let d = DestinationLimiter::new(1.0, 2, 1000.0, 1000);
        assert!(d.check("e1", "h").is_ok());
        assert!(d.check("e1", "h").is_ok());
        let wait = d.check("e1", "h").expect_err("endpoint burst spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(d.check("e2", "h").is_ok(), "another endpoint is unaffected");

        let host = DestinationLimiter::new(1000.0, 1000, 1.0, 1);
        assert!(host.check("a", "same").is_ok());
        assert!(
            host.check("b", "same").is_err(),
            "the host limit spans endpoints"
        );
        assert!(
            host.check("c", "other").is_ok(),
            "another host is unaffected"
        );
        assert_eq!(host.len(), 5);
    }

    #[tokio::test]
    async fn destination_acquire_waits_for_the_host() {
        let d = DestinationLimiter::new(1000.0, 1000, 10.0, 1);
        let start = Instant::now();
        for e in ["a", "b", "c", "d"] {
            d.acquire(e, "same").await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(250),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn destination_memory_stays_flat_with_a_million_keys() {
        let d = DestinationLimiter::new(1_000_000.0, 1, 1_000_000.0, 1)
            .with_sweep_interval(Duration::MAX);
        for round in 0..2u32 {
            for i in 0..1_000_000u32 {
                let _ = d.check(&format!("endpoint-{round}-{i}"), "h");
            }
            assert!(d.len() >= 1_000_000, "{} keys", d.len());
            std::thread::sleep(Duration::from_millis(20));
            d.retain_recent();
            assert!(d.len() <= 1, "{} keys left after round {round}", d.len());
        }
    }

    #[test]
    fn destination_sweeps_by_itself() {
        let d = DestinationLimiter::new(1_000_000.0, 1, 1_000_000.0, 1)
            .with_sweep_interval(Duration::from_millis(10));
        for i in 0..10_000u32 {
            let _ = d.check(&i.to_string(), "h");
        }
        std::thread::sleep(Duration::from_millis(30));
        let _ = d.check("last", "h");
        assert!(d.len() <= 3, "{} keys left", d.len());
    }

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            enabled: true,
            min_factor: 0.05,
            max_factor: 1.0,
            decrease: 0.5,
            increase: 0.05,
            latency_target: Duration::from_millis(25),
            acquire_target: Duration::from_millis(10),
        }
    }

    #[test]
    fn throttle_backs_off_at_once_and_recovers_gradually() {
        let t = Throttle::new(settings());
        assert_eq!(t.factor(), 1.0);
        assert_eq!(t.concurrency(64), 64);
        let healthy = Health {
            dispatch_p99: Some(Duration::from_millis(5)),
            db_acquire_wait: Some(Duration::from_millis(1)),
            query_latency: Some(Duration::from_millis(2)),
            lock_waiters: 0,
        };
        let sick = Health {
            dispatch_p99: Some(Duration::from_millis(80)),
            ..healthy
        };
        assert_eq!(t.observe(sick), 0.5);
        assert_eq!(t.concurrency(64), 32);
        assert_eq!(
            t.observe(Health {
                lock_waiters: 2,
                ..healthy
            }),
            0.25
        );
        assert_eq!(t.concurrency(64), 16);
        let f = t.observe(healthy);
        assert!((f - 0.30).abs() < 1e-9, "{f}");
        assert_eq!(t.concurrency(64), 19);
        assert!(
            t.observe(Health {
                db_acquire_wait: Some(Duration::from_millis(11)),
                ..healthy
            }) < 0.2
        );
        assert!(
            t.observe(Health {
                query_latency: Some(Duration::from_millis(26)),
                ..healthy
            }) < 0.1
        );
        let mut last = t.factor();
        for _ in 0..100 {
            let f = t.observe(healthy);
            assert!(f >= last && f <= 1.0);
            assert!(f - last <= 0.05 + 1e-9, "additive steps only");
            last = f;
        }
        assert_eq!(t.factor(), 1.0);
        assert_eq!(
            t.observe(Health::default()),
            1.0,
            "unmeasured counts as healthy"
        );
        for _ in 0..100 {
            t.observe(sick);
        }
        assert_eq!(t.factor(), 0.05);
        assert_eq!(t.concurrency(64), 3);
        assert_eq!(t.concurrency(4), 1);
        assert_eq!(t.concurrency(0), 1);
    }

    #[test]
    fn disabled_throttle_stays_at_max() {
        let off = Throttle::new(ThrottleSettings {
            enabled: false,
            ..settings()
        });
        let sick = Health {
            lock_waiters: 9,
            dispatch_p99: Some(Duration::from_secs(70)),
            ..Health::default()
        };
        for _ in 0..5 {
            assert_eq!(off.observe(sick), 1.0);
        }
        assert_eq!(off.concurrency(64), 64);
    }

    #[test]
    fn throttle_settings_are_sanitized() {
        let t = Throttle::new(ThrottleSettings {
            min_factor: f64::NAN,
            max_factor: 3.0,
            decrease: 2.0,
            increase: -1.0,
            ..settings()
        });
        let s = t.settings();
        assert_eq!(
            (s.min_factor, s.max_factor, s.decrease, s.increase),
            (0.05, 1.0, 0.5, 0.05)
        );
        assert_eq!(
            t.observe(Health {
                lock_waiters: 1,
                ..Health::default()
            }),
            0.5
        );
    }

    /// Runs `n` tasks that each hold a slot for `hold`; returns the most that held one
    /// at the same time (counted by the tasks, not by the semaphore).
    async fn peak(s: &AdjustableSemaphore, n: usize, hold: Duration) -> usize {
        let now = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (s, now, max) = (s.clone(), now.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let p = s.acquire().await;
                let c = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(c, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                now.fetch_sub(1, Ordering::SeqCst);
                drop(p);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        max.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adjustable_semaphore_follows_its_limit() {
        let s = AdjustableSemaphore::new(4);
        assert_eq!(peak(&s, 10, Duration::from_millis(30)).await, 4);
        assert_eq!(s.in_use(), 0);
        s.set_limit(1);
        assert_eq!(s.limit(), 1);
        assert_eq!(peak(&s, 6, Duration::from_millis(10)).await, 1);
        s.set_limit(8);
        assert_eq!(peak(&s, 16, Duration::from_millis(50)).await, 8);
        s.set_limit(0);
        assert_eq!(s.limit(), 1, "0 means 1");
    }

    #[tokio::test]
    async fn shrinking_while_busy_applies_as_slots_come_back() {
        let s = AdjustableSemaphore::new(4);
        let held: Vec<Permit> = futures::future::join_all((0..4).map(|_| s.acquire())).await;
        assert_eq!(s.in_use(), 4);
        s.set_limit(1);
        // Still 4 busy; none can be taken.
        assert!(tokio::time::timeout(Duration::from_millis(20), s.acquire())
            .await
            .is_err());
        drop(held);
        assert_eq!(s.in_use(), 0);
        let first = s.acquire().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), s.acquire())
                .await
                .is_err(),
            "the lowered limit holds once the busy slots came back"
        );
        drop(first);
        // Growing again while a slot is out.
        let one = s.acquire().await;
        s.set_limit(3);
        let two = s.acquire().await;
        let three = s.acquire().await;
        assert_eq!(s.in_use(), 3);
        assert!(tokio::time::timeout(Duration::from_millis(20), s.acquire())
            .await
            .is_err());
        drop((one, two, three));
        assert_eq!(peak(&s, 9, Duration::from_millis(20)).await, 3);
    }

    #[tokio::test]
    async fn raising_the_limit_releases_waiters() {
        let s = AdjustableSemaphore::new(1);
        let _held = s.acquire().await;
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move {
                let _p = s.acquire().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        s.set_limit(2);
        tokio::time::timeout(Duration::from_millis(500), waiter)
            .await
            .expect("released")
            .expect("join");
    }
}

//! Connection pools. Each role gets its own pool so that one role's backlog can never
//! take another's connections; reads go to the replica through [`ReadRouter`].

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Shown in `pg_stat_activity`, so an operator can tell the pools apart.
    pub application_name: String,
    pub read_only: bool,
}

/// Opens a pool lazily: a database that is down at start-up is retried on use, and
/// `/readyz` reports it. The pool runs no query per checkout (no test-before-acquire)
/// so that idle parked agents cost the database nothing.
pub fn connect_pool(s: &PoolSettings) -> Result<PgPool, sqlx::Error> {
    let mut opts = PgConnectOptions::from_str(&s.url)?
        .application_name(&s.application_name)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    if s.read_only {
        opts = opts.options([("default_transaction_read_only", "on")]);
    }
    // Every statement is prepared once per connection; its parameters are ids, arrays
    // and limits, for which a custom plan is no better than the generic one. Left to
    // itself PostgreSQL kept re-planning some of them on every execution (dispatch's
    // candidate query takes 2-3 ms to plan): 7.6 % of the machine's CPU under load.
    opts = opts.options([("plan_cache_mode", "force_generic_plan")]);
    Ok(PgPoolOptions::new()
        .max_connections(s.max_connections)
        .min_connections(0)
        .acquire_timeout(s.acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .test_before_acquire(false)
        .connect_lazy_with(opts))
}

/// A pooled connection that answered a ping. After a connection error the pool's idle
/// connections may all be dead (a primary restart ends every backend): each one that
/// fails the ping is closed, so the pool opens a replacement.
pub async fn live_connection(
    pool: &PgPool,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
    let mut last = sqlx::Error::PoolClosed;
    for _ in 0..=pool.size() {
        let mut conn = pool.acquire().await?;
        match sqlx::Connection::ping(&mut *conn).await {
            Ok(()) => return Ok(conn),
            Err(e) => {
                let _ = conn.close().await;
                last = e;
            }
        }
    }
    Err(last)
}

/// Decides, per read, whether the replica may serve it.
///
/// Read-your-writes: every write made through this process is counted after commit; the
/// next read then asks the primary for its WAL position (once, however many writes came
/// before it), and uses the replica only once the replica has replayed that position,
/// the primary otherwise. Writes with no read after them cost no extra query. Reads of a single row that the replica
/// does not have yet are retried on the primary by the caller. A replica that errors
/// is skipped for a few seconds.
#[derive(Clone)]
pub struct ReadRouter {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    primary: PgPool,
    replica: Option<PgPool>,
    /// Writes noted so far, and how many of them `written_lsn` covers.
    writes: AtomicU64,
    writes_covered: AtomicU64,
    written_lsn: AtomicU64,
    replayed_lsn: AtomicU64,
    replica_down_until_ms: AtomicI64,
    started: Instant,
}

pub struct Reader {
    pub pool: PgPool,
    pub is_replica: bool,
}

impl ReadRouter {
    pub fn new(primary: PgPool, replica: Option<PgPool>) -> Self {
        ReadRouter {
            inner: Arc::new(RouterInner {
                primary,
                replica,
                writes: AtomicU64::new(0),
                writes_covered: AtomicU64::new(0),
                written_lsn: AtomicU64::new(0),
                replayed_lsn: AtomicU64::new(0),
                replica_down_until_ms: AtomicI64::new(0),
                started: Instant::now(),
            }),
        }
    }

    pub fn primary(&self) -> &PgPool {
        &self.inner.primary
    }

    pub fn has_replica(&self) -> bool {
        self.inner.replica.is_some()
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Call after a write committed on the primary.
    pub async fn note_write(&self) {
        if self.inner.replica.is_some() {
            self.inner.writes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Makes `written_lsn` cover every write noted before this call. Returns false when
    /// the primary could not be asked (the caller then reads the primary).
    async fn cover_writes(&self) -> bool {
        let writes = self.inner.writes.load(Ordering::Acquire);
        if self.inner.writes_covered.load(Ordering::Acquire) >= writes {
            return true;
        }
        let lsn: Result<i64, _> =
            sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(&self.inner.primary)
                .await;
        match lsn {
            Ok(lsn) => {
                self.inner
                    .written_lsn
                    .fetch_max(u64::try_from(lsn).unwrap_or(0), Ordering::AcqRel);
                self.inner
                    .writes_covered
                    .fetch_max(writes, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// Marks the replica unusable for a while after an error on it.
    pub fn replica_failed(&self) {
        metrics::counter!("herald_replica_errors_total").increment(1);
        self.inner
            .replica_down_until_ms
            .store(self.now_ms() + 5_000, Ordering::Release);
    }

    /// The pool a read should use.
    pub async fn reader(&self) -> Reader {
        let primary = Reader {
            pool: self.inner.primary.clone(),
            is_replica: false,
        };
        let Some(replica) = &self.inner.replica else {
            return primary;
        };
        if self.now_ms() < self.inner.replica_down_until_ms.load(Ordering::Acquire) {
            return primary;
        }
        if !self.cover_writes().await {
            return primary;
        }
        let written = self.inner.written_lsn.load(Ordering::Acquire);
        if written > self.inner.replayed_lsn.load(Ordering::Acquire) {
            let replayed: Result<Option<i64>, _> =
                sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")
                    .fetch_one(replica)
                    .await;
            match replayed {
                Ok(Some(r)) => {
                    let r = u64::try_from(r).unwrap_or(0);
                    self.inner.replayed_lsn.fetch_max(r, Ordering::AcqRel);
                    if r < written {
                        metrics::counter!("herald_replica_behind_reads_total").increment(1);
                        return primary;
                    }
                }
                // Not a standby at all (misconfiguration): its data is as fresh as it gets.
                Ok(None) => {}
                Err(_) => {
                    self.replica_failed();
                    return primary;
                }
            }
        }
        Reader {
            pool: replica.clone(),
            is_replica: true,
        }
    }
}

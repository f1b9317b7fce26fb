//! Post-commit wake-ups for the hot path.
//!
//! A `NOTIFY` inside a transaction makes PostgreSQL take one database-wide lock at
//! commit and hold it through the commit's WAL flush, so every notifying transaction
//! commits one after the other. The hot path (build creation, agent calls, assignment
//! rounds, propagation) therefore commits without `NOTIFY` and hands its wake-ups to a
//! [`Waker`], which sends them after the commit from a transaction of its own. That
//! transaction writes no WAL, so it commits without a flush and holds the lock only
//! briefly; wake-ups that pile up meanwhile go out together in one statement.
//!
//! A wake-up lost to a crash between commit and send costs latency, not correctness:
//! every listener also polls as a backstop.

use sqlx::{Connection, PgConnection, PgPool};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Pending {
    /// Channels whose listeners only need to look (payload-free, coalesced).
    wakes: BTreeSet<&'static str>,
    /// Notifications whose payload matters, sent one each.
    messages: Vec<(&'static str, String)>,
}

struct Inner {
    pending: Mutex<Pending>,
    signal: Notify,
}

/// Cheap to clone; sends from one background task with its own connection, opened
/// with the pool's settings.
#[derive(Clone)]
pub struct Waker {
    inner: Arc<Inner>,
}

impl Waker {
    /// Starts the sending task on `pool`. It stops, after sending what is pending,
    /// when `cancel` fires.
    pub fn spawn(pool: PgPool, cancel: CancellationToken) -> (Waker, tokio::task::JoinHandle<()>) {
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            signal: Notify::new(),
        });
        let task = tokio::spawn(run(pool, inner.clone(), cancel));
        (Waker { inner }, task)
    }

    /// Wakes the listeners of `channel`; several calls before the next send are one.
    pub fn wake(&self, channel: &'static str) {
        self.with_pending(|p| {
            p.wakes.insert(channel);
        });
    }

    /// Sends `payload` on `channel`.
    pub fn send(&self, channel: &'static str, payload: String) {
        self.with_pending(|p| p.messages.push((channel, payload)));
    }

    fn with_pending(&self, f: impl FnOnce(&mut Pending)) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut pending);
        drop(pending);
        self.inner.signal.notify_one();
    }
}

async fn run(pool: PgPool, inner: Arc<Inner>, cancel: CancellationToken) {
    let mut conn: Option<PgConnection> = None;
    loop {
        let stopping = tokio::select! {
            _ = inner.signal.notified() => false,
            _ = cancel.cancelled() => true,
        };
        let batch =
            std::mem::take(&mut *inner.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let mut channels = Vec::with_capacity(batch.wakes.len() + batch.messages.len());
        let mut payloads = Vec::with_capacity(channels.capacity());
        for c in batch.wakes {
            channels.push(c.to_owned());
            payloads.push(String::new());
        }
        for (c, p) in batch.messages {
            channels.push(c.to_owned());
            payloads.push(p);
        }
        if !channels.is_empty() {
            // Its own connection: waiting in a busy pool's queue would delay every
            // wake-up behind the work it is meant to speed up.
            if conn.is_none() {
                conn = PgConnection::connect_with(&pool.connect_options())
                    .await
                    .ok();
            }
            let sent = match conn.as_mut() {
                Some(c) => sqlx::query(
                    "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
                )
                .bind(&channels)
                .bind(&payloads)
                .execute(c)
                .await
                .map(|_| ()),
                None => Err(sqlx::Error::PoolTimedOut),
            };
            match sent {
                Ok(()) => {
                    metrics::counter!("herald_wakes_sent_total").increment(channels.len() as u64)
                }
                // The listeners' backstop polls pick the work up.
                Err(e) => {
                    conn = None;
                    tracing::warn!(error = %e, n = channels.len(), "could not send wake-ups");
                }
            }
        }
        if stopping {
            return;
        }
    }
}

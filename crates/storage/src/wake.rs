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
//!
//! Listeners in the same process hear a wake-up at once, through [`LocalWakes`], and
//! skip its echo from PostgreSQL (recognised by the sending backend's pid): on a busy
//! box each hop through the database is a few milliseconds of waiting for a CPU.
//!
//! When no other process listens, nothing is sent to PostgreSQL at all. Each listening
//! connection names itself `herald-listen:<id of its process's LocalWakes>`; a waker
//! looks (at most once a second, and only when it has something to send) for listeners
//! of other processes in its database. A process that starts listening may miss what
//! was skipped before a waker looked again, so its listeners resync once more a few
//! seconds after they connect.

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;

type LocalMessage = (&'static str, Arc<str>);

/// The wake-ups of one process, delivered in memory. Cheap to clone; one per process
/// (or per app instance in tests), shared by its [`Waker`]s and its listeners.
#[derive(Clone)]
pub struct LocalWakes {
    tx: broadcast::Sender<LocalMessage>,
    /// Backend pids of this process's waker connections: their notifications were
    /// delivered here already.
    own: Arc<Mutex<HashSet<u32>>>,
    /// The `application_name` of this process's listening connections.
    listener_name: Arc<str>,
}

impl Default for LocalWakes {
    fn default() -> Self {
        LocalWakes {
            tx: broadcast::channel(4096).0,
            own: Arc::default(),
            listener_name: Arc::from(format!(
                "{LISTENER_PREFIX}{}",
                uuid::Uuid::new_v4().simple()
            )),
        }
    }
}

/// How listening connections name themselves (`application_name`), followed by the id
/// of their process's [`LocalWakes`].
const LISTENER_PREFIX: &str = "herald-listen:";

/// How long a waker trusts what it last saw of other processes' listeners.
const LISTENERS_FRESH: Duration = Duration::from_secs(1);

/// When a listener resyncs once more after connecting: by then every waker has looked
/// for listeners again, so nothing it skipped meanwhile stays unseen.
pub const LATE_RESYNC: Duration = Duration::from_secs(3);

impl LocalWakes {
    fn publish(&self, channel: &'static str, payload: Arc<str>) {
        // No receiver is fine: nobody in this process listens on that channel.
        let _ = self.tx.send((channel, payload));
    }

    fn own(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.own.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_own(&self, pid: u32) -> bool {
        self.own().contains(&pid)
    }
}

/// What a [`listen`] subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A notification on one of the channels, from this process or another.
    Notice { channel: String, payload: String },
    /// (Re)connected, or fell behind: notifications may have been missed, so look at
    /// the database.
    Resync,
}

/// Listens on `channels`, in this process (at once) and in PostgreSQL (for other
/// processes), until `cancel`. Reconnects with backoff; each (re)connect yields
/// [`Heard::Resync`] first. The receiver sees nothing twice for one wake-up of this
/// process, except around a reconnect of its waker.
pub fn listen(
    pool: PgPool,
    local: &LocalWakes,
    channels: &[&'static str],
    cancel: CancellationToken,
) -> mpsc::Receiver<Heard> {
    let (tx, rx) = mpsc::channel(4096);
    let wanted: Vec<&'static str> = channels.to_vec();
    let mut local_rx = local.tx.subscribe();
    let (local_tx, local_cancel) = (tx.clone(), cancel.clone());
    let local_wanted = wanted.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                m = local_rx.recv() => m,
                _ = local_cancel.cancelled() => return,
            };
            let heard = match next {
                Ok((c, p)) if local_wanted.contains(&c) => Heard::Notice {
                    channel: c.to_owned(),
                    payload: p.to_string(),
                },
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => Heard::Resync,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if local_tx.send(heard).await.is_err() {
                return;
            }
        }
    });
    let local = local.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, ?wanted, "listener cannot connect; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let ready = async {
                name_listener(&mut listener, &local).await?;
                listener.listen_all(wanted.iter().copied()).await
            };
            if let Err(e) = ready.await {
                tracing::warn!(error = %e, ?wanted, "cannot LISTEN; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
            backoff = Duration::from_millis(100);
            if tx.send(Heard::Resync).await.is_err() {
                return;
            }
            let late_resync = tokio::time::sleep(LATE_RESYNC);
            tokio::pin!(late_resync);
            let mut late_done = false;
            loop {
                let next = tokio::select! {
                    n = listener.try_recv() => n,
                    _ = &mut late_resync, if !late_done => {
                        late_done = true;
                        if tx.send(Heard::Resync).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ = cancel.cancelled() => return,
                };
                let heard = match next {
                    Ok(Some(n)) if local.is_own(n.process_id()) => continue,
                    Ok(Some(n)) => Heard::Notice {
                        channel: n.channel().to_owned(),
                        payload: n.payload().to_owned(),
                    },
                    // Reconnected underneath: what came in between is lost, and the
                    // new connection has its default name.
                    Ok(None) => {
                        if let Err(e) = name_listener(&mut listener, &local).await {
                            tracing::warn!(error = %e, "cannot name the listener; reconnecting");
                            break;
                        }
                        Heard::Resync
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?wanted, "listener failed; reconnecting");
                        break;
                    }
                };
                if tx.send(heard).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

async fn name_listener(listener: &mut PgListener, local: &LocalWakes) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(local.listener_name.as_ref())
        .execute(listener)
        .await
        .map(|_| ())
}

/// Whether a process other than `local`'s listens in this database.
async fn others_listen(conn: &mut PgConnection, local: &LocalWakes) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE $1 || '%' \
           AND application_name <> $2)",
    )
    .bind(LISTENER_PREFIX)
    .bind(local.listener_name.as_ref())
    .fetch_one(conn)
    .await
}

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
    local: LocalWakes,
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
    pub fn spawn(
        pool: PgPool,
        local: LocalWakes,
        cancel: CancellationToken,
    ) -> (Waker, tokio::task::JoinHandle<()>) {
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            signal: Notify::new(),
            local,
        });
        let task = tokio::spawn(run(pool, inner.clone(), cancel));
        (Waker { inner }, task)
    }

    /// This process's in-memory wake-ups, for its listeners (see [`listen`]).
    pub fn local(&self) -> &LocalWakes {
        &self.inner.local
    }

    /// Wakes the listeners of `channel`; several calls before the next send are one.
    pub fn wake(&self, channel: &'static str) {
        self.inner.local.publish(channel, Arc::from(""));
        self.with_pending(|p| {
            p.wakes.insert(channel);
        });
    }

    /// Sends `payload` on `channel`.
    pub fn send(&self, channel: &'static str, payload: String) {
        self.inner
            .local
            .publish(channel, Arc::from(payload.as_str()));
        self.with_pending(|p| p.messages.push((channel, payload)));
    }

    /// Sends `payload` on `channel` to other processes, and `local`, a fuller form of
    /// the same message, to this process's listeners: what is cheap in memory need not
    /// fit (or travel through) a `NOTIFY`.
    pub fn send_split(&self, channel: &'static str, payload: String, local: String) {
        self.inner.local.publish(channel, Arc::from(local.as_str()));
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
    let mut own_pid: Option<u32> = None;
    // Whether another process listens, and when that was looked at.
    let mut others: Option<(bool, std::time::Instant)> = None;
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
                if let Some(c) = conn.as_mut() {
                    match sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                        .fetch_one(&mut *c)
                        .await
                    {
                        Ok(pid) => {
                            let pid = u32::try_from(pid).unwrap_or_default();
                            if let Some(old) = own_pid.replace(pid) {
                                inner.local.own().remove(&old);
                            }
                            inner.local.own().insert(pid);
                        }
                        Err(_) => conn = None,
                    }
                }
            }
            let sent = match conn.as_mut() {
                Some(c) => {
                    let stale = others.is_none_or(|(_, at)| at.elapsed() >= LISTENERS_FRESH);
                    if stale {
                        match others_listen(c, &inner.local).await {
                            Ok(yes) => others = Some((yes, std::time::Instant::now())),
                            // Cannot tell: send.
                            Err(_) => others = None,
                        }
                    }
                    if others.is_some_and(|(yes, _)| !yes) {
                        Ok(false)
                    } else {
                        sqlx::query(
                            "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
                        )
                        .bind(&channels)
                        .bind(&payloads)
                        .execute(c)
                        .await
                        .map(|_| true)
                    }
                }
                None => Err(sqlx::Error::PoolTimedOut),
            };
            match sent {
                Ok(true) => {
                    metrics::counter!("herald_wakes_sent_total").increment(channels.len() as u64)
                }
                // Only this process listens: it heard them in memory.
                Ok(false) => metrics::counter!("herald_wakes_local_only_total")
                    .increment(channels.len() as u64),
                // The listeners' backstop polls pick the work up.
                Err(e) => {
                    conn = None;
                    if let Some(old) = own_pid.take() {
                        inner.local.own().remove(&old);
                    }
                    tracing::warn!(error = %e, n = channels.len(), "could not send wake-ups");
                }
            }
        }
        if stopping {
            return;
        }
    }
}

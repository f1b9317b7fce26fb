//! What every notify process must know at once: each type's switch (mode and rate) and
//! who subscribes to what. Both are cached in memory, refreshed by PostgreSQL
//! notifications (within milliseconds, so well inside the 1 s promise) and by a slow
//! backstop poll.

use herald_storage::notify::{
    self as store, channels, GithubIntegration, NotificationType, WebhookView,
};
use herald_storage::{wake, Heard, LocalWakes, StorageError};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enabled,
    Paused,
    Disabled,
}

impl Mode {
    fn parse(s: &str) -> Mode {
        match s {
            "paused" => Mode::Paused,
            "disabled" => Mode::Disabled,
            _ => Mode::Enabled,
        }
    }
}

/// The kill switches, as this process last read them.
#[derive(Default)]
pub struct TypeControls {
    types: RwLock<HashMap<String, NotificationType>>,
    /// Fires whenever the switches were reloaded.
    pub changed: Notify,
}

impl TypeControls {
    pub fn mode(&self, kind: &str) -> Mode {
        self.types
            .read()
            .ok()
            .and_then(|t| t.get(kind).map(|t| Mode::parse(&t.mode)))
            .unwrap_or(Mode::Enabled)
    }

    pub fn get(&self, kind: &str) -> Option<NotificationType> {
        self.types.read().ok().and_then(|t| t.get(kind).cloned())
    }

    pub async fn reload(&self, pool: &PgPool) -> Result<(), StorageError> {
        let mut conn = pool.acquire().await?;
        let all = store::notification_types(&mut conn).await?;
        if let Ok(mut t) = self.types.write() {
            *t = all.into_iter().map(|t| (t.kind.clone(), t)).collect();
        }
        self.changed.notify_waiters();
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct OrgSubscriptions {
    pub webhooks: Vec<WebhookView>,
    pub github: Vec<GithubIntegration>,
}

/// Subscriptions per org, loaded once and kept until a change is announced: a build of
/// a thousand jobs does not repeat the same lookup a thousand times.
#[derive(Default)]
pub struct SubscriptionCache {
    orgs: Mutex<HashMap<Uuid, (Arc<OrgSubscriptions>, Instant)>>,
    hooks: Mutex<HashMap<Uuid, (Option<Hook>, Instant)>>,
}

const TTL: Duration = Duration::from_secs(300);

/// A webhook and whether it was deleted.
pub type Hook = Arc<(WebhookView, bool)>;

impl SubscriptionCache {
    pub async fn org(
        &self,
        pool: &PgPool,
        org: Uuid,
    ) -> Result<Arc<OrgSubscriptions>, StorageError> {
        if let Some((subs, at)) = self.orgs.lock().ok().and_then(|m| m.get(&org).cloned()) {
            if at.elapsed() < TTL {
                metrics::counter!("herald_notify_subscription_cache_total", "result" => "hit")
                    .increment(1);
                return Ok(subs);
            }
        }
        metrics::counter!("herald_notify_subscription_cache_total", "result" => "miss")
            .increment(1);
        let mut conn = pool.acquire().await?;
        let subs = Arc::new(OrgSubscriptions {
            webhooks: store::org_webhooks(&mut conn, org).await?,
            github: store::org_github(&mut conn, org).await?,
        });
        if let Ok(mut m) = self.orgs.lock() {
            m.insert(org, (subs.clone(), Instant::now()));
        }
        Ok(subs)
    }

    /// A webhook by id with its deleted flag; `None` if it never existed.
    pub async fn webhook(
        &self,
        pool: &PgPool,
        id: Uuid,
    ) -> Result<Option<Arc<(WebhookView, bool)>>, StorageError> {
        if let Some((hook, at)) = self.hooks.lock().ok().and_then(|m| m.get(&id).cloned()) {
            if at.elapsed() < TTL {
                return Ok(hook);
            }
        }
        let mut conn = pool.acquire().await?;
        let hook = store::webhook_by_id(&mut conn, id).await?.map(Arc::new);
        if let Ok(mut m) = self.hooks.lock() {
            if m.len() > 100_000 {
                m.clear();
            }
            m.insert(id, (hook.clone(), Instant::now()));
        }
        Ok(hook)
    }

    pub fn invalidate(&self, org: Uuid) {
        if let Ok(mut m) = self.orgs.lock() {
            m.remove(&org);
        }
        if let Ok(mut m) = self.hooks.lock() {
            m.retain(|_, (h, _)| h.as_ref().is_some_and(|h| h.0.org_id != org));
        }
    }

    pub fn clear(&self) {
        if let Ok(mut m) = self.orgs.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.hooks.lock() {
            m.clear();
        }
    }
}

/// One LISTEN connection per notify process: switches, subscriptions, due work and
/// dispatch's health.
pub async fn listen(
    pool: PgPool,
    local: LocalWakes,
    controls: Arc<TypeControls>,
    cache: Arc<SubscriptionCache>,
    health: Arc<crate::throttle::RemoteHealth>,
    due: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut heard = wake::listen(
        pool.clone(),
        &local,
        &[
            channels::TYPES,
            channels::SUBSCRIPTIONS,
            channels::DUE,
            channels::HEALTH,
        ],
        cancel,
    );
    loop {
        let next = tokio::select! {
            h = heard.recv() => h,
            // Backstop: a missed notification costs at most this long.
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                let _ = controls.reload(&pool).await;
                continue;
            }
        };
        match next {
            None => return,
            Some(Heard::Notice { channel, payload }) => match channel.as_str() {
                c if c == channels::TYPES => {
                    if let Err(e) = controls.reload(&pool).await {
                        tracing::warn!(error = %e, "cannot reload notification types");
                    }
                    due.notify_one();
                }
                c if c == channels::HEALTH => health.report(&payload),
                c if c == channels::SUBSCRIPTIONS => match Uuid::parse_str(&payload) {
                    Ok(org) => cache.invalidate(org),
                    Err(_) => cache.clear(),
                },
                _ => due.notify_one(),
            },
            // Whatever happened while we were not listening.
            Some(Heard::Resync) => {
                cache.clear();
                let _ = controls.reload(&pool).await;
                due.notify_one();
            }
        }
    }
}

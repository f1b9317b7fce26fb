//! Token caches. They keep hot paths (a parked ping, an org's API calls) off the
//! database. Keys are token hashes, never tokens.

use herald_storage::agents::AgentAuth;
use herald_storage::tokens;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

const ORG_TTL: Duration = Duration::from_secs(60);
/// Agents are also dropped on the `agent_gone` notification; the TTL is a backstop.
const AGENT_TTL: Duration = Duration::from_secs(600);
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct TokenCache {
    orgs: Mutex<HashMap<Vec<u8>, (Uuid, Instant)>>,
    agents: Mutex<HashMap<Vec<u8>, (AgentAuth, Instant)>>,
}

fn get<V: Clone>(
    map: &Mutex<HashMap<Vec<u8>, (V, Instant)>>,
    token: &str,
    ttl: Duration,
) -> Option<V> {
    let map = map.lock().ok()?;
    let (v, at) = map.get(&tokens::hash(token))?;
    (at.elapsed() < ttl).then(|| v.clone())
}

fn put<V>(map: &Mutex<HashMap<Vec<u8>, (V, Instant)>>, token: &str, v: V, ttl: Duration) {
    if let Ok(mut map) = map.lock() {
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(tokens::hash(token), (v, Instant::now()));
    }
}

impl TokenCache {
    pub fn org(&self, token: &str) -> Option<Uuid> {
        get(&self.orgs, token, ORG_TTL)
    }

    pub fn put_org(&self, token: &str, org: Uuid) {
        put(&self.orgs, token, org, ORG_TTL)
    }

    pub fn agent(&self, token: &str) -> Option<AgentAuth> {
        get(&self.agents, token, AGENT_TTL)
    }

    pub fn put_agent(&self, token: &str, agent: AgentAuth) {
        put(&self.agents, token, agent, AGENT_TTL)
    }

    pub fn forget_agent(&self, agent_id: Uuid) {
        if let Ok(mut map) = self.agents.lock() {
            map.retain(|_, (a, _)| a.id != agent_id);
        }
    }

    /// After a gap in notifications, nothing cached about agents can be trusted.
    pub fn forget_all_agents(&self) {
        if let Ok(mut map) = self.agents.lock() {
            map.clear();
        }
    }

    /// The agents cached now.
    pub fn cached_agents(&self) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self
            .agents
            .lock()
            .map(|m| m.values().map(|(a, _)| a.id).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Replaces what is cached about agents with `fresh` (read after the cached set was
    /// taken); a cached agent missing from it is gone. One query for a resync instead
    /// of one per agent at its next request.
    pub fn refresh_agents(&self, asked: &[Uuid], fresh: &[AgentAuth]) {
        let by_id: HashMap<Uuid, &AgentAuth> = fresh.iter().map(|a| (a.id, a)).collect();
        if let Ok(mut map) = self.agents.lock() {
            map.retain(|_, (a, _)| {
                if asked.binary_search(&a.id).is_err() {
                    // Cached after the read: it is as fresh as the read.
                    return true;
                }
                match by_id.get(&a.id) {
                    Some(f) => {
                        *a = (*f).clone();
                        true
                    }
                    None => false,
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_domain::AgentState;

    fn auth(id: Uuid, state: AgentState) -> AgentAuth {
        AgentAuth {
            id,
            org_id: Uuid::nil(),
            state,
        }
    }

    #[test]
    fn a_refresh_updates_kept_agents_drops_gone_ones_and_keeps_newer_entries() {
        let cache = TokenCache::default();
        let (kept, gone, later) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        cache.put_agent("t-kept", auth(kept, AgentState::Connected));
        cache.put_agent("t-gone", auth(gone, AgentState::Connected));
        let asked = cache.cached_agents();
        // Cached after the read was taken: not judged by it.
        cache.put_agent("t-later", auth(later, AgentState::Connected));
        cache.refresh_agents(&asked, &[auth(kept, AgentState::Lost)]);
        assert_eq!(
            cache.agent("t-kept").map(|a| a.state),
            Some(AgentState::Lost)
        );
        assert!(cache.agent("t-gone").is_none());
        assert_eq!(cache.agent("t-later").map(|a| a.id), Some(later));
    }
}

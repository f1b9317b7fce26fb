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
}

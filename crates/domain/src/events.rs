//! Event types and subscription patterns.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "build.scheduled")]
    BuildScheduled,
    #[serde(rename = "build.running")]
    BuildRunning,
    #[serde(rename = "build.finished")]
    BuildFinished,
    #[serde(rename = "job.scheduled")]
    JobScheduled,
    #[serde(rename = "job.assigned")]
    JobAssigned,
    #[serde(rename = "job.started")]
    JobStarted,
    #[serde(rename = "job.canceling")]
    JobCanceling,
    #[serde(rename = "job.finished")]
    JobFinished,
    #[serde(rename = "agent.connected")]
    AgentConnected,
    #[serde(rename = "agent.lost")]
    AgentLost,
    #[serde(rename = "agent.disconnected")]
    AgentDisconnected,
    #[serde(rename = "webhook.disabled")]
    WebhookDisabled,
}

impl EventType {
    pub const ALL: &'static [EventType] = &[
        EventType::BuildScheduled,
        EventType::BuildRunning,
        EventType::BuildFinished,
        EventType::JobScheduled,
        EventType::JobAssigned,
        EventType::JobStarted,
        EventType::JobCanceling,
        EventType::JobFinished,
        EventType::AgentConnected,
        EventType::AgentLost,
        EventType::AgentDisconnected,
        EventType::WebhookDisabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::BuildScheduled => "build.scheduled",
            EventType::BuildRunning => "build.running",
            EventType::BuildFinished => "build.finished",
            EventType::JobScheduled => "job.scheduled",
            EventType::JobAssigned => "job.assigned",
            EventType::JobStarted => "job.started",
            EventType::JobCanceling => "job.canceling",
            EventType::JobFinished => "job.finished",
            EventType::AgentConnected => "agent.connected",
            EventType::AgentLost => "agent.lost",
            EventType::AgentDisconnected => "agent.disconnected",
            EventType::WebhookDisabled => "webhook.disabled",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .iter()
            .copied()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown event type `{s}`"))
    }
}

/// A subscription pattern is an exact event type, `prefix.*`, or `*`.
pub fn valid_pattern(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix(".*") {
        return EventType::ALL
            .iter()
            .any(|e| e.as_str().split('.').next() == Some(prefix));
    }
    pattern.parse::<EventType>().is_ok()
}

pub fn pattern_matches(pattern: &str, event: EventType) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => event
            .as_str()
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => pattern == event.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("job.*", EventType::JobFinished));
        assert!(!pattern_matches("job.*", EventType::BuildFinished));
        assert!(pattern_matches("build.finished", EventType::BuildFinished));
        assert!(!pattern_matches("build.finished", EventType::BuildRunning));
        assert!(pattern_matches("*", EventType::AgentLost));
        assert!(valid_pattern("agent.*"));
        assert!(!valid_pattern("agents.*"));
        assert!(!valid_pattern("build.done"));
        assert!(valid_pattern("webhook.*"));
        assert!(pattern_matches("webhook.*", EventType::WebhookDisabled));
    }

    #[test]
    fn names_round_trip() {
        for &e in EventType::ALL {
            assert_eq!(e.as_str().parse::<EventType>(), Ok(e));
            assert_eq!(
                serde_json::to_value(e).ok(),
                Some(serde_json::json!(e.as_str()))
            );
        }
    }
}

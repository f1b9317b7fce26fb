//! The event catalog of `GET /v1/event-types`: every event type, what it means, and the
//! JSON Schema (draft 2020-12) of its `data`. Objects allow properties beyond those
//! listed, so a field added later does not break a receiver that validates.

use herald_domain::EventType;
use serde_json::{json, Value};

fn nullable(t: &str) -> Value {
    json!({"type": [t, "null"]})
}

fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn nullable_time() -> Value {
    json!({"type": ["string", "null"], "format": "date-time"})
}

fn uuid() -> Value {
    json!({"type": "string", "format": "uuid"})
}

fn nullable_uuid() -> Value {
    json!({"type": ["string", "null"], "format": "uuid"})
}

const BUILD_STATES: [&str; 5] = ["scheduled", "running", "passed", "failed", "canceled"];
const JOB_STATES: [&str; 10] = [
    "waiting",
    "scheduled",
    "assigned",
    "accepted",
    "running",
    "passed",
    "failed",
    "canceling",
    "canceled",
    "skipped",
];

fn build() -> Value {
    json!({
        "type": "object",
        "required": ["id", "number", "state", "commit", "branch", "pipeline", "repository",
                     "created_at", "started_at", "finished_at", "canceled"],
        "properties": {
            "id": uuid(),
            "number": {"type": "integer", "minimum": 1},
            "state": {"enum": BUILD_STATES},
            "commit": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
            "branch": {"type": "string"},
            "message": nullable("string"),
            "pipeline": {"type": "string"},
            "repository": {"type": "string"},
            "created_at": time(),
            "started_at": nullable_time(),
            "finished_at": nullable_time(),
            "canceled": {"type": "boolean"},
            "attempt": {"type": "integer", "minimum": 0,
                        "description": "how many times the build has finished: 0 until its first finish; from 1 in build.finished"}
        },
        "additionalProperties": true
    })
}

fn job() -> Value {
    json!({
        "type": "object",
        "required": ["id", "build_id", "key", "command", "queue", "priority", "state",
                     "depends_on", "created_at"],
        "properties": {
            "id": uuid(),
            "build_id": uuid(),
            "key": {"type": "string"},
            "label": nullable("string"),
            "command": {"type": "string"},
            "queue": {"type": "string"},
            "priority": {"type": "integer"},
            "state": {"type": "string", "examples": JOB_STATES},
            "depends_on": {"type": "array", "items": {"type": "string"}},
            "agent_id": nullable_uuid(),
            "exit_status": nullable("integer"),
            "env": {"type": "object"},
            "created_at": time(),
            "scheduled_at": nullable_time(),
            "assigned_at": nullable_time(),
            "accepted_at": nullable_time(),
            "started_at": nullable_time(),
            "finished_at": nullable_time(),
            "attempt": {"type": "integer", "minimum": 1},
            "retry_of": nullable_uuid(),
            "retried_by": nullable_uuid(),
            "timed_out": {"type": "boolean"},
            "timeout_s": {"type": "integer", "minimum": 1}
        },
        "additionalProperties": true
    })
}

fn agent() -> Value {
    json!({
        "type": "object",
        "required": ["id", "name", "queues", "state", "connected_at", "last_heartbeat_at"],
        "properties": {
            "id": uuid(),
            "name": {"type": "string"},
            "queues": {"type": "array", "items": {"type": "string"}},
            "state": {"enum": ["connected", "lost", "disconnected"]},
            "connected_at": time(),
            "last_heartbeat_at": time()
        },
        "additionalProperties": true
    })
}

/// The webhook object as the API shows it (never its secret).
pub fn webhook() -> Value {
    json!({
        "type": "object",
        "required": ["id", "url", "events", "pipeline", "enabled", "disabled_reason",
                     "rate_per_s", "created_at"],
        "properties": {
            "id": uuid(),
            "url": {"type": "string"},
            "events": {"type": "array", "items": {"type": "string"}},
            "pipeline": nullable("string"),
            "enabled": {"type": "boolean"},
            "disabled": {"type": "boolean"},
            "disabled_reason": {"enum": [null, "gone", "failing", "manual"]},
            "rate_per_s": nullable("number"),
            "created_at": time()
        },
        "additionalProperties": true
    })
}

fn data(required: &[&str], properties: Value) -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": true
    })
}

fn describe(e: EventType) -> &'static str {
    match e {
        EventType::BuildScheduled => "A build was created; its jobs wait or are scheduled.",
        EventType::BuildRunning => "A build's first job was accepted by an agent (or a retry reopened a finished build).",
        EventType::BuildFinished => "Every job of the build is done; `build.state` is the final state.",
        EventType::JobScheduled => "A job's dependencies are done: it waits for an agent.",
        EventType::JobAssigned => "A job was handed to an agent.",
        EventType::JobStarted => "The agent started running the job.",
        EventType::JobCanceling => "The job's build was canceled while an agent ran it: the agent learns it from its heartbeat's `cancel` list.",
        EventType::JobFinished => "A job ended: passed, failed, canceled or skipped.",
        EventType::AgentConnected => "An agent registered.",
        EventType::AgentLost => "An agent missed its heartbeats; its running jobs failed.",
        EventType::AgentDisconnected => "An agent disconnected.",
        EventType::WebhookDisabled => "A webhook endpoint of the org was disabled: `gone` (it answered 410), `failing` (every attempt failed for too long) or `manual`.",
    }
}

fn schema(e: EventType) -> Value {
    match e {
        EventType::BuildScheduled | EventType::BuildRunning | EventType::BuildFinished => {
            data(&["build"], json!({"build": build()}))
        }
        EventType::JobScheduled
        | EventType::JobAssigned
        | EventType::JobStarted
        | EventType::JobCanceling
        | EventType::JobFinished => {
            data(&["build", "job"], json!({"build": build(), "job": job()}))
        }
        EventType::AgentConnected | EventType::AgentLost | EventType::AgentDisconnected => {
            data(&["agent"], json!({"agent": agent()}))
        }
        EventType::WebhookDisabled => data(
            &["webhook", "reason"],
            json!({"webhook": webhook(), "reason": {"enum": ["gone", "failing", "manual"]}}),
        ),
    }
}

/// Every event type with its description and the schema of its `data`.
pub fn catalog() -> Vec<Value> {
    EventType::ALL
        .iter()
        .map(|&e| json!({"type": e.as_str(), "description": describe(e), "schema": schema(e)}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_is_listed_once_with_a_schema() {
        let c = catalog();
        assert_eq!(c.len(), EventType::ALL.len());
        for (item, e) in c.iter().zip(EventType::ALL) {
            assert_eq!(item["type"], e.as_str());
            assert_eq!(item["schema"]["type"], "object");
            assert!(!item["description"].as_str().unwrap_or("").is_empty());
        }
    }
}

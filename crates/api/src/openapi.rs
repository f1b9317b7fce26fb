//! The OpenAPI 3 description of every endpoint.
//!
//! Its paths and operations are those the router serves: `crate::routed_operations`
//! reads them from the handlers' `#[utoipa::path]`, the same attributes `routes!`
//! registers the handlers with, so a routed endpoint is in the document by
//! construction. Each operation's text (parameters, bodies, responses) is written here,
//! by operation id, so that it documents the contract (`/work/shared/api-contract.md`)
//! word for word, including the behaviour the contract leaves open and the routes
//! settle: 404 for a malformed id, the defaults of optional fields, the long poll of
//! `ping`, idempotent agent calls, the Standard Webhooks delivery format and the GitHub
//! commit-status mapping. A routed operation without its text here fails the tests.

use serde_json::{json, Map, Value};
use std::sync::OnceLock;

// The limits the domain enforces, from the code that enforces them.
use herald_domain::input::{
    MAX_COMMAND_CHARS, MAX_ENV_CHARS, MAX_ENV_NAME_CHARS, MAX_ENV_VARS, MAX_LABEL_CHARS,
    MAX_MESSAGE_CHARS,
};
/// Free text: anything but NUL, which PostgreSQL refuses.
const NO_NUL: &str = "^[^\\u0000]*$";
/// One line of text: no control characters (C0, DEL, C1).
const ONE_LINE: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";
/// The characters `str::trim` removes (Unicode `White_Space`), for the fields the server
/// trims: such a field needs one character that is not among them.
macro_rules! white_space {
    () => {
        "\\u0009-\\u000D\\u0020\\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000"
    };
}
/// Free text, trimmed by the server, that is not all white space.
const NOTE: &str = concat!("^[^\\u0000]*[^\\u0000", white_space!(), "][^\\u0000]*$");
/// One line, trimmed by the server, that is not all white space.
const ONE_LINE_TRIMMED: &str = concat!(
    "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u001F\\u007F-\\u009F",
    white_space!(),
    "][^\\u0000-\\u001F\\u007F-\\u009F]*$"
);

/// The whole document, served at `GET /openapi.json`.
pub fn document() -> Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| build(&routed())).clone()
}

/// `(path, method, operation)` of every operation the router serves.
fn routed() -> Vec<(String, String, Value)> {
    let api = serde_json::to_value(crate::routed_operations()).unwrap_or_default();
    operations_of(&api)
}

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn operations_of(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if METHODS.contains(&method.as_str()) {
                out.push((path.clone(), method.clone(), op.clone()));
            }
        }
    }
    out
}

/// The document of the `routed` operations, each with its written text. An operation
/// without one keeps what its attribute says (and the tests fail); written text of an
/// operation nobody routes is left out (and the tests fail).
fn build(routed: &[(String, String, Value)]) -> Value {
    let mut doc = written();
    let written: std::collections::HashMap<String, Value> = operations_of(&doc)
        .into_iter()
        .filter_map(|(_, _, op)| Some((op["operationId"].as_str()?.to_owned(), op)))
        .collect();
    let mut paths = Map::new();
    for (path, method, op) in routed {
        let text = op["operationId"]
            .as_str()
            .and_then(|id| written.get(id))
            .unwrap_or(op);
        let item = paths.entry(path.clone()).or_insert_with(|| json!({}));
        item[method.as_str()] = text.clone();
    }
    doc["paths"] = Value::Object(paths);
    doc
}

/// The written document: every operation's text, under the path it was written for,
/// and the components.
fn written() -> Value {
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": info(),
        "servers": [{"url": "/", "description": "The Herald server that served this document"}],
        "tags": tags(),
        "paths": paths(),
        "components": {
            "securitySchemes": security_schemes(),
            "parameters": parameters(),
            "responses": error_responses(),
            "schemas": schemas(),
        },
    });
    job_life_cycle(&mut doc);
    doc
}

// ------------------------------------------------------------------ v1.1: job life cycle

/// v1.1 "Jobs": timeouts, retries, the cancel list, `GET /v1/jobs/{id}`, manual
/// retry and `Idempotency-Key`, laid over the v1 document in one place.
fn job_life_cycle(doc: &mut Value) {
    doc["paths"]["/v1/jobs/{id}"] = json!({"get": get_job()});
    doc["paths"]["/v1/jobs/{id}/retry"] = json!({"post": retry_job()});
    let key = json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "1 to 255 printable ASCII characters (else 422 \
            `invalid_idempotency_key`). A repeat with the same key, org and body (byte for \
            byte, same route) within 24 h returns the first response, status and body, and \
            creates nothing; the same key with another body or route is 422 \
            `idempotency_key_reused`. Two requests with one key at the same moment create \
            one resource. A repeat that arrives while the first is still being processed \
            waits for it (409 `idempotency_key_in_progress` if it takes too long). Failed \
            requests are not remembered.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    });
    for path in ["/v1/pipelines/{slug}/builds", "/v1/webhooks"] {
        if let Some(params) = doc["paths"][path]["post"]["parameters"].as_array_mut() {
            params.push(key.clone());
        } else {
            doc["paths"][path]["post"]["parameters"] = json!([key.clone()]);
        }
    }
    let schemas = &mut doc["components"]["schemas"];
    let job_fields = json!({
        "attempt": {"type": "integer", "minimum": 1, "description": "1 for the first run; a retry counts up."},
        "retry_of": nullable(uuid("The job this one retries.")),
        "retried_by": nullable(uuid("The job that retries this one. A retried job keeps its state; the build counts only the newest attempt of each key.")),
        "timed_out": {"type": "boolean", "description": "It ran longer than `timeout_s` and failed with -2."},
        "timeout_s": {"type": "integer", "minimum": 1, "maximum": 86400,
            "description": "Counted from `accepted`."},
    });
    for name in ["Job", "AssignedJob"] {
        if let (Some(props), Some(extra)) = (
            schemas[name]["properties"].as_object_mut(),
            job_fields.as_object(),
        ) {
            props.extend(extra.clone());
        }
    }
    schemas["Job"]["properties"]["exit_status"]["description"] = json!(
        "Null until finished. -1: its agent was lost, or its cancel outlived \
         `jobs.cancel_grace_s`; -2: it timed out."
    );
    schemas["AssignedJob"]["properties"]["exit_status"] =
        json!({"type": "integer", "nullable": true});
    schemas["NewJob"]["properties"]["timeout_s"] = json!({
        "type": "integer", "minimum": 1, "maximum": 86400,
        "description": "Default `jobs.default_timeout_s` (3600). A job `accepted` or `running` \
            longer, counted from `accepted`, fails with -2 and `timed_out`."});
    schemas["NewJob"]["properties"]["retry"] = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "automatic": {"type": "array", "maxItems": 10, "default": [],
                "description": "A failure (also -1 lost agent, -2 timeout) matching a rule \
                    with retries left (`limit` per rule) is retried at once, in the same \
                    transaction: a new job with the same key, attempt + 1, state \
                    `scheduled`; its dependents wait for it. The first matching rule with \
                    retries left is used.",
                "items": {"type": "object", "additionalProperties": false,
                    "required": ["exit_status", "limit"],
                    "properties": {
                        "exit_status": {"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["*"]}],
                            "description": "An exit status (-1 lost agent, -2 timeout), or `*` for any failure."},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 10}}}},
            "manual": {"type": "boolean", "default": true,
                "description": "Whether `POST /v1/jobs/{id}/retry` may retry it."},
        },
    });
    schemas["Build"]["properties"]["attempt"] = json!({"type": "integer", "minimum": 0,
        "description": "How many times the build has finished: a retry reopens a finished \
            build, and `build.finished` (whose data also carries `attempt`) is sent again. \
            Build state counts only the newest attempt of each job key; `jobs` lists every \
            attempt, ordered by position then attempt."});
    schemas["HeartbeatResponse"]["required"] = json!(["received_at", "cancel"]);
    schemas["HeartbeatResponse"]["properties"]["cancel"] = json!({
        "type": "array", "items": uuid("A job to stop."),
        "description": "Every job of this agent that it must stop: `canceling` (finish it, \
            any exit status makes it `canceled`), or ended by Herald while the agent still \
            held it (timed out, canceled after the grace). A job leaves the list once the \
            agent finishes it; a finish of a job Herald already ended returns 200 with the \
            job unchanged."});
}

fn get_job() -> Value {
    json!({
        "tags": ["builds"],
        "operationId": "getJob",
        "summary": "Get a job",
        "description": "With the org's API token: any job of the org. With an agent's access \
            token: a job assigned to that agent (its cancel shows here as `canceling`). 404 \
            otherwise, and for another org's job.",
        "security": [{"OrgApiToken": []}, {"AgentAccessToken": []}],
        "parameters": [param("JobId")],
        "responses": {
            "200": {"description": "The job.", "content": json_content(schema("Job"))},
            "401": error_ref(401), "404": error_ref(404), "503": error_ref(503),
        },
    })
}

fn retry_job() -> Value {
    json!({
        "tags": ["builds"],
        "operationId": "retryJob",
        "summary": "Retry a job",
        "description": "A new attempt of a `failed` or `canceled` job whose `retried_by` is \
            null and whose `retry.manual` is not false (409 otherwise): same key, command, \
            queue, priority and env, attempt + 1, `retry_of` set; `scheduled` once its \
            dependencies passed. A finished build becomes `running` again (`build.running`), \
            its cancel forgotten, and dependents skipped because of this job go back to \
            `waiting`. Commit statuses start a new round: `pending` after `failure` is then \
            right, and the newest round's final state is the one GitHub ends with.",
        "security": [{"OrgApiToken": []}],
        "parameters": [param("JobId")],
        "responses": {
            "201": {"description": "The new job.", "content": json_content(schema("Job"))},
            "401": error_ref(401), "404": error_ref(404), "409": error_ref(409),
            "503": error_ref(503),
        },
    })
}

// ------------------------------------------------------------------ building blocks

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn param(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

fn uuid(description: &str) -> Value {
    json!({"type": "string", "format": "uuid", "description": description})
}

fn time(description: &str) -> Value {
    json!({"type": "string", "format": "date-time", "description": description})
}

/// A value that may be JSON `null`.
fn nullable(mut v: Value) -> Value {
    if v.get("$ref").is_some() {
        // Siblings of `$ref` are ignored in 3.0: wrap it.
        return json!({"allOf": [v], "nullable": true});
    }
    v["nullable"] = json!(true);
    v
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// `{"items": [...], "next_cursor": ...}` of one schema.
fn list_of(item: &str, description: &str) -> Value {
    json!({
        "type": "object",
        "description": description,
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": schema(item)},
            "next_cursor": {
                "type": "string",
                "nullable": true,
                "description": "Pass as `?cursor=` to get the next (older) page; `null` on the last page.",
            },
        },
    })
}

/// `{"items": [...]}` without pagination (operator views with few rows).
fn items_of(item: &str, description: &str) -> Value {
    json!({
        "type": "object",
        "description": description,
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": schema(item)}},
    })
}

#[derive(Clone, Copy)]
enum Auth {
    None,
    Admin,
    Org,
    Registration,
    Agent,
}

impl Auth {
    fn security(self) -> Value {
        match self {
            Auth::None => json!([]),
            Auth::Admin => json!([{"AdminToken": []}]),
            Auth::Org => json!([{"OrgApiToken": []}]),
            Auth::Registration => json!([{"AgentRegistrationToken": []}]),
            Auth::Agent => json!([{"AgentAccessToken": []}]),
        }
    }
}

fn error_ref(status: u16) -> Value {
    let name = match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        413 => "PayloadTooLarge",
        422 => "UnprocessableEntity",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        other => panic!("no shared error response for {other}"),
    };
    json!({"$ref": format!("#/components/responses/{name}")})
}

/// One operation, built step by step.
struct Op(Map<String, Value>);

impl Op {
    fn new(tag: &str, id: &str, summary: &str, auth: Auth) -> Self {
        let mut m = Map::new();
        m.insert("tags".into(), json!([tag]));
        m.insert("operationId".into(), json!(id));
        m.insert("summary".into(), json!(summary));
        m.insert("security".into(), auth.security());
        m.insert("responses".into(), json!({}));
        Op(m)
    }

    fn describe(mut self, text: &str) -> Self {
        self.0.insert("description".into(), json!(text));
        self
    }

    fn param(mut self, p: Value) -> Self {
        self.0
            .entry("parameters")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("parameters is an array")
            .push(p);
        self
    }

    fn body(mut self, schema_name: &str, required: bool, description: &str) -> Self {
        self.0.insert(
            "requestBody".into(),
            json!({
                "required": required,
                "description": description,
                "content": json_content(schema(schema_name)),
            }),
        );
        self
    }

    fn respond(mut self, status: u16, response: Value) -> Self {
        self.0["responses"][status.to_string()] = response;
        self
    }

    /// A JSON response of a component schema.
    fn json(self, status: u16, description: &str, schema_name: &str) -> Self {
        self.respond(
            status,
            json!({"description": description, "content": json_content(schema(schema_name))}),
        )
    }

    /// A response without a body.
    fn empty(self, status: u16, description: &str) -> Self {
        self.respond(status, json!({"description": description}))
    }

    /// The shared error responses.
    fn errors(mut self, statuses: &[u16]) -> Self {
        for &s in statuses {
            self = self.respond(s, error_ref(s));
        }
        self
    }

    /// An error response with a description specific to this operation.
    fn error(self, status: u16, description: &str) -> Self {
        self.respond(
            status,
            json!({"description": description, "content": json_content(schema("Error"))}),
        )
    }

    fn extend(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.into(), value);
        self
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

// ------------------------------------------------------------------ info and tags

const OVERVIEW: &str = "\
Herald dispatches CI jobs to agents and notifies webhook receivers and GitHub of every \
state change.

**Conventions.** JSON in and out, UTF-8. IDs are UUID strings; times are RFC 3339 UTC. \
Every call but `/healthz`, `/readyz`, `/metrics` and `/openapi.json` needs \
`Authorization: Bearer <token>`; each operation names the token it takes (see the \
security schemes). Request bodies are limited to 64 MiB (413: a build of 500 jobs at the \
limits of `NewJob` fits) and reject unknown fields (422). Text never contains NUL \
characters (422). A body that is not JSON is 400 `invalid_json`; JSON of the wrong shape is 422 \
`invalid_body`; a value out of range is 422 `validation_failed`.

**Errors** have status 400, 401, 403, 404, 409, 413, 422, 429 or 503 and the body \
`{\"error\": {\"code\": \"snake_case_code\", \"message\": \"human sentence\"}}`. Nothing a \
client sends causes a 500. A resource of another org is a 404, never a 403, and so is a \
malformed id in a path. An unknown route is 404 `not_found`; a known route with the \
wrong method is 405 `method_not_allowed`. 503 `unavailable` means the database could \
not be reached (a restart, a failover): retry after the `Retry-After` seconds.

**Lists** take `?limit=` (default 50, 1 to 500) and `?cursor=` and answer \
`{\"items\": [...], \"next_cursor\": \"opaque\" | null}`: keyset pagination, newest first. \
Pass `next_cursor` back as `cursor` for the next page until it is `null`.

**States.**
Job: `waiting` (dependencies not done) → `scheduled` → `assigned` → `accepted` → \
`running` → `passed` | `failed`; also `canceling`, `canceled`, and `skipped` (a dependency \
failed or was canceled). An assignment not accepted within `dispatch.accept_timeout_s` \
(default 30) returns the job to `scheduled`.
Build: `scheduled` → `running` (first job accepted) → `passed` (every job passed) | \
`failed` (all jobs terminal, one failed) | `canceled`.
Agent: `connected` → `lost` (no heartbeat for `agents.lost_after_s`, default 90) | \
`disconnected`. A lost agent's accepted or running jobs become `failed` with \
`exit_status: -1`.

**Events.** Every state change commits together with its event: `build.scheduled`, \
`build.running`, `build.finished` (its build carries the final state), `job.scheduled`, \
`job.assigned`, `job.started`, `job.canceling`, `job.finished`, `agent.connected`, \
`agent.lost`, `agent.disconnected`, `webhook.disabled`. Webhook subscriptions match exact types and `prefix.*` patterns. \
See `POST /v1/webhooks` for the delivery format (Standard Webhooks) and \
`PUT /v1/pipelines/{slug}/github` for GitHub commit statuses.";

fn info() -> Value {
    json!({
        "title": "Herald",
        "version": env!("CARGO_PKG_VERSION"),
        "description": OVERVIEW,
        "license": {"name": "See the repository"},
    })
}

fn tags() -> Value {
    json!([
        {"name": "health", "description": "Liveness, readiness, metrics and this document. No token."},
        {"name": "operator", "description": "Installation-wide operations. Admin token."},
        {"name": "pipelines", "description": "Pipelines and their GitHub integration. Org API token."},
        {"name": "builds", "description": "Builds and their jobs. Org API token."},
        {"name": "webhooks", "description": "Webhook endpoints and their deliveries. Org API token."},
        {"name": "agents", "description": "What an agent calls: registration, the long poll, heartbeats and job transitions."},
    ])
}

fn security_schemes() -> Value {
    json!({
        "AdminToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The operator token, `auth.admin_token` (`HERALD_AUTH__ADMIN_TOKEN`). \
                Needed by `POST /v1/orgs` and every `/v1/ops/...` operation. Presenting an org \
                or agent token (`hrd_...`) there is 403; a missing or unknown token is 401.",
        },
        "OrgApiToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "hrd_api_...",
            "description": "An org's `api_token`, shown once by `POST /v1/orgs`. Needed by the \
                pipeline, build, webhook and delivery operations. Every resource these reach \
                belongs to the token's org; another org's resource is a 404.",
        },
        "AgentRegistrationToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "hrd_reg_...",
            "description": "An org's `agent_token`, shown once by `POST /v1/orgs`. Needed only by \
                `POST /v1/agents/register`.",
        },
        "AgentAccessToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "hrd_agt_...",
            "description": "An agent's `access_token`, returned by `POST /v1/agents/register`. \
                Needed by `/v1/agent/ping`, `/v1/agent/heartbeat`, `/v1/agent/disconnect` and \
                `/v1/jobs/{id}/accept|start|finish`. Stops working (401) once the agent is \
                `lost` or `disconnected`: register again.",
        },
    })
}

fn parameters() -> Value {
    json!({
        "Limit": {
            "name": "limit",
            "in": "query",
            "required": false,
            "description": "Page size. Outside 1 to 500 is 422 `validation_failed`.",
            "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
        },
        "Cursor": {
            "name": "cursor",
            "in": "query",
            "required": false,
            "description": "The `next_cursor` of the previous page. A cursor this API did not \
                return is 400 `invalid_cursor`; an empty one means the first page.",
            "schema": {"type": "string", "pattern": crate::routes::CURSOR_PATTERN},
        },
        "BuildId": path_param("id", "The build's id. A malformed id is a 404.", true),
        "JobId": path_param("id", "The job's id. A malformed id is a 404.", true),
        "WebhookId": path_param("id", "The webhook's id. A malformed id is a 404.", true),
        "DeliveryId": path_param("id", "The delivery's id. A malformed id is a 404.", true),
        "PipelineSlug": path_param("slug", "The pipeline's slug, unique within the org.", false),
    })
}

fn path_param(name: &str, description: &str, is_uuid: bool) -> Value {
    let schema = if is_uuid {
        json!({"type": "string", "format": "uuid"})
    } else {
        json!({"type": "string"})
    };
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
}

fn error_response(description: &str, code: &str, message: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {
            "schema": schema("Error"),
            "example": {"error": {"code": code, "message": message}},
        }},
    })
}

fn error_responses() -> Value {
    let mut too_many = error_response(
        "Too many requests (`rate_limited`). Wait for `Retry-After` seconds. Part of the \
         contract's error vocabulary; no operation of this version answers it.",
        "rate_limited",
        "too many requests",
    );
    too_many["headers"] = json!({"Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }});
    json!({
        "BadRequest": error_response(
            "The request is malformed: the body is not JSON (`invalid_json`) or cannot be read \
             (`invalid_body`), or a `cursor` is not one this API returned (`invalid_cursor`).",
            "invalid_json",
            "request body is not valid JSON: expected value at line 1 column 1",
        ),
        "Unauthorized": error_response(
            "The bearer token is missing, unknown, of the wrong kind for this operation, or \
             belongs to an agent that is no longer connected (`unauthorized`).",
            "unauthorized",
            "missing or invalid bearer token",
        ),
        "Forbidden": error_response(
            "An org or agent token was presented to an operator endpoint (`forbidden`).",
            "forbidden",
            "this endpoint needs the operator token",
        ),
        "NotFound": error_response(
            "No such resource in the token's org (`not_found`). A resource of another org and a \
             malformed id are 404s too.",
            "not_found",
            "build not found",
        ),
        "Conflict": error_response(
            "The request conflicts with the current state (`conflict`, `invalid_transition`).",
            "conflict",
            "an org with slug `acme` already exists",
        ),
        "PayloadTooLarge": error_response(
            &format!(
                "The request body is larger than {} MiB (`payload_too_large`).",
                crate::MAX_BODY_BYTES >> 20
            ),
            "payload_too_large",
            &format!(
                "request body is larger than {} bytes",
                crate::MAX_BODY_BYTES
            ),
        ),
        "UnprocessableEntity": error_response(
            "The request is well-formed JSON but invalid: the wrong shape or an unknown field \
             (`invalid_body`), or a value out of range (`validation_failed`). The message \
             names the field.",
            "validation_failed",
            "slug: must be 1-64 lower-case letters, digits or dashes, starting with a letter or digit",
        ),
        "TooManyRequests": too_many,
        "ServiceUnavailable": error_response(
            "The database (or broker) cannot be reached right now (`unavailable`). Nothing was \
             changed; retry with backoff.",
            "unavailable",
            "database unavailable: pool timed out while waiting for an open connection",
        ),
    })
}

// ------------------------------------------------------------------ paths

fn paths() -> Value {
    let mut ops: Vec<(&str, &str, Value)> = vec![
        ("/healthz", "get", healthz()),
        ("/readyz", "get", readyz()),
        ("/metrics", "get", metrics()),
        ("/openapi.json", "get", openapi_json()),
        ("/v1/orgs", "post", create_org()),
        (
            "/v1/ops/notification-types",
            "get",
            list_notification_types(),
        ),
        (
            "/v1/ops/notification-types/{type}",
            "put",
            put_notification_type(),
        ),
        ("/v1/ops/queues", "get", list_queues()),
        ("/v1/ops/dead-letters/replay", "post", replay_dead_letters()),
        ("/v1/ops/overview", "get", ops_overview()),
        ("/ops", "get", ops_page()),
        ("/v1/pipelines", "post", create_pipeline()),
        ("/v1/pipelines/{slug}", "get", get_pipeline()),
        ("/v1/pipelines/{slug}/github", "put", put_github()),
        ("/v1/pipelines/{slug}/builds", "post", create_build()),
        ("/v1/builds", "get", list_builds()),
        ("/v1/builds/{id}", "get", get_build()),
        ("/v1/builds/{id}/cancel", "post", cancel_build()),
        ("/v1/webhooks", "post", create_webhook()),
        ("/v1/webhooks", "get", list_webhooks()),
        ("/v1/webhooks/{id}", "get", get_webhook()),
        ("/v1/webhooks/{id}", "delete", delete_webhook()),
        ("/v1/webhooks/{id}/deliveries", "get", list_deliveries()),
        ("/v1/deliveries/{id}/redeliver", "post", redeliver()),
        ("/v1/agents/register", "post", register_agent()),
        ("/v1/agent/ping", "post", ping()),
        ("/v1/agent/heartbeat", "post", heartbeat()),
        ("/v1/agent/disconnect", "post", disconnect()),
        ("/v1/jobs/{id}/accept", "put", accept_job()),
        ("/v1/jobs/{id}/start", "put", start_job()),
        ("/v1/jobs/{id}/finish", "put", finish_job()),
    ];
    ops.extend(webhook_control_paths());
    let mut paths = Map::new();
    for (path, method, op) in ops {
        let item = paths.entry(path).or_insert_with(|| json!({}));
        item[method] = op;
    }
    Value::Object(paths)
}

// ---- health

fn healthz() -> Value {
    Op::new("health", "healthz", "Liveness", Auth::None)
        .describe("200 while the process lives. Checks nothing else.")
        .json(200, "The process is alive.", "Health")
        .done()
}

fn readyz() -> Value {
    Op::new("health", "readyz", "Readiness", Auth::None)
        .describe(
            "Served by every process, whatever its roles. 200 when every dependency the \
             process's roles need answers (`database:primary`; `broker` for every role but \
             `maintenance`; `database:replica`, with the `api` role when a replica is \
             configured, is reported but not needed, as reads fall back to the primary) and each role's loop runs (`role:api`, `role:relay`, \
             `role:dispatch`, `role:notify`, `role:maintenance`), else 503. Each check has two \
             seconds.",
        )
        .json(200, "Every dependency answers.", "Readiness")
        .json(
            503,
            "At least one dependency is down; `checks` says which.",
            "Readiness",
        )
        .done()
}

fn metrics() -> Value {
    Op::new("health", "metrics", "Prometheus metrics", Auth::None)
        .describe("Metrics in the Prometheus text exposition format, version 0.0.4.")
        .respond(
            200,
            json!({
                "description": "The metrics.",
                "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
            }),
        )
        .done()
}

fn openapi_json() -> Value {
    Op::new("health", "openapi", "This OpenAPI description", Auth::None)
        .describe("The OpenAPI 3.0 description of every endpoint. Served without a token.")
        .respond(
            200,
            json!({
                "description": "The OpenAPI document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }),
        )
        .done()
}

// ---- operator

fn create_org() -> Value {
    Op::new("operator", "createOrg", "Create an org", Auth::Admin)
        .describe(
            "Creates an org and its two tokens. The tokens are shown once, in this response, \
             and stored only as hashes: `api_token` is the org's API token, `agent_token` \
             registers agents.",
        )
        .body("CreateOrgRequest", true, "The org's slug.")
        .json(201, "The org and its tokens.", "Org")
        .error(409, "An org with this slug exists (`conflict`).")
        .errors(&[400, 401, 403, 413, 422, 503])
        .done()
}

fn list_notification_types() -> Value {
    Op::new(
        "operator",
        "listNotificationTypes",
        "List the notification kill switches",
        Auth::Admin,
    )
    .describe("One row each for `webhook` and `github_commit_status`.")
    .json(200, "The notification types.", "NotificationTypeList")
    .errors(&[401, 403, 503])
    .done()
}

fn put_notification_type() -> Value {
    Op::new(
        "operator",
        "putNotificationType",
        "Set a notification type's mode and rate",
        Auth::Admin,
    )
    .describe(
        "Takes effect in every Herald process within 1 s.\n\n\
         - `enabled` delivers.\n\
         - `paused` holds every notification of that type, losing none; going back to \
           `enabled` delivers them.\n\
         - `disabled` skips new notifications of that type: they are recorded as `skipped` \
           and never delivered later.\n\n\
         `rate_per_s` and `burst` set the type's token bucket; an omitted one keeps its \
         current value. `reason` is recorded with the change.",
    )
    .param(json!({
        "name": "type",
        "in": "path",
        "required": true,
        "description": "The notification type. Any other value is a 404.",
        "schema": schema("NotificationTypeName"),
    }))
    .body(
        "PutNotificationTypeRequest",
        true,
        "The new mode, rate and reason.",
    )
    .json(200, "The new row.", "NotificationType")
    .error(404, "No such notification type (`not_found`).")
    .errors(&[400, 401, 403, 413, 422, 503])
    .done()
}

fn list_queues() -> Value {
    Op::new("operator", "listQueues", "Backlogs", Auth::Admin)
        .describe(
            "The depth and age of every backlog: runnable jobs (`jobs.runnable`), unpublished \
             events (`outbox`), webhook deliveries waiting or dead (`webhook.pending`, \
             `webhook.dead`), commit statuses waiting (`github_commit_status.pending`), and \
             the broker's queues, named with the `amqp.prefix`. A broker queue's \
             `oldest_age_s` is `null`; its `depth` is `null` when the broker did not answer.",
        )
        .json(200, "The queues.", "QueueList")
        .errors(&[401, 403, 503])
        .done()
}

fn replay_dead_letters() -> Value {
    Op::new(
        "operator",
        "replayDeadLetters",
        "Replay dead notifications",
        Auth::Admin,
    )
    .describe(
        "Puts up to `limit` dead notifications (of one `type`, or of both when omitted) back to \
         `pending` with a fresh retry schedule, oldest first. An empty body replays both types \
         with the default limit.",
    )
    .body("ReplayRequest", false, "What to replay.")
    .json(
        200,
        "How many notifications were replayed.",
        "ReplayResponse",
    )
    .errors(&[400, 401, 403, 413, 422, 503])
    .done()
}

// ---- pipelines

fn create_pipeline() -> Value {
    Op::new(
        "pipelines",
        "createPipeline",
        "Create a pipeline",
        Auth::Org,
    )
    .body("CreatePipelineRequest", true, "The pipeline.")
    .json(201, "The pipeline.", "Pipeline")
    .error(409, "The org has a pipeline with this slug (`conflict`).")
    .errors(&[400, 401, 413, 422, 503])
    .done()
}

fn get_pipeline() -> Value {
    Op::new("pipelines", "getPipeline", "Get a pipeline", Auth::Org)
        .param(param("PipelineSlug"))
        .json(200, "The pipeline.", "Pipeline")
        .errors(&[401, 404, 503])
        .done()
}

const GITHUB_STATUSES: &str = "\
From then on the pipeline's builds (and, with `job_statuses`, its jobs) post GitHub \
commit statuses. Calling it again replaces the settings.

Each status is `POST {api_url}/repos/{owner}/{repo}/statuses/{sha}` with \
`Authorization: Bearer <token>`, `Accept: application/vnd.github+json`, \
`X-GitHub-Api-Version: 2022-11-28`, `User-Agent: herald/<version>` and the body \
`{\"state\", \"target_url\", \"description\", \"context\"}`:

- `context` is `herald/{pipeline}` for the build, `herald/{pipeline}/{job key}` for a job.
- `state`: scheduled and running → `pending`, passed → `success`, failed → `failure`, \
canceled → `error`.
- `description` is at most 140 characters; `target_url` links to the build.

Coalescing: for one (repository, sha, context) only the newest state is sent once a newer \
one exists, and a status never goes back (no `pending` after `success` for the same \
build). Rate limits: a budget per token (default 80 content-creating requests per minute, \
`notify.github_per_token_per_minute`); on 403 or 429 from GitHub, that token is not used \
again before `Retry-After` or `x-ratelimit-reset`.";

fn put_github() -> Value {
    Op::new(
        "pipelines",
        "putGithubIntegration",
        "Post commit statuses to GitHub",
        Auth::Org,
    )
    .describe(GITHUB_STATUSES)
    .param(param("PipelineSlug"))
    .body("PutGithubRequest", true, "Where and how to post statuses.")
    .json(
        200,
        "The integration (the token is never shown).",
        "GithubIntegration",
    )
    .errors(&[400, 401, 404, 413, 422, 503])
    .done()
}

// ---- builds

fn create_build() -> Value {
    Op::new("builds", "createBuild", "Create a build", Auth::Org)
        .describe(
            "Creates a build of the pipeline with its job graph, in state `scheduled`. Jobs \
             without dependencies start `scheduled`, the others `waiting`. `number` counts up \
             per pipeline from 1. Read-your-writes: `GET /v1/builds/{id}` shows the build \
             right after this returns, even when reads go to a replica.\n\n\
             422 (`invalid_build`) for no jobs, more than 500 jobs, duplicate keys, unknown \
             dependencies or a cycle; 422 (`validation_failed`) for a commit that is not 40 \
             hexadecimal characters or another invalid field.",
        )
        .param(param("PipelineSlug"))
        .body("CreateBuildRequest", true, "The commit and the jobs.")
        .json(201, "The build with its jobs.", "Build")
        .error(404, "The org has no pipeline with this slug (`not_found`).")
        .error(
            422,
            "Invalid job graph (`invalid_build`) or field (`validation_failed`, `invalid_body`).",
        )
        .errors(&[400, 401, 413, 503])
        .done()
}

fn list_builds() -> Value {
    Op::new("builds", "listBuilds", "List builds", Auth::Org)
        .describe("The org's builds, newest first, without their jobs.")
        .param(json!({
            "name": "pipeline",
            "in": "query",
            "required": false,
            "description": "Only builds of the pipeline with this slug.",
            "schema": {"type": "string"},
        }))
        .param(json!({
            "name": "state",
            "in": "query",
            "required": false,
            "description": "Only builds in this state. Another value is 422.",
            "schema": schema("BuildState"),
        }))
        .param(json!({
            "name": "branch",
            "in": "query",
            "required": false,
            "description": "Only builds of this branch.",
            "schema": {"type": "string"},
        }))
        .param(param("Limit"))
        .param(param("Cursor"))
        .json(200, "A page of builds.", "BuildList")
        .errors(&[400, 401, 422, 503])
        .done()
}

fn get_build() -> Value {
    Op::new("builds", "getBuild", "Get a build", Auth::Org)
        .param(param("BuildId"))
        .json(200, "The build with its jobs.", "Build")
        .errors(&[401, 404, 503])
        .done()
}

fn cancel_build() -> Value {
    Op::new("builds", "cancelBuild", "Cancel a build", Auth::Org)
        .describe(
            "Jobs not yet running (`waiting`, `scheduled`, `assigned`) become `canceled` at \
             once; `accepted` and `running` ones become `canceling` until their agent \
             finishes them, then `canceled`. The build becomes `canceled` when every job is \
             terminal. Safe to repeat: canceling a finished or already-canceled build returns \
             it unchanged.",
        )
        .param(param("BuildId"))
        .json(200, "The build with its jobs.", "Build")
        .errors(&[401, 404, 503])
        .done()
}

// ---- webhooks

const WEBHOOK_DELIVERY: &str = "\
Creates a webhook endpoint. The `secret` is shown once, in this response.

**Delivery (Standard Webhooks).** Each event the endpoint subscribes to (exact types or \
`prefix.*`, and only the pipeline's builds when `pipeline` is set) is sent as \
`POST <url>` with headers:

- `content-type: application/json`
- `webhook-id`: one per event × endpoint (the delivery's id), the same on every retry: \
deduplicate on it.
- `webhook-timestamp`: unix seconds of this attempt.
- `webhook-signature: v1,<base64 HMAC-SHA256>` over `\"{webhook-id}.{webhook-timestamp}.{body}\"`, \
the key being the base64-decoded part of the secret after `whsec_`.

Body: `{\"type\": \"build.finished\", \"timestamp\": \"...\", \"data\": {...}}`; `data` holds \
`build` and, for job events, `job`, and for agent events, `agent` (see `WebhookEvent`).

**Responses.** 2xx is success. 410 disables the endpoint (later deliveries are \
`skipped`). 429 and 503 with `Retry-After` are honoured. Anything else, a timeout (15 s \
per attempt) or a connection error is retried on the schedule 5 s, 30 s, 2 min, 10 min, \
30 min, 1 h, 3 h, 6 h, ±20 % jitter; then the delivery is `dead` and can be replayed \
(`POST /v1/deliveries/{id}/redeliver`, `POST /v1/ops/dead-letters/replay`). Redirects \
are not followed.

**URLs** must be `http` or `https`. Unless `webhooks.allow_private_networks` is set, a URL \
whose host resolves to a loopback, private or link-local address is refused here (422 \
`invalid_url`) and again at connect time.";

fn create_webhook() -> Value {
    Op::new("webhooks", "createWebhook", "Create a webhook", Auth::Org)
        .describe(WEBHOOK_DELIVERY)
        .body(
            "CreateWebhookRequest",
            true,
            "The endpoint and its subscriptions.",
        )
        .json(201, "The webhook and its secret.", "WebhookCreated")
        .error(
            422,
            "Invalid `events` (`validation_failed`), a refused or unresolvable `url` \
             (`invalid_url`), or an unknown `pipeline` (`validation_failed`).",
        )
        .errors(&[400, 401, 413, 503])
        .extend("callbacks", json!({"event": webhook_callback()}))
        .done()
}

fn webhook_callback() -> Value {
    let header = |name: &str, description: &str, schema: Value| json!({"name": name, "in": "header", "required": true, "description": description, "schema": schema});
    json!({"{$request.body#/url}": {"post": {
        "summary": "An event, delivered to the webhook's URL",
        "description": "Standard Webhooks: verify `webhook-signature` before trusting the body.",
        "parameters": [
            header("webhook-id", "The delivery's id; the same on every retry.", json!({"type": "string"})),
            header("webhook-timestamp", "Unix seconds of this attempt.", json!({"type": "integer"})),
            header(
                "webhook-signature",
                "`v1,<base64 HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\">`.",
                json!({"type": "string", "pattern": "^v1,"}),
            ),
        ],
        "requestBody": {"required": true, "content": json_content(schema("WebhookEvent"))},
        "responses": {
            "2XX": {"description": "Delivered."},
            "410": {"description": "Gone: Herald disables the endpoint."},
            "429": {"description": "Retried after `Retry-After`."},
            "503": {"description": "Retried after `Retry-After`."},
            "default": {"description": "Retried on the schedule, then `dead`."},
        },
    }}})
}

fn list_webhooks() -> Value {
    Op::new("webhooks", "listWebhooks", "List webhooks", Auth::Org)
        .describe("The org's webhooks, newest first. Secrets are not shown.")
        .param(param("Limit"))
        .param(param("Cursor"))
        .json(200, "A page of webhooks.", "WebhookList")
        .errors(&[400, 401, 422, 503])
        .done()
}

fn get_webhook() -> Value {
    Op::new("webhooks", "getWebhook", "Get a webhook", Auth::Org)
        .param(param("WebhookId"))
        .json(200, "The webhook (without its secret).", "Webhook")
        .errors(&[401, 404, 503])
        .done()
}

fn delete_webhook() -> Value {
    Op::new("webhooks", "deleteWebhook", "Delete a webhook", Auth::Org)
        .describe(
            "Stops deliveries to the endpoint; those still pending are recorded as `skipped`. \
             A deleted webhook is a 404 afterwards.",
        )
        .param(param("WebhookId"))
        .empty(204, "Deleted.")
        .errors(&[401, 404, 503])
        .done()
}

fn list_deliveries() -> Value {
    Op::new(
        "webhooks",
        "listDeliveries",
        "List a webhook's deliveries",
        Auth::Org,
    )
    .describe(
        "One delivery per event × endpoint, newest first. `status`: `pending` (waiting for its \
         first or next attempt, or held by a paused type), `succeeded`, `failed` (the last \
         attempt failed; a retry is scheduled), `dead` (retries exhausted; replayable), \
         `skipped` (not sent: type disabled, endpoint disabled or deleted).",
    )
    .param(param("WebhookId"))
    .param(param("Limit"))
    .param(param("Cursor"))
    .param(query_param("status", "Only deliveries in this status (`pending`, `succeeded`, `failed`, `dead`, `skipped`); anything else is 422.", json!({"type": "string", "enum": ["pending", "succeeded", "failed", "dead", "skipped"]})))
    .param(query_param("event_type", "Only deliveries of this event type; an unknown type is 422.", schema("EventType")))
    .param(query_param("since", "Only deliveries created at or after this RFC 3339 time.", json!({"type": "string", "format": "date-time"})))
    .param(query_param("until", "Only deliveries created before this RFC 3339 time.", json!({"type": "string", "format": "date-time"})))
    .json(200, "A page of deliveries.", "DeliveryList")
    .errors(&[400, 401, 404, 422, 503])
    .done()
}

fn redeliver() -> Value {
    Op::new("webhooks", "redeliver", "Deliver again", Auth::Org)
        .describe(
            "Queues the delivery again, whatever its status, with the same `webhook-id`. \
             Returns at once; the attempt happens in the background.",
        )
        .param(param("DeliveryId"))
        .json(202, "Queued.", "RedeliverResponse")
        .errors(&[401, 404, 503])
        .done()
}

// ---- webhooks: update, rotate, recover, one delivery, the event catalog (v1.1)

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn webhook_control_paths() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("/v1/webhooks/{id}", "patch", patch_webhook()),
        ("/v1/webhooks/{id}/rotate-secret", "post", rotate_secret()),
        ("/v1/webhooks/{id}/recover", "post", recover_webhook()),
        ("/v1/deliveries/{id}", "get", get_delivery()),
        ("/v1/event-types", "get", list_event_types()),
    ]
}

fn patch_webhook() -> Value {
    Op::new("webhooks", "updateWebhook", "Update a webhook", Auth::Org)
        .describe(
            "Changes only the fields sent. `url` passes the same SSRF check as on create. \
             `pipeline: null` and `rate_per_s: null` clear them. `enabled: true` clears \
             `disabled_reason` and the failure streak (deliveries recorded `skipped` meanwhile \
             can be sent with `recover`); `enabled: false` disables it with reason `manual` \
             and announces `webhook.disabled`. Every Herald process follows within 1 s. The \
             secret is not shown (see `rotate-secret`).",
        )
        .param(param("WebhookId"))
        .body("PatchWebhookRequest", true, "The fields to change.")
        .json(200, "The webhook.", "Webhook")
        .error(
            422,
            "Invalid `events`, `rate_per_s` or an unknown `pipeline` (`validation_failed`), a \
             refused `url` (`invalid_url`), an unknown field (`invalid_body`).",
        )
        .errors(&[400, 401, 404, 413, 503])
        .done()
}

fn rotate_secret() -> Value {
    Op::new(
        "webhooks",
        "rotateSecret",
        "Rotate a webhook's secret",
        Auth::Org,
    )
    .describe(
        "Replaces the secret. Until `old_secret_expires_at` every attempt carries both \
             signatures, `webhook-signature: v1,<new> v1,<old>` (space-separated, as Standard \
             Webhooks allows), so a receiver that knows either secret verifies every delivery \
             while it switches. `old_secret_valid_s: 0` ends the old secret at once.",
    )
    .param(param("WebhookId"))
    .body(
        "RotateSecretRequest",
        false,
        "How long the old secret keeps signing.",
    )
    .json(
        200,
        "The new secret (shown once) and when the old one stops signing.",
        "RotatedSecret",
    )
    .error(
        422,
        "`old_secret_valid_s` outside 0 to 604800 (`validation_failed`).",
    )
    .errors(&[400, 401, 404, 413, 503])
    .done()
}

fn recover_webhook() -> Value {
    Op::new(
        "webhooks",
        "recoverWebhook",
        "Send again what failed in a time window",
        Auth::Org,
    )
    .describe(
        "Every delivery of this endpoint created in `[since, until)` (`until` defaults to \
             now) whose status is `failed`, `dead` or `skipped` is sent again, once, with its \
             original `webhook-id` and its attempt count (a `dead` one that fails again is \
             `dead` again; a `failed` or `skipped` one goes on with the retry schedule). \
             Returns at once: the rows are marked due in small batches in the background, \
             only while the webhook queue has room, and go out through the type's switch \
             (nothing is sent while `webhook` is paused or disabled), its rate, the \
             endpoint's and host's limits and the throttle. `queued` counts the matching \
             deliveries when the call was made.",
    )
    .param(param("WebhookId"))
    .body("RecoverRequest", true, "The time window.")
    .json(202, "Queued.", "RecoverResponse")
    .error(
        409,
        "The endpoint is disabled (`webhook_disabled`): enable it first.",
    )
    .error(
        422,
        "`since` older than the kept history, `notify.history_retention_s` \
             (`since_out_of_history`); `until` not after `since` (`validation_failed`); a \
             missing or malformed time (`invalid_body`).",
    )
    .errors(&[400, 401, 404, 413, 503])
    .done()
}

fn get_delivery() -> Value {
    Op::new(
        "webhooks",
        "getDelivery",
        "Get a delivery with its attempts",
        Auth::Org,
    )
    .describe(
        "The delivery, with `attempts` (here a list, not a count: the count is \
             `attempts_made`) of its newest 50 attempts, newest first. Read from the replica.",
    )
    .param(param("DeliveryId"))
    .json(200, "The delivery.", "DeliveryWithAttempts")
    .errors(&[401, 404, 503])
    .done()
}

fn list_event_types() -> Value {
    Op::new("webhooks", "listEventTypes", "List event types", Auth::Org)
        .describe(
            "Every event type a webhook can subscribe to, what it means, and the JSON Schema \
             (draft 2020-12) of its `data`. Objects allow properties beyond those listed.",
        )
        .json(200, "The catalog.", "EventTypeList")
        .errors(&[401, 503])
        .done()
}

fn webhook_control_schemas() -> Value {
    json!({
        "PatchWebhookRequest": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "events": {"type": "array", "minItems": 1, "maxItems": 50, "items": schema("EventPattern")},
                "pipeline": {"type": "string", "nullable": true},
                "enabled": {"type": "boolean"},
                "rate_per_s": {"type": "number", "nullable": true, "minimum": 0, "exclusiveMinimum": true, "maximum": 1000000},
            },
            "example": {"url": "https://ci.example.com/herald-v2", "enabled": true, "rate_per_s": 20},
        },
        "RotateSecretRequest": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "old_secret_valid_s": {"type": "integer", "minimum": 0, "maximum": 604800, "default": 86400},
            },
        },
        "RotatedSecret": {
            "type": "object",
            "required": ["secret", "old_secret_expires_at"],
            "properties": {
                "secret": {"type": "string", "pattern": "^whsec_[A-Za-z0-9+/]+={0,2}$"},
                "old_secret_expires_at": time("Until then attempts are signed with both secrets."),
            },
        },
        "RecoverRequest": {
            "type": "object",
            "required": ["since"],
            "additionalProperties": false,
            "properties": {
                "since": time("Start of the window (inclusive)."),
                "until": time("End of the window (exclusive); default now."),
            },
        },
        "RecoverResponse": {
            "type": "object",
            "required": ["queued"],
            "properties": {"queued": {"type": "integer", "minimum": 0}},
        },
        "Attempt": {
            "type": "object",
            "required": ["at", "status_code", "error", "duration_ms"],
            "properties": {
                "at": time("When the attempt was made."),
                "status_code": {"type": "integer", "nullable": true, "description": "`null`: no answer."},
                "error": {"type": "string", "nullable": true, "description": "`null` on success."},
                "duration_ms": {"type": "integer", "minimum": 0},
            },
        },
        "DeliveryWithAttempts": {
            "allOf": [
                schema("Delivery"),
                {"type": "object", "required": ["attempts", "attempts_made"], "properties": {
                    "attempts": {"type": "array", "maxItems": 50, "items": schema("Attempt")},
                    "attempts_made": {"type": "integer", "minimum": 0},
                }},
            ],
        },
        "EventTypeList": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": {
                "type": "object",
                "required": ["type", "description", "schema"],
                "properties": {
                    "type": schema("EventType"),
                    "description": {"type": "string"},
                    "schema": {"type": "object", "description": "JSON Schema of the event's `data`."},
                },
            }}},
        },
    })
}

// ---- agents

fn register_agent() -> Value {
    Op::new(
        "agents",
        "registerAgent",
        "Register an agent",
        Auth::Registration,
    )
    .describe(
        "Registers a `connected` agent that takes jobs from `queues`. Keep the \
             `access_token`: it authenticates every later agent call. Send a heartbeat (or a \
             ping) at least every `heartbeat_interval_s`; after `agents.lost_after_s` (default \
             90) without one the agent is `lost`.",
    )
    .body("RegisterAgentRequest", true, "The agent.")
    .json(201, "The agent and its access token.", "AgentRegistration")
    .errors(&[400, 401, 413, 422, 503])
    .done()
}

fn ping() -> Value {
    Op::new("agents", "ping", "Wait for a job (long poll)", Auth::Agent)
        .describe(
            "Long poll. Answers 200 with the job as soon as one is assigned to this agent (at \
             once if one already is), or 204 when `wait` seconds pass with none (or the agent \
             is disconnected meanwhile). A parked ping costs no database query per second. A \
             ping also counts as a heartbeat.\n\n\
             The agent then calls `PUT /v1/jobs/{id}/accept` within `dispatch.accept_timeout_s` \
             (default 30), else the job returns to `scheduled` and may go to another agent. \
             A job still `assigned` may be returned again by a later ping: accept it by its id.",
        )
        .param(json!({
            "name": "wait",
            "in": "query",
            "required": false,
            "description": "Seconds to wait for a job, 0 to `ping_wait_max_s` (default 30). \
                Omitted: the smaller of 20 and `ping_wait_max_s`. Above the maximum or not an \
                integer is 422.",
            "schema": {"type": "integer", "minimum": 0, "maximum": 30, "default": 20},
        }))
        .json(200, "A job was assigned to this agent.", "PingResponse")
        .empty(204, "No job within `wait` seconds. Ping again.")
        .errors(&[401, 422, 503])
        .done()
}

fn heartbeat() -> Value {
    Op::new("agents", "heartbeat", "Heartbeat", Auth::Agent)
        .describe("Keeps the agent `connected`. Recorded in memory and written in batches.")
        .json(200, "Received.", "HeartbeatResponse")
        .errors(&[401, 503])
        .done()
}

fn disconnect() -> Value {
    Op::new("agents", "disconnect", "Disconnect", Auth::Agent)
        .describe(
            "The agent becomes `disconnected` (event `agent.disconnected`) and its access token \
             stops working. A parked ping answers 204.",
        )
        .empty(204, "Disconnected.")
        .errors(&[401, 503])
        .done()
}

const IDEMPOTENT: &str = "\n\nRepeating a call that already took effect returns 200 with the \
same job, so retries after a timeout are safe. A transition that does not fit the job's \
state is 409 (`invalid_transition`). A job not assigned to this agent (or of another org, \
or a malformed id) is 404.";

fn job_call(id: &str, summary: &str, text: &str) -> Op {
    Op::new("agents", id, summary, Auth::Agent)
        .describe(&format!("{text}{IDEMPOTENT}"))
        .param(param("JobId"))
        .json(200, "The job.", "Job")
        .error(
            404,
            "The job is not assigned to this agent, or does not exist (`not_found`).",
        )
        .error(
            409,
            "The transition does not fit the job's state (`invalid_transition`, `conflict`).",
        )
        .errors(&[401, 503])
}

fn accept_job() -> Value {
    job_call(
        "acceptJob",
        "Accept an assigned job",
        "`assigned` → `accepted`. The first accepted job of a build makes the build `running`.",
    )
    .done()
}

fn start_job() -> Value {
    job_call(
        "startJob",
        "Start an accepted job",
        "`accepted` → `running` (event `job.started`).",
    )
    .done()
}

fn finish_job() -> Value {
    job_call(
        "finishJob",
        "Finish a job",
        "`running` (or `accepted`, or `canceling`) → `passed` when `exit_status` is 0, \
         `failed` otherwise; a `canceling` job becomes `canceled`. Event `job.finished`. \
         Repeating it with the same `exit_status` returns the job; a different \
         `exit_status` for a finished job is 409.",
    )
    .body("FinishJobRequest", true, "The command's exit status.")
    .errors(&[400, 413, 422])
    .done()
}

// ------------------------------------------------------------------ schemas

fn schemas() -> Value {
    let mut all = Map::new();
    for part in [
        common_schemas(),
        enum_schemas(),
        operator_schemas(),
        build_schemas(),
        agent_schemas(),
        webhook_schemas(),
        webhook_control_schemas(),
        overview_schemas(),
    ] {
        if let Value::Object(m) = part {
            all.extend(m);
        }
    }
    Value::Object(all)
}

fn common_schemas() -> Value {
    json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "pattern": "^[a-z][a-z0-9_]*$",
                        "description": "Stable, machine-readable: `invalid_json`, `invalid_body`, \
                            `invalid_cursor`, `unauthorized`, `forbidden`, `not_found`, \
                            `conflict`, `invalid_transition`, `payload_too_large`, \
                            `validation_failed`, `invalid_build`, `invalid_url`, \
                            `rate_limited`, `unavailable`, `method_not_allowed`.",
                    },
                    "message": {"type": "string", "description": "A human sentence."},
                },
            }},
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "checks"],
            "properties": {
                "ready": {"type": "boolean"},
                "checks": {
                    "type": "object",
                    "description": "Each dependency and role of the process: `ok`, or what is wrong.",
                    "additionalProperties": {"type": "string", "minLength": 1},
                },
            },
            "example": {"ready": true, "checks": {"database:primary": "ok", "broker": "ok", "role:api": "ok"}},
        },
    })
}

fn enum_schemas() -> Value {
    json!({
        "JobState": {
            "type": "string",
            "enum": ["waiting", "scheduled", "assigned", "accepted", "running", "passed",
                     "failed", "canceling", "canceled", "skipped"],
            "description": "`waiting` (dependencies not done) → `scheduled` → `assigned` → \
                `accepted` → `running` → `passed` | `failed`; also `canceling` (canceled while \
                accepted or running, until the agent finishes it), `canceled`, `skipped` (a \
                dependency failed or was canceled). An assignment not accepted within \
                `dispatch.accept_timeout_s` returns to `scheduled`. Terminal: `passed`, \
                `failed`, `canceled`, `skipped`.",
        },
        "BuildState": {
            "type": "string",
            "enum": ["scheduled", "running", "passed", "failed", "canceled"],
            "description": "`scheduled` → `running` (first job accepted) → `passed` (every job \
                passed) | `failed` (all jobs terminal, one failed) | `canceled`.",
        },
        "AgentState": {
            "type": "string",
            "enum": ["connected", "lost", "disconnected"],
            "description": "`connected` → `lost` (no heartbeat for `agents.lost_after_s`) | \
                `disconnected`. A lost agent's accepted or running jobs become `failed` with \
                `exit_status: -1`.",
        },
        "EventType": {
            "type": "string",
            "enum": ["build.scheduled", "build.running", "build.finished", "job.scheduled",
                     "job.assigned", "job.started", "job.canceling", "job.finished", "agent.connected",
                     "agent.lost", "agent.disconnected", "webhook.disabled"],
        },
        "EventPattern": {
            "type": "string",
            "minLength": 1,
            "pattern": "^(\\*|[a-z_]+\\.(\\*|[a-z_]+))$",
            "description": "An event type (`build.finished`), a prefix pattern (`build.*`, \
                `job.*`, `agent.*`), or `*` for every event.",
            "example": "job.*",
        },
        "DeliveryStatus": {
            "type": "string",
            "enum": ["pending", "succeeded", "failed", "dead", "skipped"],
        },
        "NotificationTypeName": {
            "type": "string",
            "enum": ["webhook", "github_commit_status"],
        },
        "NotificationMode": {
            "type": "string",
            "enum": ["enabled", "paused", "disabled"],
            "description": "`enabled` delivers; `paused` holds every notification, losing none; \
                `disabled` skips new notifications (recorded as `skipped`, not delivered later).",
        },
    })
}

fn operator_schemas() -> Value {
    json!({
        "CreateOrgRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["slug"],
            "properties": {"slug": slug_schema("The org's slug, unique in the installation.")},
            "example": {"slug": "acme"},
        },
        "Org": {
            "type": "object",
            "description": "A new org with its tokens, shown only in the creation response.",
            "required": ["id", "slug", "api_token", "agent_token"],
            "properties": {
                "id": uuid("The org's id."),
                "slug": {"type": "string"},
                "api_token": {"type": "string", "description": "The org's API token (`hrd_api_...`). Shown once."},
                "agent_token": {"type": "string", "description": "Registers agents (`hrd_reg_...`). Shown once."},
            },
        },
        "NotificationType": {
            "type": "object",
            "required": ["type", "mode", "rate_per_s", "burst", "updated_at", "reason"],
            "properties": {
                "type": schema("NotificationTypeName"),
                "mode": schema("NotificationMode"),
                "rate_per_s": {"type": "number", "description": "Sustained sends per second across the installation."},
                "burst": {"type": "integer", "description": "Token-bucket size."},
                "updated_at": time("When this row last changed."),
                "reason": {"type": "string", "description": "Why, as given by the last change."},
            },
        },
        "NotificationTypeList": items_of("NotificationType", "Every notification type."),
        "PutNotificationTypeRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["mode", "reason"],
            "properties": {
                "mode": schema("NotificationMode"),
                "rate_per_s": {"type": "number", "nullable": true, "minimum": crate::routes::ops::MIN_RATE,
                    "maximum": crate::routes::ops::MAX_RATE, "description": "Omitted: unchanged."},
                "burst": {"type": "integer", "nullable": true, "minimum": 1, "maximum": crate::routes::ops::MAX_BURST,
                    "description": "Omitted: unchanged."},
                "reason": {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": NOTE,
                    "description": "Why; surrounding white space is trimmed."},
            },
            "example": {"mode": "paused", "reason": "receiver maintenance"},
        },
        "Queue": {
            "type": "object",
            "required": ["name", "depth", "oldest_age_s"],
            "properties": {
                "name": {"type": "string", "example": "webhook.pending"},
                "depth": {"type": "integer", "nullable": true,
                    "description": "Messages or rows waiting; `null` when unknown."},
                "oldest_age_s": {"type": "number", "nullable": true,
                    "description": "Age of the oldest waiting item in seconds; `null` when empty or unknown."},
            },
        },
        "QueueList": items_of("Queue", "Every backlog."),
        "ReplayRequest": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "type": {"type": "string", "nullable": true,
                    "enum": ["webhook", "github_commit_status", null],
                    "description": "Omitted or null: every type."},
                "limit": {"type": "integer", "nullable": true, "minimum": 1, "maximum": 100_000,
                    "default": 1000, "description": "At most this many of each type."},
            },
        },
        "ReplayResponse": {
            "type": "object",
            "required": ["replayed"],
            "properties": {"replayed": {"type": "integer", "minimum": 0}},
        },
    })
}

fn slug_schema(description: &str) -> Value {
    json!({
        "type": "string",
        "pattern": "^[a-z0-9][a-z0-9-]{0,63}$",
        "description": format!("{description} 1-64 lower-case letters, digits or dashes, starting with a letter or digit."),
    })
}

fn build_schemas() -> Value {
    let mut m = json!({
        "CreatePipelineRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["slug", "repository"],
            "properties": {
                "slug": slug_schema("Unique within the org."),
                "repository": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
                    "maxLength": 200, "description": "`owner/name`, as GitHub spells it."},
            },
            "example": {"slug": "web", "repository": "acme/web"},
        },
        "Pipeline": {
            "type": "object",
            "required": ["id", "slug", "repository", "created_at"],
            "properties": {
                "id": uuid("The pipeline's id."),
                "slug": {"type": "string"},
                "repository": {"type": "string"},
                "created_at": time("When it was created."),
            },
        },
        "PutGithubRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["token"],
            "properties": {
                "api_url": {"type": "string", "format": "uri", "default": "https://api.github.com",
                    "maxLength": 2048, "pattern": "^https?://[^\\s\\u0000-\\u001F\\u007F-\\u009F]+$",
                    "description": "GitHub's (or GitHub Enterprise's) API base URL, http or https."},
                "token": {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": ONE_LINE_TRIMMED,
                    "description": "A token allowed to create commit statuses; surrounding white \
                        space is trimmed. Never shown again."},
                "job_statuses": {"type": "boolean", "default": false,
                    "description": "Also post one status per job."},
            },
            "example": {"api_url": "https://api.github.com", "token": "ghp_...", "job_statuses": false},
        },
        "GithubIntegration": {
            "type": "object",
            "required": ["pipeline", "repository", "api_url", "job_statuses", "updated_at"],
            "properties": {
                "pipeline": {"type": "string"},
                "repository": {"type": "string"},
                "api_url": {"type": "string"},
                "job_statuses": {"type": "boolean"},
                "updated_at": time("When the settings last changed."),
            },
        },
        "FinishJobRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["exit_status"],
            "properties": {"exit_status": {"type": "integer", "format": "int32",
                "description": "0 passes the job; anything else fails it."}},
            "example": {"exit_status": 0},
        },
    });
    let extra = [
        ("NewJob", new_job_schema()),
        ("CreateBuildRequest", create_build_schema()),
        ("Job", job_schema()),
        ("Build", build_schema()),
        (
            "BuildList",
            list_of("Build", "A page of builds (without `jobs`)."),
        ),
    ];
    for (name, s) in extra {
        m[name] = s;
    }
    m
}

fn new_job_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["key"],
        "properties": {
            "key": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,100}$",
                "description": "Unique within the build."},
            "command": {"type": "string", "default": "", "maxLength": MAX_COMMAND_CHARS,
                "pattern": NO_NUL, "description": "What the agent runs; at most 65,536 characters."},
            "queue": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$", "default": "default",
                "description": "Only agents listening on this queue get the job."},
            "depends_on": {"type": "array", "default": [], "maxItems": crate::MAX_JOBS,
                "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,100}$"},
                "description": "Keys of jobs of this build that must pass first."},
            "priority": {"type": "integer", "format": "int32", "default": 0,
                "minimum": i32::MIN, "maximum": i32::MAX,
                "description": "Higher runs first; ties go to the longest scheduled."},
            "label": {"type": "string", "nullable": true, "maxLength": MAX_LABEL_CHARS, "pattern": NO_NUL},
            "env": {"type": "object", "default": {}, "maxProperties": MAX_ENV_VARS,
                "additionalProperties": {"type": "string", "maxLength": MAX_ENV_CHARS, "pattern": NO_NUL},
                "description": format!("Environment variables for the command. Names are 1-{MAX_ENV_NAME_CHARS} \
                    bytes without `=` or control characters; names and values total at most \
                    {MAX_ENV_CHARS} bytes.")},
        },
    })
}

fn create_build_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["commit", "jobs"],
        "properties": {
            "commit": {"type": "string", "pattern": "^[0-9a-fA-F]{40}$",
                "description": "The full commit SHA; stored lower-case."},
            "branch": {"type": "string", "default": "main", "minLength": 1, "maxLength": 255,
                "pattern": ONE_LINE,
                "description": "Without control characters."},
            "message": {"type": "string", "nullable": true, "maxLength": MAX_MESSAGE_CHARS, "pattern": NO_NUL},
            "jobs": {"type": "array", "minItems": 1, "maxItems": 500, "items": schema("NewJob"),
                "description": "Unique keys, known dependencies, no cycles."},
        },
        "example": {
            "commit": "4f2c1d9e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e",
            "branch": "main",
            "message": "Fix the login page",
            "jobs": [
                {"key": "build", "command": "make build"},
                {"key": "test", "command": "make test", "queue": "default",
                 "depends_on": ["build"], "priority": 0, "label": "Unit tests"},
            ],
        },
    })
}

fn job_schema() -> Value {
    json!({
        "type": "object",
        "required": ["id", "build_id", "key", "label", "command", "queue", "priority", "state",
                     "depends_on", "agent_id", "exit_status", "env", "created_at",
                     "scheduled_at", "assigned_at", "accepted_at", "started_at", "finished_at"],
        "properties": {
            "id": uuid("The job's id."),
            "build_id": uuid("Its build."),
            "key": {"type": "string"},
            "label": {"type": "string", "nullable": true},
            "command": {"type": "string"},
            "queue": {"type": "string"},
            "priority": {"type": "integer", "format": "int32"},
            "state": schema("JobState"),
            "depends_on": {"type": "array", "items": {"type": "string"},
                "description": "Keys of the jobs it depends on."},
            "agent_id": nullable(uuid("The agent it is or was assigned to.")),
            "exit_status": {"type": "integer", "format": "int32", "nullable": true,
                "description": "Set when finished; -1 when its agent was lost."},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "created_at": time("When the build was created."),
            "scheduled_at": nullable(time("When it last became runnable.")),
            "assigned_at": nullable(time("When it was last assigned.")),
            "accepted_at": nullable(time("When its agent accepted it.")),
            "started_at": nullable(time("When its agent started it.")),
            "finished_at": nullable(time("When it became terminal.")),
        },
    })
}

fn build_schema() -> Value {
    json!({
        "type": "object",
        "required": ["id", "number", "state", "commit", "branch", "message", "pipeline",
                     "repository", "created_at", "started_at", "finished_at", "canceled"],
        "properties": {
            "id": uuid("The build's id."),
            "number": {"type": "integer", "minimum": 1, "description": "Counts up per pipeline from 1."},
            "state": schema("BuildState"),
            "commit": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
            "branch": {"type": "string"},
            "message": {"type": "string", "nullable": true},
            "pipeline": {"type": "string", "description": "The pipeline's slug."},
            "repository": {"type": "string", "description": "`owner/name`."},
            "created_at": time("When it was created."),
            "started_at": nullable(time("When its first job was accepted.")),
            "finished_at": nullable(time("When it became terminal.")),
            "canceled": {"type": "boolean", "description": "Whether a cancel was requested."},
            "jobs": {"type": "array", "items": schema("Job"),
                "description": "Present on create, get and cancel; absent in lists."},
        },
    })
}

fn agent_schemas() -> Value {
    json!({
        "RegisterAgentRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": ONE_LINE_TRIMMED,
                    "description": "Without control characters; surrounding white space is trimmed."},
                "queues": {"type": "array", "minItems": 1, "maxItems": 32, "default": ["default"],
                    "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
                    "description": "Queues it takes jobs from."},
            },
            "example": {"name": "ci-1", "queues": ["default"]},
        },
        "AgentRegistration": {
            "type": "object",
            "required": ["id", "name", "queues", "state", "access_token", "heartbeat_interval_s",
                         "ping_wait_max_s"],
            "properties": {
                "id": uuid("The agent's id."),
                "name": {"type": "string"},
                "queues": {"type": "array", "items": {"type": "string"}},
                "state": schema("AgentState"),
                "access_token": {"type": "string",
                    "description": "Authenticates the agent's calls (`hrd_agt_...`). Shown once."},
                "heartbeat_interval_s": {"type": "integer", "description": "Heartbeat at least this often (default 30)."},
                "ping_wait_max_s": {"type": "integer", "description": "The largest `wait` a ping accepts (default 30)."},
            },
        },
        "Agent": {
            "type": "object",
            "description": "An agent, as events show it.",
            "required": ["id", "name", "queues", "state", "connected_at", "last_heartbeat_at"],
            "properties": {
                "id": uuid("The agent's id."),
                "name": {"type": "string"},
                "queues": {"type": "array", "items": {"type": "string"}},
                "state": schema("AgentState"),
                "connected_at": time("When it registered."),
                "last_heartbeat_at": time("Its last heartbeat or ping."),
            },
        },
        "AssignedJob": {
            "type": "object",
            "description": "What an agent needs to run a job.",
            "required": ["id", "build_id", "key", "command", "queue", "state", "env"],
            "properties": {
                "id": uuid("The job's id: accept, start and finish it by this."),
                "build_id": uuid("Its build."),
                "key": {"type": "string"},
                "label": {"type": "string", "nullable": true},
                "command": {"type": "string"},
                "queue": {"type": "string"},
                "priority": {"type": "integer", "format": "int32"},
                "state": {"type": "string", "enum": ["assigned"]},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "scheduled_at": nullable(time("When it became runnable.")),
                "assigned_at": nullable(time("When it was assigned to this agent.")),
            },
        },
        "PingResponse": {
            "type": "object",
            "required": ["job"],
            "properties": {"job": schema("AssignedJob")},
        },
        "HeartbeatResponse": {
            "type": "object",
            "required": ["received_at"],
            "properties": {"received_at": time("When Herald received it.")},
        },
    })
}

fn webhook_schemas() -> Value {
    let mut m = json!({
        "CreateWebhookRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["url", "events"],
            "properties": {
                "url": {"type": "string", "format": "uri", "maxLength": 2048, "pattern": ONE_LINE,
                    "description": "http or https."},
                "events": {"type": "array", "minItems": 1, "maxItems": 50, "items": schema("EventPattern")},
                "pipeline": {"type": "string", "nullable": true, "pattern": "^[a-z0-9][a-z0-9-]{0,63}$",
                    "description": "Only events of this pipeline's builds (agent events carry no \
                        pipeline and are not sent). Omitted: every event of the org."},
            },
            "example": {"url": "https://ci.example.com/herald", "events": ["build.finished", "job.*"], "pipeline": "web"},
        },
        "Webhook": {
            "type": "object",
            "required": ["id", "url", "events", "pipeline", "enabled", "disabled_reason",
                         "rate_per_s", "created_at"],
            "properties": {
                "id": uuid("The webhook's id."),
                "url": {"type": "string"},
                "events": {"type": "array", "items": schema("EventPattern")},
                "pipeline": {"type": "string", "nullable": true},
                "enabled": {"type": "boolean", "description": "False once disabled (see \
                    `disabled_reason`): its deliveries are then recorded `skipped`. \
                    `PATCH {\"enabled\": true}` enables it again."},
                "disabled": {"type": "boolean", "description": "`!enabled`, the v1 name."},
                "disabled_reason": {"type": "string", "nullable": true,
                    "enum": ["gone", "failing", "manual", null],
                    "description": "`gone`: the receiver answered 410. `failing`: every attempt \
                        failed for `webhooks.disable_after_s` (5 days) and at least \
                        `webhooks.disable_min_failures` (20) attempts. `manual`: \
                        `PATCH {\"enabled\": false}`. `null` while enabled."},
                "rate_per_s": {"type": "number", "nullable": true, "exclusiveMinimum": true, "minimum": 0,
                    "description": "The endpoint's own rate limit, on top of the global \
                        per-endpoint and per-host limits; `null`: the global per-endpoint limit only."},
                "created_at": time("When it was created."),
            },
        },
        "WebhookCreated": {
            "allOf": [
                schema("Webhook"),
                {"type": "object", "required": ["secret"], "properties": {"secret": {
                    "type": "string",
                    "pattern": "^whsec_[A-Za-z0-9+/]+={0,2}$",
                    "description": "`whsec_<base64>`: the signing key is the base64-decoded part. Shown once.",
                }}},
            ],
        },
        "WebhookList": list_of("Webhook", "A page of webhooks."),
        "Delivery": {
            "type": "object",
            "required": ["id", "event_id", "event_type", "status", "attempts", "last_status_code",
                         "last_error", "created_at", "updated_at"],
            "properties": {
                "id": uuid("The delivery's id; sent as `webhook-id`."),
                "webhook_id": uuid("Its webhook."),
                "event_id": uuid("The event."),
                "event_type": schema("EventType"),
                "status": schema("DeliveryStatus"),
                "attempts": {"type": "integer", "minimum": 0},
                "last_status_code": {"type": "integer", "nullable": true,
                    "description": "The receiver's last HTTP status; `null` before any response."},
                "last_error": {"type": "string", "nullable": true},
                "next_attempt_at": nullable(time("When the next attempt is due.")),
                "created_at": time("When it was created."),
                "updated_at": time("When it last changed."),
            },
        },
        "DeliveryList": list_of("Delivery", "A page of deliveries."),
        "RedeliverResponse": {
            "type": "object",
            "required": ["id", "status"],
            "properties": {
                "id": uuid("The delivery's id."),
                "status": {"type": "string", "enum": ["pending"]},
            },
        },
    });
    m["WebhookEvent"] = webhook_event_schema();
    m
}

fn webhook_event_schema() -> Value {
    json!({
        "type": "object",
        "description": "The body of a webhook delivery.",
        "required": ["type", "timestamp", "data"],
        "properties": {
            "id": uuid("The event's id."),
            "type": schema("EventType"),
            "timestamp": time("When the event happened."),
            "org_id": uuid("The org."),
            "data": {
                "type": "object",
                "description": "`build` for build and job events (for `build.finished` its \
                    `state` is the final state); `job` too for job events; `agent` for agent \
                    events.",
                "properties": {
                    "build": schema("Build"),
                    "job": schema("Job"),
                    "agent": schema("Agent"),
                },
            },
        },
        "example": {
            "type": "build.finished",
            "timestamp": "2024-05-01T12:00:00Z",
            "data": {"build": {"id": "0190c8e4-5b1e-7d3a-9f00-6a2b3c4d5e6f", "number": 7,
                               "state": "passed", "pipeline": "web"}},
        },
    })
}

// ------------------------------------------------------------------ the on-call page

fn ops_overview() -> Value {
    Op::new(
        "operator",
        "opsOverview",
        "Everything the on-call page shows",
        Auth::Admin,
    )
    .describe(
        "One call with what `GET /ops` shows, refreshed by the page every 1.5 s. The API \
             runs no dispatch or notification work, so those roles' figures come from the \
             database: each dispatcher and each throttle writes its figures every 2 s (a \
             process silent for 30 s is left out); deliveries/s and failures/s count the \
             webhook attempts of the last 60 s; queues are those of `GET /v1/ops/queues`; the \
             notification types are read from the primary, the rest from the replica. \
             `dispatch.p99_ms` is the worst of the dispatchers' p99s over the last minute of \
             runnable → assigned times (jobs that waited for a free agent excluded), and \
             `p50_ms` their p50s weighted by jobs assigned; both are `null` when nothing was \
             assigned, and `healthy` is then true.",
    )
    .json(200, "The overview.", "OpsOverview")
    .errors(&[401, 403, 503])
    .done()
}

fn ops_page() -> Value {
    Op::new("operator", "opsPage", "The on-call page", Auth::None)
        .describe(
            "An HTML page embedded in the binary (no asset from elsewhere). It has no login of \
             its own: it asks for the admin token (or reads it from the fragment \
             `#token=...`, which it then clears), keeps it in the tab's sessionStorage and \
             calls `GET /v1/ops/overview`, `PUT /v1/ops/notification-types/{type}` and `POST \
             /v1/ops/dead-letters/replay` with it as Bearer. Served only by the api role.",
        )
        .respond(
            200,
            json!({
                "description": "The page.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }),
        )
        .done()
}

fn overview_schemas() -> Value {
    let num = |d: &str| json!({"type": "number", "nullable": true, "description": d});
    json!({
        "OpsOverview": {
            "type": "object",
            "required": ["generated_at", "dispatch", "queues", "notification_types", "throttle",
                         "webhooks", "dead_letters", "disabled_endpoints"],
            "properties": {
                "generated_at": time("When the figures were read."),
                "dispatch": {
                    "type": "object",
                    "properties": {
                        "healthy": {"type": "boolean", "description": "`p99_ms` is within `target_p99_ms` (or nothing was assigned)."},
                        "p50_ms": num("Median runnable → assigned time, last minute."),
                        "p99_ms": num("99th percentile, last minute: the worst dispatcher's."),
                        "target_p99_ms": {"type": "number"},
                        "assigned_last_minute": {"type": "number"},
                        "window_s": {"type": "integer"},
                        "dispatchers": {"type": "integer", "description": "Dispatchers reporting."},
                    },
                },
                "queues": {"type": "array", "items": schema("Queue")},
                "notification_types": {"type": "array", "items": schema("NotificationType")},
                "throttle": {
                    "type": "object",
                    "properties": {
                        "factor": num("The lowest factor of the notify processes (1 = not throttled); `null` when none reports."),
                        "engaged": {"type": "boolean"},
                        "signals": {
                            "type": "object", "nullable": true,
                            "description": "What that throttle last saw.",
                            "properties": {
                                "dispatch_latency_ms": num("Dispatch's assignment latency."),
                                "query_latency_ms": num("A probe query's latency."),
                                "lock_waiters": {"type": "integer"},
                            },
                        },
                        "processes": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "webhooks": {
                    "type": "object",
                    "properties": {
                        "window_s": {"type": "number"},
                        "deliveries_per_s": {"type": "number", "description": "2xx attempts per second."},
                        "failures_per_s": {"type": "number", "description": "Other attempts (errors, timeouts) per second."},
                        "dead_letters": {"type": "integer"},
                    },
                },
                "dead_letters": {
                    "type": "object",
                    "properties": {
                        "webhook": {"type": "integer"},
                        "github_commit_status": {"type": "integer"},
                    },
                },
                "disabled_endpoints": {
                    "type": "array",
                    "description": "Webhooks disabled in the last 24 h, newest first, at most 100.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": uuid("The webhook."),
                            "org": {"type": "string", "description": "The org's slug."},
                            "url": {"type": "string"},
                            "reason": {"type": "string", "nullable": true},
                            "disabled_at": time("When it was disabled."),
                        },
                    },
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every endpoint of the contract, plus health, metrics, this document and
    /// `GET /v1/pipelines/{slug}`.
    const ENDPOINTS: &[(&str, &str)] = &[
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("post", "/v1/orgs"),
        ("get", "/v1/ops/notification-types"),
        ("put", "/v1/ops/notification-types/{type}"),
        ("get", "/v1/ops/queues"),
        ("post", "/v1/ops/dead-letters/replay"),
        ("get", "/v1/ops/overview"),
        ("get", "/ops"),
        ("post", "/v1/pipelines"),
        ("get", "/v1/pipelines/{slug}"),
        ("put", "/v1/pipelines/{slug}/github"),
        ("post", "/v1/pipelines/{slug}/builds"),
        ("get", "/v1/builds"),
        ("get", "/v1/builds/{id}"),
        ("post", "/v1/builds/{id}/cancel"),
        ("post", "/v1/webhooks"),
        ("get", "/v1/webhooks"),
        ("get", "/v1/webhooks/{id}"),
        ("delete", "/v1/webhooks/{id}"),
        ("get", "/v1/webhooks/{id}/deliveries"),
        ("post", "/v1/deliveries/{id}/redeliver"),
        ("patch", "/v1/webhooks/{id}"),
        ("post", "/v1/webhooks/{id}/rotate-secret"),
        ("post", "/v1/webhooks/{id}/recover"),
        ("get", "/v1/deliveries/{id}"),
        ("get", "/v1/event-types"),
        ("post", "/v1/agents/register"),
        ("post", "/v1/agent/ping"),
        ("post", "/v1/agent/heartbeat"),
        ("post", "/v1/agent/disconnect"),
        ("put", "/v1/jobs/{id}/accept"),
        ("put", "/v1/jobs/{id}/start"),
        ("put", "/v1/jobs/{id}/finish"),
        ("get", "/v1/jobs/{id}"),
        ("post", "/v1/jobs/{id}/retry"),
    ];

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if METHODS.contains(&method.as_str()) {
                    out.push((method.clone(), path.clone(), op.clone()));
                }
            }
        }
        out
    }

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "$ref" {
                        out.push(v.as_str().expect("$ref is a string").to_owned());
                    } else {
                        refs(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// Every operation the router serves has its written text, under the path and
    /// method the router serves it at, and no written operation is left unrouted.
    #[test]
    fn every_routed_operation_is_written_and_every_written_one_routed() {
        let routed = routed();
        assert!(routed.len() > 30, "the router's table is read: {routed:?}");
        let texts: BTreeSet<(String, String, String)> = operations_of(&written())
            .into_iter()
            .map(|(p, m, op)| (op["operationId"].as_str().expect("id").to_owned(), p, m))
            .collect();
        let served: BTreeSet<(String, String, String)> = routed
            .iter()
            .map(|(p, m, op)| {
                let id = op["operationId"].as_str().expect("an operation_id");
                (id.to_owned(), p.clone(), m.clone())
            })
            .collect();
        let unwritten: Vec<_> = served.difference(&texts).collect();
        assert!(unwritten.is_empty(), "routed without text: {unwritten:?}");
        let unrouted: Vec<_> = texts.difference(&served).collect();
        assert!(unrouted.is_empty(), "written but not routed: {unrouted:?}");
        // So the served document says all the written one says, and nothing else.
        assert_eq!(document(), written());
    }

    /// A route added to the router is in the document even before its text is
    /// written: the paths come from the router, not from the text.
    #[test]
    fn a_routed_operation_is_in_the_document_by_construction() {
        let mut routed = routed();
        routed.push((
            "/v1/new".into(),
            "get".into(),
            json!({"operationId": "brandNew", "responses": {}}),
        ));
        let doc = build(&routed);
        assert_eq!(doc["paths"]["/v1/new"]["get"]["operationId"], "brandNew");
        // And one the router drops is gone from it.
        routed.retain(|(p, _, _)| p != "/v1/ops/queues");
        assert!(build(&routed)["paths"].get("/v1/ops/queues").is_none());
    }

    /// Each request body's written schema has exactly the fields, and the required
    /// fields, of the Rust type the handler parses (its `ToSchema`, from its serde
    /// attributes): a field added to a request type fails here until it is written.
    #[test]
    fn written_request_bodies_have_the_fields_of_the_rust_types() {
        let api = serde_json::to_value(crate::routed_operations()).expect("serializes");
        let generated = &api["components"]["schemas"];
        let doc = document();
        let written = &doc["components"]["schemas"];
        let body = |op: &Value| {
            op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .and_then(|r| r.rsplit('/').next())
                .map(str::to_owned)
        };
        // The jobs of a build, a domain type.
        let mut pairs = vec![("RawJob".to_owned(), "NewJob".to_owned())];
        for (path, method, op) in operations_of(&api) {
            let Some(rust) = body(&op) else { continue };
            let text = body(&doc["paths"][&path][&method])
                .unwrap_or_else(|| panic!("{method} {path} has no written body"));
            pairs.push((rust, text));
        }
        assert!(pairs.len() >= 13, "{pairs:?}");
        let names = |v: &Value| -> BTreeSet<String> {
            match v {
                Value::Object(m) => m.keys().cloned().collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                _ => BTreeSet::new(),
            }
        };
        for (rust, text) in pairs {
            let (g, w) = (&generated[&rust], &written[&text]);
            assert!(g.is_object(), "{rust} is generated");
            assert_eq!(
                names(&g["properties"]),
                names(&w["properties"]),
                "fields of {rust} and {text}"
            );
            assert_eq!(
                names(&g["required"]),
                names(&w["required"]),
                "required fields of {rust} and {text}"
            );
            // `deny_unknown_fields`.
            assert_eq!(w["additionalProperties"], json!(false), "{text}");
        }
    }

    /// The limits the domain enforces are stated in the schemas.
    #[test]
    fn states_the_domain_limits() {
        let doc = document();
        let s = &doc["components"]["schemas"];
        let job = &s["NewJob"]["properties"];
        assert_eq!(job["timeout_s"]["minimum"], 1);
        assert_eq!(job["timeout_s"]["maximum"], 86400);
        assert_eq!(job["command"]["maxLength"], MAX_COMMAND_CHARS);
        assert_eq!(job["command"]["pattern"], NO_NUL);
        assert_eq!(job["env"]["maxProperties"], MAX_ENV_VARS);
        let rule = &job["retry"]["properties"]["automatic"]["items"]["properties"]["limit"];
        assert_eq!(
            (rule["minimum"].clone(), rule["maximum"].clone()),
            (json!(1), json!(10))
        );
        let build = &s["CreateBuildRequest"]["properties"];
        assert_eq!(build["branch"]["maxLength"], 255);
        assert_eq!(build["branch"]["pattern"], ONE_LINE);
        assert_eq!(build["jobs"]["maxItems"], crate::MAX_JOBS);
        assert_eq!(build["message"]["maxLength"], MAX_MESSAGE_CHARS);
        let put = &s["PutNotificationTypeRequest"]["properties"];
        assert_eq!(put["rate_per_s"]["minimum"], crate::routes::ops::MIN_RATE);
        assert_eq!(put["rate_per_s"]["maximum"], crate::routes::ops::MAX_RATE);
        assert_eq!(put["burst"]["maximum"], crate::routes::ops::MAX_BURST);
        assert_eq!(
            s["RegisterAgentRequest"]["properties"]["name"]["pattern"],
            ONE_LINE_TRIMMED
        );
        assert_eq!(put["reason"]["pattern"], NOTE);
        let key = doc["paths"]["/v1/pipelines/{slug}/builds"]["post"]["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "Idempotency-Key"))
            .cloned()
            .expect("Idempotency-Key");
        assert_eq!(
            (
                key["schema"]["minLength"].clone(),
                key["schema"]["maxLength"].clone()
            ),
            (json!(1), json!(255))
        );
        assert!(
            doc["components"]["responses"]["PayloadTooLarge"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("64 MiB"))
        );
    }

    /// A string the trimmed fields' patterns allow is one the server accepts, and the
    /// other way round (`\u{b}` alone was a schema-valid reason that got a 422).
    #[test]
    fn trimmed_patterns_agree_with_the_server() {
        let note = regex::Regex::new(NOTE).expect("NOTE compiles");
        let one_line = regex::Regex::new(ONE_LINE_TRIMMED).expect("ONE_LINE_TRIMMED compiles");
        let samples = (0u32..0x3100)
            .filter_map(char::from_u32)
            .map(|c| c.to_string())
            .chain(["  a ", "\u{b}\u{b}", " \u{a0} ", "a\0"].map(String::from));
        for s in samples {
            assert_eq!(
                note.is_match(&s),
                herald_domain::note("reason", &s, 1000).is_ok(),
                "reason {s:?}"
            );
            let trimmed = s.trim();
            let server = herald_domain::line("name", trimmed, 255).is_ok()
                && !s.chars().any(char::is_control);
            assert_eq!(one_line.is_match(&s), server, "name {s:?}");
        }
    }

    #[test]
    fn serializes_and_is_openapi_3() {
        let doc = document();
        let text = serde_json::to_string(&doc).expect("serializes");
        let back: Value = serde_json::from_str(&text).expect("round-trips");
        assert_eq!(back, doc);
        let version = doc["openapi"].as_str().expect("openapi is a string");
        assert!(version.starts_with("3."), "{version}");
        assert!(doc["info"]["title"].is_string());
        assert!(doc["info"]["version"].is_string());
    }

    #[test]
    fn every_endpoint_is_documented() {
        let doc = document();
        let documented: BTreeSet<(String, String)> = operations(&doc)
            .into_iter()
            .map(|(m, p, _)| (m, p))
            .collect();
        let wanted: BTreeSet<(String, String)> = ENDPOINTS
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        let missing: Vec<_> = wanted.difference(&documented).collect();
        assert!(missing.is_empty(), "undocumented: {missing:?}");
        let extra: Vec<_> = documented.difference(&wanted).collect();
        assert!(extra.is_empty(), "not in the contract: {extra:?}");
    }

    #[test]
    fn every_ref_resolves() {
        let doc = document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in &all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{r} is not local"));
            assert!(pointer.starts_with("/components/"), "{r}");
            assert!(doc.pointer(pointer).is_some(), "{r} points nowhere");
        }
        // And every schema the brief names exists.
        for name in [
            "Build",
            "Job",
            "Agent",
            "Pipeline",
            "Org",
            "Webhook",
            "WebhookCreated",
            "Delivery",
            "NotificationType",
            "Queue",
            "Error",
            "BuildList",
            "WebhookList",
            "DeliveryList",
            "JobState",
            "BuildState",
            "AgentState",
            "EventType",
            "WebhookEvent",
        ] {
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "schema {name}"
            );
        }
    }

    #[test]
    fn operations_are_well_formed() {
        let doc = document();
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("security schemes");
        let mut ids = BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            let what = format!("{method} {path}");
            let id = op["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{what} has no responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{what} has no success response"
            );
            for requirement in op["security"].as_array().expect("security") {
                for scheme in requirement.as_object().expect("requirement").keys() {
                    assert!(schemes.contains_key(scheme), "{what}: {scheme}");
                }
            }
            let open = path.starts_with("/healthz")
                || path.starts_with("/readyz")
                || path == "/metrics"
                || path == "/openapi.json"
                // The page itself has no login; the calls it makes carry the token.
                || path == "/ops";
            assert_eq!(
                op["security"].as_array().expect("security").is_empty(),
                open,
                "{what}: only health, metrics and the document are open"
            );
            if !open {
                assert!(responses.contains_key("401"), "{what} lacks 401");
                assert!(responses.contains_key("503"), "{what} lacks 503");
            }
            if op.get("requestBody").is_some() {
                for s in ["400", "413", "422"] {
                    assert!(responses.contains_key(s), "{what} lacks {s}");
                }
            }
            // Every `{name}` of the path is a declared path parameter.
            let declared: BTreeSet<String> = op
                .get("parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| match p.get("$ref").and_then(Value::as_str) {
                    Some(r) => doc
                        .pointer(&r[1..])
                        .expect("parameter ref resolves")
                        .clone(),
                    None => p.clone(),
                })
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().expect("name").to_owned())
                .collect();
            let in_path: BTreeSet<String> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .map(str::to_owned)
                .collect();
            assert_eq!(declared, in_path, "{what}: path parameters");
        }
    }

    #[test]
    fn documents_the_contract_details() {
        let doc = document();
        let ping = &doc["paths"]["/v1/agent/ping"]["post"];
        assert!(ping["responses"]["200"].is_object());
        assert!(ping["responses"]["204"].is_object());
        let finish = &doc["paths"]["/v1/jobs/{id}/finish"]["put"];
        for s in ["200", "404", "409"] {
            assert!(finish["responses"][s].is_object(), "finish {s}");
        }
        let admin = &doc["paths"]["/v1/orgs"]["post"];
        assert_eq!(admin["security"], json!([{"AdminToken": []}]));
        assert!(admin["responses"]["403"].is_object());
        assert_eq!(
            doc["paths"]["/v1/agents/register"]["post"]["security"],
            json!([{"AgentRegistrationToken": []}])
        );
        assert!(
            doc["paths"]["/v1/deliveries/{id}/redeliver"]["post"]["responses"]["202"].is_object()
        );
        let limit = &doc["components"]["parameters"]["Limit"]["schema"];
        assert_eq!(limit["default"], 50);
        assert_eq!(limit["maximum"], 500);
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["JobState"]["enum"].as_array().map(Vec::len),
            Some(10)
        );
        assert_eq!(
            schemas["EventType"]["enum"].as_array().map(Vec::len),
            Some(herald_domain::EventType::ALL.len())
        );
        assert_eq!(
            schemas["CreateBuildRequest"]["properties"]["branch"]["default"],
            "main"
        );
        assert_eq!(
            schemas["NewJob"]["properties"]["queue"]["default"],
            "default"
        );
        assert_eq!(
            schemas["RegisterAgentRequest"]["properties"]["queues"]["default"],
            json!(["default"])
        );
        let text = doc.to_string();
        for needle in [
            "webhook-signature",
            "whsec_",
            "herald/{pipeline}",
            "failure",
        ] {
            assert!(text.contains(needle), "{needle}");
        }
    }
}

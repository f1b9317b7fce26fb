-- Herald core schema: orgs, tokens, pipelines, builds, jobs, agents and the outbox.
-- Every hot-path query has an index named for it.

CREATE TABLE orgs (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only SHA-256 hashes of tokens are stored; the plain token is shown once.
CREATE TABLE org_tokens (
    token_hash  bytea PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('api', 'agent_registration')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX org_tokens_org ON org_tokens (org_id);

CREATE TABLE pipelines (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    slug               text NOT NULL,
    repository         text NOT NULL,
    next_build_number  integer NOT NULL DEFAULT 1,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, slug)
);

CREATE TABLE builds (
    id                   uuid PRIMARY KEY,  -- UUIDv7: time-ordered, so keyset pagination by id is newest-first
    org_id               uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    pipeline_id          uuid NOT NULL REFERENCES pipelines(id) ON DELETE CASCADE,
    number               integer NOT NULL,
    state                text NOT NULL,
    commit_sha           text NOT NULL,
    branch               text NOT NULL,
    message              text,
    cancel_requested_at  timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pipeline_id, number)
);
CREATE INDEX builds_org_list ON builds (org_id, id DESC);
CREATE INDEX builds_pipeline_list ON builds (pipeline_id, id DESC);
CREATE INDEX builds_org_state_list ON builds (org_id, state, id DESC);

CREATE TABLE agents (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    name               text NOT NULL,
    queues             text[] NOT NULL,
    state              text NOT NULL,
    token_hash         bytea NOT NULL UNIQUE,
    connected_at       timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    last_assigned_at   timestamptz,
    lost_at            timestamptz,
    disconnected_at    timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- Dispatch: connected agents of an org, least recently assigned first.
CREATE INDEX agents_dispatch ON agents (org_id, last_assigned_at NULLS FIRST) WHERE state = 'connected';
-- Lost-agent sweep.
CREATE INDEX agents_heartbeat ON agents (last_heartbeat_at) WHERE state = 'connected';

CREATE TABLE jobs (
    id            uuid PRIMARY KEY,
    build_id      uuid NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    org_id        uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    position      integer NOT NULL,
    key           text NOT NULL,
    command       text NOT NULL,
    queue         text NOT NULL,
    priority      integer NOT NULL DEFAULT 0,
    label         text,
    env           jsonb NOT NULL DEFAULT '{}',
    depends_on    jsonb NOT NULL DEFAULT '[]',  -- keys, as the client sent them
    state         text NOT NULL,
    agent_id      uuid REFERENCES agents(id),
    exit_status   integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    scheduled_at  timestamptz,
    assigned_at   timestamptz,
    accepted_at   timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (build_id, key)
);
CREATE INDEX jobs_build ON jobs (build_id, position);
-- Dispatch: runnable jobs by priority, then age.
CREATE INDEX jobs_runnable ON jobs (org_id, queue, priority DESC, scheduled_at, id) WHERE state = 'scheduled';
-- Queue depth and oldest runnable job, for ops.
CREATE INDEX jobs_runnable_age ON jobs (scheduled_at) WHERE state = 'scheduled';
-- An agent holds at most one job: enforced by the database, not only by the dispatcher.
CREATE UNIQUE INDEX jobs_one_per_agent ON jobs (agent_id)
    WHERE state IN ('assigned', 'accepted', 'running', 'canceling');
-- Assignment-timeout sweep.
CREATE INDEX jobs_assigned_at ON jobs (assigned_at) WHERE state = 'assigned';

-- Dependency edges, by job id.
CREATE TABLE job_dependencies (
    job_id         uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    depends_on_id  uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, depends_on_id)
);
CREATE INDEX job_dependencies_reverse ON job_dependencies (depends_on_id);

-- Transactional outbox: every state change inserts its event here in the same
-- transaction; the relay publishes unpublished rows in id order.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    event_type    text NOT NULL,
    org_id        uuid NOT NULL,
    build_id      uuid,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

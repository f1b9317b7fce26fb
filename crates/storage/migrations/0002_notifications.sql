-- Notifications: webhooks, GitHub integrations, deliveries with their attempt log,
-- coalesced commit statuses, and the per-type kill switches with their audit trail.

CREATE TABLE webhooks (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    pipeline_id      uuid REFERENCES pipelines(id) ON DELETE CASCADE,
    url              text NOT NULL,
    events           text[] NOT NULL,
    secret           text NOT NULL,
    disabled_at      timestamptz,
    disabled_reason  text,
    deleted_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Subscription lookups and the list endpoint.
CREATE INDEX webhooks_org ON webhooks (org_id, id DESC) WHERE deleted_at IS NULL;

CREATE TABLE github_integrations (
    pipeline_id   uuid PRIMARY KEY REFERENCES pipelines(id) ON DELETE CASCADE,
    org_id        uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    api_url       text NOT NULL,
    token         text NOT NULL,
    job_statuses  boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX github_integrations_org ON github_integrations (org_id);

-- One row per event × endpoint: the unique key makes fan-out idempotent.
CREATE TABLE deliveries (
    id                uuid PRIMARY KEY,
    org_id            uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    webhook_id        uuid NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_id          uuid NOT NULL,
    event_type        text NOT NULL,
    payload           jsonb NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'dead', 'skipped')),
    attempts          integer NOT NULL DEFAULT 0,
    -- Set while the row waits in PostgreSQL (a retry, a pause, a replay); NULL while its
    -- message is in the broker or it is done.
    next_attempt_at   timestamptz,
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, webhook_id)
);
CREATE INDEX deliveries_webhook_list ON deliveries (webhook_id, id DESC);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_dead ON deliveries (id) WHERE status = 'dead';
CREATE INDEX deliveries_created ON deliveries (created_at);

CREATE TABLE delivery_attempts (
    id             bigserial PRIMARY KEY,
    delivery_id    uuid NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
    attempt        integer NOT NULL,
    status_code    integer,
    error          text,
    response_body  text,
    duration_ms    integer NOT NULL,
    attempted_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id);
CREATE INDEX delivery_attempts_at ON delivery_attempts (attempted_at);

-- The newest wanted status per (repository, sha, context). `version` counts changes;
-- `sent_version` is what GitHub has. Superseded versions are never sent.
CREATE TABLE commit_statuses (
    repository        text NOT NULL,
    sha               text NOT NULL,
    context           text NOT NULL,
    org_id            uuid NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    pipeline_id       uuid NOT NULL REFERENCES pipelines(id) ON DELETE CASCADE,
    build_id          uuid NOT NULL,
    state             text NOT NULL,
    rank              smallint NOT NULL,
    description       text NOT NULL,
    target_url        text NOT NULL,
    version           bigint NOT NULL DEFAULT 1,
    sent_version      bigint NOT NULL DEFAULT 0,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed', 'dead', 'skipped')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz,
    last_status_code  integer,
    last_error        text,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repository, sha, context)
);
CREATE INDEX commit_statuses_due ON commit_statuses (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX commit_statuses_dead ON commit_statuses (updated_at) WHERE status = 'dead';

CREATE TABLE notification_types (
    type        text PRIMARY KEY,
    mode        text NOT NULL CHECK (mode IN ('enabled', 'paused', 'disabled')),
    rate_per_s  double precision NOT NULL CHECK (rate_per_s > 0),
    burst       integer NOT NULL CHECK (burst > 0),
    reason      text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO notification_types (type, mode, rate_per_s, burst, reason) VALUES
    ('webhook', 'enabled', 10000, 10000, 'default'),
    ('github_commit_status', 'enabled', 100, 100, 'default');

-- Audit trail of every kill-switch change: when, which token, why.
CREATE TABLE notification_type_changes (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL,
    mode        text NOT NULL,
    rate_per_s  double precision NOT NULL,
    burst       integer NOT NULL,
    reason      text NOT NULL,
    actor       text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);

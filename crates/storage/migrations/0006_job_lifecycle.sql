-- Job life cycle: timeouts, cancel that reaches the agent, automatic and manual
-- retries, and idempotent creation.

-- A retry is a new row with the same key and attempt + 1.
ALTER TABLE jobs DROP CONSTRAINT jobs_build_id_key_key;
ALTER TABLE jobs
    ADD COLUMN attempt       integer NOT NULL DEFAULT 1,
    ADD COLUMN retry_of      uuid,
    ADD COLUMN retried_by    uuid,
    ADD COLUMN timed_out     boolean NOT NULL DEFAULT false,
    ADD COLUMN timeout_s     integer NOT NULL DEFAULT 3600,
    -- [{"exit_status": int | "*", "limit": n}], and how many retries each rule made.
    ADD COLUMN retry_rules   jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN retry_counts  integer[] NOT NULL DEFAULT '{}',
    ADD COLUMN retry_manual  boolean NOT NULL DEFAULT true,
    -- accepted_at + timeout_s, set by the accept: the timeout sweep walks an index.
    ADD COLUMN deadline_at   timestamptz,
    ADD COLUMN canceling_at  timestamptz,
    -- Herald ended the job (timeout, cancel grace, lost agent), not its agent.
    ADD COLUMN herald_ended  boolean NOT NULL DEFAULT false,
    -- Herald ended it while the agent still held it; the agent has not finished it yet.
    ADD COLUMN stop_pending  boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX jobs_build_key_attempt ON jobs (build_id, key, attempt);
-- Timeout sweep.
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE state IN ('accepted', 'running');
-- Cancel-grace sweep.
CREATE INDEX jobs_canceling ON jobs (canceling_at) WHERE state = 'canceling';
-- The heartbeat's cancel list: small, read whole by each API process.
CREATE INDEX jobs_to_stop ON jobs (agent_id) WHERE state = 'canceling' OR stop_pending;

-- How many times the build has finished (a retry reopens it).
ALTER TABLE builds ADD COLUMN finish_count integer NOT NULL DEFAULT 0;

-- A retried build starts a new round of commit statuses: pending after failure.
ALTER TABLE commit_statuses ADD COLUMN round integer NOT NULL DEFAULT 0;

-- Idempotency-Key: the first response, per org and key, for 24 hours.
CREATE TABLE idempotency_keys (
    org_id        uuid NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status        integer,
    body          jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

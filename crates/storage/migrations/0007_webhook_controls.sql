-- Webhooks receivers can live with: a per-endpoint rate, secret rotation with an
-- overlap, the failure streak behind auto-disable, recover by time window, and the
-- indexes of the delivery filters.

ALTER TABLE webhooks
    -- NULL: the global per-endpoint limit.
    ADD COLUMN rate_per_s double precision CHECK (rate_per_s IS NULL OR rate_per_s > 0),
    -- After a rotation, attempts are also signed with the old secret until this time.
    ADD COLUMN old_secret text,
    ADD COLUMN old_secret_expires_at timestamptz,
    -- The current streak of failed attempts: when it began and how long it is. Reset by
    -- any success and by re-enabling.
    ADD COLUMN failing_since timestamptz,
    ADD COLUMN failures integer NOT NULL DEFAULT 0;

-- Reasons are codes now: gone (a 410), failing, manual.
UPDATE webhooks SET disabled_reason = 'gone'
WHERE disabled_at IS NOT NULL AND disabled_reason IS DISTINCT FROM 'gone'
  AND disabled_reason IS DISTINCT FROM 'failing' AND disabled_reason IS DISTINCT FROM 'manual';

-- The delivery list is newest first by (created_at, id); each filter has its index.
-- The old (webhook_id, id) index is replaced, not kept beside: every index costs each
-- delivery's insert and status updates.
CREATE INDEX deliveries_webhook_created ON deliveries (webhook_id, created_at DESC, id DESC);
CREATE INDEX deliveries_webhook_status ON deliveries (webhook_id, status, created_at DESC, id DESC);
CREATE INDEX deliveries_webhook_type ON deliveries (webhook_id, event_type, created_at DESC, id DESC);
DROP INDEX deliveries_webhook_list;

-- A recover in progress: the scheduler marks its deliveries due in small batches,
-- moving the cursor in the same transaction, so a crash neither loses nor repeats one.
CREATE TABLE webhook_recoveries (
    id           uuid PRIMARY KEY,
    webhook_id   uuid NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    since        timestamptz NOT NULL,
    until        timestamptz NOT NULL,
    cursor_at    timestamptz,
    cursor_id    uuid,
    queued       bigint NOT NULL,
    marked       bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX webhook_recoveries_open ON webhook_recoveries (created_at) WHERE finished_at IS NULL;

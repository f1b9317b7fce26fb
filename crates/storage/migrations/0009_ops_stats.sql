-- Figures a process measures for the on-call page (GET /v1/ops/overview), which the
-- API of another process shows: the dispatchers' latency over the last minute, the
-- throttle's factor and signals. One row per (kind, process), upserted every few
-- seconds only when the figure changed or is about to look stale.
CREATE TABLE ops_stats (
    kind        text NOT NULL,
    process     text NOT NULL,
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, process)
);

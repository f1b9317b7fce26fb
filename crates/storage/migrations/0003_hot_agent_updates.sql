-- Agent rows are rewritten at every assignment (last_assigned_at) and heartbeat flush
-- (last_heartbeat_at). While indexes covered those columns, each rewrite added index
-- entries, and the dispatcher's scans of agents grew with the number of assignments
-- made until a vacuum. Without them the updates are HOT: the index keeps one entry per
-- agent, and free space on each page lets new row versions stay there. Dispatch sorts
-- an org's connected agents itself, and the lost-agent sweep reads connected agents.
DROP INDEX agents_dispatch;
DROP INDEX agents_heartbeat;
CREATE INDEX agents_connected ON agents (org_id) WHERE state = 'connected';
ALTER TABLE agents SET (fillfactor = 50);

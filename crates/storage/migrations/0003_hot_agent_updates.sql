-- Heartbeat flushes rewrite agent rows. While an index covered last_heartbeat_at,
-- each rewrite added index entries that dispatch's scans of agents had to step over
-- until a vacuum. Without it the heartbeat updates are HOT, and free space on each
-- page lets new row versions stay there. The lost-agent sweep reads the connected
-- agents through agents_dispatch instead.
DROP INDEX agents_heartbeat;
ALTER TABLE agents SET (fillfactor = 50);

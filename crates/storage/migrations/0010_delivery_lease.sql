-- A webhook delivery is sent by one worker at a time. Copies of its broker message
-- (the relay, the fan-out and the broker are at-least-once) each try to claim the row
-- until `claimed_until` before sending; a copy that finds a live claim is dropped. The
-- lease is short and renewed while the attempt runs, and `next_attempt_at` is set to
-- its end, so the row of a worker that died comes due then. Cleared by the statement
-- that records the attempt. A column, not a held lock: no transaction spans the call.
ALTER TABLE deliveries ADD COLUMN claimed_until timestamptz;

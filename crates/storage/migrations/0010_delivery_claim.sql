-- A webhook worker claims a delivery until `claimed_until` before its HTTP attempt:
-- another copy of its broker message (the relay and the fan-out are at-least-once)
-- finds the claim and hands the delivery to the scheduler for when the claim ends,
-- instead of sending it a second time. Cleared when the attempt's result is recorded.
ALTER TABLE deliveries ADD COLUMN claimed_until timestamptz;

-- The W3C traceparent of the request (or message) that wrote the event, when the
-- writing process exports traces; NULL otherwise. The relay sends it on as an AMQP
-- header. Nullable without a default: adding it rewrites nothing.
ALTER TABLE outbox ADD COLUMN traceparent text;

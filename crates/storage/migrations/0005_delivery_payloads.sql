-- An event's webhook body is stored once, not once per endpoint: 50 endpoints used to
-- write 50 copies of it (and its WAL, shipped to the replica). Rows written before this
-- migration keep their own copy; readers take whichever exists.
CREATE TABLE delivery_payloads (
    event_id    uuid PRIMARY KEY,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- History expiry, oldest first.
CREATE INDEX delivery_payloads_created ON delivery_payloads (created_at);
ALTER TABLE deliveries ALTER COLUMN payload DROP NOT NULL;

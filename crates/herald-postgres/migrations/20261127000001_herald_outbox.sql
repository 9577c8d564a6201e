-- The transactional outbox: a service inserts its events here in the same
-- transaction as its business rows; the relay publishes them to Kafka.
CREATE TABLE herald_outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        UUID NOT NULL UNIQUE,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    -- Position of the event within its aggregate: one more than the highest
    -- of the aggregate's rows visible at insert. A row can only take k + 1
    -- once the row with k has committed, so a late commit can never slip an
    -- event in front of one already published; two uncoordinated writers of
    -- one aggregate collide on the unique constraint instead of racing.
    aggregate_seq   BIGINT NOT NULL,
    event_type      TEXT NOT NULL,
    topic           TEXT NOT NULL,
    record_key      TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    -- Every header to write, as {"name": "value"}, trace context included.
    headers         JSONB NOT NULL DEFAULT '{}'::jsonb,
    occurred_at     TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at    TIMESTAMPTZ,
    CONSTRAINT herald_outbox_aggregate_seq UNIQUE (aggregate_type, aggregate_id, aggregate_seq)
);

-- The relay's scan: unpublished rows, oldest first.
CREATE INDEX herald_outbox_unpublished ON herald_outbox (id) WHERE published_at IS NULL;
-- "Is an earlier row of this aggregate still unpublished?"
CREATE INDEX herald_outbox_aggregate_unpublished
    ON herald_outbox (aggregate_type, aggregate_id, aggregate_seq) WHERE published_at IS NULL;
-- Retention of published rows.
CREATE INDEX herald_outbox_published_at ON herald_outbox (published_at) WHERE published_at IS NOT NULL;

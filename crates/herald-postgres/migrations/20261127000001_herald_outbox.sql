-- The transactional outbox: a service inserts its events here in the same
-- transaction as its business rows; the relay publishes them to Kafka.
CREATE TABLE herald_outbox (
    -- Position in creation order within one writing transaction.
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction. Ids are taken before commit, so a transaction
    -- that took a lower id can commit after one with a higher id: the relay
    -- only publishes rows whose transaction is older than every transaction
    -- still running (below the snapshot's xmin) and orders them by (xid, id).
    xid             XID8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id        UUID NOT NULL UNIQUE,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    topic           TEXT NOT NULL,
    record_key      TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    -- Every header to write, as {"name": "value"}, trace context included.
    headers         JSONB NOT NULL DEFAULT '{}'::jsonb,
    occurred_at     TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at    TIMESTAMPTZ
);

-- The relay's scan: unpublished rows in (xid, id) order.
CREATE INDEX herald_outbox_unpublished ON herald_outbox (xid, id) WHERE published_at IS NULL;
-- "Is an older row of this aggregate still unpublished?"
CREATE INDEX herald_outbox_aggregate_unpublished
    ON herald_outbox (aggregate_type, aggregate_id, xid, id) WHERE published_at IS NULL;
-- Retention of published rows.
CREATE INDEX herald_outbox_published_at ON herald_outbox (published_at) WHERE published_at IS NOT NULL;

-- The transactional outbox (SQLite): a service inserts its events here in the
-- same transaction as its business rows; the relay publishes them to Kafka.
-- Same columns and meaning as the PostgreSQL table; SQLite types: uuids and
-- timestamps are TEXT (timestamps as RFC 3339 UTC with a fixed width, so
-- that they compare correctly as text), the payload is a BLOB and the
-- headers a JSON object in TEXT.
CREATE TABLE herald_outbox (
    -- AUTOINCREMENT: ids are never reused, even after the relay deletes the
    -- newest rows, so "older row" always means "lower id".
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    -- Position of the event within its aggregate: one more than the highest
    -- of the aggregate's rows at insert. SQLite has one writer at a time, so
    -- the rows visible at insert are all the aggregate's committed rows and
    -- a late commit can never slip in front of a published event.
    aggregate_seq   INTEGER NOT NULL,
    event_type      TEXT NOT NULL,
    topic           TEXT NOT NULL,
    record_key      TEXT NOT NULL,
    payload         BLOB NOT NULL,
    -- Every header to write, as {"name": "value"}, trace context included.
    headers         TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(headers)),
    occurred_at     TEXT NOT NULL,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    published_at    TEXT,
    CONSTRAINT herald_outbox_aggregate_seq UNIQUE (aggregate_type, aggregate_id, aggregate_seq)
);

-- The relay's scan: unpublished rows, oldest first.
CREATE INDEX herald_outbox_unpublished ON herald_outbox (id) WHERE published_at IS NULL;
-- "Is an earlier row of this aggregate still unpublished?"
CREATE INDEX herald_outbox_aggregate_unpublished
    ON herald_outbox (aggregate_type, aggregate_id, aggregate_seq) WHERE published_at IS NULL;
-- Retention of published rows.
CREATE INDEX herald_outbox_published_at ON herald_outbox (published_at) WHERE published_at IS NOT NULL;

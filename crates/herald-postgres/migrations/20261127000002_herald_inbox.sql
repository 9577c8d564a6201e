-- The inbox: which events a consumer group has applied. A handler's effects
-- and its inbox row commit in one transaction, so a redelivered event finds
-- its row and has no second effect.
CREATE TABLE herald_inbox (
    consumer_group  TEXT NOT NULL,
    event_id        UUID NOT NULL,
    processed_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, event_id)
);

-- Retention: rows older than any redelivery window are deleted.
CREATE INDEX herald_inbox_processed_at ON herald_inbox (processed_at);

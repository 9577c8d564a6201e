-- The inbox (SQLite): which events a consumer group has applied. A handler's
-- effects and its inbox row commit in one transaction, so a redelivered
-- event finds its row and has no second effect.
CREATE TABLE herald_inbox (
    consumer_group  TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    processed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, event_id)
);

-- Retention: rows older than any redelivery window are deleted.
CREATE INDEX herald_inbox_processed_at ON herald_inbox (processed_at);

-- Reads a batch for the relay. SQLite has no row locks: the caller holds the
-- outbox's claim lock (one batch at a time per SqliteOutbox) from this read
-- until the batch commits, which is what keeps a second claim from taking an
-- aggregate whose earlier rows are in flight.
--
-- Per-aggregate order: an aggregate is taken through its HEAD, the
-- unpublished row with the lowest aggregate_seq, and then its following
-- unpublished rows in aggregate_seq order; aggregates come oldest head first.
-- No cursor is kept: a row that commits late is simply found by a later pass.
WITH heads AS (
    SELECT o.id AS head_id, o.aggregate_type, o.aggregate_id
    FROM herald_outbox o
    WHERE o.published_at IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM herald_outbox earlier
          WHERE earlier.published_at IS NULL
            AND earlier.aggregate_type = o.aggregate_type
            AND earlier.aggregate_id = o.aggregate_id
            AND earlier.aggregate_seq < o.aggregate_seq)
    ORDER BY o.id
    LIMIT ?1
)
SELECT o.id, o.event_id, o.topic, o.record_key, o.payload, o.headers
FROM herald_outbox o
JOIN heads h ON h.aggregate_type = o.aggregate_type AND h.aggregate_id = o.aggregate_id
WHERE o.published_at IS NULL
ORDER BY h.head_id, o.aggregate_seq
LIMIT ?2

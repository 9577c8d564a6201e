-- Marks the published rows $1 by moving them to herald_outbox_published (see
-- that table's migration for why a move and not an UPDATE).
WITH moved AS (
    DELETE FROM herald_outbox
    WHERE id = ANY($1)
    RETURNING id, event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic,
              record_key, payload, headers, occurred_at, created_at
)
INSERT INTO herald_outbox_published
    (id, event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic,
     record_key, payload, headers, occurred_at, created_at, published_at)
SELECT id, event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic,
       record_key, payload, headers, occurred_at, created_at, clock_timestamp()
FROM moved

-- Claims a batch for one relay, inside its transaction.
--
-- Per-aggregate order across relays: a relay claims an aggregate through its
-- HEAD, the unpublished row with the lowest aggregate_seq, locked with
-- SKIP LOCKED. A row with an earlier unpublished row of its aggregate is
-- never a head, so no other relay can take it while the head is claimed; the
-- owner of the head then claims the aggregate's following rows as well.
--
-- Late commits: a row becomes visible when its transaction commits, and its
-- aggregate_seq was taken after every earlier row of the aggregate had
-- committed, so what is visible is always a gap-free prefix per aggregate.
-- No cursor is kept, so a row that commits late is simply found later.
WITH heads AS MATERIALIZED (
    SELECT o.id, o.aggregate_type, o.aggregate_id
    FROM herald_outbox o
    WHERE o.published_at IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM herald_outbox earlier
          WHERE earlier.published_at IS NULL
            AND earlier.aggregate_type = o.aggregate_type
            AND earlier.aggregate_id = o.aggregate_id
            AND earlier.aggregate_seq < o.aggregate_seq)
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
)
SELECT o.id, o.event_id, o.topic, o.record_key, o.payload, o.headers
FROM herald_outbox o
WHERE o.published_at IS NULL
  AND (o.aggregate_type, o.aggregate_id) IN (SELECT aggregate_type, aggregate_id FROM heads)
-- Id order is creation order within an aggregate (a row's successor is
-- inserted after it committed), so any cut keeps a prefix of each aggregate;
-- and it lets the scan stop after $2 rows instead of sorting every row of
-- every claimed aggregate.
ORDER BY o.id
LIMIT $2
FOR UPDATE OF o

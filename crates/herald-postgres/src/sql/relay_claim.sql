-- Claims a batch of at most $1 rows for one relay, inside its transaction.
--
-- Per-aggregate order across relays: a relay claims an aggregate through its
-- HEAD, the unpublished row with the lowest id (= lowest aggregate_seq, see
-- the migration of herald_outbox_aggregate_pending), locked with
-- SKIP LOCKED. A row with an earlier unpublished row of its aggregate is
-- never a head, so no other relay can take it while the head is claimed; the
-- owner of the head then claims the aggregate's following rows as well.
--
-- Late commits: a row becomes visible when its transaction commits, and its
-- aggregate_seq was taken after every earlier row of the aggregate had
-- committed, so what is visible is always a gap-free prefix per aggregate.
-- No cursor is kept, so a row that commits late is simply found later.
--
-- The batch is the $1 lowest ids among the heads and their followers: id
-- order is creation order within an aggregate, so any such cut keeps a
-- prefix of each aggregate.
WITH heads AS MATERIALIZED (
    -- The whole record is read here, where the row is locked anyway, so a
    -- head is neither fetched nor locked a second time below.
    SELECT o.id, o.aggregate_type, o.aggregate_id,
           o.event_id, o.topic, o.record_key, o.payload, o.headers
    FROM herald_outbox o
    WHERE o.published_at IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM herald_outbox earlier
          WHERE earlier.published_at IS NULL
            AND earlier.aggregate_type = o.aggregate_type
            AND earlier.aggregate_id = o.aggregate_id
            AND earlier.id < o.id)
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
),
-- With $1 heads, the $1 lowest ids are at most the last head's, so a
-- follower above it can never make the cut: each head's followers are read
-- as an index range that ends there. (Without this bound a claim read every
-- unpublished row of every claimed aggregate — 100 per aggregate in an
-- outbox of 1,000,000 rows over 10,000 keys — only to sort most of them
-- away.) With fewer heads there is no bound but each head's LIMIT.
bound AS (
    SELECT CASE WHEN count(*) = $1 THEN max(id) ELSE 9223372036854775807 END AS below
    FROM heads
),
followers AS MATERIALIZED (
    SELECT o.id, o.event_id, o.topic, o.record_key, o.payload, o.headers
    FROM herald_outbox o
    -- Still unpublished once locked: FOR UPDATE re-reads a row changed
    -- meanwhile and drops it here if it was published.
    WHERE o.published_at IS NULL
      AND o.id IN (
          SELECT later.id
          FROM heads h
          CROSS JOIN bound b
          CROSS JOIN LATERAL (
              SELECT f.id FROM herald_outbox f
              WHERE f.published_at IS NULL
                AND f.aggregate_type = h.aggregate_type
                AND f.aggregate_id = h.aggregate_id
                AND f.id > h.id
                AND f.id < b.below
              ORDER BY f.id
              LIMIT $1
          ) later)
    -- Waits rather than skips: only this relay can hold a row behind a head
    -- it holds.
    FOR UPDATE OF o
)
SELECT id, event_id, topic, record_key, payload, headers FROM heads
UNION ALL
SELECT id, event_id, topic, record_key, payload, headers FROM followers
ORDER BY id
LIMIT $1

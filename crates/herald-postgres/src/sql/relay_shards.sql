-- The shards with pending events, the shard whose first pending event is
-- oldest first, so a relay serves the longest-waiting events first.
--
-- A loose index scan of herald_outbox_pending's primary key: one descent
-- per shard (at most 64) instead of a read of every pending row. Read under
-- the statement's own snapshot and without locks: it only proposes shards;
-- the claim locks a shard and then reads it afresh (see relay_claim.sql).
WITH RECURSIVE pending (shard, first_id) AS (
    (SELECT p.shard, p.id
     FROM herald_outbox_pending p
     ORDER BY p.shard, p.id
     LIMIT 1)
    UNION ALL
    SELECT next.shard, next.id
    FROM pending
    CROSS JOIN LATERAL (
        SELECT p.shard, p.id
        FROM herald_outbox_pending p
        WHERE p.shard > pending.shard
        ORDER BY p.shard, p.id
        LIMIT 1
    ) next
)
-- A shard whose pending events all belong to parked aggregates has no
-- work a claim would take (see relay_claim.sql): left out, or relays would
-- spin on it. The first test is one probe of a partial index per shard;
-- the second runs only for shards that hold a parked aggregate.
SELECT shard FROM pending
WHERE NOT EXISTS (
          SELECT 1 FROM herald_outbox_refused r
          WHERE r.parked_at IS NOT NULL AND r.shard = pending.shard)
   OR EXISTS (
          SELECT 1
          FROM herald_outbox_pending p
          JOIN herald_outbox o ON o.id = p.id
          WHERE p.shard = pending.shard
            AND {NOT_HELD_BACK})
ORDER BY first_id

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
SELECT shard FROM pending ORDER BY first_id

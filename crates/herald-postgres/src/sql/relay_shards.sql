-- The shards with unpublished rows, the shard whose oldest unpublished row is
-- oldest first, so a relay serves the longest-waiting events first.
--
-- A loose index scan of herald_outbox_shard_pending: one descent per shard
-- (at most 64) instead of a read of every unpublished row. Read under the
-- statement's own snapshot and without locks: it only proposes shards; the
-- claim locks a shard and then reads it afresh (see relay_claim.sql).
WITH RECURSIVE pending (shard, first_id) AS (
    (SELECT o.shard, o.id
     FROM herald_outbox o
     WHERE o.published_at IS NULL
     ORDER BY o.shard, o.id
     LIMIT 1)
    UNION ALL
    SELECT next.shard, next.id
    FROM pending p
    CROSS JOIN LATERAL (
        SELECT o.shard, o.id
        FROM herald_outbox o
        WHERE o.published_at IS NULL
          AND o.shard > p.shard
        ORDER BY o.shard, o.id
        LIMIT 1
    ) next
)
SELECT shard FROM pending ORDER BY first_id

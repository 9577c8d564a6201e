-- Claims at most $2 pending events of each shard in $1, which this
-- transaction owns: a lease took their advisory locks in an EARLIER
-- statement. One statement for a whole relay slot instead of one per shard
-- (a lease's claim was 16 round trips); per shard it is exactly
-- relay_claim.sql, whose argument holds unchanged: the snapshot is taken
-- after the locks were granted, each shard gives its lowest pending ids (a
-- prefix of each of its aggregates), and FOR UPDATE (waiting, never
-- skipping) locks the pending rows the lease is about to delete.
--
-- Rows come shard by shard in $1's order, ids ascending within a shard.
SELECT c.shard, c.id, c.event_id, c.topic, c.record_key, c.payload, c.headers
FROM unnest($1::smallint[]) WITH ORDINALITY AS s(shard, position)
CROSS JOIN LATERAL (
    SELECT p.shard, o.id, o.event_id, o.topic, o.record_key, o.payload, o.headers
    FROM herald_outbox_pending p
    JOIN herald_outbox o ON o.id = p.id
    WHERE p.shard = s.shard
      AND {NOT_HELD_BACK}
    ORDER BY p.id
    LIMIT $2
    FOR UPDATE OF p
) c
ORDER BY s.position, c.id

-- Marks events published: deletes their pending rows, given as the parallel
-- arrays $1 (shards) and $2 (ids) so that each is a primary-key lookup.
DELETE FROM herald_outbox_pending p
USING unnest($1::smallint[], $2::bigint[]) AS published(shard, id)
WHERE p.shard = published.shard
  AND p.id = published.id

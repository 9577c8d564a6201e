-- AfterPublish::Delete: marks events published as relay_mark.sql does and
-- deletes the events themselves in the same statement.
WITH marked AS (
    DELETE FROM herald_outbox_pending p
    USING unnest($1::smallint[], $2::bigint[]) AS published(shard, id)
    WHERE p.shard = published.shard
      AND p.id = published.id
    RETURNING p.id
)
DELETE FROM herald_outbox o
USING marked
WHERE o.id = marked.id

-- Marks published the outbox rows $1 that an exactly-once relay's Kafka
-- transaction committed while its PostgreSQL transaction did not (see
-- herald_postgres::slots). Rows no longer pending are skipped; with $2
-- (AfterPublish::Delete) the events themselves are deleted too, as
-- relay_mark_delete.sql does. Returns how many rows were still pending.
WITH marked AS (
    DELETE FROM herald_outbox_pending p
    USING herald_outbox o
    WHERE o.id = ANY($1::bigint[])
      AND p.id = o.id
      AND p.shard = herald_outbox_shard(o.aggregate_type, o.aggregate_id)
    RETURNING p.id
), deleted AS (
    DELETE FROM herald_outbox o
    USING marked
    WHERE $2 AND o.id = marked.id
)
SELECT count(*) FROM marked

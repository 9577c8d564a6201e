-- Shards of aggregates: the relay's unit of ownership (see
-- src/sql/relay_shards.sql and PgOutbox).
--
-- Every row of an aggregate has the same shard, a hash of the aggregate
-- (64 shards). A relay transaction owns a shard through a transaction-level
-- advisory lock and publishes the shard's unpublished rows in id order, so
-- relays never scan, lock or skip each other's rows. The head-of-aggregate
-- claim this replaces spent most of its time on exactly that: with four
-- relay workers, each claim stepped over the rows the other three held
-- (`FOR UPDATE SKIP LOCKED`) and checked every candidate for an earlier
-- unpublished row of its aggregate.
--
-- Adding a stored generated column rewrites the table under an exclusive
-- lock: on a large outbox, run this while writers are paused.
ALTER TABLE herald_outbox
    ADD COLUMN shard SMALLINT NOT NULL
    GENERATED ALWAYS AS ((hashtextextended(aggregate_type || '/' || aggregate_id, 0) & 63)::smallint) STORED;

-- The relay's only index: which shards have unpublished rows (one descent
-- per shard), and a shard's unpublished rows in id order.
CREATE INDEX herald_outbox_shard_pending ON herald_outbox (shard, id) WHERE published_at IS NULL;

-- The claim no longer looks rows up by aggregate or scans all unpublished
-- rows by id; every index less is one entry less to write per insert, mark
-- and delete. (The enqueue's "highest sequence of this aggregate" uses the
-- unique constraint's index.)
DROP INDEX herald_outbox_aggregate_pending;
DROP INDEX herald_outbox_unpublished;

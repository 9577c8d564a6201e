-- The relay's queue: one narrow row per unpublished event, keyed by the
-- event's shard of aggregates and its outbox id. herald_outbox keeps the
-- events themselves, append-only, as the audit trail until retention; an
-- event is published when its pending row is gone.
--
-- Why a queue beside the events rather than a published_at column on them:
-- marking an event published in place was an UPDATE that could never be
-- HOT (published_at was in the relay's partial indexes), so PostgreSQL
-- wrote a new copy of the ~500-byte row and an entry in each of its
-- indexes, three of them unique. Now the relay deletes a 30-byte row. With
-- pgbench, four clients claiming 500 rows of a random shard, locking them
-- and marking them, on an outbox of 1,000,000 events: 124,100 events/s with
-- the queue, 69,563 moving each published row to a table of its own, an
-- earlier version of this design (pgbench -c 4 -j 2 -T 8, one run each).
--
-- Shards: every aggregate hashes to one of 64 shards (herald_outbox_shard).
-- A relay transaction owns a shard through a transaction-level advisory
-- lock and publishes the shard's pending events in id order, so relays
-- never scan, lock or skip each other's rows (see src/sql/relay_claim.sql).
--
-- Events are enqueued with herald_postgres::outbox::enqueue, which writes
-- both rows in one statement; an event inserted into herald_outbox by hand
-- has no pending row and is never published.

-- Upgrading: stop the writers and relays of the earlier version first. The
-- lock below waits for their open transactions and holds new ones off
-- until this migration commits, so the copy into the queue sees every
-- event they committed; but a writer of the earlier version that inserts
-- after it (the old INSERT, with published_at left out) writes an event
-- without a pending row, which is never published.
LOCK TABLE herald_outbox IN ACCESS EXCLUSIVE MODE;

-- The shard of an aggregate. Immutable: changing it would move aggregates
-- between shards under running relays.
CREATE FUNCTION herald_outbox_shard(aggregate_type TEXT, aggregate_id TEXT) RETURNS SMALLINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT (hashtextextended(aggregate_type || '/' || aggregate_id, 0) & 63)::smallint $$;

CREATE TABLE herald_outbox_pending (
    shard SMALLINT NOT NULL,
    -- herald_outbox.id (no foreign key: its check would cost every enqueue
    -- and every retention delete a lookup).
    id    BIGINT NOT NULL,
    PRIMARY KEY (shard, id)
);

-- Events earlier versions had not published yet are pending; those they
-- marked published are not.
INSERT INTO herald_outbox_pending (shard, id)
SELECT herald_outbox_shard(aggregate_type, aggregate_id), id
FROM herald_outbox
WHERE published_at IS NULL;

-- Published is now "has no pending row": the column and the indexes of the
-- old claim and retention go.
DROP INDEX herald_outbox_unpublished;
DROP INDEX herald_outbox_aggregate_pending;
DROP INDEX herald_outbox_published_at;
ALTER TABLE herald_outbox DROP COLUMN published_at;

-- Retention removes published events by age. Rows arrive in created_at
-- order, so a block-range index finds the old ones for almost nothing per
-- insert.
CREATE INDEX herald_outbox_created_at ON herald_outbox USING brin (created_at);

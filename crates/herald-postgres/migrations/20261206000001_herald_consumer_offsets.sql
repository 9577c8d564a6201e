-- Consumer offsets kept in the database (herald::offsets): per consumer
-- group and partition, the offset below which every record is done (where
-- the consumer starts the partition) and the offsets applied above it
-- (records of different keys finish out of order). A handler's transaction
-- moves its record's partition beside its effects, so effects and
-- position commit together.
CREATE TABLE herald_consumer_offsets (
    consumer_group  TEXT NOT NULL,
    topic           TEXT NOT NULL,
    partition       INTEGER NOT NULL,
    next_offset     BIGINT NOT NULL,
    done            BIGINT[] NOT NULL DEFAULT '{}',
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Consumer offsets kept in the database (herald::offsets): per consumer
-- group and partition, the next offset to read. A handler's transaction
-- moves its record's partition forwards beside its effects, and the
-- consumer starts an assigned partition here, so effects and position
-- commit together.
CREATE TABLE herald_consumer_offsets (
    consumer_group  TEXT NOT NULL,
    topic           TEXT NOT NULL,
    partition       INTEGER NOT NULL,
    next_offset     BIGINT NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

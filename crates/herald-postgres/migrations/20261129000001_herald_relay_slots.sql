-- The exactly-once relay's record of what it published, per relay slot.
--
-- A slot is a fixed group of outbox shards (shard % 4); an exactly-once
-- relay owns one slot per transaction and publishes the slot's batch in a
-- Kafka transaction under the slot's transactional.id, together with a
-- checkpoint record (the slot, its next sequence, the ids published) on the
-- relay's checkpoint topic. The same PostgreSQL transaction that marks the
-- batch published stores that sequence here. When the two disagree (Kafka
-- committed, PostgreSQL did not), the next owner of the slot marks the
-- checkpoint's ids before it claims anything. See herald_postgres::slots.
CREATE TABLE herald_relay_slots (
    slot            SMALLINT PRIMARY KEY,
    sequence        BIGINT NOT NULL,
    checkpointed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

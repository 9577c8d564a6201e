-- The dead-letter log becomes an audit trail: every replay and discard of
-- `orders dlq`, by whom, why, for which group and key, and what came of it.
-- A parked key's letters may be replayed more than once (the key stays
-- parked while its first record fails again), so a letter may appear in
-- several rows.
ALTER TABLE dlq_replays
    DROP CONSTRAINT dlq_replays_dlq_topic_dlq_partition_dlq_offset_key,
    ADD COLUMN action TEXT NOT NULL DEFAULT 'replay',
    ADD COLUMN actor TEXT,
    ADD COLUMN reason TEXT,
    ADD COLUMN consumer_group TEXT,
    ADD COLUMN record_key TEXT,
    ADD COLUMN original_partition INTEGER,
    ADD COLUMN original_offset BIGINT,
    ADD COLUMN outcome TEXT NOT NULL DEFAULT 'published';

CREATE INDEX dlq_replays_letter ON dlq_replays (dlq_topic, dlq_partition, dlq_offset);

-- One row; enqueue_all runs it once per record, in the caller's order, inside
-- the caller's transaction. The row takes the next sequence number of its
-- aggregate: the highest one present (this transaction's own earlier rows
-- included), plus one. SQLite serializes writers, so no other transaction
-- can insert a row of the aggregate between this read and this write.
INSERT INTO herald_outbox
    (event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic, record_key,
     payload, headers, occurred_at)
VALUES (
    ?1, ?2, ?3,
    COALESCE((SELECT max(o.aggregate_seq) FROM herald_outbox o
              WHERE o.aggregate_type = ?2 AND o.aggregate_id = ?3), 0) + 1,
    ?4, ?5, ?3, ?6, ?7, ?8)

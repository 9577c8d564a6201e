-- Many rows in one statement. WITH ORDINALITY keeps the caller's order; each
-- row takes the next sequence number of its aggregate (the highest visible
-- one, plus its rank among this call's rows of that aggregate).
-- Each event's pending row (its place in the relay's queue) is written in
-- the same statement, so the two exist together or not at all. The relay's
-- wake-up (NOTIFY on channel $9, delivered at commit; repeats within one
-- transaction fold into one) rides along, saving the POST a round trip.
WITH inserted AS (
    INSERT INTO herald_outbox
        (event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic, record_key,
         payload, headers, occurred_at)
    SELECT r.event_id, r.aggregate_type, r.aggregate_id,
           COALESCE((SELECT max(o.aggregate_seq) FROM herald_outbox o
                     WHERE o.aggregate_type = r.aggregate_type AND o.aggregate_id = r.aggregate_id), 0)
             + row_number() OVER (PARTITION BY r.aggregate_type, r.aggregate_id ORDER BY r.n),
           r.event_type, r.topic, r.aggregate_id, r.payload, r.headers, r.occurred_at
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::jsonb[], $8::timestamptz[])
         WITH ORDINALITY AS r(event_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, occurred_at, n)
    ORDER BY r.n
    RETURNING id, aggregate_type, aggregate_id
)
INSERT INTO herald_outbox_pending (shard, id)
SELECT herald_outbox_shard(inserted.aggregate_type, inserted.aggregate_id), inserted.id
FROM inserted CROSS JOIN (SELECT pg_notify($9, '')) AS notified

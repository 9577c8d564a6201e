NOT EXISTS (
          -- Not held back: no earlier event of its aggregate is parked
          -- (see relay_claim.sql). p is the event's pending row, o the event.
          SELECT 1 FROM herald_outbox_refused r
          WHERE r.parked_at IS NOT NULL
            AND r.shard = p.shard
            AND r.aggregate_type = o.aggregate_type
            AND r.aggregate_id = o.aggregate_id AND r.id < p.id)

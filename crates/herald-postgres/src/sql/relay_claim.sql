-- Claims at most $2 pending events of shard $1, which this transaction
-- owns: it took the shard's advisory lock in an EARLIER statement (see
-- PgOutbox::claim).
--
-- Why a separate, later statement: in READ COMMITTED every statement takes a
-- new snapshot, and this one is taken after the lock was granted, so it sees
-- every pending row the shard's previous owner deleted, having committed
-- before its locks were released. Read in the statement that took the lock,
-- its snapshot could predate that commit and publish the events again.
--
-- Per-aggregate order: an aggregate's events all live in one shard and only
-- the shard's owner publishes them. Within an aggregate, id order is
-- creation order (an event takes aggregate_seq k + 1 only once event k is
-- visible, so its identity value is drawn after event k's), and the batch is
-- the shard's lowest pending ids, so it holds a prefix of each aggregate's
-- pending events: an event is never published while an earlier one of its
-- aggregate waits.
--
-- Late commits: an event and its pending row commit together, and what is
-- visible of an aggregate is always a gap-free prefix (the same
-- aggregate_seq rule); no cursor is kept, so an event whose transaction
-- commits late is simply found on a later pass.
--
-- Parked events (herald_outbox_refused, parked_at set) hold back their
-- aggregate: its events after the parked one wait behind it, in order,
-- while its earlier ones (an aborted transaction may leave some pending)
-- and the shard's other aggregates are claimed. A park is committed
-- before the claims that honour it begin, and ends (retry/discard) in one
-- transaction, so a claim sees an aggregate either held back from the
-- parked event on or not at all.
--
-- FOR UPDATE (waiting, never skipping) locks the pending rows the
-- transaction is about to delete. Relays that follow the shard protocol
-- never meet here; the row locks keep anything that does not from taking
-- the same events at the same time.
SELECT o.id, o.event_id, o.topic, o.record_key, o.payload, o.headers
FROM herald_outbox_pending p
JOIN herald_outbox o ON o.id = p.id
WHERE p.shard = $1
  AND {NOT_HELD_BACK}
ORDER BY p.id
LIMIT $2
FOR UPDATE OF p

-- Claims at most $2 rows of shard $1, which this transaction owns: it took
-- the shard's advisory lock in an EARLIER statement (see PgOutbox::claim).
--
-- Why a separate, later statement: in READ COMMITTED every statement takes a
-- new snapshot, and this one is taken after the lock was granted, so it sees
-- every mark (or delete) of the shard's previous owner, which committed
-- before its locks were released. Read in the statement that took the lock,
-- its snapshot could predate that commit and publish the rows again.
--
-- Per-aggregate order: an aggregate's rows all live in one shard and only
-- the shard's owner publishes them. Within an aggregate, id order is
-- creation order (a row takes aggregate_seq k + 1 only once row k is
-- visible, so its identity value is drawn after row k's), and the batch is
-- the shard's lowest ids, so it holds a prefix of each aggregate's
-- unpublished rows: an event is never published while an earlier one of its
-- aggregate waits.
--
-- Late commits: what is visible of an aggregate is always a gap-free prefix
-- (the same aggregate_seq rule), and no cursor is kept, so a row whose
-- transaction commits late is simply found on a later pass.
--
-- FOR UPDATE (waiting, never skipping) locks the rows the transaction is
-- about to mark. Relays that follow the shard protocol never meet here; the
-- locks keep the claim safe next to anything that does not, such as a relay
-- of an earlier herald version during a rolling upgrade (which locks an
-- aggregate's earliest row with SKIP LOCKED): this claim waits for it and
-- then drops the rows it published.
SELECT id, event_id, topic, record_key, payload, headers
FROM herald_outbox
WHERE shard = $1
  AND published_at IS NULL
ORDER BY id
LIMIT $2
FOR UPDATE

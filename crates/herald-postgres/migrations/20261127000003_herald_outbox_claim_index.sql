-- The relay's per-aggregate index, keyed by id instead of aggregate_seq.
--
-- Within one aggregate, id order is aggregate_seq order: a row takes
-- aggregate_seq k + 1 only in a statement whose snapshot already sees row k
-- committed (or in row k's own transaction, after it), so its identity value
-- is drawn after row k's. Keyed by id, one index answers both questions of
-- the claim: "is an earlier row of this aggregate still unpublished?" and
-- "which rows of this aggregate follow its head, below a given id?" — the
-- second as a range scan that stops at the bound, where the old index made
-- the claim read, and sort, every unpublished row of every claimed
-- aggregate.
CREATE INDEX herald_outbox_aggregate_pending
    ON herald_outbox (aggregate_type, aggregate_id, id) WHERE published_at IS NULL;
DROP INDEX herald_outbox_aggregate_unpublished;

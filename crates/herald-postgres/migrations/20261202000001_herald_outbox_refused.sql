-- Records the broker refuses for good (larger than the topic takes, invalid,
-- not authorized), so that one of them neither reorders its aggregate nor
-- stalls everyone else's.
--
-- A relay that meets such a refusal counts it here (attempts, last error).
-- Once the count reaches the relay's limit the event is parked: its
-- pending row leaves herald_outbox_pending, and while the park lasts no
-- later event of its aggregate is claimed either (the claims skip parked
-- aggregates), so they wait behind it in order. Other aggregates, in the
-- same shard too, flow as usual. A person ends the park: retry (the event
-- is queued again, the count starts over) or discard (the event stays in
-- herald_outbox but is never published; the aggregate's later events
-- flow). Both are recorded in herald_outbox_audit.
CREATE TABLE herald_outbox_refused (
    id               BIGINT PRIMARY KEY,
    event_id         UUID NOT NULL UNIQUE,
    shard            SMALLINT NOT NULL,
    aggregate_type   TEXT NOT NULL,
    aggregate_id     TEXT NOT NULL,
    topic            TEXT NOT NULL,
    attempts         INT NOT NULL,
    last_error       TEXT NOT NULL,
    first_refused_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_refused_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    parked_at        TIMESTAMPTZ
);

-- What the claims probe: is this aggregate parked?
CREATE INDEX herald_outbox_refused_parked
    ON herald_outbox_refused (shard, aggregate_type, aggregate_id)
    WHERE parked_at IS NOT NULL;

-- Every retry and discard of a parked event: what, when, by whom, why.
CREATE TABLE herald_outbox_audit (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id  UUID NOT NULL,
    action    TEXT NOT NULL CHECK (action IN ('retry', 'discard')),
    actor     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    last_error TEXT NOT NULL,
    at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The write model: one row per order, changed only through the API, in the
-- same transaction that enqueues the order's event to the outbox.
CREATE TABLE orders (
    id           UUID PRIMARY KEY,
    customer_id  UUID NOT NULL,
    currency     TEXT NOT NULL,
    total        NUMERIC(30, 6) NOT NULL,
    items        JSONB NOT NULL,
    status       TEXT NOT NULL,
    version      INTEGER NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);

-- Idempotency-Key: the first answer to a key is replayed for a retry with
-- the same request; another request under the same key is refused.
CREATE TABLE idempotency_keys (
    key              TEXT PRIMARY KEY,
    request          JSONB NOT NULL,
    response_status  INTEGER NOT NULL,
    response_body    JSONB NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- The read model, kept by the projection consumer from order-events.
CREATE TABLE order_views (
    order_id         UUID PRIMARY KEY,
    customer_id      UUID NOT NULL,
    currency         TEXT NOT NULL,
    total            NUMERIC(30, 6) NOT NULL,
    items            JSONB NOT NULL,
    status           TEXT NOT NULL,
    version          INTEGER NOT NULL,
    cancel_reason    TEXT,
    last_event_id    UUID NOT NULL,
    last_event_type  TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    projected_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_views_customer ON order_views (customer_id, created_at, order_id);

-- The notification log (a stand-in for e-mail), one row per event.
CREATE TABLE notifications (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     UUID NOT NULL UNIQUE,
    order_id     UUID NOT NULL,
    kind         TEXT NOT NULL,
    message      TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX notifications_order ON notifications (order_id);

-- What `orders dlq replay` re-published, for the audit trail.
CREATE TABLE dlq_replays (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dlq_topic         TEXT NOT NULL,
    dlq_partition     INTEGER NOT NULL,
    dlq_offset        BIGINT NOT NULL,
    original_topic    TEXT NOT NULL,
    event_id          TEXT,
    error_class       TEXT,
    replayed_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (dlq_topic, dlq_partition, dlq_offset)
);

-- The service's tables for the embedded development mode (SQLite): the same
-- model as migrations/ for PostgreSQL, with SQLite types (uuids, decimals and
-- timestamps as TEXT, JSON as TEXT).
CREATE TABLE orders (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    currency     TEXT NOT NULL,
    total        TEXT NOT NULL,
    items        TEXT NOT NULL,
    status       TEXT NOT NULL,
    version      INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);

CREATE TABLE idempotency_keys (
    key              TEXT PRIMARY KEY,
    request          TEXT NOT NULL,
    response_status  INTEGER NOT NULL,
    response_body    TEXT NOT NULL,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE order_views (
    order_id         TEXT PRIMARY KEY,
    customer_id      TEXT NOT NULL,
    currency         TEXT NOT NULL,
    total            TEXT NOT NULL,
    items            TEXT NOT NULL,
    status           TEXT NOT NULL,
    version          INTEGER NOT NULL,
    cancel_reason    TEXT,
    last_event_id    TEXT NOT NULL,
    last_event_type  TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    projected_at     TEXT NOT NULL
);
CREATE INDEX order_views_customer ON order_views (customer_id, created_at, order_id);

CREATE TABLE notifications (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    order_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    message      TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX notifications_order ON notifications (order_id);

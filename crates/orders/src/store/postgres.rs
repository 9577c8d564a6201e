//! The service's PostgreSQL queries: the write model (orders and their
//! outbox events in one transaction), idempotency keys, the read model and
//! the notification log; [`OrderStore`] for a [`PgPool`].

use std::time::Duration;

use chrono::Utc;
use herald::{HandlerError, OutboxStatus, TraceContext};
use herald_postgres::{outbox, Inbox, OutboxRecord, StoreError};
use rust_decimal::Decimal;
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::{query, DbError, Effect, OrderStore};
use crate::domain::{
    fingerprint, new_order, notification_text, plan_transition, projection_step, transition_event,
    CreateOutcome, NewOrder, OrderEvent, OrderItem, OrderStatus, OrderView, Topics, Transition,
    TransitionOutcome, ViewChange, SOURCE,
};

/// The service's own migrations (herald's run beside them).
pub static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.ignore_missing = true;
    migrator
};

/// Applies herald's migrations, then the service's.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    herald_postgres::migrate(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

fn view_from_row(row: &sqlx::postgres::PgRow, read_model: bool) -> Result<OrderView, DbError> {
    let status: String = row.get("status");
    let items: sqlx::types::Json<Vec<OrderItem>> = row.get("items");
    let version: i32 = row.get("version");
    Ok(OrderView {
        id: row.get(if read_model { "order_id" } else { "id" }),
        customer_id: row.get("customer_id"),
        currency: row.get("currency"),
        items: items.0,
        total: {
            let currency: String = row.get("currency");
            let mut total: Decimal = row.get("total");
            total.rescale(crate::domain::currency_minor_digits(&currency).unwrap_or(2));
            total
        },
        status: OrderStatus::parse(&status)
            .ok_or_else(|| DbError::Corrupt(format!("status {status:?}")))?,
        version: u32::try_from(version)
            .map_err(|_| DbError::Corrupt(format!("version {version}")))?,
        cancel_reason: row.get("cancel_reason"),
        last_event_id: read_model.then(|| row.get("last_event_id")),
        last_event_type: read_model.then(|| row.get("last_event_type")),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        projected_at: read_model.then(|| row.get("projected_at")),
    })
}

/// See [`OrderStore::create_order`].
async fn create_order(
    pool: &PgPool,
    topics: &Topics,
    order: &NewOrder,
    idempotency_key: Option<&str>,
    trace: Option<TraceContext>,
) -> Result<CreateOutcome, DbError> {
    let fingerprint = fingerprint(order);
    // The order and its answer are known before anything is written, so
    // the key's claim stores the answer at once (one statement, not a
    // claim and a later update): the transaction makes them one.
    let (view, event) = new_order(order, Utc::now());
    let mut tx = pool.begin().await.map_err(query("begin"))?;
    if let Some(key) = idempotency_key {
        // Claim the key first: a concurrent request with the same key waits
        // here until this one commits, then sees its answer.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, request, response_status, response_body)
             VALUES ($1, $2, 201, $3) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(&fingerprint)
        .bind(sqlx::types::Json(&view))
        .execute(&mut *tx)
        .await
        .map_err(query("claiming the idempotency key"))?;
        if claimed.rows_affected() == 0 {
            let row = sqlx::query(
                "SELECT request, response_status, response_body FROM idempotency_keys WHERE key = $1",
            )
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(query("reading the idempotency key"))?;
            let request: serde_json::Value = row.get("request");
            if request != fingerprint {
                return Ok(CreateOutcome::KeyReused);
            }
            let status: i32 = row.get("response_status");
            return Ok(CreateOutcome::Replayed {
                status: u16::try_from(status).unwrap_or(500),
                body: row.get("response_body"),
            });
        }
    }

    sqlx::query(
        "INSERT INTO orders (id, customer_id, currency, total, items, status, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'created', 1, $6, $6)",
    )
    .bind(view.id)
    .bind(order.customer_id)
    .bind(&order.currency)
    .bind(order.total)
    .bind(sqlx::types::Json(&order.items))
    .bind(view.created_at)
    .execute(&mut *tx)
    .await
    .map_err(query("inserting the order"))?;
    outbox::enqueue(
        &mut tx,
        &OutboxRecord::new(&topics.events, &event, SOURCE, trace)?,
    )
    .await?;
    tx.commit().await.map_err(query("commit"))?;
    Ok(CreateOutcome::Created(Box::new(view)))
}

/// See [`OrderStore::transition`].
async fn transition(
    pool: &PgPool,
    topics: &Topics,
    order_id: Uuid,
    owner: Option<Uuid>,
    to: Transition,
    trace: Option<TraceContext>,
) -> Result<TransitionOutcome, DbError> {
    let mut tx = pool.begin().await.map_err(query("begin"))?;
    // The row lock is the transaction's first write: it serializes every
    // writer of this order, which is what keeps its events in order.
    let Some(row) = sqlx::query(
        "SELECT id, customer_id, currency, total, items, status, version, NULL::text AS cancel_reason,
                created_at, updated_at
         FROM orders WHERE id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(query("locking the order"))?
    else {
        return Ok(TransitionOutcome::NotFound);
    };
    let mut view = view_from_row(&row, false)?;
    let (next, version) = match plan_transition(&view, owner, &to) {
        Ok(plan) => plan,
        Err(stopped) => return Ok(stopped),
    };
    let now = Utc::now();
    sqlx::query("UPDATE orders SET status = $2, version = $3, updated_at = $4 WHERE id = $1")
        .bind(order_id)
        .bind(next.as_str())
        .bind(i32::try_from(version).unwrap_or(i32::MAX))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(query("updating the order"))?;
    let event = transition_event(order_id, &to, version, now);
    outbox::enqueue(
        &mut tx,
        &OutboxRecord::new(&topics.events, &event, SOURCE, trace)?,
    )
    .await?;
    tx.commit().await.map_err(query("commit"))?;
    view.status = next;
    view.version = version;
    view.updated_at = now;
    if let Transition::Cancel(reason) = to {
        view.cancel_reason = Some(reason);
    }
    Ok(TransitionOutcome::Done(Box::new(view)))
}

/// The most events a consumer's inbox transaction takes (herald's cap).
const INBOX_BATCH: usize = 64;

const VIEW_COLUMNS: &str =
    "order_id, customer_id, currency, total, items, status, version, cancel_reason,
     last_event_id, last_event_type, created_at, updated_at, projected_at";

/// See [`OrderStore::get_view`].
async fn get_view(pool: &PgPool, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_views WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await
    .map_err(query("reading the read model"))?;
    row.map(|r| view_from_row(&r, true)).transpose()
}

/// See [`OrderStore::list_views`].
async fn list_views(
    pool: &PgPool,
    customer_id: Uuid,
    limit: i64,
) -> Result<Vec<OrderView>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_views WHERE customer_id = $1
         ORDER BY created_at, order_id LIMIT $2"
    ))
    .bind(customer_id)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(query("listing the read model"))?;
    rows.iter().map(|r| view_from_row(r, true)).collect()
}

/// Applies one event to the read model, inside the inbox transaction (see
/// [`projection_step`] for out-of-order events).
async fn project(conn: &mut PgConnection, event: &OrderEvent) -> Result<(), HandlerError> {
    let classify = herald_postgres::classify;
    let (event_id, event_type) = (
        herald::Event::event_id(event),
        herald::Event::event_type(event),
    );
    if let OrderEvent::OrderCreated(e) = event {
        sqlx::query(
            "INSERT INTO order_views (order_id, customer_id, currency, total, items, status, version,
                                      last_event_id, last_event_type, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'created', $6, $7, $8, $9, $9)
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(e.order_id)
        .bind(e.customer_id)
        .bind(&e.currency)
        .bind(e.total)
        .bind(sqlx::types::Json(&e.items))
        .bind(i32::try_from(e.version).unwrap_or(i32::MAX))
        .bind(event_id)
        .bind(event_type)
        .bind(e.timestamp)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
        return Ok(());
    }
    let current: Option<(String, i32)> =
        sqlx::query_as("SELECT status, version FROM order_views WHERE order_id = $1 FOR UPDATE")
            .bind(event.order_id())
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify)?;
    let current = current.map(|(status, version)| (status, u32::try_from(version).unwrap_or(0)));
    let Some(ViewChange { next, reason, at }) = projection_step(current, event)? else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE order_views SET status = $2, version = $3, cancel_reason = COALESCE($4, cancel_reason),
                last_event_id = $5, last_event_type = $6, updated_at = $7, projected_at = clock_timestamp()
         WHERE order_id = $1",
    )
    .bind(event.order_id())
    .bind(next.as_str())
    .bind(i32::try_from(event.version()).unwrap_or(i32::MAX))
    .bind(reason)
    .bind(event_id)
    .bind(event_type)
    .bind(at)
    .execute(&mut *conn)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Writes the notification of one event, inside the inbox transaction.
async fn notify(conn: &mut PgConnection, event: &OrderEvent) -> Result<(), HandlerError> {
    let (kind, message) = notification_text(event);
    sqlx::query(
        "INSERT INTO notifications (event_id, order_id, kind, message) VALUES ($1, $2, $3, $4)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(herald::Event::event_id(event))
    .bind(event.order_id())
    .bind(kind)
    .bind(message)
    .execute(&mut *conn)
    .await
    .map_err(herald_postgres::classify)?;
    Ok(())
}

impl OrderStore for PgPool {
    type Inbox = Inbox;

    async fn create_order(
        &self,
        topics: &Topics,
        order: &NewOrder,
        idempotency_key: Option<&str>,
        trace: Option<TraceContext>,
    ) -> Result<CreateOutcome, DbError> {
        create_order(self, topics, order, idempotency_key, trace).await
    }

    async fn transition(
        &self,
        topics: &Topics,
        order_id: Uuid,
        owner: Option<Uuid>,
        to: Transition,
        trace: Option<TraceContext>,
    ) -> Result<TransitionOutcome, DbError> {
        transition(self, topics, order_id, owner, to, trace).await
    }

    async fn get_view(&self, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
        get_view(self, order_id).await
    }

    async fn list_views(&self, customer_id: Uuid, limit: i64) -> Result<Vec<OrderView>, DbError> {
        list_views(self, customer_id, limit).await
    }

    fn inbox(&self, group: String) -> Inbox {
        // Concurrent events (different orders) share a transaction and its
        // commit: herald-bench inbox measured that at 1.38 times the
        // throughput of a transaction per event (crates/herald-bench/README.md).
        // No wait for a batch to fill: batches form from what queues while
        // the previous ones run, so a lone event goes at once.
        Inbox::batched(self.clone(), group, INBOX_BATCH, Duration::ZERO)
    }

    async fn apply_once(
        inbox: &Inbox,
        effect: Effect,
        event: OrderEvent,
        event_id: Uuid,
    ) -> Result<(), HandlerError> {
        inbox
            .apply(event_id, async move |conn| match effect {
                Effect::Projection => project(conn, &event).await,
                Effect::Notifications => notify(conn, &event).await,
            })
            .await
            .map(|_| ())
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(self).await.is_ok()
    }

    async fn close(&self) {
        PgPool::close(self).await;
    }

    async fn inbox_rows(&self) -> Option<Vec<(String, i64)>> {
        herald_postgres::inbox::rows_per_group(self).await.ok()
    }

    async fn backlog(&self) -> Option<OutboxStatus> {
        herald_postgres::outbox::status(self).await.ok()
    }
}

//! The service's PostgreSQL queries: the write model (orders and their
//! outbox events in one transaction), idempotency keys, the read model and
//! the notification log.

use chrono::{DateTime, Utc};
use herald::{HandlerError, TraceContext};
use herald_postgres::{outbox, OutboxRecord, StoreError};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::{
    NewOrder, OrderCancelled, OrderCreated, OrderEvent, OrderItem, OrderShipped, OrderStatus,
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

/// The CloudEvents source of this service's events.
pub const SOURCE: &str = "/orders";

/// Where the service's events go.
#[derive(Debug, Clone)]
pub struct Topics {
    /// The order events topic (`order-events`).
    pub events: String,
}

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderView {
    /// Order id.
    pub id: Uuid,
    /// Customer id.
    pub customer_id: Uuid,
    /// ISO 4217 code.
    pub currency: String,
    /// Lines.
    pub items: Vec<OrderItem>,
    /// Sum of the lines.
    pub total: Decimal,
    /// Status.
    pub status: OrderStatus,
    /// Version: 1 when created, +1 per transition.
    pub version: u32,
    /// Why it was cancelled, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// The last event applied (read model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<Uuid>,
    /// Its type (read model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_type: Option<String>,
    /// When the order was placed.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When the read model applied the last event (read model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projected_at: Option<DateTime<Utc>>,
}

/// Result of `POST /orders`.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A new order.
    Created(Box<OrderView>),
    /// The same Idempotency-Key and request as before: the first answer.
    Replayed {
        /// HTTP status of the first answer.
        status: u16,
        /// Its body.
        body: serde_json::Value,
    },
    /// The Idempotency-Key was used for another request.
    KeyReused,
}

/// Result of a state transition.
#[derive(Debug)]
pub enum TransitionOutcome {
    /// Done; the order after it.
    Done(Box<OrderView>),
    /// No such order.
    NotFound,
    /// The state machine forbids it from the current status.
    Forbidden(OrderStatus),
}

/// Errors of the service's store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A query failed.
    #[error("{operation}: {source}")]
    Query {
        /// What the service was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] StoreError),
    /// An event could not be encoded.
    #[error(transparent)]
    Encode(#[from] herald::EncodeError),
    /// The embedded store failed.
    #[error("store: {0}")]
    Store(String),
    /// A stored value is not what the schema promises.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

fn query(operation: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { operation, source }
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

/// Places an order: the order row and its `OrderCreated` event commit
/// together. With an idempotency key, a repeat of the same request returns
/// the first answer and creates nothing.
pub async fn create_order(
    pool: &PgPool,
    topics: &Topics,
    order: &NewOrder,
    idempotency_key: Option<&str>,
    trace: Option<TraceContext>,
) -> Result<CreateOutcome, DbError> {
    let fingerprint = fingerprint(order);
    let mut tx = pool.begin().await.map_err(query("begin"))?;
    if let Some(key) = idempotency_key {
        // Claim the key first: a concurrent request with the same key waits
        // here until this one commits, then sees its answer.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, request, response_status, response_body)
             VALUES ($1, $2, 0, 'null') ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(&fingerprint)
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

    let (view, event) = new_order(order, Utc::now());
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
    if let Some(key) = idempotency_key {
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = 201, response_body = $2 WHERE key = $1",
        )
        .bind(key)
        .bind(sqlx::types::Json(&view))
        .execute(&mut *tx)
        .await
        .map_err(query("storing the idempotent answer"))?;
    }
    tx.commit().await.map_err(query("commit"))?;
    Ok(CreateOutcome::Created(Box::new(view)))
}

/// The target of a transition.
#[derive(Debug, Clone)]
pub enum Transition {
    /// Ship the order.
    Ship,
    /// Cancel it, with a reason.
    Cancel(String),
}

/// The event of a transition to `version`.
pub(crate) fn transition_event(
    order_id: Uuid,
    to: &Transition,
    version: u32,
    now: DateTime<Utc>,
) -> OrderEvent {
    match to {
        Transition::Ship => OrderEvent::OrderShipped(OrderShipped {
            event_id: Uuid::new_v4(),
            order_id,
            version,
            timestamp: now,
        }),
        Transition::Cancel(reason) => OrderEvent::OrderCancelled(OrderCancelled {
            event_id: Uuid::new_v4(),
            order_id,
            reason: reason.clone(),
            version,
            timestamp: now,
        }),
    }
}

/// The request part an idempotency key is bound to.
pub(crate) fn fingerprint(order: &NewOrder) -> serde_json::Value {
    serde_json::json!({
        "customer_id": order.customer_id,
        "currency": order.currency,
        "items": order.items,
    })
}

/// The answer to a new order, and its `OrderCreated` event.
pub(crate) fn new_order(order: &NewOrder, now: DateTime<Utc>) -> (OrderView, OrderEvent) {
    let order_id = Uuid::now_v7();
    let event = OrderEvent::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        order_id,
        customer_id: order.customer_id,
        items: order.items.clone(),
        total: order.total,
        currency: order.currency.clone(),
        version: 1,
        timestamp: now,
    });
    let view = OrderView {
        id: order_id,
        customer_id: order.customer_id,
        currency: order.currency.clone(),
        items: order.items.clone(),
        total: order.total,
        status: OrderStatus::Created,
        version: 1,
        cancel_reason: None,
        last_event_id: None,
        last_event_type: None,
        created_at: now,
        updated_at: now,
        projected_at: None,
    };
    (view, event)
}

/// Moves an order along the state machine; the change and its event commit
/// together. With `owner`, an order of another customer is
/// [`TransitionOutcome::NotFound`] (the API's authorization: it does not
/// tell others' orders from missing ones).
pub async fn transition(
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
    if owner.is_some_and(|owner| owner != view.customer_id) {
        return Ok(TransitionOutcome::NotFound);
    }
    let next = match to {
        Transition::Ship => OrderStatus::Shipped,
        Transition::Cancel(_) => OrderStatus::Cancelled,
    };
    if !view.status.can_become(next) {
        return Ok(TransitionOutcome::Forbidden(view.status));
    }
    let now = Utc::now();
    let version = view.version + 1;
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

const VIEW_COLUMNS: &str =
    "order_id, customer_id, currency, total, items, status, version, cancel_reason,
     last_event_id, last_event_type, created_at, updated_at, projected_at";

/// One order from the read model.
pub async fn get_view(pool: &PgPool, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_views WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await
    .map_err(query("reading the read model"))?;
    row.map(|r| view_from_row(&r, true)).transpose()
}

/// A customer's orders from the read model, oldest first, at most `limit`.
pub async fn list_views(
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

/// A transition of an order's read-model row.
pub(crate) struct ViewChange<'a> {
    /// The new status.
    pub next: OrderStatus,
    /// The cancellation reason, if any.
    pub reason: Option<&'a str>,
    /// When the event happened.
    pub at: DateTime<Utc>,
}

/// What a shipped/cancelled event does to a read-model row in `current`
/// (status, version): `None` when the row already reflects it.
///
/// Events of one order arrive in order (one key, one partition, sequential
/// handling), but a replay or a hand-made record can break that: an event
/// whose predecessor is missing is a transient failure (retried a bounded
/// number of times, then dead-lettered); an impossible transition is
/// permanent.
pub(crate) fn projection_step(
    current: Option<(String, u32)>,
    event: &OrderEvent,
) -> Result<Option<ViewChange<'_>>, HandlerError> {
    let event_type = herald::Event::event_type(event);
    let Some((status, version)) = current else {
        return Err(HandlerError::transient(format!(
            "{event_type} for order {} before its OrderCreated",
            event.order_id()
        )));
    };
    if version >= event.version() {
        return Ok(None);
    }
    if version + 1 != event.version() {
        return Err(HandlerError::transient(format!(
            "{event_type} v{} for order {} arrived before v{}",
            event.version(),
            event.order_id(),
            version + 1
        )));
    }
    let (next, reason, at) = match event {
        OrderEvent::OrderShipped(e) => (OrderStatus::Shipped, None, e.timestamp),
        OrderEvent::OrderCancelled(e) => {
            (OrderStatus::Cancelled, Some(e.reason.as_str()), e.timestamp)
        }
        OrderEvent::OrderCreated(_) => return Ok(None),
    };
    let from = OrderStatus::parse(&status).unwrap_or(OrderStatus::Created);
    if !from.can_become(next) {
        return Err(HandlerError::permanent(format!(
            "{event_type} for order {} in status {}",
            event.order_id(),
            from.as_str()
        )));
    }
    Ok(Some(ViewChange { next, reason, at }))
}

/// Applies one event to the read model, inside the inbox transaction (see
/// [`projection_step`] for out-of-order events).
pub async fn project(conn: &mut PgConnection, event: &OrderEvent) -> Result<(), HandlerError> {
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

/// The notification of one event: its kind and text (a stand-in for the
/// e-mail a real service would send).
pub(crate) fn notification_text(event: &OrderEvent) -> (&'static str, String) {
    match event {
        OrderEvent::OrderCreated(e) => (
            "order_created",
            format!(
                "Thank you! Order {} for {} {} is placed.",
                e.order_id, e.total, e.currency
            ),
        ),
        OrderEvent::OrderShipped(e) => (
            "order_shipped",
            format!("Order {} is on its way.", e.order_id),
        ),
        OrderEvent::OrderCancelled(e) => (
            "order_cancelled",
            format!("Order {} was cancelled: {}", e.order_id, e.reason),
        ),
    }
}

/// Writes the notification of one event, inside the inbox transaction.
pub async fn notify(conn: &mut PgConnection, event: &OrderEvent) -> Result<(), HandlerError> {
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

/// A notification row.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    /// The event it is about.
    pub event_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// `order_created`, `order_shipped` or `order_cancelled`.
    pub kind: String,
    /// The text.
    pub message: String,
}

/// The notifications of an order, oldest first.
pub async fn notifications(pool: &PgPool, order_id: Uuid) -> Result<Vec<Notification>, DbError> {
    let rows = sqlx::query("SELECT event_id, order_id, kind, message FROM notifications WHERE order_id = $1 ORDER BY id")
        .bind(order_id)
        .fetch_all(pool)
        .await
        .map_err(query("reading notifications"))?;
    Ok(rows
        .iter()
        .map(|r| Notification {
            event_id: r.get("event_id"),
            order_id: r.get("order_id"),
            kind: r.get("kind"),
            message: r.get("message"),
        })
        .collect())
}

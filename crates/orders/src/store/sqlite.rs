//! The service's queries on SQLite, for the embedded development mode: the
//! same model and rules as [`super::postgres`] (both take them from
//! [`crate::domain`]), in SQLite's dialect; [`OrderStore`] for a
//! [`SqliteDatabase`]. Writers start with `BEGIN IMMEDIATE`, which
//! serializes them the way `SELECT … FOR UPDATE` does on PostgreSQL.

use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use herald::{HandlerError, OutboxStatus, TraceContext};
use herald_sqlite::{outbox, OutboxRecord, SqliteDatabase, SqliteInbox};
use rust_decimal::Decimal;
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};
use uuid::Uuid;

use super::{query, DbError, Effect, OrderStore};
use crate::domain::{
    currency_minor_digits, fingerprint, new_order, notification_text, plan_transition,
    projection_step, transition_event, CreateOutcome, NewOrder, OrderEvent, OrderItem, OrderStatus,
    OrderView, Topics, Transition, TransitionOutcome, ViewChange, SOURCE,
};

/// The service's own SQLite migrations (herald's run beside them).
pub static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations-sqlite");
    migrator.ignore_missing = true;
    migrator
};

fn text_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn corrupt(what: &str) -> DbError {
    DbError::Corrupt(what.to_owned())
}

fn view_from_row(row: &SqliteRow, read_model: bool) -> Result<OrderView, DbError> {
    let uuid = |name: &str| -> Result<Uuid, DbError> {
        Uuid::parse_str(&row.get::<String, _>(name)).map_err(|_| corrupt(name))
    };
    let time = |name: &str| -> Result<DateTime<Utc>, DbError> {
        DateTime::parse_from_rfc3339(&row.get::<String, _>(name))
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| corrupt(name))
    };
    let currency: String = row.get("currency");
    let mut total =
        Decimal::from_str(&row.get::<String, _>("total")).map_err(|_| corrupt("total"))?;
    total.rescale(currency_minor_digits(&currency).unwrap_or(2));
    let items: Vec<OrderItem> =
        serde_json::from_str(&row.get::<String, _>("items")).map_err(|_| corrupt("items"))?;
    let status: String = row.get("status");
    let version: i64 = row.get("version");
    Ok(OrderView {
        id: uuid(if read_model { "order_id" } else { "id" })?,
        customer_id: uuid("customer_id")?,
        currency,
        items,
        total,
        status: OrderStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
        version: u32::try_from(version).map_err(|_| corrupt("version"))?,
        cancel_reason: if read_model {
            row.get("cancel_reason")
        } else {
            None
        },
        last_event_id: if read_model {
            Some(uuid("last_event_id")?)
        } else {
            None
        },
        last_event_type: read_model.then(|| row.get("last_event_type")),
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        projected_at: if read_model {
            Some(time("projected_at")?)
        } else {
            None
        },
    })
}

/// Applies herald's SQLite migrations, then the service's.
pub async fn migrate(pool: &SqlitePool) -> Result<(), herald_sqlite::StoreError> {
    herald_sqlite::migrate(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// See [`OrderStore::create_order`].
async fn create_order(
    pool: &SqlitePool,
    topics: &Topics,
    order: &NewOrder,
    idempotency_key: Option<&str>,
    trace: Option<TraceContext>,
) -> Result<CreateOutcome, DbError> {
    let request_json = fingerprint(order);
    let fingerprint = request_json.to_string();
    let mut tx = herald_sqlite::begin(pool)
        .await
        .map_err(|e| DbError::Store(e.to_string()))?;
    if let Some(key) = idempotency_key {
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, request, response_status, response_body)
             VALUES (?1, ?2, 0, 'null') ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(&fingerprint)
        .execute(&mut *tx)
        .await
        .map_err(query("claiming the idempotency key"))?;
        if claimed.rows_affected() == 0 {
            let row = sqlx::query("SELECT request, response_status, response_body FROM idempotency_keys WHERE key = ?1")
                .bind(key)
                .fetch_one(&mut *tx)
                .await
                .map_err(query("reading the idempotency key"))?;
            let request: serde_json::Value = serde_json::from_str(&row.get::<String, _>("request"))
                .map_err(|_| corrupt("request"))?;
            if request != request_json {
                return Ok(CreateOutcome::KeyReused);
            }
            let status: i64 = row.get("response_status");
            let body = serde_json::from_str(&row.get::<String, _>("response_body"))
                .map_err(|_| corrupt("response_body"))?;
            return Ok(CreateOutcome::Replayed {
                status: u16::try_from(status).unwrap_or(500),
                body,
            });
        }
    }
    let (view, event) = new_order(order, Utc::now());
    let items = serde_json::to_string(&order.items).map_err(|e| DbError::Store(e.to_string()))?;
    sqlx::query(
        "INSERT INTO orders (id, customer_id, currency, total, items, status, version, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'created', 1, ?6, ?6)",
    )
    .bind(view.id.to_string())
    .bind(order.customer_id.to_string())
    .bind(&order.currency)
    .bind(order.total.to_string())
    .bind(items)
    .bind(text_time(&view.created_at))
    .execute(&mut *tx)
    .await
    .map_err(query("inserting the order"))?;
    let record = OutboxRecord::new(&topics.events, &event, SOURCE, trace)?;
    outbox::enqueue(&mut tx, &record)
        .await
        .map_err(|e| DbError::Store(e.to_string()))?;
    if let Some(key) = idempotency_key {
        let body = serde_json::to_string(&view).map_err(|e| DbError::Store(e.to_string()))?;
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = 201, response_body = ?2 WHERE key = ?1",
        )
        .bind(key)
        .bind(body)
        .execute(&mut *tx)
        .await
        .map_err(query("storing the idempotent answer"))?;
    }
    tx.commit().await.map_err(query("commit"))?;
    Ok(CreateOutcome::Created(Box::new(view)))
}

/// See [`OrderStore::transition`].
async fn transition(
    pool: &SqlitePool,
    topics: &Topics,
    order_id: Uuid,
    owner: Option<Uuid>,
    to: Transition,
    trace: Option<TraceContext>,
) -> Result<TransitionOutcome, DbError> {
    let mut tx = herald_sqlite::begin(pool)
        .await
        .map_err(|e| DbError::Store(e.to_string()))?;
    let Some(row) = sqlx::query(
        "SELECT id, customer_id, currency, total, items, status, version, created_at, updated_at
         FROM orders WHERE id = ?1",
    )
    .bind(order_id.to_string())
    .fetch_optional(&mut *tx)
    .await
    .map_err(query("reading the order"))?
    else {
        return Ok(TransitionOutcome::NotFound);
    };
    let mut view = view_from_row(&row, false)?;
    let (next, version) = match plan_transition(&view, owner, &to) {
        Ok(plan) => plan,
        Err(stopped) => return Ok(stopped),
    };
    let now = Utc::now();
    sqlx::query("UPDATE orders SET status = ?2, version = ?3, updated_at = ?4 WHERE id = ?1")
        .bind(order_id.to_string())
        .bind(next.as_str())
        .bind(i64::from(version))
        .bind(text_time(&now))
        .execute(&mut *tx)
        .await
        .map_err(query("updating the order"))?;
    let event = transition_event(order_id, &to, version, now);
    let record = OutboxRecord::new(&topics.events, &event, SOURCE, trace)?;
    outbox::enqueue(&mut tx, &record)
        .await
        .map_err(|e| DbError::Store(e.to_string()))?;
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

/// See [`OrderStore::get_view`].
async fn get_view(pool: &SqlitePool, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_views WHERE order_id = ?1"
    ))
    .bind(order_id.to_string())
    .fetch_optional(pool)
    .await
    .map_err(query("reading the read model"))?;
    row.map(|r| view_from_row(&r, true)).transpose()
}

/// See [`OrderStore::list_views`].
async fn list_views(
    pool: &SqlitePool,
    customer_id: Uuid,
    limit: i64,
) -> Result<Vec<OrderView>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_views WHERE customer_id = ?1 ORDER BY created_at, order_id LIMIT ?2"
    ))
    .bind(customer_id.to_string())
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(query("listing the read model"))?;
    rows.iter().map(|r| view_from_row(r, true)).collect()
}

/// As [`super::postgres`]'s `project`, in SQLite's dialect.
async fn project(conn: &mut SqliteConnection, event: &OrderEvent) -> Result<(), HandlerError> {
    let classify = herald_sqlite::classify;
    let event_id = herald::Event::event_id(event).to_string();
    let event_type = herald::Event::event_type(event);
    let now = text_time(&Utc::now());
    if let OrderEvent::OrderCreated(e) = event {
        let items = serde_json::to_string(&e.items).map_err(HandlerError::permanent)?;
        sqlx::query(
            "INSERT INTO order_views (order_id, customer_id, currency, total, items, status, version,
                                      last_event_id, last_event_type, created_at, updated_at, projected_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'created', ?6, ?7, ?8, ?9, ?9, ?10)
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(e.order_id.to_string())
        .bind(e.customer_id.to_string())
        .bind(&e.currency)
        .bind(e.total.to_string())
        .bind(items)
        .bind(i64::from(e.version))
        .bind(event_id)
        .bind(event_type)
        .bind(text_time(&e.timestamp))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
        return Ok(());
    }
    let current: Option<(String, i64)> =
        sqlx::query_as("SELECT status, version FROM order_views WHERE order_id = ?1")
            .bind(event.order_id().to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify)?;
    let current = current.map(|(status, version)| (status, u32::try_from(version).unwrap_or(0)));
    let Some(ViewChange { next, reason, at }) = projection_step(current, event)? else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE order_views SET status = ?2, version = ?3, cancel_reason = COALESCE(?4, cancel_reason),
                last_event_id = ?5, last_event_type = ?6, updated_at = ?7, projected_at = ?8
         WHERE order_id = ?1",
    )
    .bind(event.order_id().to_string())
    .bind(next.as_str())
    .bind(i64::from(event.version()))
    .bind(reason)
    .bind(event_id)
    .bind(event_type)
    .bind(text_time(&at))
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(classify)?;
    Ok(())
}

/// As [`super::postgres`]'s `notify`, in SQLite's dialect.
async fn notify(conn: &mut SqliteConnection, event: &OrderEvent) -> Result<(), HandlerError> {
    let (kind, message) = notification_text(event);
    sqlx::query(
        "INSERT INTO notifications (event_id, order_id, kind, message) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(herald::Event::event_id(event).to_string())
    .bind(event.order_id().to_string())
    .bind(kind)
    .bind(message)
    .execute(&mut *conn)
    .await
    .map_err(herald_sqlite::classify)?;
    Ok(())
}

impl OrderStore for SqliteDatabase {
    type Inbox = SqliteInbox;

    async fn create_order(
        &self,
        topics: &Topics,
        order: &NewOrder,
        idempotency_key: Option<&str>,
        trace: Option<TraceContext>,
    ) -> Result<CreateOutcome, DbError> {
        create_order(self.pool(), topics, order, idempotency_key, trace).await
    }

    async fn transition(
        &self,
        topics: &Topics,
        order_id: Uuid,
        owner: Option<Uuid>,
        to: Transition,
        trace: Option<TraceContext>,
    ) -> Result<TransitionOutcome, DbError> {
        transition(self.pool(), topics, order_id, owner, to, trace).await
    }

    async fn get_view(&self, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
        get_view(self.pool(), order_id).await
    }

    async fn list_views(&self, customer_id: Uuid, limit: i64) -> Result<Vec<OrderView>, DbError> {
        list_views(self.pool(), customer_id, limit).await
    }

    fn inbox(&self, group: String) -> SqliteInbox {
        SqliteDatabase::inbox(self, group)
    }

    async fn apply_once(
        inbox: &SqliteInbox,
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
        sqlx::query("SELECT 1").execute(self.pool()).await.is_ok()
    }

    async fn close(&self) {
        SqliteDatabase::close(self).await;
    }

    async fn inbox_rows(&self) -> Option<Vec<(String, i64)>> {
        herald_sqlite::inbox::rows_per_group(self.pool()).await.ok()
    }

    async fn backlog(&self) -> Option<OutboxStatus> {
        herald_sqlite::outbox::status(self.pool()).await.ok()
    }
}

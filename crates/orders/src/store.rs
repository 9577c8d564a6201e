//! The service's store: PostgreSQL in production, SQLite in the embedded
//! development mode. One type so the API and the app wiring do not care which.

use std::time::Duration;

use herald::{OutboxStatus, TraceContext};
use herald_sqlite::SqliteDatabase;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::{self, CreateOutcome, DbError, OrderView, Topics, Transition, TransitionOutcome};
use crate::db_sqlite;
use crate::domain::NewOrder;

/// Where orders, the outbox, the inbox and the read model live.
#[derive(Debug, Clone)]
pub enum Store {
    /// The production store.
    Postgres(PgPool),
    /// The embedded development mode's file.
    Sqlite(SqliteDatabase),
}

impl Store {
    /// Places an order (see [`db::create_order`]).
    pub async fn create_order(
        &self,
        topics: &Topics,
        order: &NewOrder,
        idempotency_key: Option<&str>,
        trace: Option<TraceContext>,
    ) -> Result<CreateOutcome, DbError> {
        match self {
            Store::Postgres(pool) => {
                db::create_order(pool, topics, order, idempotency_key, trace).await
            }
            Store::Sqlite(db) => {
                db_sqlite::create_order(db.pool(), topics, order, idempotency_key, trace).await
            }
        }
    }

    /// Moves an order along the state machine (see [`db::transition`]).
    pub async fn transition(
        &self,
        topics: &Topics,
        order_id: Uuid,
        owner: Option<Uuid>,
        to: Transition,
        trace: Option<TraceContext>,
    ) -> Result<TransitionOutcome, DbError> {
        match self {
            Store::Postgres(pool) => db::transition(pool, topics, order_id, owner, to, trace).await,
            Store::Sqlite(db) => {
                db_sqlite::transition(db.pool(), topics, order_id, owner, to, trace).await
            }
        }
    }

    /// One order from the read model.
    pub async fn get_view(&self, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
        match self {
            Store::Postgres(pool) => db::get_view(pool, order_id).await,
            Store::Sqlite(db) => db_sqlite::get_view(db.pool(), order_id).await,
        }
    }

    /// A customer's orders from the read model.
    pub async fn list_views(
        &self,
        customer_id: Uuid,
        limit: i64,
    ) -> Result<Vec<OrderView>, DbError> {
        match self {
            Store::Postgres(pool) => db::list_views(pool, customer_id, limit).await,
            Store::Sqlite(db) => db_sqlite::list_views(db.pool(), customer_id, limit).await,
        }
    }

    /// Whether the database answers within two seconds.
    pub async fn ping(&self) -> bool {
        let probe = async {
            match self {
                Store::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
                Store::Sqlite(db) => sqlx::query("SELECT 1").execute(db.pool()).await.is_ok(),
            }
        };
        tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .unwrap_or(false)
    }

    /// Closes the connections.
    pub async fn close(&self) {
        match self {
            Store::Postgres(pool) => pool.close().await,
            Store::Sqlite(db) => db.close().await,
        }
    }

    /// The PostgreSQL pool, when that is the store.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Store::Postgres(pool) => Some(pool),
            Store::Sqlite(_) => None,
        }
    }

    /// Inbox rows per consumer group, when they can be counted.
    pub async fn inbox_rows(&self) -> Option<Vec<(String, i64)>> {
        match self {
            Store::Postgres(pool) => herald_postgres::inbox::rows_per_group(pool).await.ok(),
            Store::Sqlite(db) => herald_sqlite::inbox::rows_per_group(db.pool()).await.ok(),
        }
    }

    /// Dead letters replayed so far (the replay log kept by `orders dlq
    /// replay`, which needs PostgreSQL).
    pub async fn dlq_replays(&self) -> Option<u64> {
        let Store::Postgres(pool) = self else {
            return None;
        };
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dlq_replays WHERE action = 'replay'")
            .fetch_one(pool)
            .await
            .ok()
            .and_then(|n| u64::try_from(n).ok())
    }

    /// Outbox events parked after refusals (PostgreSQL only: the embedded
    /// store does not park).
    pub async fn parked(&self) -> Option<i64> {
        let Store::Postgres(pool) = self else {
            return None;
        };
        herald_postgres::refusals::parked(pool).await.ok()
    }

    /// The outbox backlog, when it can be read.
    pub async fn backlog(&self) -> Option<OutboxStatus> {
        match self {
            Store::Postgres(pool) => herald_postgres::outbox::status(pool).await.ok(),
            Store::Sqlite(db) => herald_sqlite::outbox::status(db.pool()).await.ok(),
        }
    }
}

//! The service's store: PostgreSQL in production, SQLite in the embedded
//! development mode. Both implement [`OrderStore`]; [`Store`] is the one
//! the process opened, so the API and the consumers are written once.
//!
//! # Layout
//! - this file: [`OrderStore`], the [`Store`] handle, [`DbError`], and the
//!   consumers' handler ([`consumer_router`]), wired once for both stores.
//! - [`postgres`]: the queries on PostgreSQL, and its migrations.
//! - [`sqlite`]: the same on SQLite, in its dialect.

pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::time::Duration;

use herald::{HandlerError, OutboxStatus, TraceContext};
use herald_kafka::{RecordInfo, Router};
use herald_sqlite::SqliteDatabase;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{
    CreateOutcome, NewOrder, OrderEvent, OrderView, Topics, Transition, TransitionOutcome,
};

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
    Outbox(#[from] herald_postgres::StoreError),
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

/// The error of a query that failed while the service was doing `operation`.
pub(crate) fn query(operation: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { operation, source }
}

/// The two consumers of `order-events`, each an effect of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The read model (`order_views`).
    Projection,
    /// The notification log.
    Notifications,
}

impl Effect {
    /// The consumer's name: its handler's and its group's suffix.
    pub fn name(self) -> &'static str {
        match self {
            Effect::Projection => "projection",
            Effect::Notifications => "notifications",
        }
    }
}

/// What the service asks of its database: the write model (each change
/// and its outbox event in one transaction), the read model, and the
/// consumers' effects recorded in an inbox, once per event.
pub trait OrderStore: Clone + Send + Sync + 'static {
    /// The inbox the consumers record applied events in.
    type Inbox: Clone + Send + Sync + 'static;

    /// Places an order: the order row and its `OrderCreated` event commit
    /// together. With an idempotency key, a repeat of the same request
    /// returns the first answer and creates nothing.
    fn create_order(
        &self,
        topics: &Topics,
        order: &NewOrder,
        idempotency_key: Option<&str>,
        trace: Option<TraceContext>,
    ) -> impl Future<Output = Result<CreateOutcome, DbError>> + Send;

    /// Moves an order along the state machine; the change and its event
    /// commit together. With `owner`, an order of another customer is
    /// [`TransitionOutcome::NotFound`] (the API's authorization: it does not
    /// tell others' orders from missing ones).
    fn transition(
        &self,
        topics: &Topics,
        order_id: Uuid,
        owner: Option<Uuid>,
        to: Transition,
        trace: Option<TraceContext>,
    ) -> impl Future<Output = Result<TransitionOutcome, DbError>> + Send;

    /// One order from the read model.
    fn get_view(
        &self,
        order_id: Uuid,
    ) -> impl Future<Output = Result<Option<OrderView>, DbError>> + Send;

    /// A customer's orders from the read model, oldest first, at most `limit`.
    fn list_views(
        &self,
        customer_id: Uuid,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OrderView>, DbError>> + Send;

    /// The inbox of consumer group `group`.
    fn inbox(&self, group: String) -> Self::Inbox;

    /// Applies `effect` of `event` and records `event_id` in `inbox`, in one
    /// transaction: a second delivery of the event changes nothing.
    fn apply_once(
        inbox: &Self::Inbox,
        effect: Effect,
        event: OrderEvent,
        event_id: Uuid,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Whether the database answers a trivial query.
    fn ping(&self) -> impl Future<Output = bool> + Send;

    /// Closes the connections.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Inbox rows per consumer group, when they can be counted.
    fn inbox_rows(&self) -> impl Future<Output = Option<Vec<(String, i64)>>> + Send;

    /// The outbox backlog, when it can be read.
    fn backlog(&self) -> impl Future<Output = Option<OutboxStatus>> + Send;
}

/// The consumer of `effect`: each event's effect and its inbox row in one
/// transaction.
pub fn consumer_router<S: OrderStore>(
    effect: Effect,
    store: &S,
    group: String,
) -> Router<S::Inbox> {
    Router::with_state(store.inbox(group)).handle(
        effect.name(),
        move |inbox: S::Inbox, event: OrderEvent, record: RecordInfo| async move {
            S::apply_once(&inbox, effect, event, record.envelope.event_id).await
        },
    )
}

/// Where orders, the outbox, the inbox and the read model live.
#[derive(Debug, Clone)]
pub enum Store {
    /// The production store.
    Postgres(PgPool),
    /// The embedded development mode's file.
    Sqlite(SqliteDatabase),
}

/// Runs `$body` with `$store` bound to the [`OrderStore`] inside `$self`.
macro_rules! on_store {
    ($self:expr, $store:ident => $body:expr) => {
        match $self {
            Store::Postgres($store) => $body,
            Store::Sqlite($store) => $body,
        }
    };
}

impl Store {
    /// See [`OrderStore::create_order`].
    pub async fn create_order(
        &self,
        topics: &Topics,
        order: &NewOrder,
        idempotency_key: Option<&str>,
        trace: Option<TraceContext>,
    ) -> Result<CreateOutcome, DbError> {
        on_store!(self, store => store.create_order(topics, order, idempotency_key, trace).await)
    }

    /// See [`OrderStore::transition`].
    pub async fn transition(
        &self,
        topics: &Topics,
        order_id: Uuid,
        owner: Option<Uuid>,
        to: Transition,
        trace: Option<TraceContext>,
    ) -> Result<TransitionOutcome, DbError> {
        on_store!(self, store => store.transition(topics, order_id, owner, to, trace).await)
    }

    /// See [`OrderStore::get_view`].
    pub async fn get_view(&self, order_id: Uuid) -> Result<Option<OrderView>, DbError> {
        on_store!(self, store => store.get_view(order_id).await)
    }

    /// See [`OrderStore::list_views`].
    pub async fn list_views(
        &self,
        customer_id: Uuid,
        limit: i64,
    ) -> Result<Vec<OrderView>, DbError> {
        on_store!(self, store => store.list_views(customer_id, limit).await)
    }

    /// The consumer of `effect` in group `group` (see [`consumer_router`]).
    pub fn consumer_router(&self, effect: Effect, group: String) -> Router {
        on_store!(self, store => consumer_router(effect, store, group).erase_state())
    }

    /// Whether the database answers within two seconds.
    pub async fn ping(&self) -> bool {
        let probe = async { on_store!(self, store => store.ping().await) };
        tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .unwrap_or(false)
    }

    /// Closes the connections.
    pub async fn close(&self) {
        on_store!(self, store => store.close().await)
    }

    /// The PostgreSQL pool, when that is the store.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Store::Postgres(pool) => Some(pool),
            Store::Sqlite(_) => None,
        }
    }

    /// See [`OrderStore::inbox_rows`].
    pub async fn inbox_rows(&self) -> Option<Vec<(String, i64)>> {
        on_store!(self, store => store.inbox_rows().await)
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

    /// See [`OrderStore::backlog`].
    pub async fn backlog(&self) -> Option<OutboxStatus> {
        on_store!(self, store => store.backlog().await)
    }
}

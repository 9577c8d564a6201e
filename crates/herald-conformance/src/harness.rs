//! What a store provides to be checked: its outbox and inbox under the core
//! traits ([`herald::OutboxStore`], [`herald::InboxStore`]), plus the few
//! store-typed operations the core does not abstract (a business transaction
//! that enqueues, status and retention, an effects table).

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use herald::{AfterPublish, HandlerError, InboxStore, OutboxRecord, OutboxStatus, OutboxStore};
use uuid::Uuid;

use crate::events::{ConformanceEvent, Step};

/// Any error a harness passes on from its store.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Event `seq` of aggregate `key`, bound for `topic`.
#[derive(Debug, Clone)]
pub struct Rec {
    /// The topic the relay publishes it to.
    pub topic: String,
    /// The event.
    pub event: ConformanceEvent,
}

impl Rec {
    /// Step `seq` of aggregate `key`, with a new event id.
    pub fn new(topic: &str, key: &str, seq: u64) -> Self {
        Self {
            topic: topic.to_owned(),
            event: ConformanceEvent::Step(Step {
                event_id: Uuid::new_v4(),
                key: key.to_owned(),
                seq,
                at: Utc::now(),
            }),
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> Uuid {
        let ConformanceEvent::Step(s) = &self.event;
        s.event_id
    }

    /// The record a store enqueues for it (every store takes the core's
    /// [`OutboxRecord`]).
    pub fn record(&self) -> OutboxRecord {
        OutboxRecord::new(&self.topic, &self.event, "/conformance", None).expect("encode")
    }
}

/// One store under test, on its own fresh database.
pub trait Harness: Send + Sync + Sized + 'static {
    /// The relay's store.
    type Outbox: OutboxStore;
    /// The inbox of one consumer group.
    type Inbox: InboxStore + 'static;
    /// An open business transaction.
    type Tx: Send;

    /// The store's name, for messages.
    const NAME: &'static str;
    /// Whether a claim waits for the batch before it (SQLite) instead of
    /// skipping its locked aggregates (PostgreSQL).
    const CLAIMS_SERIALIZED: bool;

    /// `n` relay-side handles on the outbox, as `n` relays of one
    /// deployment would have them (one process per file for SQLite: clones
    /// of one outbox), doing `after_publish` with what they publish.
    fn outboxes(&self, n: usize, after_publish: AfterPublish) -> Vec<Self::Outbox>;
    /// One relay-side handle on the outbox.
    fn outbox(&self, after_publish: AfterPublish) -> Self::Outbox {
        self.outboxes(1, after_publish).pop().expect("one outbox")
    }

    /// Starts a business transaction.
    fn begin(&self) -> impl Future<Output = Self::Tx> + Send;
    /// Enqueues `records` in `tx` with the store's own enqueue.
    fn enqueue<'a>(
        tx: &'a mut Self::Tx,
        records: &'a [Rec],
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'a;
    /// Commits `tx`.
    fn commit(tx: Self::Tx) -> impl Future<Output = ()> + Send;
    /// Rolls `tx` back.
    fn rollback(tx: Self::Tx) -> impl Future<Output = ()> + Send;

    /// The store's outbox status.
    fn status(&self) -> impl Future<Output = OutboxStatus> + Send;
    /// Rows in the outbox table, published or not.
    fn outbox_rows(&self) -> impl Future<Output = i64> + Send;
    /// The store's retention of published rows: how many it removed.
    fn purge_published(&self, retention: Duration, limit: i64) -> impl Future<Output = u64> + Send;

    /// The inbox of consumer group `group`.
    fn inbox(&self, group: &str) -> Self::Inbox;
    /// The store's retention of inbox rows: how many it removed.
    fn purge_processed(&self, retention: Duration, limit: i64) -> impl Future<Output = u64> + Send;
    /// Creates `effects (event_id, applied_by)`.
    fn create_effects_table(&self) -> impl Future<Output = ()> + Send;
    /// The effect of a handler: one row in `effects`.
    fn insert_effect<'c>(
        conn: &'c mut <Self::Inbox as InboxStore>::Connection,
        event_id: Uuid,
        by: &'static str,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'c;
    /// Effect rows of `event_id` (all events when `None`).
    fn effects(&self, event_id: Option<Uuid>) -> impl Future<Output = i64> + Send;
}

/// Enqueues `records` in one committed transaction.
pub async fn enqueue_committed<H: Harness>(h: &H, records: &[Rec]) {
    let mut tx = h.begin().await;
    H::enqueue(&mut tx, records).await.expect("enqueue");
    H::commit(tx).await;
}

//! What a store provides to be checked: its outbox and inbox under the core
//! traits ([`herald::OutboxStore`], [`herald::InboxStore`]), plus the few
//! store-typed operations the core does not abstract (a business transaction
//! that enqueues, status and retention, an effects table).

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald::{HandlerError, InboxStore, OutboxStore};
use uuid::Uuid;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use herald_test::events::{Step, TestEvent};

/// Event `seq` of aggregate `key`, bound for `topic`.
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    pub event: TestEvent,
}

impl Rec {
    pub fn new(topic: &str, key: &str, seq: u64) -> Self {
        Self {
            topic: topic.to_owned(),
            event: TestEvent::Step(Step {
                event_id: Uuid::new_v4(),
                key: key.to_owned(),
                seq,
                at: Utc::now(),
            }),
        }
    }

    pub fn event_id(&self) -> Uuid {
        let TestEvent::Step(s) = &self.event;
        s.event_id
    }
}

/// The outbox figures every store reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub backlog: i64,
    pub oldest_unpublished_at: Option<DateTime<Utc>>,
    pub published_retained: i64,
}

/// What the relay does with published rows (each store has its own enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Mark,
    Delete,
}

/// One store under test, on its own fresh database.
pub trait Harness: Send + Sync + Sized + 'static {
    type Outbox: OutboxStore;
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
    /// of one outbox).
    fn outboxes(&self, n: usize, mode: Mode) -> Vec<Self::Outbox>;
    fn outbox(&self, mode: Mode) -> Self::Outbox {
        self.outboxes(1, mode).pop().expect("one outbox")
    }

    fn begin(&self) -> impl Future<Output = Self::Tx> + Send;
    fn enqueue<'a>(
        tx: &'a mut Self::Tx,
        records: &'a [Rec],
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'a;
    fn commit(tx: Self::Tx) -> impl Future<Output = ()> + Send;
    fn rollback(tx: Self::Tx) -> impl Future<Output = ()> + Send;

    fn status(&self) -> impl Future<Output = Status> + Send;
    /// Rows in the outbox table, published or not.
    fn outbox_rows(&self) -> impl Future<Output = i64> + Send;
    fn purge_published(&self, retention: Duration, limit: i64) -> impl Future<Output = u64> + Send;

    fn inbox(&self, group: &str) -> Self::Inbox;
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

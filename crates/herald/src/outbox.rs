//! The storage side of the transactional outbox, as a contract: a store
//! (PostgreSQL in production, SQLite in the embedded mode) hands the relay
//! batches of committed, unpublished records in publish order, and marks what
//! the relay published in the same transaction that claimed it.
//!
//! The relay itself (claim → publish → mark) lives with the publisher in
//! `herald-kafka`; a store implements [`OutboxStore`].

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::{EncodeError, Envelope, Event, TraceContext};

/// One event bound for a topic, ready for a store's `enqueue` in the
/// caller's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// The Kafka topic.
    pub topic: String,
    /// The aggregate type, e.g. `order`.
    pub aggregate_type: String,
    /// The encoded event; its `key` is the aggregate id.
    pub envelope: Envelope,
}

impl OutboxRecord {
    /// Encodes `event` for `topic`, stamped by `source` (the CloudEvents
    /// `ce_source`, e.g. `/orders`) and carrying `trace` — the trace context
    /// of the operation that produced it, so the trace continues through Kafka.
    pub fn new<E: Event>(
        topic: impl Into<String>,
        event: &E,
        source: &str,
        trace: Option<TraceContext>,
    ) -> Result<Self, EncodeError> {
        Ok(Self {
            topic: topic.into(),
            aggregate_type: E::AGGREGATE_TYPE.to_owned(),
            envelope: Envelope::encode(event, source)?.with_trace(trace),
        })
    }
}

/// How far behind the relay is, whatever the store.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxStatus {
    /// Rows not yet published.
    pub backlog: i64,
    /// When the oldest unpublished row was created.
    pub oldest_unpublished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Published rows still kept (until retention removes them).
    pub published_retained: i64,
}

impl OutboxStatus {
    /// Age of the oldest unpublished row, zero when there is none.
    pub fn oldest_unpublished_age(&self) -> Duration {
        self.oldest_unpublished_at
            .map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// A committed outbox row waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRecord {
    /// The store's id of the row.
    pub id: i64,
    /// The event id (the same on every re-publish).
    pub event_id: Uuid,
    /// Target topic.
    pub topic: String,
    /// Record key: the aggregate id.
    pub key: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers to write, trace context included.
    pub headers: Vec<(String, String)>,
}

/// The span of one enqueue call, a child of the caller's span (the HTTP
/// request's, in the service): every store emits the same one.
/// `db_system` is the OpenTelemetry `db.system.name` (`postgresql`, `sqlite`).
pub fn enqueue_span(db_system: &'static str, records: usize) -> tracing::Span {
    tracing::info_span!(
        "outbox_enqueue",
        otel.name = "outbox enqueue",
        db.system.name = db_system,
        db.collection.name = "herald_outbox",
        db.operation.name = "INSERT",
        messaging.batch.message_count = records,
    )
}

/// A store the relay can drain.
pub trait OutboxStore: Send + Sync + 'static {
    /// A claimed batch: holds the rows (and their locks) until committed.
    type Batch: OutboxBatch<Error = Self::Error>;
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Claims up to `max` records, in publish order: per aggregate, creation
    /// order, and never a record while an earlier one of its aggregate is
    /// unpublished and not in this batch. Several relays may claim at once;
    /// they get disjoint batches.
    fn claim(&self, max: usize) -> impl Future<Output = Result<Self::Batch, Self::Error>> + Send;

    /// Resolves when new records may be there (a notification), or after
    /// `timeout` at the latest.
    fn wait_for_work(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

/// A batch of claimed records.
pub trait OutboxBatch: Send {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The claimed records, in publish order.
    fn records(&self) -> &[PendingRecord];

    /// Marks the records with these ids published (or deletes them) and
    /// releases the rest for a later pass, atomically.
    fn commit(self, published: &[i64]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

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

/// What a store's relay does with an event once it is published, whatever
/// the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterPublish {
    /// Keep the event until retention removes it: an audit trail, and an
    /// outbox status can show recent traffic. When it was published is its
    /// Kafka record's timestamp (PostgreSQL) or its `published_at`
    /// (SQLite).
    #[default]
    MarkPublished,
    /// Delete the event too, in the transaction that claimed it: for when no
    /// audit trail is needed (consumers deduplicate by event id either way).
    /// It costs the relay a delete per event and saves retention's.
    Delete,
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

    /// The broker refused `record` for good (`error`: larger than the topic
    /// takes, invalid, not authorized). Returns whether this refusal parked
    /// it (once per park, however many relays saw it refused), and with it
    /// its aggregate: no later event of the
    /// aggregate is claimed until a person ends the park, and the other
    /// aggregates flow. The default parks nothing: the record is claimed
    /// and refused again on every pass, holding its aggregate back.
    fn refused(
        &self,
        record: &PendingRecord,
        error: &str,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        let _ = (record, error);
        async { Ok(false) }
    }
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

/// What one exactly-once relay transaction published for one relay slot,
/// as written to Kafka in that same transaction: every outbox row id its
/// store transaction marks published (the batch, and any rows it recovered
/// from an earlier checkpoint), under the slot's next sequence number.
///
/// A relay that dies after its Kafka transaction committed and before its
/// store transaction did leaves this record as the only durable note of
/// what it published; the slot's next owner reads it (`read_committed`)
/// and marks those rows before it claims any (see [`SlotLease::recover`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The relay slot.
    pub slot: u16,
    /// The slot's sequence number: one more than the sequence the store had
    /// recorded when the batch was claimed.
    pub sequence: i64,
    /// The outbox rows (store ids) this transaction published or recovered.
    pub ids: Vec<i64>,
}

/// An outbox store that an exactly-once relay can drain: its aggregates are
/// divided among a fixed number of **slots**, and a relay owns a slot (all
/// of its aggregates, exclusively) for the length of one store transaction.
///
/// A slot is the unit that the Kafka side fences: the relay derives one
/// `transactional.id` per slot, so the next owner of a slot fences every
/// earlier owner of it (see `herald_kafka::TransactionalRelay`). The number
/// of slots is therefore part of the deployment's identity and never
/// changes for a given outbox.
pub trait SlotStore: OutboxStore {
    /// A slot owned by one store transaction.
    type Lease: SlotLease<Error = Self::Error>;

    /// How many slots there are (fixed for the store).
    fn slots(&self) -> u16;

    /// The slots that have unpublished records now, the longest-waiting
    /// first: a hint (by the time a slot is leased another relay may have
    /// emptied it), so that a relay leases the slots with work instead of
    /// trying every slot in turn.
    fn slots_with_work(&self) -> impl Future<Output = Result<Vec<u16>, Self::Error>> + Send;

    /// Resolves when new records may have been added (a notification), or
    /// after `timeout` at the latest. Unlike [`OutboxStore::wait_for_work`]
    /// it does not return early because records already wait: an
    /// exactly-once relay worker serves some slots only, asks
    /// [`SlotStore::slots_with_work`] itself, and waits while its own slots
    /// are empty and other slots' records are being published.
    fn wait_for_new_work(&self, timeout: Duration) -> impl Future<Output = ()> + Send;

    /// Takes `slot` if no one else holds it; `None` when another relay does.
    fn lease(
        &self,
        slot: u16,
    ) -> impl Future<Output = Result<Option<Self::Lease>, Self::Error>> + Send;
}

/// One slot, owned until [`SlotLease::commit`] or [`SlotLease::release`]
/// (dropping it also releases it with nothing marked, when the store gets
/// to it).
pub trait SlotLease: Send {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The slot.
    fn slot(&self) -> u16;

    /// The sequence of the last checkpoint the store recorded for this
    /// slot (0 when none).
    fn sequence(&self) -> i64;

    /// Marks published the rows of `checkpoint`, which Kafka committed but
    /// the store never recorded (its relay died between the two commits),
    /// and records its sequence; returns how many rows were still pending.
    /// Rows already marked are skipped. Call it before [`SlotLease::claim`].
    fn recover(
        &mut self,
        checkpoint: &Checkpoint,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Claims up to `max` pending records of the slot's aggregates, in
    /// publish order (as [`OutboxStore::claim`]), and returns them: only
    /// records this lease has not claimed before.
    fn claim(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<&[PendingRecord], Self::Error>> + Send;

    /// Marks the records claimed since the last call published inside the
    /// lease, where later claims of the lease no longer find them; only
    /// [`SlotLease::commit`] makes it durable. A relay calls it once Kafka
    /// committed their batch, so that one lease carries several batches
    /// (each of whose checkpoints then lists every id the lease published).
    fn published(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Ends the lease with nothing marked, releasing the slot at once.
    fn release(self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Makes durable what [`SlotLease::published`] and
    /// [`SlotLease::recover`] marked, records `sequence` as the slot's
    /// checkpoint, and releases the slot, atomically. Records claimed since
    /// the last [`SlotLease::published`] stay pending: their batch did not
    /// commit in Kafka (a lease whose later batch failed commits the
    /// earlier ones), and marking them would lose them.
    fn commit(self, sequence: i64) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

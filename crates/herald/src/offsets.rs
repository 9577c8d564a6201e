//! Consumer offsets kept in the store, in the handler's transaction.
//!
//! A consumer normally commits its offsets to Kafka after its handlers'
//! effects committed in the database: a crash between the two commits
//! replays records whose effects are already there, which the inbox's
//! per-event rows then skip. With offsets in the store, the handler's
//! transaction also moves its partition's next offset (one row per
//! partition), and the consumer starts each assigned partition there:
//! effects and position commit together, and the Kafka commit only serves
//! lag monitoring.
//!
//! What this needs of the two sides:
//! - the **consumer runtime** tells each record's handler how far its
//!   partition is done ([`Position::done_below`]: every earlier record was
//!   handled, dead-lettered or skipped), and starts an assigned partition
//!   at the later of its stored offset and its Kafka commit;
//! - the **store** keeps, per partition, that done offset and the offsets
//!   applied above it (records of different keys finish out of order),
//!   both moved in the effects' transaction; a record below the done
//!   offset or among those applied is already processed, and its effects
//!   do not run.
//!
//! Offsets replace the per-event inbox row only when every event is in the
//! log once: the input of an exactly-once producer (herald's
//! `TransactionalRelay`, read `read_committed`). An at-least-once relay can
//! publish an event twice, at two offsets; there the event-id inbox stays,
//! beside the offsets.

use std::future::Future;
use std::sync::Arc;

/// Where a record was read, and how far its partition was done: what a
/// store records in the handler's transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// Every record of the partition before this offset was done when the
    /// consumer started this one (handled, dead-lettered or skipped; its
    /// contiguous offset, `None` when unknown): a store may record it as
    /// the partition's next offset.
    pub done_below: Option<i64>,
}

/// A store that keeps consumer offsets: what the consumer runtime reads
/// when partitions are assigned (see the module documentation).
pub trait OffsetStore: Send + Sync + 'static {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The stored next offset of each of `partitions` of `topic`, for
    /// those that have one (any order).
    fn next_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Vec<(i32, i64)>, Self::Error>> + Send;
}

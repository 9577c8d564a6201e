//! Sweeping: aborting whatever an earlier instance of a `transactional.id`
//! left open in a partition, before this instance commits there.
//!
//! # Why
//!
//! A partition's open transaction belongs to the producer id, which every
//! instance of a `transactional.id` shares (a new instance only bumps the
//! epoch). When a transaction ends, its coordinator writes a marker to
//! every partition in it; a record of a dead instance that never got its
//! marker stays open, and the next marker of *any* instance of the id in
//! that partition ends it. A commit then commits the dead instance's
//! records with the new ones.
//!
//! Markers do go missing. A broker that restarts and times a transaction
//! out before its metadata is loaded completes the abort without writing
//! markers to the partitions it does not know yet (Kafka's transaction
//! marker channel skips a partition without a known leader as deleted).
//! Seen in `orders/tests/faults/broker_outage.rs` with the broker checking
//! for timed-out transactions every second: the fulfillment processor's
//! dead instance had written two outcomes before the outage; the new
//! instance redid the same inputs (their offsets were never committed),
//! and its commit committed both copies: two outcomes for one order.
//!
//! # How
//!
//! Before this instance's first commit in a partition, one of its
//! transactions puts a record (key [`SWEEP_KEY`], no value) there and is
//! aborted: its marker aborts everything the producer id left open in the
//! partition, and `read_committed` readers skip it all. A sweep costs one
//! tiny aborted record per partition, once per instance and topic.

use std::time::Duration;

use rdkafka::client::{Client, ClientContext};
use rdkafka::error::KafkaError;

/// The key of sweep records: compacted topics (changelogs, checkpoints)
/// refuse records without one.
pub(crate) const SWEEP_KEY: &str = "herald.sweep";

/// Whether a record with this key and payload is a sweep record. Readers
/// skip it: under `read_committed` a broker never returns one (its
/// transaction was aborted), but librdkafka's mock cluster, which reports
/// no aborted transactions, does.
pub(crate) fn is_sweep_record(key: Option<&[u8]>, payload: Option<&[u8]>) -> bool {
    key == Some(SWEEP_KEY.as_bytes()) && payload.is_none_or(<[u8]>::is_empty)
}

/// The partitions of `topic`; none when it does not exist (nothing can be
/// open in it).
pub(crate) fn partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

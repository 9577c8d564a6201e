//! State that survives restarts: a table kept in memory whose every change is
//! also an output record to a compacted changelog topic, committed in the same
//! transaction as the inputs that caused it, and restored from that topic at
//! start.
//!
//! ```
//! use herald_kafka::processor::ChangelogTable;
//! let mut stock: ChangelogTable<i64> = ChangelogTable::new("fulfillment-stock-changelog");
//! let record = stock.put("sku-1", 7).unwrap(); // emit `record` as an output
//! assert_eq!(stock.get("sku-1"), Some(&7));    // visible to later inputs
//! stock.rollback();                            // the transaction aborted
//! assert_eq!(stock.get("sku-1"), None);
//! # let _ = record;
//! ```
//!
//! Wire it into a [`Transform`](super::Transform): emit the records that
//! [`ChangelogTable::put`] / [`ChangelogTable::remove`] return among the
//! outputs, and forward [`Transform::restore`](super::Transform::restore),
//! [`Transform::commit`](super::Transform::commit) and
//! [`Transform::rollback`](super::Transform::rollback) to the table. Register
//! the topic with [`ProcessorConfig::changelog`](super::ProcessorConfig::changelog).
//!
//! Keep it simple, and know the limits:
//! - The changelog topic must exist and should be compacted
//!   (`cleanup.policy=compact`): only the latest value per key matters.
//! - Keys are strings, values JSON. A removal writes the JSON value `null`
//!   (herald's [`OutgoingRecord`] always has a payload), which restoring
//!   treats like a tombstone.
//! - By default state is restored once, at start, after `init_transactions`
//!   fenced the previous incarnation (so no zombie commits a change behind
//!   the restore's back). That is exact for a processor whose state only it
//!   writes: one instance, or state whose keys each belong to one instance
//!   for good.
//! - Several instances that share the work of a group partition their
//!   state like the input (Kafka Streams' co-partitioning):
//!   [`ProcessorConfig::partitioned_state`](super::ProcessorConfig::partitioned_state).
//!   Partition *p* of each changelog then holds the state of input
//!   partition *p*: the processor writes every changelog record to its
//!   input's partition, restores partition *p* when input partition *p* is
//!   assigned (once the group's committed offset for it is stable, so the
//!   previous owner's last transaction is in the changelog or aborted), and
//!   calls [`Transform::revoked`](super::Transform::revoked) when it is
//!   taken away. Change such a table with [`ChangelogTable::put_in`] /
//!   [`ChangelogTable::remove_in`] and forward `revoked` to
//!   [`ChangelogTable::drop_partitions`]. A transform's state per key must
//!   then depend on the inputs of that key's partition only.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use herald::HandlerError;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use super::ProcessorError;
use crate::publisher::OutgoingRecord;

/// One record read from a changelog topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    /// The changelog topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The key (the state's key).
    pub key: Option<Vec<u8>>,
    /// The value; `None` for a Kafka tombstone.
    pub value: Option<Vec<u8>>,
}

/// Reads every partition of `topic` from its beginning to its current end
/// with `isolation.level=read_committed` (so aborted changes are never
/// seen), calling `apply` for each record in offset order per partition.
/// Returns how many records were read.
///
/// "The end" is each partition's last stable offset when the read began:
/// changes committed after that are not waited for. (Waiting for the
/// partition EOF instead never ends while another instance keeps writing:
/// every fetch then returns new records, and a processor that starts beside
/// a busy one would restore until the busy one went idle.) It blocks the calling thread: from async code call it through
/// `tokio::task::spawn_blocking`. `client` carries the brokers and security
/// settings; a group-less consumer is made from it.
pub fn read_to_end<F>(
    client: &ClientConfig,
    topic: &str,
    timeout: Duration,
    apply: F,
) -> Result<u64, ProcessorError>
where
    F: FnMut(&ChangelogRecord) -> Result<(), HandlerError>,
{
    read_partitions_to_end(client, topic, None, timeout, apply)
}

/// [`read_to_end`] of some of `topic`'s partitions only (all of them for
/// `None`): what a processor with partitioned state
/// ([`ProcessorConfig::partitioned_state`](super::ProcessorConfig::partitioned_state))
/// restores when input partitions are assigned to it. A partition the topic
/// does not have is an error.
pub fn read_partitions_to_end<F>(
    client: &ClientConfig,
    topic: &str,
    only: Option<&[i32]>,
    timeout: Duration,
    mut apply: F,
) -> Result<u64, ProcessorError>
where
    F: FnMut(&ChangelogRecord) -> Result<(), HandlerError>,
{
    let failed = |reason: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| {
        ProcessorError::Restore {
            topic: topic.to_owned(),
            reason,
            source,
        }
    };
    let mut config = client.clone();
    if config.get("group.id").is_none() {
        // librdkafka's assign() needs a group id; this consumer never joins
        // the group nor commits.
        config.set("group.id", "herald-changelog-restore");
    }
    config
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // A read to the end, never a wait for new records: the broker answers
        // a fetch at the end at once instead of after librdkafka's 500 ms
        // default. A partition that ends in a swept (aborted) transaction
        // reports its end only from such an empty fetch (the relay's start
        // took 500 ms per slot, one slot after another).
        .set("fetch.wait.max.ms", "10")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| failed("cannot create the restore consumer".into(), Some(e.into())))?;
    let deadline = Instant::now() + timeout;
    // A topic created a moment ago may take a little while to appear in
    // the metadata: look again until the deadline.
    let partitions: Vec<i32> = loop {
        let metadata = consumer
            .fetch_metadata(
                Some(topic),
                deadline.saturating_duration_since(Instant::now()),
            )
            .map_err(|e| failed("cannot read the topic's metadata".into(), Some(e.into())))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !partitions.is_empty() || Instant::now() + Duration::from_millis(100) >= deadline {
            break partitions;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if partitions.is_empty() {
        return Err(failed(
            "the topic does not exist or has no partitions (create it, compacted, before starting)"
                .into(),
            None,
        ));
    }
    let partitions = match only {
        None => partitions,
        Some(only) => {
            if let Some(missing) = only.iter().find(|p| !partitions.contains(p)) {
                return Err(failed(
                    format!(
                        "it has no partition {missing} ({} partitions): a partitioned state's \
                         changelog needs as many partitions as its input topics",
                        partitions.len()
                    ),
                    None,
                ));
            }
            only.to_vec()
        }
    };
    // With `read_committed` the high watermark librdkafka reports is the
    // last stable offset. An empty partition may never report EOF (there is
    // nothing to fetch): it is at its end already.
    let mut at_end = std::collections::HashSet::new();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| failed("cannot read the partition's offsets".into(), Some(e.into())))?;
        if high <= low {
            at_end.insert(*p);
            continue;
        }
        ends.insert(*p, high);
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| failed("cannot build the assignment".into(), Some(e.into())))?;
    }
    if at_end.len() == partitions.len() {
        return Ok(0);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| failed("cannot assign the partitions".into(), Some(e.into())))?;

    let mut read = 0u64;
    while at_end.len() < partitions.len() {
        let now = Instant::now();
        if now >= deadline {
            return Err(failed(
                format!(
                    "not at the end after {timeout:?} ({} of {} partitions done, {read} records read)",
                    at_end.len(),
                    partitions.len()
                ),
                None,
            ));
        }
        match consumer.poll((deadline - now).min(Duration::from_millis(100))) {
            Some(Ok(message))
                if crate::sweep::is_sweep_record(message.key(), message.payload()) =>
            {
                // herald's, never state (see `is_sweep_record`).
                if ends
                    .get(&message.partition())
                    .is_some_and(|end| message.offset() + 1 >= *end)
                {
                    at_end.insert(message.partition());
                }
            }
            Some(Ok(message)) => {
                let record = ChangelogRecord {
                    topic: topic.to_owned(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                };
                apply(&record).map_err(|e| {
                    failed(
                        format!(
                            "record at partition {} offset {} was rejected",
                            record.partition, record.offset
                        ),
                        Some(e.into()),
                    )
                })?;
                read += 1;
                if ends
                    .get(&record.partition)
                    .is_some_and(|end| record.offset + 1 >= *end)
                {
                    at_end.insert(record.partition);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(error)) => {
                // Brokers come and go; the deadline bounds how long we wait.
                tracing::warn!(%error, topic, "error while restoring a changelog");
            }
            None => {
                // The last records before the end may be transaction
                // markers, which are never returned: the position moves
                // past them.
                if let Ok(positions) = consumer.position() {
                    for element in positions.elements() {
                        if let Offset::Offset(position) = element.offset() {
                            if ends
                                .get(&element.partition())
                                .is_some_and(|end| position >= *end)
                            {
                                at_end.insert(element.partition());
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(read)
}

/// An in-memory table of JSON values by string key, changed through records
/// to a changelog topic, with uncommitted changes kept apart so an aborted
/// transaction can be undone. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct ChangelogTable<V> {
    topic: String,
    committed: HashMap<String, V>,
    /// Changes since the last commit; `None` is a removal.
    pending: HashMap<String, Option<V>>,
    /// The state partition of each committed key that has one (restored,
    /// or changed through [`ChangelogTable::put_in`]).
    partition_of: HashMap<String, i32>,
    /// The state partitions of the pending changes made with one.
    pending_partition_of: HashMap<String, i32>,
}

impl<V: Serialize + DeserializeOwned> ChangelogTable<V> {
    /// An empty table changed through `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            committed: HashMap::new(),
            pending: HashMap::new(),
            partition_of: HashMap::new(),
            pending_partition_of: HashMap::new(),
        }
    }

    /// The changelog topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The current value of `key`, uncommitted changes included.
    pub fn get(&self, key: &str) -> Option<&V> {
        match self.pending.get(key) {
            Some(change) => change.as_ref(),
            None => self.committed.get(key),
        }
    }

    /// Sets `key` to `value` and returns the changelog record to emit among
    /// the outputs. A value that cannot be serialized is a permanent error.
    pub fn put(
        &mut self,
        key: impl Into<String>,
        value: V,
    ) -> Result<OutgoingRecord, HandlerError> {
        let key = key.into();
        let payload = serde_json::to_vec(&value).map_err(HandlerError::permanent)?;
        let record = self.record(&key, payload);
        self.pending.insert(key, Some(value));
        Ok(record)
    }

    /// Removes `key` and returns the changelog record to emit (JSON `null`).
    pub fn remove(&mut self, key: &str) -> OutgoingRecord {
        self.pending.insert(key.to_owned(), None);
        self.record(key, b"null".to_vec())
    }

    /// [`ChangelogTable::put`] for state partitioned like the input
    /// ([`ProcessorConfig::partitioned_state`](super::ProcessorConfig::partitioned_state)):
    /// `partition` is the input's ([`Input::partition`](super::Input::partition)),
    /// which the processor writes the record to, and which
    /// [`ChangelogTable::drop_partitions`] drops the key with.
    pub fn put_in(
        &mut self,
        partition: i32,
        key: impl Into<String>,
        value: V,
    ) -> Result<OutgoingRecord, HandlerError> {
        let key = key.into();
        self.pending_partition_of.insert(key.clone(), partition);
        self.put(key, value)
    }

    /// [`ChangelogTable::remove`] for partitioned state (see
    /// [`ChangelogTable::put_in`]).
    pub fn remove_in(&mut self, partition: i32, key: &str) -> OutgoingRecord {
        self.pending_partition_of.insert(key.to_owned(), partition);
        self.remove(key)
    }

    /// Forgets the committed entries of state `partitions` (call from
    /// [`Transform::revoked`](super::Transform::revoked)): their input
    /// partitions went to another instance, which restores them from the
    /// changelog. Entries without a partition (changed with
    /// [`ChangelogTable::put`]) stay.
    pub fn drop_partitions(&mut self, partitions: &[i32]) {
        self.partition_of.retain(|key, partition| {
            let dropped = partitions.contains(partition);
            if dropped {
                self.committed.remove(key);
                self.pending.remove(key);
            }
            !dropped
        });
        self.pending_partition_of
            .retain(|_, partition| !partitions.contains(partition));
    }

    /// Makes the uncommitted changes permanent (call from
    /// [`Transform::commit`](super::Transform::commit)).
    pub fn commit(&mut self) {
        for (key, change) in self.pending.drain() {
            let partition = self.pending_partition_of.remove(&key);
            match change {
                Some(value) => {
                    if let Some(partition) = partition {
                        self.partition_of.insert(key.clone(), partition);
                    }
                    self.committed.insert(key, value);
                }
                None => {
                    self.partition_of.remove(&key);
                    self.committed.remove(&key);
                }
            }
        }
    }

    /// Drops the uncommitted changes (call from
    /// [`Transform::rollback`](super::Transform::rollback)).
    pub fn rollback(&mut self) {
        self.pending.clear();
        self.pending_partition_of.clear();
    }

    /// Applies one restored record as committed state (call from
    /// [`Transform::restore`](super::Transform::restore)). Records of other
    /// topics are ignored; a JSON `null` or a tombstone removes the key.
    pub fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        if record.topic != self.topic {
            return Ok(());
        }
        let key = record
            .key
            .as_deref()
            .map(std::str::from_utf8)
            .transpose()
            .map_err(HandlerError::permanent)?
            .ok_or_else(|| HandlerError::permanent("changelog record without a key"))?
            .to_owned();
        let value: Option<V> = match record.value.as_deref() {
            None => None,
            Some(bytes) => {
                serde_json::from_slice::<Option<V>>(bytes).map_err(HandlerError::permanent)?
            }
        };
        match value {
            Some(value) => {
                self.partition_of.insert(key.clone(), record.partition);
                self.committed.insert(key, value);
            }
            None => {
                self.partition_of.remove(&key);
                self.committed.remove(&key);
            }
        }
        Ok(())
    }

    /// The committed entries (what a restart would restore).
    pub fn committed(&self) -> impl Iterator<Item = (&str, &V)> {
        self.committed.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn record(&self, key: &str, payload: Vec<u8>) -> OutgoingRecord {
        change_record(&self.topic, key, payload, Uuid::nil())
    }
}

/// A change of changelog-backed state: the JSON `payload` (`null` for a
/// removal) under `key` on `topic`, as one more output of the transaction.
/// `event_id` names the record in error messages.
pub(crate) fn change_record(
    topic: &str,
    key: &str,
    payload: Vec<u8>,
    event_id: Uuid,
) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec()),
        payload,
        headers: vec![(
            herald::headers::CONTENT_TYPE.to_owned(),
            Some(herald::envelope::JSON_CONTENT_TYPE.as_bytes().to_vec()),
        )],
        event_id,
    }
}

/// `record` as a restore would read it back at `offset` (unit tests of
/// changelog-backed state).
#[cfg(test)]
pub(crate) fn as_restored(record: &OutgoingRecord, offset: i64) -> ChangelogRecord {
    ChangelogRecord {
        topic: record.topic.clone(),
        partition: 0,
        offset,
        key: record.key.clone(),
        value: Some(record.payload.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_changes_are_visible_and_undone_by_rollback() {
        let mut t: ChangelogTable<i64> = ChangelogTable::new("c");
        t.put("a", 1).expect("put");
        t.commit();
        t.put("a", 2).expect("put");
        t.remove("a");
        assert_eq!(t.get("a"), None);
        t.rollback();
        assert_eq!(t.get("a"), Some(&1));
        t.put("b", 5).expect("put");
        t.commit();
        let committed: HashMap<_, _> = t.committed().collect();
        assert_eq!(committed.len(), 2);
    }

    #[test]
    fn partitioned_entries_are_dropped_with_their_partition() {
        let mut t: ChangelogTable<i64> = ChangelogTable::new("c");
        t.put_in(0, "a", 1).expect("put");
        t.put_in(1, "b", 2).expect("put");
        t.put("global", 3).expect("put");
        t.commit();
        let record = t.put_in(9, "c", 4).expect("record");
        t.restore(&ChangelogRecord {
            partition: 2,
            ..as_restored(&record, 0)
        })
        .expect("restore");
        t.rollback();
        t.drop_partitions(&[1, 2]);
        assert_eq!(t.get("a"), Some(&1));
        assert_eq!(t.get("b"), None, "dropped with partition 1");
        assert_eq!(
            t.get("c"),
            None,
            "restored into partition 2, dropped with it"
        );
        assert_eq!(t.get("global"), Some(&3), "no partition: kept");
        t.drop_partitions(&[0]);
        assert_eq!(t.get("a"), None);
    }

    #[test]
    fn restores_from_its_own_records() {
        let mut writer: ChangelogTable<i64> = ChangelogTable::new("c");
        let records = [
            writer.put("a", 3).expect("put"),
            writer.put("b", 4).expect("put"),
            writer.remove("a"),
        ];
        let mut reader: ChangelogTable<i64> = ChangelogTable::new("c");
        for (i, r) in records.iter().enumerate() {
            reader.restore(&as_restored(r, i as i64)).expect("restore");
        }
        let tombstone = ChangelogRecord {
            value: None,
            key: Some(b"b".to_vec()),
            ..as_restored(&records[0], 3)
        };
        assert_eq!(reader.get("b"), Some(&4));
        reader.restore(&tombstone).expect("tombstone");
        assert_eq!(reader.get("a"), None);
        assert_eq!(reader.get("b"), None);
    }
}

//! Duplicate inputs dropped: the event ids a processor completed are part of
//! its transactional state.
//!
//! Why a processor needs this although its own transactions are exact: its
//! *input* may hold one event twice, as two records with the same
//! `event_id` at different offsets (an at-least-once producer that died
//! between the broker's acknowledgement and its own bookkeeping, such as an
//! at-least-once outbox relay). Each copy is a new record to Kafka, so the
//! transaction that consumes the second one would run the transform again.
//!
//! `Deduplicated` wraps the user's transform. An input whose event id is
//! among the completed ones produces no output and no state change; its
//! offset still advances in the transaction like any other input's. When
//! the transform succeeds, the id is completed, and when the transaction
//! commits the ids it completed are written as one more output
//! ([`Transform::closing`]): one record per input partition (up to 1,000
//! ids each; key `<partition>-<first id>`, value `{"at": ms, "ids": […]}`)
//! on the compacted topic [`Deduplication::topic`], so they commit or abort
//! with the inputs' outputs and offsets. (One record per input was the
//! first design; it doubled a transaction's outputs, and an exactly-once
//! processor ran at 0.85 of one without the filter.) At start the topic is
//! read (`read_committed`, after the fencing) like every changelog; records
//! of the per-input design (key: the id, value: its time) are read too.
//!
//! # The window
//!
//! Ids are remembered up to [`Deduplication::capacity`] of them and for at
//! most [`Deduplication::max_age`] after completion; older ones are
//! forgotten a transaction's batch at a time, oldest first, with a
//! tombstone of its record written by the next transaction that has an
//! input of the batch's partition (so compaction removes it from the topic
//! too, and a restart restores about the window). A copy that arrives after
//! its original was forgotten is processed again: choose the window longer
//! than the longest time a duplicate can take to arrive (for an outbox
//! relay: its longest outage plus a batch).
//!
//! Limits, as for every changelog (see [`super::changelog`]): by default
//! the ids are restored once, at start. With several instances in one
//! group, an id another instance completed after this one started is then
//! not known here, and a duplicate of it that reaches this instance after a
//! rebalance is processed again. With
//! [`ProcessorConfig::partitioned_state`](super::ProcessorConfig::partitioned_state)
//! the topic has the input's partition count, an id is written to its
//! input's partition, and a partition's ids move with the input partition
//! (restored on assignment, dropped on revocation). That is exact when both
//! copies of an event are in the same input partition, which holds for
//! copies keyed alike by the same partitioner (an outbox relay's). Poison
//! inputs (dead-lettered) are not recorded as completed: a copy of one is
//! dead-lettered too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herald::{Event, HandlerError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::changelog::{change_record, ChangelogRecord};
use super::{Input, ProcessorStats, Transform};
use crate::publisher::OutgoingRecord;

/// How a processor recognises inputs it already completed
/// ([`ProcessorConfig::deduplication`](super::ProcessorConfig::deduplication)).
/// See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduplication {
    /// The compacted topic of completed ids; `None` (the default) is
    /// `<group_id>-completed`. Created (compacted, one partition) at start
    /// when missing.
    pub topic: Option<String>,
    /// The most ids remembered (default 100,000): about 2.5 MB of memory.
    pub capacity: usize,
    /// How long an id is remembered after its input completed (default
    /// 24 h).
    pub max_age: Duration,
}

impl Default for Deduplication {
    fn default() -> Self {
        Self {
            topic: None,
            capacity: 100_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// The most ids one record of the completed-ids topic lists: a
/// transaction of more inputs writes more records (a record stays far below
/// Kafka's default 1 MB limit).
const IDS_PER_RECORD: usize = 1_000;

/// The ids one record of the completed-ids topic lists: those a
/// transaction completed in one input partition.
#[derive(Debug, Clone)]
struct Batch {
    /// The record's key: `<partition>-<first id>` (an old per-id record
    /// read back has its id as key).
    key: Arc<str>,
    /// The input partition (the state partition with partitioned state).
    partition: i32,
    /// Completion time of the transaction (Unix ms).
    at: i64,
    ids: Vec<Uuid>,
}

/// The value of a completed-ids record.
#[derive(Debug, Serialize, Deserialize)]
struct BatchValue {
    at: i64,
    ids: Vec<Uuid>,
}

/// The completed ids: the committed ones in batches in completion order,
/// the open transaction's apart until it commits.
#[derive(Debug)]
pub(crate) struct CompletedIds {
    topic: String,
    capacity: usize,
    max_age_ms: i64,
    /// Every remembered id (committed or in the open transaction) → the key
    /// of its batch.
    ids: HashMap<Uuid, Arc<str>>,
    /// Committed batches, oldest first.
    batches: VecDeque<Batch>,
    /// Batches read by a restore, by key (a later record of a key replaces
    /// it), and keys a restore read a tombstone of: sorted into `batches`
    /// by [`CompletedIds::settle`].
    restored: HashMap<String, Batch>,
    removed: HashSet<String>,
    /// The open transaction's batches, by input partition (the last one is
    /// the one still filling).
    open: BTreeMap<i32, Vec<Batch>>,
    /// Keys of forgotten batches whose tombstone is not committed yet, by
    /// partition: written by the next transaction with an input there.
    tombstones: BTreeMap<i32, Vec<String>>,
    /// Tombstones written by the open transaction (queued again if it
    /// aborts).
    written: Vec<(i32, String)>,
    /// Whether the topic is partitioned like the input: a tombstone must
    /// then go to its batch's partition; otherwise any transaction writes
    /// it.
    partitioned: bool,
}

impl CompletedIds {
    pub(crate) fn new(topic: String, settings: &Deduplication, partitioned: bool) -> Self {
        Self {
            topic,
            capacity: settings.capacity.max(1),
            max_age_ms: i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX),
            ids: HashMap::new(),
            batches: VecDeque::new(),
            restored: HashMap::new(),
            removed: HashSet::new(),
            open: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            written: Vec::new(),
            partitioned,
        }
    }

    pub(crate) fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains_key(id)
    }

    /// Sorts what a restore read into the committed batches, in completion
    /// order (a restore after a restart reads batches this instance has
    /// already: they are replaced).
    pub(crate) fn settle(&mut self) {
        if self.restored.is_empty() && self.removed.is_empty() {
            return;
        }
        let restored = std::mem::take(&mut self.restored);
        let removed = std::mem::take(&mut self.removed);
        let ids = &mut self.ids;
        self.batches.retain(|batch| {
            let replaced = restored.contains_key(&*batch.key) || removed.contains(&*batch.key);
            if replaced {
                for id in &batch.ids {
                    if ids.get(id) == Some(&batch.key) {
                        ids.remove(id);
                    }
                }
            }
            !replaced
        });
        for batch in restored.values() {
            for id in &batch.ids {
                ids.insert(*id, batch.key.clone());
            }
        }
        self.batches.extend(restored.into_values());
        self.batches.make_contiguous().sort_by_key(|b| b.at);
    }

    /// Records `id`, an input of `partition`, as completed in the open
    /// transaction (written by [`CompletedIds::closing`]).
    pub(crate) fn complete(&mut self, id: Uuid, partition: i32, now_ms: i64) {
        let batches = self.open.entry(partition).or_default();
        if batches.last().is_none_or(|b| b.ids.len() >= IDS_PER_RECORD) {
            batches.push(Batch {
                key: format!("{partition}-{id}").into(),
                partition,
                at: now_ms,
                ids: Vec::new(),
            });
        }
        let batch = batches.last_mut().expect("a batch");
        batch.ids.push(id);
        self.ids.insert(id, batch.key.clone());
    }

    /// The records that close the open transaction: its batches, and
    /// tombstones of the batches that fell out of the window (with
    /// partitioned state, of the transaction's `partitions` only: a record
    /// goes to the partition of the input it comes with). Each with its
    /// input partition.
    pub(crate) fn closing(
        &mut self,
        partitions: &[i32],
        now_ms: i64,
    ) -> Vec<(i32, OutgoingRecord)> {
        self.settle();
        self.forget_expired(now_ms);
        let mut records = Vec::new();
        for batch in self.open.values().flatten() {
            let value = BatchValue {
                at: batch.at,
                ids: batch.ids.clone(),
            };
            let payload = serde_json::to_vec(&value).expect("ids serialize");
            records.push((batch.partition, self.record(&batch.key, payload)));
        }
        let due: Vec<i32> = if self.partitioned {
            partitions.to_vec()
        } else {
            self.tombstones.keys().copied().collect()
        };
        for partition in due {
            for key in self.tombstones.remove(&partition).unwrap_or_default() {
                records.push((partition, self.record(&key, b"null".to_vec())));
                self.written.push((partition, key));
            }
        }
        records
    }

    /// Forgets committed batches, oldest first, while more ids than the
    /// capacity are remembered or the oldest is older than the window.
    fn forget_expired(&mut self, now_ms: i64) {
        while let Some(oldest) = self.batches.front() {
            let expired = self.ids.len() > self.capacity || now_ms - oldest.at > self.max_age_ms;
            if !expired {
                break;
            }
            let batch = self.batches.pop_front().expect("a batch");
            for id in &batch.ids {
                if self.ids.get(id) == Some(&batch.key) {
                    self.ids.remove(id);
                }
            }
            self.tombstones
                .entry(batch.partition)
                .or_default()
                .push(batch.key.to_string());
        }
    }

    /// The open transaction committed.
    pub(crate) fn commit(&mut self) {
        let open = std::mem::take(&mut self.open);
        self.batches.extend(open.into_values().flatten());
        self.written.clear();
    }

    /// The open transaction aborted: its ids are not completed, and the
    /// tombstones it wrote are written again by a later one.
    pub(crate) fn rollback(&mut self) {
        for batch in std::mem::take(&mut self.open).into_values().flatten() {
            for id in &batch.ids {
                self.ids.remove(id);
            }
        }
        for (partition, key) in self.written.drain(..) {
            self.tombstones.entry(partition).or_default().push(key);
        }
    }

    /// One record of the topic, read at start (or, with partitioned state,
    /// on assignment). Returns whether it was one of this topic's.
    pub(crate) fn restore(&mut self, record: &ChangelogRecord) -> Result<bool, HandlerError> {
        if record.topic != self.topic {
            return Ok(false);
        }
        let key = record
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| {
                HandlerError::permanent(format!(
                    "record at offset {} of {} has no UTF-8 key",
                    record.offset, self.topic
                ))
            })?
            .to_owned();
        let value = record
            .value
            .as_deref()
            .map(serde_json::from_slice::<serde_json::Value>)
            .transpose()
            .map_err(HandlerError::permanent)?
            .filter(|v| !v.is_null());
        // A later record of the same key replaces the batch.
        if let Some(old) = self.restored.remove(&key) {
            for id in &old.ids {
                if self.ids.get(id) == Some(&old.key) {
                    self.ids.remove(id);
                }
            }
        }
        let Some(value) = value else {
            self.removed.insert(key);
            return Ok(true);
        };
        self.removed.remove(&key);
        let batch = match value {
            // Written before batches: one id (the key), its time.
            serde_json::Value::Number(at) => Batch {
                ids: vec![key.parse::<Uuid>().map_err(HandlerError::permanent)?],
                at: at.as_i64().unwrap_or_default(),
                key: key.into(),
                partition: record.partition,
            },
            value => {
                let value: BatchValue =
                    serde_json::from_value(value).map_err(HandlerError::permanent)?;
                Batch {
                    key: key.into(),
                    partition: record.partition,
                    at: value.at,
                    ids: value.ids,
                }
            }
        };
        for id in &batch.ids {
            self.ids.insert(*id, batch.key.clone());
        }
        self.restored.insert(batch.key.to_string(), batch);
        Ok(true)
    }

    /// Forgets the ids of state `partitions` (revoked: their next owner
    /// restores them, and writes their tombstones).
    pub(crate) fn drop_partitions(&mut self, partitions: &[i32]) {
        let ids = &mut self.ids;
        self.batches.retain(|batch| {
            let dropped = partitions.contains(&batch.partition);
            if dropped {
                for id in &batch.ids {
                    ids.remove(id);
                }
            }
            !dropped
        });
        self.restored.retain(|_, batch| {
            let dropped = partitions.contains(&batch.partition);
            if dropped {
                for id in &batch.ids {
                    ids.remove(id);
                }
            }
            !dropped
        });
        self.tombstones.retain(|p, _| !partitions.contains(p));
    }

    fn record(&self, key: &str, payload: Vec<u8>) -> OutgoingRecord {
        change_record(&self.topic, key, payload, Uuid::nil())
    }
}

/// A transform whose duplicate inputs are dropped (see the module
/// documentation).
pub(crate) struct Deduplicated<T> {
    inner: T,
    ids: CompletedIds,
    stats: Arc<ProcessorStats>,
    /// Inputs dropped in the open transaction: counted when it commits (an
    /// aborted transaction's inputs come again and are dropped again).
    dropped: u64,
}

impl<T> Deduplicated<T> {
    pub(crate) fn new(inner: T, ids: CompletedIds, stats: Arc<ProcessorStats>) -> Self {
        Self {
            inner,
            ids,
            stats,
            dropped: 0,
        }
    }
}

impl<E: Event, T: Transform<E>> Transform<E> for Deduplicated<T> {
    async fn process(
        &mut self,
        event: E,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let id = input.envelope.event_id;
        self.ids.settle();
        if self.ids.contains(&id) {
            self.dropped += 1;
            tracing::info!(
                event_id = %id,
                topic = %input.topic,
                partition = input.partition,
                offset = input.offset,
                "duplicate input dropped: this event was already processed"
            );
            return Ok(Vec::new());
        }
        let partition = input.partition;
        let outputs = self.inner.process(event, input).await?;
        self.ids
            .complete(id, partition, chrono::Utc::now().timestamp_millis());
        Ok(outputs)
    }

    fn closing(&mut self, partitions: &[i32]) -> Result<Vec<(i32, OutgoingRecord)>, HandlerError> {
        let mut outputs = self
            .ids
            .closing(partitions, chrono::Utc::now().timestamp_millis());
        outputs.extend(self.inner.closing(partitions)?);
        Ok(outputs)
    }

    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        if self.ids.restore(record)? {
            return Ok(());
        }
        self.inner.restore(record)
    }

    fn commit(&mut self) {
        self.stats
            .duplicates
            .fetch_add(std::mem::take(&mut self.dropped), Ordering::Relaxed);
        self.ids.commit();
        self.inner.commit();
    }

    fn rollback(&mut self) {
        self.dropped = 0;
        self.ids.rollback();
        self.inner.rollback();
    }

    fn revoked(&mut self, partitions: &[i32]) {
        self.ids.drop_partitions(partitions);
        self.inner.revoked(partitions);
    }
}

#[cfg(test)]
mod tests {
    use super::super::changelog::as_restored as restored;
    use super::*;

    fn ids(capacity: usize, max_age: Duration) -> CompletedIds {
        CompletedIds::new(
            "done".to_owned(),
            &Deduplication {
                topic: None,
                capacity,
                max_age,
            },
            true,
        )
    }

    /// Restores `records` (as read back in this order) into a fresh set.
    fn read_back(records: &[(i32, OutgoingRecord)], capacity: usize) -> CompletedIds {
        let mut reader = ids(capacity, Duration::from_secs(3600));
        for (offset, (partition, record)) in records.iter().enumerate() {
            let record = ChangelogRecord {
                partition: *partition,
                ..restored(record, offset as i64)
            };
            assert!(reader.restore(&record).expect("restore"));
        }
        reader.settle();
        reader
    }

    #[test]
    fn a_transaction_writes_one_record_per_partition_and_an_abort_forgets_its_ids() {
        let mut done = ids(100, Duration::from_secs(3600));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        done.complete(a, 0, 1);
        done.complete(b, 0, 2);
        done.complete(c, 1, 3);
        assert!(
            done.contains(&a),
            "known to later inputs of the transaction"
        );
        let records = done.closing(&[0, 1], 3);
        assert_eq!(records.len(), 2, "one record per partition: {records:?}");
        assert_eq!(records[0].0, 0);
        assert_eq!(records[1].0, 1);
        done.rollback();
        assert!(!done.contains(&a) && !done.contains(&c));
        // Committed, they come back from their records.
        done.complete(a, 0, 1);
        done.complete(b, 0, 2);
        done.complete(c, 1, 3);
        let records = done.closing(&[0, 1], 3);
        done.commit();
        let reader = read_back(&records, 100);
        assert!(reader.contains(&a) && reader.contains(&b) && reader.contains(&c));
    }

    #[test]
    fn the_window_forgets_whole_batches_with_a_tombstone_in_their_partition() {
        let mut done = ids(2, Duration::from_secs(3600));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        done.complete(a, 0, 1);
        done.complete(b, 0, 1);
        let mut log = done.closing(&[0], 1);
        done.commit();
        done.complete(c, 1, 2);
        // Three ids, capacity two: a and b's batch goes, but its tombstone
        // waits for a transaction with an input of partition 0.
        let records = done.closing(&[1], 2);
        assert_eq!(records.len(), 1);
        assert!(!done.contains(&a) && !done.contains(&b) && done.contains(&c));
        log.extend(records);
        done.commit();
        done.complete(Uuid::new_v4(), 0, 3);
        let records = done.closing(&[0], 3);
        let tombstone = records
            .iter()
            .find(|(_, r)| r.payload == b"null")
            .expect("a tombstone");
        assert_eq!(tombstone.0, 0);
        assert_eq!(tombstone.1.key, log[0].1.key);
        // Aborted, the tombstone is written by a later transaction.
        done.rollback();
        done.complete(Uuid::new_v4(), 0, 4);
        let again = done.closing(&[0], 4);
        assert!(again.iter().any(|(_, r)| r.payload == b"null"));
        log.extend(again);
        done.commit();
        let reader = read_back(&log, 10);
        assert!(!reader.contains(&a) && !reader.contains(&b) && reader.contains(&c));
    }

    #[test]
    fn unpartitioned_any_transaction_writes_a_tombstone() {
        let mut done = CompletedIds::new(
            "done".to_owned(),
            &Deduplication {
                capacity: 1,
                ..Deduplication::default()
            },
            false,
        );
        done.complete(Uuid::new_v4(), 0, 1);
        done.closing(&[0], 1);
        done.commit();
        done.complete(Uuid::new_v4(), 1, 2);
        let records = done.closing(&[1], 2);
        assert!(
            records.iter().any(|(_, r)| r.payload == b"null"),
            "partition 0's batch forgotten by a transaction of partition 1: {records:?}"
        );
    }

    #[test]
    fn ids_older_than_the_window_are_forgotten() {
        let mut done = ids(100, Duration::from_millis(10));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        done.complete(a, 0, 0);
        done.closing(&[0], 0);
        done.commit();
        done.complete(b, 0, 50);
        let records = done.closing(&[0], 50);
        assert_eq!(records.len(), 2, "b's batch and a's tombstone");
        assert!(!done.contains(&a) && done.contains(&b));
    }

    #[test]
    fn records_written_before_batches_are_read_and_forgotten_by_their_key() {
        let old = Uuid::new_v4();
        let record = OutgoingRecord {
            key: Some(old.to_string().into_bytes()),
            payload: b"5".to_vec(),
            ..change_record("done", "x", Vec::new(), Uuid::nil())
        };
        let mut reader = read_back(&[(0, record)], 1);
        assert!(reader.contains(&old));
        reader.complete(Uuid::new_v4(), 0, 10);
        let records = reader.closing(&[0], 10);
        assert!(!reader.contains(&old));
        assert!(records
            .iter()
            .any(|(_, r)| r.payload == b"null" && r.key == Some(old.to_string().into_bytes())));
    }

    #[test]
    fn ids_are_dropped_with_their_partition() {
        let mut done = ids(10, Duration::from_secs(3600));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        done.complete(a, 0, 1);
        done.complete(b, 1, 2);
        done.closing(&[0, 1], 2);
        done.commit();
        done.drop_partitions(&[1]);
        assert!(done.contains(&a) && !done.contains(&b));
        done.complete(c, 1, 3);
        done.closing(&[1], 3);
        done.commit();
        assert!(done.contains(&a) && done.contains(&c));
    }

    #[test]
    fn a_restore_over_held_state_replaces_it() {
        let mut done = ids(10, Duration::from_secs(3600));
        let a = Uuid::new_v4();
        done.complete(a, 0, 1);
        let records = done.closing(&[0], 1);
        done.commit();
        for (offset, (partition, record)) in records.iter().enumerate() {
            let record = ChangelogRecord {
                partition: *partition,
                ..restored(record, offset as i64)
            };
            done.restore(&record).expect("restore");
        }
        done.settle();
        assert!(done.contains(&a));
        assert_eq!(done.batches.len(), 1, "the same batch once");
    }
}

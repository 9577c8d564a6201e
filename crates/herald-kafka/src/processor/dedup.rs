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
//! the transform succeeds, the id is recorded as completed by one more
//! output: a record keyed by the id on the compacted topic
//! [`Deduplication::topic`], so it commits or aborts with the input's
//! outputs and offset. At start the topic is read (`read_committed`, after
//! the fencing) like every changelog.
//!
//! # The window
//!
//! Ids are remembered up to [`Deduplication::capacity`] of them and for at
//! most [`Deduplication::max_age`] after completion; older ones are
//! forgotten, in completion order, with a tombstone in the transaction that
//! forgets them (so compaction removes them from the topic too, and a
//! restart restores at most the window). A copy that arrives after its
//! original was forgotten is processed again: choose the window longer
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herald::{Event, HandlerError};
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

/// A change to undo if the transaction aborts.
#[derive(Debug, Clone, Copy)]
enum Undo {
    Completed(Uuid),
    Forgot(Uuid, i64, i32),
}

/// The completed ids, in completion order, with the changes of the open
/// transaction undoable.
#[derive(Debug)]
pub(crate) struct CompletedIds {
    topic: String,
    capacity: usize,
    max_age_ms: i64,
    /// Id → completion time (Unix ms).
    at: HashMap<Uuid, i64>,
    /// Completion order. Restored ids are sorted in before the first change;
    /// an entry whose time no longer matches `at` is stale and skipped.
    order: VecDeque<(Uuid, i64)>,
    sorted: bool,
    undo: Vec<Undo>,
    /// The state partition of each id in `at` (its input's partition, or
    /// the partition it was restored from), for
    /// [`CompletedIds::drop_partitions`].
    partition_of: HashMap<Uuid, i32>,
}

impl CompletedIds {
    pub(crate) fn new(topic: String, settings: &Deduplication) -> Self {
        Self {
            topic,
            capacity: settings.capacity.max(1),
            max_age_ms: i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX),
            at: HashMap::new(),
            order: VecDeque::new(),
            sorted: true,
            undo: Vec::new(),
            partition_of: HashMap::new(),
        }
    }

    pub(crate) fn contains(&self, id: &Uuid) -> bool {
        self.at.contains_key(id)
    }

    /// Records `id` as completed at `now_ms`, and forgets what falls out of
    /// the window; returns the records to add to the transaction.
    pub(crate) fn complete(
        &mut self,
        id: Uuid,
        partition: i32,
        now_ms: i64,
    ) -> Vec<OutgoingRecord> {
        if !self.sorted {
            let mut order: Vec<(Uuid, i64)> = self.at.iter().map(|(id, at)| (*id, *at)).collect();
            order.sort_unstable_by_key(|(_, at)| *at);
            self.order = order.into();
            self.sorted = true;
        }
        let mut records = vec![self.record(&id, now_ms.to_string().into_bytes())];
        self.at.insert(id, now_ms);
        self.partition_of.insert(id, partition);
        self.order.push_back((id, now_ms));
        self.undo.push(Undo::Completed(id));
        while let Some(&(oldest, at)) = self.order.front() {
            let expired = self.at.len() > self.capacity || now_ms - at > self.max_age_ms;
            if !expired && self.at.get(&oldest) == Some(&at) {
                break;
            }
            self.order.pop_front();
            if self.at.get(&oldest) == Some(&at) {
                self.at.remove(&oldest);
                let partition = self.partition_of.remove(&oldest).unwrap_or_default();
                self.undo.push(Undo::Forgot(oldest, at, partition));
                records.push(self.record(&oldest, b"null".to_vec()));
            }
        }
        records
    }

    /// The open transaction committed.
    pub(crate) fn commit(&mut self) {
        self.undo.clear();
    }

    /// The open transaction aborted: undo its changes, newest first.
    pub(crate) fn rollback(&mut self) {
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Completed(id) => {
                    self.at.remove(&id);
                    self.partition_of.remove(&id);
                    self.order.pop_back();
                }
                Undo::Forgot(id, at, partition) => {
                    self.at.insert(id, at);
                    self.partition_of.insert(id, partition);
                    self.order.push_front((id, at));
                }
            }
        }
    }

    /// One record of the topic, read at start. Returns whether it was one
    /// of this topic's.
    pub(crate) fn restore(&mut self, record: &ChangelogRecord) -> Result<bool, HandlerError> {
        if record.topic != self.topic {
            return Ok(false);
        }
        let id = record
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.parse::<Uuid>().ok())
            .ok_or_else(|| {
                HandlerError::permanent(format!(
                    "record at offset {} of {} is not keyed by an event id",
                    record.offset, self.topic
                ))
            })?;
        let at = record
            .value
            .as_deref()
            .map(serde_json::from_slice::<Option<i64>>)
            .transpose()
            .map_err(HandlerError::permanent)?
            .flatten();
        match at {
            Some(at) => {
                self.at.insert(id, at);
                self.partition_of.insert(id, record.partition);
                self.sorted = false;
            }
            None => {
                self.at.remove(&id);
                self.partition_of.remove(&id);
            }
        }
        Ok(true)
    }

    /// Forgets the ids of state `partitions` (revoked: their next owner
    /// restores them). Their entries in the completion order go stale and
    /// are skipped.
    pub(crate) fn drop_partitions(&mut self, partitions: &[i32]) {
        let at = &mut self.at;
        self.partition_of.retain(|id, partition| {
            let dropped = partitions.contains(partition);
            if dropped {
                at.remove(id);
            }
            !dropped
        });
    }

    fn record(&self, id: &Uuid, payload: Vec<u8>) -> OutgoingRecord {
        change_record(&self.topic, &id.to_string(), payload, *id)
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
        let mut outputs = self.inner.process(event, input).await?;
        outputs.extend(
            self.ids
                .complete(id, partition, chrono::Utc::now().timestamp_millis()),
        );
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
        )
    }

    #[test]
    fn the_window_forgets_the_oldest_with_a_tombstone_and_an_abort_undoes_it() {
        let mut done = ids(2, Duration::from_secs(3600));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(done.complete(a, 0, 1).len(), 1);
        assert_eq!(done.complete(b, 0, 2).len(), 1);
        done.commit();
        let records = done.complete(c, 0, 3);
        assert_eq!(records.len(), 2, "c recorded, a forgotten");
        assert_eq!(records[1].payload, b"null");
        assert!(!done.contains(&a) && done.contains(&c));
        done.rollback();
        assert!(done.contains(&a) && done.contains(&b) && !done.contains(&c));
        // After the undo the window still works from the same order.
        done.complete(c, 0, 3);
        done.commit();
        assert!(!done.contains(&a) && done.contains(&b) && done.contains(&c));
    }

    #[test]
    fn ids_older_than_the_window_are_forgotten() {
        let mut done = ids(100, Duration::from_millis(10));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        done.complete(a, 0, 0);
        let records = done.complete(b, 0, 50);
        assert_eq!(records.len(), 2);
        assert!(!done.contains(&a) && done.contains(&b));
    }

    #[test]
    fn a_restart_restores_what_was_committed_in_completion_order() {
        let mut writer = ids(2, Duration::from_secs(3600));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut log = Vec::new();
        log.extend(writer.complete(b, 0, 20));
        log.extend(writer.complete(a, 0, 10));
        let mut reader = ids(2, Duration::from_secs(3600));
        for (offset, record) in log.iter().enumerate() {
            assert!(reader
                .restore(&restored(record, offset as i64))
                .expect("restore"));
        }
        assert!(reader.contains(&a) && reader.contains(&b));
        // The oldest by completion time (a, at 10) goes first.
        let records = reader.complete(c, 0, 30);
        assert_eq!(records[1].key.as_deref(), Some(a.to_string().as_bytes()));
        let other = ChangelogRecord {
            topic: "other".to_owned(),
            ..restored(&log[0], 0)
        };
        assert!(!reader.restore(&other).expect("other topic"));
    }

    #[test]
    fn ids_are_dropped_with_their_partition() {
        let mut done = ids(10, Duration::from_secs(3600));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        done.complete(a, 0, 1);
        done.complete(b, 1, 2);
        done.commit();
        done.drop_partitions(&[1]);
        assert!(done.contains(&a) && !done.contains(&b));
        // The stale order entry of b is skipped; the window still works.
        done.complete(c, 1, 3);
        done.commit();
        assert!(done.contains(&a) && done.contains(&c));
    }
}

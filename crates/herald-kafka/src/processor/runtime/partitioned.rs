//! State partitioned like the input
//! ([`ProcessorConfig::partitioned_state`](crate::processor::ProcessorConfig::partitioned_state)):
//! a changelog partition is restored when its input partition is assigned
//! and dropped when it is revoked.
//!
//! Why the restore waits for the group's committed offsets first: the
//! previous owner of an input partition may still be finishing its last
//! transaction (a zombie the group already dropped, or a commit in flight
//! during the handover). Its changelog records are then in an open
//! transaction, beyond the last stable offset a `read_committed` restore
//! reads to, and would be missed if it committed after the restore. The
//! consumer's offset fetch asks for stable offsets (KIP-447: librdkafka sets
//! `require_stable` with `read_committed`) and is answered only once that
//! transaction is committed or aborted; a restore after it sees every change
//! the committed offset accounts for. The input partitions stay paused
//! until their state is restored.
//!
//! Why state survives a rebalance that gives its partitions back: the
//! consumer rebalances eagerly (the `range` assignor co-partitions the
//! inputs), so every rebalance revokes every partition, and most come
//! back to the same instance. Their state is still exact: the instance
//! finished its transaction in the revoke callback, and in an eager
//! rebalance no other member can own a partition between this member's
//! revoke and its next assignment. So a revoked partition's state is kept
//! (parked) until that assignment, and only dropped if it does not come
//! back. A *lost* assignment (this member was evicted from the group, and
//! another may have processed its partitions meanwhile) drops at once.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use herald::Event;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, TopicPartitionList};

use crate::error::ClientError;
use crate::processor::changelog::read_partitions_to_end;
use crate::processor::{ProcessorError, Transform};

use super::rebalance::ProcessorContext;
use super::{Engine, Tp};

/// What the engine keeps of partitioned state.
pub(super) struct PartitionedState {
    /// Every changelog, the completed-ids topic included.
    pub(super) changelogs: Vec<Arc<str>>,
    /// The client the restores read with.
    pub(super) client: ClientConfig,
    /// How long one restore may take.
    pub(super) timeout: Duration,
    /// The input partitions assigned to this instance.
    assigned: HashSet<Tp>,
    /// Assigned input partitions, paused, whose state is not restored yet.
    restoring: HashSet<Tp>,
    /// The state partitions this instance holds (restored).
    held: BTreeSet<i32>,
    /// State partitions revoked by a rebalance that did not lose them,
    /// kept until the next assignment says whether they come back.
    parked: BTreeSet<i32>,
}

impl PartitionedState {
    pub(super) fn new(changelogs: Vec<Arc<str>>, client: ClientConfig, timeout: Duration) -> Self {
        Self {
            changelogs,
            client,
            timeout,
            assigned: HashSet::new(),
            restoring: HashSet::new(),
            held: BTreeSet::new(),
            parked: BTreeSet::new(),
        }
    }

    /// Whether `topic` is one of the partitioned changelogs (its records go
    /// to their input's partition).
    pub(super) fn is_changelog(&self, topic: &str) -> bool {
        self.changelogs.iter().any(|t| t.as_ref() == topic)
    }

    /// Whether `tp` waits for its state: its records are not processed.
    pub(super) fn is_restoring(&self, tp: &Tp) -> bool {
        self.restoring.contains(tp)
    }
}

/// Checks that every changelog has exactly as many partitions as every
/// input topic: partition *p* of a changelog is the state of input
/// partition *p*.
pub(super) fn check_partition_counts(
    client: &ClientConfig,
    inputs: &[String],
    changelogs: &[Arc<str>],
    timeout: Duration,
) -> Result<usize, ProcessorError> {
    let mut counts = Vec::new();
    for topic in inputs
        .iter()
        .map(String::as_str)
        .chain(changelogs.iter().map(|t| t.as_ref()))
    {
        counts.push((
            topic,
            crate::admin::partition_count(client, topic, timeout)?,
        ));
    }
    let expected = counts.first().map_or(0, |(_, n)| *n);
    if expected == 0 || counts.iter().any(|(_, n)| *n != expected) {
        let found: Vec<String> = counts.iter().map(|(t, n)| format!("{t}: {n}")).collect();
        return Err(ClientError::Setting {
            setting: "partitioned_state",
            reason: format!(
                "the input topics and changelogs must exist with one partition count (found {})",
                found.join(", ")
            ),
        }
        .into());
    }
    Ok(expected)
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    /// Input partitions were assigned: those whose state partition this
    /// instance does not hold are paused until [`Engine::restore_assigned`].
    pub(super) fn state_assigned(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        tpl: &TopicPartitionList,
    ) {
        let Some(state) = self.partitioned.as_mut() else {
            return;
        };
        // Parked state partitions that came back are held again, exact as
        // they were; the others go now.
        let assigned: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let parked = std::mem::take(&mut state.parked);
        let (back, gone): (Vec<i32>, Vec<i32>) =
            parked.into_iter().partition(|p| assigned.contains(p));
        state.held.extend(back.iter().copied());
        if !back.is_empty() {
            tracing::info!(partitions = ?back, "state kept across the rebalance");
        }
        if !gone.is_empty() {
            self.transform.revoked(&gone);
            tracing::info!(partitions = ?gone, "state of partitions not assigned again dropped");
        }
        let mut pause = TopicPartitionList::new();
        for element in tpl.elements() {
            let tp: Tp = (self.topics.intern(element.topic()), element.partition());
            state.assigned.insert(tp.clone());
            if !state.held.contains(&tp.1) {
                pause.add_partition(&tp.0, tp.1);
                state.restoring.insert(tp);
            }
        }
        if pause.count() > 0 {
            if let Err(error) = consumer.pause(&pause) {
                self.fatal = Some(ProcessorError::Kafka {
                    transactional_id: self.transactional_id.clone(),
                    operation: "pausing input partitions until their state is restored",
                    source: error,
                });
            }
        }
    }

    /// Input partitions were revoked (after the open transaction was
    /// finished): state partitions no input partition of this instance
    /// needs any more are parked until the next assignment, or dropped at
    /// once when the assignment was `lost` (see the module documentation).
    pub(super) fn state_revoked(&mut self, revoked: &HashSet<Tp>, lost: bool) {
        let Some(state) = self.partitioned.as_mut() else {
            return;
        };
        state.assigned.retain(|tp| !revoked.contains(tp));
        state.restoring.retain(|tp| !revoked.contains(tp));
        let still: HashSet<i32> = state.assigned.iter().map(|tp| tp.1).collect();
        let gone: Vec<i32> = state
            .held
            .iter()
            .copied()
            .filter(|p| !still.contains(p))
            .collect();
        for p in &gone {
            state.held.remove(p);
        }
        if !lost {
            state.parked.extend(gone);
            return;
        }
        let gone: Vec<i32> = gone
            .into_iter()
            .chain(std::mem::take(&mut state.parked))
            .collect();
        if gone.is_empty() {
            return;
        }
        self.transform.revoked(&gone);
        tracing::info!(partitions = ?gone, "state of lost partitions dropped");
    }

    /// Restores the state of the assigned input partitions that wait for
    /// it, then resumes them. Called before a poll, with no transaction
    /// touching those partitions.
    pub(super) fn restore_assigned(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) {
        let Some(state) = self.partitioned.as_ref() else {
            return;
        };
        if state.restoring.is_empty() {
            return;
        }
        let mut waiting = TopicPartitionList::new();
        for tp in &state.restoring {
            waiting.add_partition(&tp.0, tp.1);
        }
        let partitions: Vec<i32> = state
            .restoring
            .iter()
            .map(|tp| tp.1)
            .filter(|p| !state.held.contains(p))
            .collect::<BTreeSet<i32>>()
            .into_iter()
            .collect();
        // Stable offsets first (see the module documentation).
        if let Err(error) = consumer.committed_offsets(waiting.clone(), state.timeout) {
            self.fatal = Some(ProcessorError::Kafka {
                transactional_id: self.transactional_id.clone(),
                operation: "reading the committed offsets of assigned partitions",
                source: error,
            });
            return;
        }
        let mut records = 0;
        for topic in &state.changelogs {
            let read = read_partitions_to_end(
                &state.client,
                topic,
                Some(&partitions),
                state.timeout,
                |record| self.transform.restore(record),
            );
            match read {
                Ok(read) => records += read,
                Err(error) => {
                    // What was read of these partitions is dropped with
                    // them; the restarted processor reads them again.
                    self.transform.revoked(&partitions);
                    self.fatal = Some(error);
                    return;
                }
            }
        }
        let state = self.partitioned.as_mut().expect("partitioned state");
        state.held.extend(partitions.iter().copied());
        state.restoring.clear();
        tracing::info!(partitions = ?partitions, records, "state of assigned partitions restored");
        if let Err(error) = consumer.resume(&waiting) {
            self.fatal = Some(ProcessorError::Kafka {
                transactional_id: self.transactional_id.clone(),
                operation: "resuming input partitions after their restore",
                source: error,
            });
        }
    }
}

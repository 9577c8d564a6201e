//! Partitions revoked and assigned: the open batch finished while the
//! partitions are still ours; rewinds and backoff pauses applied before
//! each poll.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use herald::Event;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::processor::{ProcessorError, Transform};

use super::transactions::Backoff;
use super::{lock, Engine, Tp};

/// The consumer's context: routes rebalance callbacks to the engine.
pub(super) struct ProcessorContext<E, T> {
    pub(super) engine: Arc<Mutex<Engine<E, T>>>,
}

impl<E: Event, T: Transform<E>> ClientContext for ProcessorContext<E, T> {}

impl<E: Event, T: Transform<E>> ConsumerContext for ProcessorContext<E, T> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => lock(&self.engine).revoke(consumer, tpl),
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition paused for a backoff, revoked, then assigned again
            // must not stay paused forever.
            let _ = consumer.resume(tpl);
            // Partitioned state: paused again until restored.
            lock(&self.engine).state_assigned(consumer, tpl);
        }
    }
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    /// Seeks rewound partitions back; resumes paused ones whose time came.
    pub(super) fn before_poll(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) {
        if self.resume_at.is_some_and(|at| Instant::now() >= at) {
            let mut tpl = TopicPartitionList::new();
            for tp in self.paused.drain() {
                tpl.add_partition(&tp.0, tp.1);
            }
            if let Err(error) = consumer.resume(&tpl) {
                tracing::warn!(%error, "resuming after the backoff failed");
            }
            self.resume_at = None;
        }
        self.restore_assigned(consumer);
        if self.rewind.is_empty() || self.fatal.is_some() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let rewind: Vec<(Tp, i64)> = self.rewind.drain().collect();
        for (tp, offset) in rewind {
            if let Err(error) = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset)) {
                self.fatal_seek(error);
                return;
            }
        }
        tracing::debug!(
            partitions = tpl.count(),
            "rewinding to the last committed offsets"
        );
        match consumer.seek_partitions(tpl, self.operation_timeout) {
            Ok(result) => {
                for element in result.elements() {
                    if let Err(error) = element.error() {
                        self.fatal_seek(error);
                        return;
                    }
                }
            }
            Err(error) => self.fatal_seek(error),
        }
    }

    pub(super) fn rewind_to(&mut self, tp: &Tp, offset: i64) {
        let target = self.rewind.entry(tp.clone()).or_insert(offset);
        *target = (*target).min(offset);
    }

    pub(super) fn fatal_seek(&mut self, error: KafkaError) {
        // Going on without the rewind would skip inputs: stop instead (a
        // restart starts from the committed offsets, which is exact).
        tracing::error!(%error, "rewinding after an abort failed: the processor stops");
        self.fatal = Some(ProcessorError::Kafka {
            transactional_id: self.transactional_id.clone(),
            operation: "rewinding to the last committed offsets",
            source: error,
        });
    }

    /// Partitions are about to be taken away: finish the open transaction
    /// while they are still ours, then forget them.
    pub(super) fn revoke(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        tpl: &TopicPartitionList,
    ) {
        let revoked: HashSet<Tp> = tpl
            .elements()
            .iter()
            .map(|e| (self.topics.intern(e.topic()), e.partition()))
            .collect();
        let lost = consumer.assignment_lost();
        if self.txn.is_some() && self.fatal.is_none() && !self.closing {
            if lost {
                tracing::warn!("assignment lost: aborting the open transaction");
                self.abort(consumer, "assignment lost", None, Backoff::None);
            } else if self.commit(consumer) {
                tracing::debug!("open transaction committed before the revoke");
            }
        }
        self.rewind.retain(|tp, _| !revoked.contains(tp));
        self.paused.retain(|tp| !revoked.contains(tp));
        self.failures
            .retain(|(topic, partition, _), _| !revoked.contains(&(Arc::clone(topic), *partition)));
        self.commit_before
            .retain(|(topic, partition, _)| !revoked.contains(&(Arc::clone(topic), *partition)));
        self.state_revoked(&revoked, lost);
        tracing::info!(partitions = revoked.len(), "partitions revoked");
    }
}

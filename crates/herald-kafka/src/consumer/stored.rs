//! Offsets kept in a store ([`herald::offsets`]): where an assigned
//! partition starts when [`super::ConsumerConfig::offsets_in`] is set.
//!
//! The rebalance callback runs on the poll thread, before librdkafka starts
//! fetching: it reads the partitions' stored offsets and their Kafka
//! commits and assigns each partition at the later of the two. The Kafka
//! commit is only ever behind the store's when the process died between
//! its handlers' commit and its own; it is ahead when the last records
//! wrote nothing to the store (unknown types, dead letters), which need not
//! run again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use herald::OffsetStore;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::ClientError;

type Loading<'a> = Pin<Box<dyn Future<Output = Result<Vec<(i32, i64)>, String>> + Send + 'a>>;

/// [`OffsetStore`] with its error and future erased, for the config.
trait Source: Send + Sync {
    fn next_offsets<'a>(&'a self, topic: &'a str, partitions: &'a [i32]) -> Loading<'a>;
}

impl<S: OffsetStore> Source for S {
    fn next_offsets<'a>(&'a self, topic: &'a str, partitions: &'a [i32]) -> Loading<'a> {
        Box::pin(async move {
            OffsetStore::next_offsets(self, topic, partitions)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The store a consumer reads its start offsets from.
#[derive(Clone)]
pub(crate) struct StoredOffsets(Arc<dyn Source>);

impl std::fmt::Debug for StoredOffsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredOffsets")
    }
}

/// Attempts at reading the stored offsets before the consumer stops.
const ATTEMPTS: u32 = 5;

impl StoredOffsets {
    pub(crate) fn new(store: impl OffsetStore) -> Self {
        Self(Arc::new(store))
    }

    /// Sets each partition of `tpl` to start at the later of its stored
    /// offset and its Kafka commit (blocking the poll thread, inside the
    /// assignment). Fails when the store cannot be read: starting from
    /// Kafka's commit alone could apply again what the store already has.
    pub(crate) fn start_assigned<C: ConsumerContext>(
        &self,
        tokio: &tokio::runtime::Handle,
        consumer: &BaseConsumer<C>,
        tpl: &mut TopicPartitionList,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let mut by_topic: HashMap<String, Vec<i32>> = HashMap::new();
        for e in tpl.elements() {
            by_topic
                .entry(e.topic().to_owned())
                .or_default()
                .push(e.partition());
        }
        let mut start: HashMap<(String, i32), i64> = HashMap::new();
        for (topic, partitions) in &by_topic {
            for (partition, offset) in self.read(tokio, topic, partitions)? {
                start.insert((topic.clone(), partition), offset);
            }
        }
        // The Kafka commits: a failure to read them costs at most records
        // handled again (the store skips what it has), so it only warns.
        match consumer.committed_offsets(tpl.clone(), timeout) {
            Ok(committed) => {
                for e in committed.elements() {
                    if let Offset::Offset(kafka) = e.offset() {
                        let at = start.entry((e.topic().to_owned(), e.partition()));
                        let at = at.or_insert(kafka);
                        *at = (*at).max(kafka);
                    }
                }
            }
            Err(error) => tracing::warn!(
                %error,
                "reading the Kafka commits of the assigned partitions failed; \
                 they start at their stored offsets"
            ),
        }
        for ((topic, partition), offset) in start {
            tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(|source| ClientError::Kafka {
                    operation: "starting an assigned partition at its stored offset",
                    source,
                })?;
        }
        Ok(())
    }

    fn read(
        &self,
        tokio: &tokio::runtime::Handle,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<(i32, i64)>, ClientError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match tokio.block_on(self.0.next_offsets(topic, partitions)) {
                Ok(offsets) => return Ok(offsets),
                Err(error) if attempt < ATTEMPTS => {
                    tracing::warn!(%error, attempt, topic, "reading stored offsets failed; retrying");
                    std::thread::sleep(Duration::from_millis(200) * 2u32.pow(attempt));
                }
                Err(error) => {
                    return Err(ClientError::Store {
                        operation: "reading the stored offsets of assigned partitions",
                        reason: format!("{topic}, {ATTEMPTS} attempts: {error}"),
                    })
                }
            }
        }
    }
}

//! The exactly-once relay's checkpoint topic: one partition per relay slot,
//! one record per committed relay transaction ([`herald::Checkpoint`] as
//! JSON, keyed by the slot), written inside that transaction.
//!
//! Compacted: only a slot's latest checkpoint is ever needed (a checkpoint
//! lists every id its lease marks, recovered ones included; see
//! `herald_postgres::slots`), so the topic stays as small as the number of
//! slots.

use std::time::{Duration, Instant};

use herald::Checkpoint;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::error::ClientError;

/// How many offsets from a partition's end the first read starts: each
/// committed transaction adds two (its record and its commit marker), an
/// aborted one at most two; further back only when nothing committed is
/// found there.
const TAIL: i64 = 64;

/// Creates the checkpoint topic (compacted, one partition per slot) unless
/// it exists, and checks that it has a partition for every slot.
pub(crate) async fn ensure_topic(
    client: &ClientConfig,
    topic: &str,
    slots: u16,
    durability: crate::admin::TopicDurability,
    timeout: Duration,
) -> Result<(), ClientError> {
    let partitions =
        crate::admin::ensure_compacted_topic(client, topic, i32::from(slots), durability, timeout)
            .await?;
    if partitions < usize::from(slots) {
        return Err(ClientError::Setting {
            setting: "checkpoint_topic",
            reason: format!(
                "topic {topic} has {partitions} partitions; the exactly-once relay needs one per \
                 relay slot ({slots}): give it more partitions or name another topic"
            ),
        });
    }
    Ok(())
}

/// The checkpoint as the record's payload.
pub(crate) fn encode(checkpoint: &Checkpoint) -> Vec<u8> {
    // A struct of integers always serializes.
    serde_json::to_vec(checkpoint).unwrap_or_default()
}

/// Reads the latest checkpoints of slots from the checkpoint topic with
/// `read_committed`.
pub(crate) struct CheckpointReader {
    consumer: BaseConsumer,
    topic: String,
    timeout: Duration,
}

impl CheckpointReader {
    /// A group-less `read_committed` consumer made from `client` (brokers
    /// and security settings).
    pub(crate) fn new(
        client: &ClientConfig,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let mut config = client.clone();
        config
            // assign() needs a group id; this consumer never joins nor commits.
            .set("group.id", "herald-relay-checkpoint-reader")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            // A read to the end, never a wait for new records: the broker answers
            // a fetch at the end at once instead of after librdkafka's 500 ms
            // default. A partition that ends in a swept (aborted) transaction
            // reports its end only from such an empty fetch (the relay's start
            // took 500 ms per slot, one slot after another).
            .set("fetch.wait.max.ms", "10")
            .set("enable.auto.commit", "false");
        Ok(Self {
            consumer: config.create().map_err(ClientError::Config)?,
            topic: topic.to_owned(),
            timeout,
        })
    }

    /// The latest committed checkpoint of `slot` (its partition), or `None`
    /// when the slot has none. Blocks: call it from a blocking thread, and
    /// only after the slot's producer finished `init_transactions`, so that
    /// no transaction of the slot is open and the partition's end is final.
    pub(crate) fn latest(&self, slot: u16) -> Result<Option<Checkpoint>, ClientError> {
        let partition = i32::from(slot);
        let kafka = |operation| move |source| ClientError::Kafka { operation, source };
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map_err(kafka("reading a relay checkpoint partition's offsets"))?;
        if high <= low {
            return Ok(None);
        }
        let mut start = (high - TAIL).max(low);
        loop {
            let found = self.read_from(partition, slot, start)?;
            if found.is_some() || start == low {
                return Ok(found);
            }
            start = low;
        }
    }

    /// The checkpoint of `slot` with the highest sequence from `start` to
    /// the partition's end.
    fn read_from(
        &self,
        partition: i32,
        slot: u16,
        start: i64,
    ) -> Result<Option<Checkpoint>, ClientError> {
        let kafka = |operation| move |source| ClientError::Kafka { operation, source };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(start))
            .map_err(kafka("assigning a relay checkpoint partition"))?;
        self.consumer
            .assign(&tpl)
            .map_err(kafka("assigning a relay checkpoint partition"))?;
        let deadline = Instant::now() + self.timeout;
        let mut latest: Option<Checkpoint> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Kafka {
                    operation: "reading a relay checkpoint partition to its end",
                    source: KafkaError::Global(RDKafkaErrorCode::OperationTimedOut),
                });
            }
            match self
                .consumer
                .poll((deadline - now).min(Duration::from_millis(100)))
            {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break,
                // The reader lives as long as the relay: an outage leaves
                // its queue full of client-wide errors ("all brokers
                // down") that it hands out after the brokers are back.
                // librdkafka recovers from them by itself; the deadline
                // bounds a broker that stays away.
                Some(Err(source)) if crate::is_retriable(&source) => {
                    tracing::debug!(%source, "relay checkpoint reader: retriable error, reading on");
                }
                Some(Err(source)) => {
                    return Err(ClientError::Kafka {
                        operation: "reading a relay checkpoint partition",
                        source,
                    })
                }
                Some(Ok(message))
                    if crate::sweep::is_sweep_record(message.key(), message.payload()) => {}
                Some(Ok(message)) => {
                    let decoded = message.payload().map(serde_json::from_slice::<Checkpoint>);
                    match decoded {
                        Some(Ok(checkpoint)) if checkpoint.slot == slot => {
                            if latest
                                .as_ref()
                                .is_none_or(|l| checkpoint.sequence > l.sequence)
                            {
                                latest = Some(checkpoint);
                            }
                        }
                        _ => tracing::warn!(
                            topic = %self.topic,
                            partition,
                            offset = message.offset(),
                            "a record on the relay checkpoint topic is not a checkpoint of this \
                             partition's slot; ignored"
                        ),
                    }
                }
            }
        }
        self.consumer
            .unassign()
            .map_err(kafka("releasing a relay checkpoint partition"))?;
        Ok(latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_through_its_payload() {
        let checkpoint = Checkpoint {
            slot: 3,
            sequence: 42,
            ids: vec![7, 8, 10],
        };
        let back: Checkpoint = serde_json::from_slice(&encode(&checkpoint)).expect("decode");
        assert_eq!(back, checkpoint);
    }
}

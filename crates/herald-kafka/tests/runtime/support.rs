//! Events, producers and waiting helpers shared by the runtime tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_kafka::{Publisher, PublisherConfig};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

pub use herald_test::events::{steps, Step, TestEvent};

pub fn publisher(kafka: &herald_test::Kafka) -> Publisher {
    Publisher::new(&PublisherConfig::new(kafka.brokers(), "/herald-tests")).expect("publisher")
}

/// Publishes every event and asserts each was acknowledged.
pub async fn publish_all(publisher: &Publisher, topic: &str, events: &[TestEvent]) {
    for result in publisher.publish_batch(topic, events).await {
        result.expect("published");
    }
}

/// What handlers saw, in the order they saw it.
#[derive(Debug, Default, Clone)]
pub struct Seen(pub Arc<Mutex<Vec<HandledStep>>>);

/// One handled step: key, seq, partition, offset.
pub type HandledStep = (String, u64, i32, i64);

impl Seen {
    pub fn record(&self, step: &Step, partition: i32, offset: i64) {
        self.0
            .lock()
            .expect("lock")
            .push((step.key.clone(), step.seq, partition, offset));
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("lock").len()
    }

    /// Sequences per key, in handling order.
    pub fn by_key(&self) -> BTreeMap<String, Vec<u64>> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (key, seq, _, _) in self.0.lock().expect("lock").iter() {
            out.entry(key.clone()).or_default().push(*seq);
        }
        out
    }
}

/// Waits until `done()` holds, checking every 20 ms; panics after `limit`
/// with `what` so a stuck runtime fails loudly instead of hanging.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The group's committed offset per partition of `topic` (partitions with
/// no commit are absent).
pub fn committed(
    kafka: &herald_test::Kafka,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = kafka
        .config()
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// The end offset of every partition of `topic`.
pub fn end_offsets(kafka: &herald_test::Kafka, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = kafka.config().create().expect("consumer");
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, high)
        })
        .collect()
}

/// Asserts that every key's steps were handled in order 0..per_key (each
/// at least once; a redelivery repeats a suffix, never skips back past a
/// step that was not handled).
pub fn assert_complete_and_ordered(seen: &Seen, keys: usize, per_key: u64) {
    let by_key = seen.by_key();
    assert_eq!(by_key.len(), keys, "every key handled");
    for (key, seqs) in by_key {
        let mut expected_next = 0;
        for seq in &seqs {
            assert!(
                *seq <= expected_next,
                "{key}: step {seq} handled before step {expected_next}: {seqs:?}"
            );
            if *seq == expected_next {
                expected_next += 1;
            }
        }
        assert_eq!(expected_next, per_key, "{key}: all steps handled: {seqs:?}");
    }
}

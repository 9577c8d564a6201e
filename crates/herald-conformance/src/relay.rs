//! The relay as it runs in production, from the store under test to a real
//! Kafka topic (feature `kafka`): the one check of the suite that needs a
//! broker (see the crate's documentation for why it runs with the stores'
//! tests).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::AfterPublish;
use herald_kafka::{Publisher, PublisherConfig, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::harness::{enqueue_committed, Harness, Rec};
use crate::suite::assert_in_order;

/// The relay as it runs in production, from this store to a real Kafka
/// topic: two relays drain while writers commit; every event reaches Kafka
/// once, each aggregate on one partition, in creation order.
pub async fn the_relay_publishes_each_aggregate_in_order_to_kafka<H: Harness>(h: H) {
    const WRITERS: usize = 3;
    const AGGREGATES_PER_WRITER: usize = 4;
    const EVENTS: u64 = 20;
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("conformance", 3).await;
    let h = Arc::new(h);

    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for outbox in h.outboxes(2, AfterPublish::MarkPublished) {
        let publisher = Publisher::new(&PublisherConfig::new(kafka.brokers(), "/conformance"))
            .expect("publisher");
        let relay = Relay::new(
            outbox,
            publisher,
            RelayConfig {
                batch_size: 50,
                poll_interval: Duration::from_millis(200),
                ..RelayConfig::default()
            },
        );
        relays.push(tokio::spawn(relay.run(stop.clone().cancelled_owned())));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let h = Arc::clone(&h);
        let topic = topic.name().to_owned();
        writers.push(tokio::spawn(async move {
            for seq in 0..EVENTS {
                for a in 0..AGGREGATES_PER_WRITER {
                    enqueue_committed(&*h, &[Rec::new(&topic, &format!("w{w}-a{a}"), seq)]).await;
                }
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while h.status().await.backlog > 0 {
        assert!(
            Instant::now() < deadline,
            "{}: the relays did not drain",
            H::NAME
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for r in relays {
        r.await.expect("relay stopped");
    }

    let reads = kafka_read::read_to_end(&kafka, topic.name(), 3);
    let total = WRITERS * AGGREGATES_PER_WRITER * EVENTS as usize;
    assert_eq!(reads.len(), total, "{}: every event once", H::NAME);
    let mut partition_of = BTreeMap::new();
    for (partition, key, _) in &reads {
        assert_eq!(
            *partition_of.entry(key.clone()).or_insert(*partition),
            *partition,
            "{key} on one partition"
        );
    }
    let log: Vec<(String, u64)> = reads.into_iter().map(|(_, k, s)| (k, s)).collect();
    let expected: BTreeMap<String, u64> = (0..WRITERS)
        .flat_map(|w| (0..AGGREGATES_PER_WRITER).map(move |a| (format!("w{w}-a{a}"), EVENTS)))
        .collect();
    assert_in_order(H::NAME, &log, &expected);
}

mod kafka_read {
    use std::time::{Duration, Instant};

    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::{Message, Offset, TopicPartitionList};

    /// Every record of `topic` as (partition, key, seq), per partition in
    /// offset order.
    pub fn read_to_end(
        kafka: &herald_test::Kafka,
        topic: &str,
        partitions: i32,
    ) -> Vec<(i32, String, u64)> {
        let consumer: BaseConsumer = kafka
            .config()
            .set("group.id", herald_test::unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        let mut remaining = 0;
        for p in 0..partitions {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            remaining += high;
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while remaining > 0 {
            assert!(Instant::now() < deadline, "reading {topic} timed out");
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.expect("read");
            remaining -= 1;
            let body: serde_json::Value =
                serde_json::from_slice(message.payload().expect("payload")).expect("json");
            out.push((
                message.partition(),
                String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8"),
                body["seq"].as_u64().expect("seq"),
            ));
        }
        out
    }
}

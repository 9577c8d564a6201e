//! Foundation smoke test: rdkafka against the real broker. Keyed records
//! produced with acks=all and idempotence come back to a fresh consumer
//! group, every one of them, in order within each partition.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

const KEYS: usize = 40;
const PER_KEY: usize = 25;

#[tokio::test]
async fn keyed_records_round_trip_in_partition_order() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("smoke", 3).await;

    let producer: FutureProducer = kafka
        .config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    // Sequence numbers per key are produced in order; many records in flight.
    let mut deliveries = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let key = format!("key-{key}");
            let payload = format!("{key}/{seq}");
            let producer = producer.clone();
            let topic = topic.name().to_owned();
            deliveries.push(tokio::spawn(async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }));
        }
    }
    let mut produced_partitions = HashSet::new();
    for delivery in deliveries {
        let delivered = delivery.await.expect("task").expect("delivered");
        produced_partitions.insert(delivered.partition);
    }
    assert!(produced_partitions.len() > 1, "keys spread over partitions");

    let consumer: StreamConsumer = kafka
        .config()
        .set("group.id", herald_test::unique_name("smoke-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic.name()]).expect("subscribe");

    let total = KEYS * PER_KEY;
    let mut last_offset: BTreeMap<i32, i64> = BTreeMap::new();
    let mut next_seq: BTreeMap<String, usize> = BTreeMap::new();
    let mut key_partition: BTreeMap<String, i32> = BTreeMap::new();
    let mut received = 0;
    while received < total {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {received} of {total} records within 60 s"))
            .expect("consume");
        let key = String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8 key");
        let payload = std::str::from_utf8(message.payload().expect("payload")).expect("utf-8");
        let (payload_key, seq) = payload.split_once('/').expect("key/seq");
        assert_eq!(payload_key, key);

        let previous = last_offset.insert(message.partition(), message.offset());
        assert!(
            previous.is_none_or(|p| p < message.offset()),
            "offsets increase"
        );
        let partition = *key_partition
            .entry(key.clone())
            .or_insert(message.partition());
        assert_eq!(
            partition,
            message.partition(),
            "a key stays on one partition"
        );
        let expected = next_seq.entry(key.clone()).or_insert(0);
        assert_eq!(
            seq.parse::<usize>().expect("seq"),
            *expected,
            "order of {key}"
        );
        *expected += 1;
        received += 1;
    }
    assert_eq!(next_seq.len(), KEYS);
    assert!(next_seq.values().all(|n| *n == PER_KEY));
}

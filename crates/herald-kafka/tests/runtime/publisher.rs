//! The publisher: Java-compatible partitioning, per-record batch results and
//! the wire headers on real records.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use herald::Event;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;

use crate::support::*;

/// The kafka-clients jar that `scripts/services.sh up` fetched.
fn kafka_clients_jar() -> Option<PathBuf> {
    let cache = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/kafka");
    let mut jars: Vec<PathBuf> = std::fs::read_dir(&cache)
        .ok()?
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("libs-"))
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|f| f.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("kafka-clients-") && name.ends_with(".jar")
        })
        .collect();
    jars.sort();
    jars.pop()
}

#[tokio::test]
async fn keys_land_on_the_partition_the_java_client_chooses() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let Some(jar) = kafka_clients_jar() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: the kafka-clients jar must exist (scripts/services.sh up)"
        );
        eprintln!("\n*** SKIPPED: no kafka-clients jar under .cache/kafka; run scripts/services.sh up ***\n");
        return;
    };
    const PARTITIONS: i32 = 7;
    let keys: Vec<String> = [
        "a",
        "order-1",
        "5f0c0b1e-3c39-4d1f-9d5c-1f1b1a6d4c2e",
        "ключ",
        "key-with-a-longer-tail-0123456789",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((0..20).map(|i| format!("key-{i}")))
    .collect();
    // The whole folder: kafka-clients needs slf4j beside it.
    let classpath = jar.parent().expect("libs folder").join("*");
    let java = std::process::Command::new("java")
        .arg("-cp")
        .arg(&classpath)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/runtime/JavaPartition.java"))
        .arg(PARTITIONS.to_string())
        .args(&keys)
        .output()
        .expect("run java");
    assert!(
        java.status.success(),
        "java failed: {}",
        String::from_utf8_lossy(&java.stderr)
    );
    let java_partitions: Vec<i32> = String::from_utf8(java.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| l.trim().parse().expect("partition"))
        .collect();
    assert_eq!(java_partitions.len(), keys.len());

    let topic = kafka.topic("partitioner", PARTITIONS).await;
    let events: Vec<TestEvent> = keys
        .iter()
        .map(|k| {
            TestEvent::Step(Step {
                event_id: uuid::Uuid::new_v4(),
                key: k.clone(),
                seq: 0,
                at: chrono::Utc::now(),
            })
        })
        .collect();
    let results = publisher(&kafka).publish_batch(topic.name(), &events).await;
    let ours: Vec<i32> = results
        .into_iter()
        .map(|r| r.expect("delivered").partition)
        .collect();
    assert_eq!(ours, java_partitions, "partition per key, herald vs Java");
    assert!(
        ours.iter().collect::<std::collections::HashSet<_>>().len() > 3,
        "keys spread"
    );
}

#[tokio::test]
async fn published_records_carry_the_envelope_headers() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("headers", 1).await;
    let event = steps(1, 1).remove(0);
    let delivered = publisher(&kafka)
        .publish(topic.name(), &event)
        .await
        .expect("published");
    assert_eq!(delivered.offset, 0);

    let reader: StreamConsumer = kafka
        .config()
        .set("group.id", herald_test::unique_name("headers"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader");
    reader.subscribe(&[topic.name()]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
        .await
        .expect("record arrives")
        .expect("read");
    assert_eq!(message.key(), Some(event.aggregate_id().as_bytes()));
    let headers: HashMap<String, String> = message
        .headers()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h.key.to_owned(),
                String::from_utf8(h.value.unwrap_or_default().to_vec()).expect("utf-8"),
            )
        })
        .collect();
    assert_eq!(headers["event_type"], "Step");
    assert_eq!(headers["event_id"], event.event_id().to_string());
    assert_eq!(headers["ce_id"], event.event_id().to_string());
    assert_eq!(headers["ce_type"], "Step");
    assert_eq!(headers["ce_source"], "/herald-tests");
    assert_eq!(headers["ce_specversion"], "1.0");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("produced_at") && headers.contains_key("ce_time"));
    let back = herald_kafka::envelope_of(&message)
        .expect("envelope")
        .decode::<TestEvent>()
        .expect("event");
    assert_eq!(back, event);
}

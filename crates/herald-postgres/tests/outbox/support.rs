//! Shared set-up: a migrated fresh database, a topic, a relay, and a reader
//! that reads a topic to its end.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_kafka::{Publisher, PublisherConfig, Relay, RelayConfig};
use herald_postgres::{OutboxRecord, PgOutbox};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use uuid::Uuid;

pub use herald_test::events::{step, steps, TestEvent};

pub fn record(topic: &str, event: &TestEvent) -> OutboxRecord {
    OutboxRecord::new(topic, event, "/outbox-tests", None).expect("encode")
}

pub struct Env {
    pub kafka: herald_test::Kafka,
    pub db: herald_test::TestDatabase,
    pub pool: PgPool,
    pub topic: herald_test::TestTopic,
}

/// Kafka, a fresh migrated database and a topic; `None` when a service is
/// missing outside CI.
pub async fn env(partitions: i32) -> Option<Env> {
    let kafka = herald_test::kafka()?;
    let postgres = herald_test::postgres()?;
    let db = postgres.database().await;
    let pool = db.pool().await;
    herald_postgres::migrate(&pool).await.expect("migrate");
    let topic = kafka.topic("outbox", partitions).await;
    Some(Env {
        kafka,
        db,
        pool,
        topic,
    })
}

pub fn publisher(kafka: &herald_test::Kafka) -> Publisher {
    Publisher::new(&PublisherConfig::new(kafka.brokers(), "/outbox-tests")).expect("publisher")
}

pub fn relay(env: &Env, pool: PgPool) -> Relay<PgOutbox> {
    Relay::new(
        PgOutbox::new(pool),
        publisher(&env.kafka),
        RelayConfig {
            batch_size: 200,
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub key: String,
    pub event_id: Uuid,
    pub seq: u64,
    pub headers: BTreeMap<String, String>,
}

/// Every record of `topic`, per partition in offset order.
pub fn read_to_end(kafka: &herald_test::Kafka, topic: &str, partitions: i32) -> Vec<Read> {
    let consumer: BaseConsumer = kafka
        .config()
        .set("group.id", herald_test::unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    let mut high = BTreeMap::new();
    for p in 0..partitions {
        let (_, h) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        high.insert(p, h);
        remaining += h;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while remaining > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} timed out"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("read");
        remaining -= 1;
        let headers: BTreeMap<String, String> = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_slice(message.payload().expect("payload")).expect("json");
        out.push(Read {
            partition: message.partition(),
            key: String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8"),
            event_id: headers["event_id"].parse().expect("event id"),
            seq: body["seq"].as_u64().expect("seq"),
            headers,
        });
    }
    out
}

/// Per key, the sequence numbers in the order Kafka holds them.
pub fn sequences(reads: &[Read]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in reads {
        out.entry(r.key.clone()).or_default().push(r.seq);
    }
    out
}

/// Enqueues `event` in its own committed transaction.
pub async fn enqueue_committed(pool: &PgPool, topic: &str, event: &TestEvent) {
    let mut tx = pool.begin().await.expect("begin");
    herald_postgres::outbox::enqueue(&mut tx, &record(topic, event))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
}

/// Drives `relay` until the outbox backlog is empty and returns how many
/// records it published. Passes can come up empty while any transaction on
/// the server (other tests' included) is older than the rows: keep going
/// until the backlog is zero, within a bound.
pub async fn drain_all(relay: &Relay<PgOutbox>, pool: &PgPool) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut published = 0;
    loop {
        published += relay.drain().await.expect("relay pass");
        let status = herald_postgres::outbox::status(pool).await.expect("status");
        if status.backlog == 0 {
            return published;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outbox not drained: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

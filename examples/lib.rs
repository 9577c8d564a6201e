//! Runnable examples of herald's library, each started with the one
//! `cargo run -p herald-examples --example …` line at its top, on an
//! embedded Kafka where it can. `tests/examples.rs` runs each of them in
//! the test suite, so they keep working.
//!
//! # Layout
//! - `consumer.rs`: a typed consumer with retries and dead letters (and a
//!   poisoned key's next event parked behind it).
//! - `outbox.rs`: a row and its event in one transaction (SQLite), and the
//!   relay that publishes the events in commit order.
//! - `processor.rs`: an exactly-once processor that drops the duplicate
//!   inputs an at-least-once producer sends (real Kafka: transactions).
//! - this file: [`ExampleKafka`], the cluster an example runs on, and
//!   its topic reader.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Message as _, Offset, TopicPartitionList};

/// Any error of an example.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The Kafka cluster an example runs on: the one at `brokers` when given
/// (its topics created through the admin API), else an embedded
/// librdkafka mock cluster, which lives as long as this value. The
/// embedded one has no transactions and no durability: fine to show an
/// API, never proof of a guarantee.
pub struct ExampleKafka {
    brokers: String,
    _embedded: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl ExampleKafka {
    /// Connects to `brokers` (or embeds a cluster) and creates `topics`,
    /// each with its partition count.
    pub async fn start(brokers: Option<String>, topics: &[(&str, i32)]) -> Result<Self, Error> {
        let Some(brokers) = brokers else {
            let cluster = MockCluster::new(1)?;
            for (topic, partitions) in topics {
                cluster.create_topic(topic, *partitions, 1)?;
            }
            // herald's own topics, which a real cluster gets from the
            // runtimes through the admin API (compacted); the mock's admin
            // API cannot create them.
            cluster.create_topic(herald_kafka::parking::DEFAULT_PARKED_TOPIC, 1, 1)?;
            return Ok(Self {
                brokers: cluster.bootstrap_servers(),
                _embedded: Some(cluster),
            });
        };
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(topic, partitions)| {
                NewTopic::new(topic, *partitions, TopicReplication::Fixed(1))
            })
            .collect();
        for result in admin.create_topics(&new, &AdminOptions::new()).await? {
            result.map_err(|(topic, code)| format!("creating {topic}: {code}"))?;
        }
        Ok(Self {
            brokers,
            _embedded: None,
        })
    }

    /// Reads `topic` from the beginning to its current end with
    /// `isolation` (`read_committed` sees only committed transactions):
    /// each record's key and event id, in offset order per partition.
    pub async fn read_to_end(
        &self,
        topic: &str,
        isolation: &str,
    ) -> Result<Vec<(String, uuid::Uuid)>, Error> {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            // assign() wants a group; nothing is committed.
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", isolation);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.create()?;
            let timeout = Duration::from_secs(10);
            let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
            let partitions = metadata
                .topics()
                .first()
                .map_or(0, |t| t.partitions().len() as i32);
            let (mut ends, mut done) = (BTreeMap::new(), BTreeSet::new());
            let mut assignment = TopicPartitionList::new();
            for partition in 0..partitions {
                let (low, high) = consumer.fetch_watermarks(&topic, partition, timeout)?;
                if high <= low {
                    // An empty partition never reports its end.
                    done.insert(partition);
                }
                ends.insert(partition, high);
                assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
            }
            consumer.assign(&assignment)?;
            let (mut read, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(60));
            while done.len() < ends.len() {
                if Instant::now() > deadline {
                    return Err(format!("reading {topic} to its end took over 60 s").into());
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => {
                        if message.offset() + 1 >= ends[&message.partition()] {
                            done.insert(message.partition());
                        }
                        let envelope = herald_kafka::envelope_of(&message)?;
                        let key =
                            String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                        read.push((key, envelope.event_id));
                    }
                    Some(Err(KafkaError::PartitionEOF(partition))) => {
                        done.insert(partition);
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => {}
                }
            }
            Ok(read)
        })
        .await?
    }

    /// `bootstrap.servers` of the cluster.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }
}

//! The typed publisher: events in, acknowledged records out.
//!
//! Production defaults: `acks=all` with idempotence (no duplicates or
//! reordering from producer retries), lz4 compression, a short linger for
//! batching, and the Java-compatible `murmur2_random` partitioner so a key
//! lands on the partition a Java client would choose. Every default can be
//! overridden through the pass-through librdkafka settings.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use herald::{Envelope, Event};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use uuid::Uuid;

use crate::error::{is_retriable, ClientError, PublishError};
use crate::metrics::latency_histogram;
use crate::settings;

/// librdkafka settings the publisher uses unless overridden.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("compression.type", "lz4"),
    ("linger.ms", "5"),
    ("batch.num.messages", "10000"),
    ("batch.size", "1000000"),
    ("queue.buffering.max.messages", "500000"),
    ("queue.buffering.max.kbytes", "1048576"),
    ("message.timeout.ms", "30000"),
    // Java's default partitioner: murmur2 of the key, random for null keys.
    ("partitioner", "murmur2_random"),
];

/// Configuration of a [`Publisher`]; build it with [`PublisherConfig::new`].
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub(crate) brokers: String,
    pub(crate) source: String,
    pub(crate) settings: crate::settings::Settings,
}

impl PublisherConfig {
    /// A configuration for `brokers` (`host:port,...`) with production defaults.
    /// `source` becomes the CloudEvents `ce_source` of every event, e.g. `/orders`.
    pub fn new(brokers: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            source: source.into(),
            settings: crate::settings::Settings::default(),
        }
    }

    /// Overrides or adds one librdkafka setting (e.g. `linger.ms`, or the
    /// `security.protocol` / `sasl.*` / `ssl.*` settings of a secured cluster).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// Overrides or adds many librdkafka settings.
    pub fn set_all<K: Into<String>, V: Into<String>>(
        mut self,
        settings: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in settings {
            self.settings.insert(k.into(), v.into());
        }
        self
    }

    /// The librdkafka configuration: defaults, then the overrides.
    pub fn client_config(&self) -> ClientConfig {
        settings::layered(
            &self.brokers,
            settings::table(PRODUCER_DEFAULTS).chain(settings::pairs(&self.settings)),
        )
    }
}

/// Where a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// A record ready for the wire: what the publisher, the outbox relay and the
/// dead-letter writer all send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingRecord {
    /// Target topic.
    pub topic: String,
    /// Record key (`None` for no key).
    pub key: Option<Vec<u8>>,
    /// Record payload.
    pub payload: Vec<u8>,
    /// Headers in order; a `None` value is a null header.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The event id, for error messages (nil when the record has none).
    pub event_id: Uuid,
}

impl OutgoingRecord {
    /// The record for `envelope` on `topic`: key = aggregate id, envelope headers.
    pub fn from_envelope(topic: impl Into<String>, envelope: &Envelope) -> Self {
        Self {
            topic: topic.into(),
            key: Some(envelope.key.clone().into_bytes()),
            payload: envelope.payload.clone(),
            headers: envelope
                .headers()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Some(v.into_bytes())))
                .collect(),
            event_id: envelope.event_id,
        }
    }

    /// The record as [`Publisher::publish_records`] takes it.
    pub fn borrowed(&self) -> BorrowedRecord<'_> {
        BorrowedRecord {
            topic: &self.topic,
            key: self.key.as_deref(),
            payload: &self.payload,
            headers: self.headers.iter().fold(
                OwnedHeaders::new_with_capacity(self.headers.len()),
                |headers, (key, value)| {
                    headers.insert(Header {
                        key,
                        value: value.as_deref(),
                    })
                },
            ),
            event_id: self.event_id,
            partition: None,
        }
    }
}

impl<'a> From<&'a OutgoingRecord> for BorrowedRecord<'a> {
    fn from(record: &'a OutgoingRecord) -> Self {
        record.borrowed()
    }
}

/// A record borrowed from whoever keeps its bytes, its headers already in
/// librdkafka's form. librdkafka copies what it sends, so a caller that
/// keeps its records anyway (the outbox relay keeps its claimed batch until
/// the mark) publishes them without first copying each into an
/// [`OutgoingRecord`].
#[derive(Debug)]
pub struct BorrowedRecord<'a> {
    /// Target topic.
    pub topic: &'a str,
    /// Record key (`None` for no key).
    pub key: Option<&'a [u8]>,
    /// Record payload.
    pub payload: &'a [u8],
    /// Headers in order.
    pub headers: OwnedHeaders,
    /// The event id, for error messages (nil when the record has none).
    pub event_id: Uuid,
    /// The partition to write to; `None` lets the key choose (the usual
    /// case). A redrive sets it: the record goes back to the partition it
    /// came from.
    pub partition: Option<i32>,
}

impl BorrowedRecord<'_> {
    /// The same record, written to `partition` of its topic instead of the
    /// one its key would choose.
    pub fn to_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// Publishes typed events (and raw records) to Kafka.
///
/// Cheap to clone; clones share one producer.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
/// # struct OrderPlaced {
/// #     #[event(id)] event_id: uuid::Uuid,
/// #     #[event(key)] order_id: uuid::Uuid,
/// #     #[event(time)] at: chrono::DateTime<chrono::Utc>,
/// # }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
/// # #[serde(tag = "event_type")]
/// # #[event(aggregate = "order")]
/// # enum OrderEvent { OrderPlaced(OrderPlaced) }
/// use herald_kafka::{Publisher, PublisherConfig};
/// # async fn run(placed: OrderEvent) -> Result<(), Box<dyn std::error::Error>> {
/// // Idempotent, acks=all, Java-compatible partitioning by default.
/// let publisher = Publisher::new(&PublisherConfig::new("127.0.0.1:9092", "/orders"))?;
/// // Keyed by the aggregate id; returns once the broker acknowledged it.
/// let delivered = publisher.publish("order-events", &placed).await?;
/// println!("at partition {}, offset {}", delivered.partition, delivered.offset);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    source: String,
    stats: Arc<PublisherStats>,
}

crate::metrics::stats! {
    /// What a [`Publisher`] (and its clones) did, readable while it runs (one
    /// method per figure); a Prometheus collector (see [`crate::metrics`]).
    pub struct PublisherStats {
        /// Records the broker acknowledged.
        published: counter(
            "herald_publisher_records_published",
            "Records the broker acknowledged."
        ),
        /// Records that failed (after librdkafka's own retries).
        failed: counter("herald_publisher_records_failed", "Records whose delivery failed."),
    }
    metrics {
        /// Seconds from the publish call to each record's acknowledgement.
        latency: Histogram = latency_histogram() => (
            "herald_publisher_latency_seconds",
            "Seconds from the publish call to the broker's acknowledgement."
        ),
    }
}

impl PublisherStats {
    fn record(&self, started: Instant, result: &Result<Delivered, PublishError>) {
        match result {
            Ok(_) => {
                self.published.fetch_add(1, Ordering::Relaxed);
                self.latency.observe(started.elapsed().as_secs_f64());
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Collector for PublisherStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.encode_figures(&mut encoder)
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Creates the producer. Fails when librdkafka rejects a setting.
    pub fn new(config: &PublisherConfig) -> Result<Self, ClientError> {
        Self::from_client_config(config.client_config(), &config.source)
    }

    /// A publisher on an explicit librdkafka configuration (no defaults added).
    pub(crate) fn from_client_config(
        config: ClientConfig,
        source: &str,
    ) -> Result<Self, ClientError> {
        let producer: FutureProducer = config.create().map_err(ClientError::Config)?;
        Ok(Self {
            producer,
            source: source.to_owned(),
            stats: Arc::default(),
        })
    }

    /// The same publisher counting into `stats` (several producers of one
    /// component, e.g. the exactly-once relay's per-slot producers, report
    /// as one).
    pub(crate) fn with_stats(mut self, stats: Arc<PublisherStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The `ce_source` stamped on events.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The underlying producer, for what herald does not wrap.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Live counters and the latency histogram, shared by every clone.
    pub fn stats(&self) -> Arc<PublisherStats> {
        Arc::clone(&self.stats)
    }

    /// Publishes one event to `topic`, keyed by its aggregate id, and waits
    /// for the broker's acknowledgement.
    pub async fn publish<E: Event>(
        &self,
        topic: &str,
        event: &E,
    ) -> Result<Delivered, PublishError> {
        let envelope = Envelope::encode(event, &self.source)?;
        self.publish_record(&OutgoingRecord::from_envelope(topic, &envelope))
            .await
    }

    /// Publishes many events with all of them in flight at once; one result
    /// per event, in input order.
    pub async fn publish_batch<E: Event>(
        &self,
        topic: &str,
        events: &[E],
    ) -> Vec<Result<Delivered, PublishError>> {
        // Everything is enqueued before anything is awaited, so the whole
        // batch is in flight at once; the envelope's bytes are borrowed, not
        // copied into an intermediate record.
        let started = Instant::now();
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let enqueued = match Envelope::encode(event, &self.source) {
                Ok(envelope) => {
                    let headers = envelope.headers().into_iter().fold(
                        OwnedHeaders::new_with_capacity(12),
                        |headers, (key, value)| {
                            headers.insert(Header {
                                key,
                                value: Some(value.as_bytes()),
                            })
                        },
                    );
                    let record = FutureRecord::to(topic)
                        .key(envelope.key.as_bytes())
                        .payload(envelope.payload.as_slice())
                        .headers(headers);
                    self.send(record, topic, envelope.event_id)
                        .await
                        .map(|future| (future, envelope.event_id))
                }
                Err(e) => Err(PublishError::Encode(e)),
            };
            pending.push(enqueued);
        }
        join_all(pending.into_iter().map(|enqueued| async move {
            let (future, event_id) = enqueued?;
            self.await_delivery(topic, event_id, future, started).await
        }))
        .await
    }

    /// Publishes one record as it is (an [`OutgoingRecord`], or a
    /// [`BorrowedRecord`], which may name its partition) and waits for its
    /// acknowledgement. The dead-letter writer and the redrive use it.
    pub async fn publish_record<'a>(
        &self,
        record: impl Into<BorrowedRecord<'a>>,
    ) -> Result<Delivered, PublishError> {
        let started = Instant::now();
        let record = record.into();
        let (topic, event_id) = (record.topic, record.event_id);
        let pending = self.enqueue(record).await?;
        self.await_delivery(topic, event_id, pending, started).await
    }

    /// Publishes records as they are, all of them in flight at once; one
    /// result per record, in input order. Records of one key keep their
    /// order. The records are borrowed from whoever keeps their bytes (the
    /// outbox relay keeps its claimed batch until the mark): pass
    /// `records.iter().map(OutgoingRecord::borrowed)` for owned ones.
    ///
    /// A record that cannot be enqueued (librdkafka refuses it at once: too
    /// large, say) holds back the later records of the call with the same
    /// topic and key ([`PublishError::HeldBack`]): they are not sent, so
    /// none of them reaches Kafka before it.
    pub async fn publish_records<'a>(
        &self,
        records: impl IntoIterator<Item = BorrowedRecord<'a>>,
    ) -> Vec<Result<Delivered, PublishError>> {
        let started = Instant::now();
        let records = records.into_iter();
        let mut pending = Vec::with_capacity(records.size_hint().0);
        let mut failed_keys: Vec<(&str, Option<&[u8]>)> = Vec::new();
        for record in records {
            let (topic, event_id, key) = (record.topic, record.event_id, record.key);
            if failed_keys.contains(&(topic, key)) {
                let held = PublishError::HeldBack {
                    topic: topic.to_owned(),
                    event_id,
                };
                pending.push((topic, event_id, Err(held)));
                continue;
            }
            let enqueued = self.enqueue(record).await;
            if enqueued.is_err() {
                failed_keys.push((topic, key));
            }
            pending.push((topic, event_id, enqueued));
        }
        join_all(
            pending
                .into_iter()
                .map(|(topic, event_id, enqueued)| async move {
                    self.await_delivery(topic, event_id, enqueued?, started)
                        .await
                }),
        )
        .await
    }

    /// Flushes every queued record (call before dropping at shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), ClientError> {
        self.producer
            .flush(timeout)
            .map_err(|source| ClientError::Kafka {
                operation: "flushing the producer",
                source,
            })
    }

    /// Puts a record on librdkafka's queue, waiting while the queue is full.
    async fn enqueue(&self, record: BorrowedRecord<'_>) -> Result<DeliveryFuture, PublishError> {
        let mut future_record = FutureRecord::to(record.topic)
            .payload(record.payload)
            .headers(record.headers);
        if let Some(key) = record.key {
            future_record = future_record.key(key);
        }
        if let Some(partition) = record.partition {
            future_record = future_record.partition(partition);
        }
        self.send(future_record, record.topic, record.event_id)
            .await
    }

    /// Enqueues `record`, waiting (with backoff) while librdkafka's queue is
    /// full: that is the producer's backpressure.
    async fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
        topic: &str,
        event_id: Uuid,
    ) -> Result<DeliveryFuture, PublishError> {
        let mut backoff = Duration::from_millis(1);
        loop {
            match self.producer.send_result(record) {
                Ok(pending) => return Ok(pending),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err((source, _)) => return Err(Self::error(topic, event_id, source)),
            }
        }
    }

    async fn await_delivery(
        &self,
        topic: &str,
        event_id: Uuid,
        pending: DeliveryFuture,
        started: Instant,
    ) -> Result<Delivered, PublishError> {
        let result = match pending.await {
            Ok(Ok(delivery)) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Err((source, _))) => Err(Self::error(topic, event_id, source)),
            Err(_canceled) => Err(Self::error(topic, event_id, KafkaError::Canceled)),
        };
        self.stats.record(started, &result);
        result
    }

    fn error(topic: &str, event_id: Uuid, source: KafkaError) -> PublishError {
        PublishError::Kafka {
            topic: topic.to_owned(),
            event_id,
            retriable: is_retriable(&source),
            source,
        }
    }
}

/// Waits until librdkafka holds no record of `producer` any more: every one
/// handed to it was acknowledged or failed, and its delivery report was
/// handled (librdkafka counts a record until its report is destroyed, a
/// moment after the callback that resolves its delivery future). Fails
/// after `timeout`.
///
/// Call it before `commit_transaction`, which flushes first. rdkafka 0.39's
/// flush, while anything is counted, polls the event queue in slices that
/// only end at their 100 ms deadline, and the producer's own polling
/// thread takes the events: a commit right after the last delivery took
/// 100 ms more (the exactly-once relay's commit p99 was 102 ms, its median
/// 2 ms). Blocks the calling thread.
pub(crate) fn await_released<C, P>(producer: &P, timeout: Duration) -> Result<(), KafkaError>
where
    C: rdkafka::producer::ProducerContext,
    P: Producer<C>,
{
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librdkafka is built with OpenSSL: the settings of a managed,
    /// SASL_SSL-only cluster are accepted (nothing connects here).
    #[test]
    fn sasl_ssl_with_scram_and_plain_is_built_in() {
        for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
            let config = PublisherConfig::new("127.0.0.1:1", "/tests")
                .set("security.protocol", "SASL_SSL")
                .set("sasl.mechanism", mechanism)
                .set("sasl.username", "herald")
                .set("sasl.password", "not-a-secret");
            Publisher::new(&config).unwrap_or_else(|e| panic!("{mechanism}: {e}"));
        }
    }
}

//! Dead letters: records that could not be handled, written to `<topic>.dlq`
//! with their original key, payload bytes and headers, plus headers that say
//! what failed, where the record came from and when.

use chrono::{DateTime, SecondsFormat, Utc};
use herald::ErrorClass;

use crate::publisher::OutgoingRecord;

/// Header names added to a dead-lettered record.
pub mod headers {
    /// The error message.
    pub const ERROR: &str = "dlq.error";
    /// The error class (`transient`, `permanent`, `decode`, `unknown_type`).
    pub const ERROR_CLASS: &str = "dlq.error_class";
    /// The topic the record was read from.
    pub const ORIGINAL_TOPIC: &str = "dlq.original_topic";
    /// Its partition there.
    pub const ORIGINAL_PARTITION: &str = "dlq.original_partition";
    /// Its offset there.
    pub const ORIGINAL_OFFSET: &str = "dlq.original_offset";
    /// How many times handling was attempted.
    pub const ATTEMPTS: &str = "dlq.attempts";
    /// When the first attempt failed (RFC 3339).
    pub const FIRST_FAILED_AT: &str = "dlq.first_failed_at";
    /// When the last attempt failed (RFC 3339).
    pub const LAST_FAILED_AT: &str = "dlq.last_failed_at";
    /// The consumer group that gave up on the record.
    pub const CONSUMER_GROUP: &str = "dlq.consumer_group";
    /// The handler that failed, when one was called.
    pub const HANDLER: &str = "dlq.handler";
}

/// The dead-letter topic of `topic` under the default naming.
pub fn default_dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Why and where a record failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error message.
    pub error: String,
    /// Its class.
    pub class: ErrorClass,
    /// The handler that failed, if any.
    pub handler: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
}

/// The original record, as read.
#[derive(Debug, Clone)]
pub struct OriginalRecord {
    /// Topic read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Payload bytes, untouched.
    pub payload: Option<Vec<u8>>,
    /// Headers, untouched and in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl OriginalRecord {
    /// A copy of `message` (key, payload bytes and headers untouched).
    pub fn of(message: &impl rdkafka::Message) -> Self {
        use rdkafka::message::Headers;
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Builds the dead-letter record for `original` on `dlq_topic`.
pub fn dead_letter(
    dlq_topic: &str,
    group_id: &str,
    original: &OriginalRecord,
    failure: &Failure,
) -> OutgoingRecord {
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut record_headers: Vec<(String, Option<Vec<u8>>)> = original
        .headers
        .iter()
        // A record that failed before keeps its own history only once: the
        // new failure headers replace the old ones.
        .filter(|(name, _)| !name.starts_with("dlq."))
        .cloned()
        .collect();
    let mut add = |name: &str, value: String| {
        record_headers.push((name.to_owned(), Some(value.into_bytes())))
    };
    add(headers::ERROR, failure.error.clone());
    add(headers::ERROR_CLASS, failure.class.as_str().to_owned());
    add(headers::ORIGINAL_TOPIC, original.topic.clone());
    add(headers::ORIGINAL_PARTITION, original.partition.to_string());
    add(headers::ORIGINAL_OFFSET, original.offset.to_string());
    add(headers::ATTEMPTS, failure.attempts.to_string());
    add(headers::FIRST_FAILED_AT, time(&failure.first_failed_at));
    add(headers::LAST_FAILED_AT, time(&failure.last_failed_at));
    add(headers::CONSUMER_GROUP, group_id.to_owned());
    if let Some(handler) = &failure.handler {
        add(headers::HANDLER, handler.clone());
    }
    let event_id = original
        .headers
        .iter()
        .find(|(name, _)| name == herald::headers::EVENT_ID)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .unwrap_or_default();
    OutgoingRecord {
        topic: dlq_topic.to_owned(),
        key: original.key.clone(),
        payload: original.payload.clone().unwrap_or_default(),
        headers: record_headers,
        event_id,
    }
}

/// A dead letter read back from a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Partition in the dead-letter topic.
    pub partition: i32,
    /// Offset in the dead-letter topic.
    pub offset: i64,
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original payload bytes.
    pub payload: Vec<u8>,
    /// Every header, the original ones and the `dlq.*` ones, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetter {
    /// The value of header `name` as text (the last one wins).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The event id, when the original record had one.
    pub fn event_id(&self) -> Option<uuid::Uuid> {
        self.header(herald::headers::EVENT_ID)
            .and_then(|v| uuid::Uuid::parse_str(&v).ok())
    }

    /// The record that re-publishes this letter to its original topic: the
    /// original key, payload and headers, without the `dlq.*` headers, plus
    /// `dlq.replayed_from` = `<dlq topic>/<partition>/<offset>` for the trail.
    pub fn replay_record(&self, dlq_topic: &str) -> Option<OutgoingRecord> {
        let topic = self.header(headers::ORIGINAL_TOPIC)?;
        let mut record_headers: Vec<(String, Option<Vec<u8>>)> = self
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with("dlq."))
            .cloned()
            .collect();
        record_headers.push((
            "dlq.replayed_from".to_owned(),
            Some(format!("{dlq_topic}/{}/{}", self.partition, self.offset).into_bytes()),
        ));
        Some(OutgoingRecord {
            topic,
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers: record_headers,
            event_id: self.event_id().unwrap_or_default(),
        })
    }
}

/// Reads up to `limit` dead letters of `dlq_topic`, oldest first per
/// partition, with a throw-away reader (no group commits). `config` must hold
/// `bootstrap.servers` (and any security settings).
///
/// Blocking: call it from `spawn_blocking` in async code.
pub fn read_dead_letters(
    config: &rdkafka::ClientConfig,
    dlq_topic: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, crate::ClientError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    use std::time::Duration;

    let kafka = |operation| move |source| crate::ClientError::Kafka { operation, source };
    let mut config = config.clone();
    config
        .set(
            "group.id",
            format!("herald-dlq-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().map_err(crate::ClientError::Config)?;
    let metadata = consumer
        .fetch_metadata(Some(dlq_topic), Duration::from_secs(10))
        .map_err(kafka("reading the dead-letter topic's metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut remaining = 0;
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(dlq_topic, *p, Duration::from_secs(10))
            .map_err(kafka("reading the dead-letter topic's offsets"))?;
        if high > low {
            remaining += high - low;
            tpl.add_partition_offset(dlq_topic, *p, rdkafka::Offset::Offset(low))
                .map_err(kafka("assigning the dead-letter topic"))?;
        }
    }
    let mut letters = Vec::new();
    if remaining == 0 {
        return Ok(letters);
    }
    consumer
        .assign(&tpl)
        .map_err(kafka("assigning the dead-letter topic"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // read_committed readers skip transaction markers, so stop at the
    // deadline rather than waiting for exact counts.
    while remaining > 0 && letters.len() < limit && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.map_err(kafka("reading dead letters"))?;
        remaining -= 1;
        letters.push(DeadLetter {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    letters.sort_by_key(|l| (l.partition, l.offset));
    Ok(letters)
}

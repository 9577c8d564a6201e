//! Dead letters: records that could not be handled, written to `<topic>.dlq`
//! with their original key, payload bytes and headers, plus headers that say
//! what failed, where the record came from and when.

use chrono::{DateTime, SecondsFormat, Utc};
use herald::ErrorClass;

use crate::parking::headers as redrive;
use crate::parking::RedriveAction;
use crate::publisher::OutgoingRecord;

/// Whether `name` is one of the headers that address a redriven record
/// (group, original offset, action), as opposed to its redrive count.
fn is_redrive_address(name: &str) -> bool {
    [
        redrive::REDRIVE_GROUP,
        redrive::REDRIVE_OF,
        redrive::REDRIVE_ACTION,
        redrive::REDRIVE_PARKED,
    ]
    .contains(&name)
}

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
    // A redriven record keeps its original offset: its identity in the
    // parked-key table and for the next redrive.
    let origin = original
        .headers
        .iter()
        .find(|(name, _)| name == redrive::REDRIVE_OF)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(original.offset);
    let mut record_headers: Vec<(String, Option<Vec<u8>>)> = original
        .headers
        .iter()
        // A record that failed before keeps its own history only once: the
        // new failure headers replace the old ones, and a redrive's
        // addressing goes (its count stays, for the loop guard).
        .filter(|(name, _)| !name.starts_with("dlq.") && !is_redrive_address(name))
        .cloned()
        .collect();
    let mut add = |name: &str, value: String| {
        record_headers.push((name.to_owned(), Some(value.into_bytes())))
    };
    add(headers::ERROR, failure.error.clone());
    add(headers::ERROR_CLASS, failure.class.as_str().to_owned());
    add(headers::ORIGINAL_TOPIC, original.topic.clone());
    add(headers::ORIGINAL_PARTITION, original.partition.to_string());
    add(headers::ORIGINAL_OFFSET, origin.to_string());
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

    /// The consumer group that dead-lettered (or parked) the record.
    pub fn group(&self) -> Option<String> {
        self.header(headers::CONSUMER_GROUP)
    }

    /// Where the record was read from: topic, partition and original offset.
    pub fn origin(&self) -> Option<(String, i32, i64)> {
        Some((
            self.header(headers::ORIGINAL_TOPIC)?,
            self.header(headers::ORIGINAL_PARTITION)?.parse().ok()?,
            self.header(headers::ORIGINAL_OFFSET)?.parse().ok()?,
        ))
    }

    /// Whether this letter is a parked record (it did not fail itself).
    pub fn is_parked(&self) -> bool {
        self.header(headers::ERROR_CLASS).as_deref() == Some(herald::ErrorClass::Parked.as_str())
    }

    /// How many times the record was redriven before this letter.
    pub fn redrives(&self) -> u32 {
        self.header(redrive::REDRIVES)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The record that sends this letter back to its group: to its original
    /// topic and partition, with the original key, payload and headers
    /// (without the `dlq.*` ones), addressed to the group that failed it
    /// ([`crate::parking`]), its redrive count one higher, and
    /// `dlq.replayed_from` = `<dlq topic>/<partition>/<offset>` for the
    /// trail. `None` when the letter lacks its origin or group headers.
    pub fn redrive_record(&self, dlq_topic: &str, action: RedriveAction) -> Option<Redrive> {
        let (topic, partition, offset) = self.origin()?;
        let group = self.group()?;
        let mut record_headers: Vec<(String, Option<Vec<u8>>)> = self
            .headers
            .iter()
            .filter(|(name, _)| {
                !name.starts_with("dlq.") && !is_redrive_address(name) && name != redrive::REDRIVES
            })
            .cloned()
            .collect();
        let mut add = |name: &str, value: String| {
            record_headers.push((name.to_owned(), Some(value.into_bytes())))
        };
        add(
            "dlq.replayed_from",
            format!("{dlq_topic}/{}/{}", self.partition, self.offset),
        );
        add(redrive::REDRIVE_GROUP, group);
        add(redrive::REDRIVE_OF, offset.to_string());
        add(redrive::REDRIVE_ACTION, action.as_str().to_owned());
        add(redrive::REDRIVES, (self.redrives() + 1).to_string());
        if self.is_parked() || self.header(redrive::PARKS_KEY).is_some() {
            add(redrive::REDRIVE_PARKED, "true".to_owned());
        }
        Some(Redrive {
            partition,
            record: OutgoingRecord {
                topic,
                key: self.key.clone(),
                payload: self.payload.clone(),
                headers: record_headers,
                event_id: self.event_id().unwrap_or_default(),
            },
        })
    }
}

/// A redriven dead letter: the record, and the partition it goes back to.
#[derive(Debug, Clone)]
pub struct Redrive {
    /// The original partition (the redrive must reach the member that owns
    /// the key's parked list).
    pub partition: i32,
    /// The record.
    pub record: OutgoingRecord,
}

/// The newest letter per original record (a record dead-lettered again after
/// a redrive, or written twice by a member that died, has several), in the
/// order of their original topic, partition and offset: the order a
/// redrive must keep.
pub fn latest_per_origin(letters: &[DeadLetter]) -> Vec<&DeadLetter> {
    let mut newest: std::collections::BTreeMap<(String, String, i32, i64), &DeadLetter> =
        std::collections::BTreeMap::new();
    for letter in letters {
        let Some((topic, partition, offset)) = letter.origin() else {
            continue;
        };
        let group = letter.group().unwrap_or_default();
        let slot = newest
            .entry((group, topic, partition, offset))
            .or_insert(letter);
        if (letter.partition, letter.offset) > (slot.partition, slot.offset) {
            *slot = letter;
        }
    }
    newest.into_values().collect()
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

/// Which dead letters an operation takes: every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct LetterFilter {
    /// The consumer group that failed the record.
    pub group: Option<String>,
    /// The record key (an aggregate id).
    pub key: Option<String>,
    /// The event type.
    pub event_type: Option<String>,
    /// The error class (`transient`, `permanent`, `decode`, `unknown_type`,
    /// `parked`).
    pub error_class: Option<String>,
    /// Failed at or after.
    pub since: Option<DateTime<Utc>>,
    /// Failed before.
    pub until: Option<DateTime<Utc>>,
    /// Only these event ids (any when empty).
    pub event_ids: Vec<uuid::Uuid>,
}

impl LetterFilter {
    /// Whether `letter` passes.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let is = |wanted: &Option<String>, actual: Option<String>| {
            wanted.as_ref().is_none_or(|w| actual.as_deref() == Some(w))
        };
        let failed_at = letter
            .header(headers::LAST_FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        is(&self.group, letter.group())
            && is(&self.key, letter.key_text())
            && is(&self.event_type, letter.header(herald::headers::EVENT_TYPE))
            && is(&self.error_class, letter.header(headers::ERROR_CLASS))
            && self
                .since
                .is_none_or(|since| failed_at.is_some_and(|t| t >= since))
            && self
                .until
                .is_none_or(|until| failed_at.is_some_and(|t| t < until))
            && (self.event_ids.is_empty()
                || letter
                    .event_id()
                    .is_some_and(|id| self.event_ids.contains(&id)))
    }
}

impl DeadLetter {
    /// The key as text (lossy for a key that is not UTF-8).
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// Sends `letter` back to the group that failed it ([`RedriveAction::Replay`]:
/// handle it; [`RedriveAction::Discard`]: drop it from its key's parked list)
/// and waits for the acknowledgement. `Ok(None)`: the letter lacks the
/// headers that say where it came from, so it cannot be redriven.
pub async fn redrive(
    publisher: &crate::Publisher,
    dlq_topic: &str,
    letter: &DeadLetter,
    action: RedriveAction,
) -> Result<Option<crate::Delivered>, crate::PublishError> {
    let Some(redrive) = letter.redrive_record(dlq_topic, action) else {
        return Ok(None);
    };
    publisher
        .publish_record(redrive.record.borrowed().to_partition(redrive.partition))
        .await
        .map(Some)
}

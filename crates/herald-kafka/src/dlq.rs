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

//! The records every benchmark sends: one herald event family whose JSON
//! body is exactly `payload_bytes` long, and the same bytes for bare loops.
//!
//! Record `i` has key `k<i mod keys>` (zero-padded, so all keys have one
//! length), a fresh UUIDv4 event id, sequence number `i` and a pad of random
//! alphanumerics sized so the JSON body has exactly the requested length.
//! [`Workload::event`] builds the typed event herald encodes;
//! [`Workload::bare_payload`] writes the byte-identical JSON directly, and
//! [`Workload::bare_headers`] the same header names with values of the same
//! lengths, so a bare loop sends records of the same size and shape without
//! doing herald's work. [`publish`] sends the typed events through herald's
//! publisher; [`filled_topic`] makes the input of the benchmarks that read.

use std::io::Write as _;
use std::time::Instant;

use anyhow::ensure;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use futures::StreamExt as _;
use herald::headers;
use herald_kafka::{PublishError, Publisher, PublisherConfig};
use rand::distributions::Alphanumeric;
use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::stats::{per_second, rate};
use super::topics::RunResources;
use super::{progress, CommonArgs};

/// The `ce_source` of benchmark events.
pub const SOURCE: &str = "/herald-bench";

/// One benchmark record as a typed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct BenchRecord {
    /// Unique id.
    #[event(id)]
    pub event_id: Uuid,
    /// The aggregate id: the record key.
    #[event(key)]
    pub key: String,
    /// The record's index in the run.
    pub seq: u64,
    /// When it happened (fixed per process, so every body has one length).
    #[event(time)]
    pub at: DateTime<Utc>,
    /// Filler that brings the JSON body to the requested size.
    pub pad: String,
}

/// The benchmark's event family (one type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "bench")]
pub enum BenchEvent {
    /// A benchmark record.
    BenchRecord(BenchRecord),
}

const POOL_BYTES: usize = 64 * 1024;

/// Generates the records of a run.
#[derive(Debug, Clone)]
pub struct Workload {
    payload_bytes: usize,
    keys: u64,
    key_width: usize,
    at: DateTime<Utc>,
    /// `at` as serde writes it, with its quotes.
    at_json: String,
    /// `at` as the envelope's time headers write it.
    at_header: String,
    /// JSON length with seq 0 and an empty pad.
    base_len: usize,
    pool: String,
}

fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

impl Workload {
    /// A workload of `records` bodies of exactly `payload_bytes`, over `keys`
    /// keys. Fails when `payload_bytes` is too small for the JSON fields.
    pub fn new(payload_bytes: usize, keys: u64, records: u64) -> anyhow::Result<Self> {
        // A fixed instant with 6 sub-second digits: every body has one length.
        let now = Utc::now().timestamp();
        let at = Utc
            .timestamp_opt(now, 123_456_000)
            .single()
            .unwrap_or_default();
        let mut workload = Self {
            payload_bytes,
            keys,
            key_width: digits(keys.saturating_sub(1)),
            at,
            at_json: serde_json::to_string(&at)?,
            at_header: at.to_rfc3339_opts(SecondsFormat::Micros, true),
            base_len: 0,
            pool: rand::thread_rng()
                .sample_iter(&Alphanumeric)
                .take(POOL_BYTES)
                .map(char::from)
                .collect(),
        };
        let mut key = String::new();
        workload.key(0, &mut key);
        let template = BenchEvent::BenchRecord(BenchRecord {
            event_id: Uuid::nil(),
            key,
            seq: 0,
            at,
            pad: String::new(),
        });
        workload.base_len = serde_json::to_vec(&template)?.len();
        let smallest = workload.base_len + digits(records.saturating_sub(1)) - 1;
        ensure!(
            payload_bytes >= smallest,
            "--payload-bytes {payload_bytes} is too small: the event's JSON needs at least {smallest} bytes"
        );
        ensure!(
            payload_bytes < POOL_BYTES / 2,
            "--payload-bytes {payload_bytes} is too large (at most {})",
            POOL_BYTES / 2 - 1
        );
        Ok(workload)
    }

    /// The body size of every record.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// Writes record `i`'s key into `out`.
    pub fn key(&self, i: u64, out: &mut String) {
        use std::fmt::Write as _;
        out.clear();
        let _ = write!(out, "k{:0width$}", i % self.keys, width = self.key_width);
    }

    fn pad(&self, i: u64) -> &str {
        let len = self.payload_bytes - self.base_len - (digits(i) - 1);
        let room = (self.pool.len() - len) as u64;
        let start = (i.wrapping_mul(7919) % room) as usize;
        &self.pool[start..start + len]
    }

    /// Record `i` as a typed event (a fresh event id).
    pub fn event(&self, i: u64) -> BenchEvent {
        let mut key = String::with_capacity(self.key_width + 1);
        self.key(i, &mut key);
        BenchEvent::BenchRecord(BenchRecord {
            event_id: Uuid::new_v4(),
            key,
            seq: i,
            at: self.at,
            pad: self.pad(i).to_owned(),
        })
    }

    /// Writes the JSON body of record `i` with `event_id` and `key` into
    /// `out`: the bytes serde writes for [`Workload::event`].
    pub fn bare_payload(&self, i: u64, event_id: &str, key: &str, out: &mut Vec<u8>) {
        out.clear();
        let _ = write!(
            out,
            r#"{{"event_type":"BenchRecord","event_id":"{event_id}","key":"{key}","seq":{i},"at":{},"pad":"{}"}}"#,
            self.at_json,
            self.pad(i),
        );
    }

    /// Headers with the names herald writes and values of the same lengths
    /// (times are fixed strings: a bare loop formats nothing).
    pub fn bare_headers(&self, event_id: &str, key: &str) -> OwnedHeaders {
        let values: [(&str, &str); 10] = [
            (headers::EVENT_TYPE, "BenchRecord"),
            (headers::EVENT_ID, event_id),
            (headers::PRODUCED_AT, &self.at_header),
            (headers::CONTENT_TYPE, herald::envelope::JSON_CONTENT_TYPE),
            (headers::CE_SPECVERSION, "1.0"),
            (headers::CE_ID, event_id),
            (headers::CE_TYPE, "BenchRecord"),
            (headers::CE_SOURCE, SOURCE),
            (headers::CE_TIME, &self.at_header),
            (headers::CE_SUBJECT, key),
        ];
        values.iter().fold(
            OwnedHeaders::new_with_capacity(values.len()),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            },
        )
    }
}

/// Publishes records `0..records` of `workload` to `topic`, `batch` events
/// per `publish_batch` call and `in_flight` calls at once (1: each waits
/// for the previous one's acknowledgements). Returns how many were
/// acknowledged, or the first error.
pub async fn publish(
    publisher: &Publisher,
    workload: &Workload,
    topic: &str,
    records: u64,
    batch: usize,
    in_flight: usize,
) -> Result<u64, PublishError> {
    let mut batches = futures::stream::iter((0..records).step_by(batch))
        .map(|first| async move {
            let events: Vec<BenchEvent> = (first..(first + batch as u64).min(records))
                .map(|i| workload.event(i))
                .collect();
            let results = publisher.publish_batch(topic, &events).await;
            let sent = results.len() as u64;
            (sent, results.into_iter().find_map(Result::err))
        })
        .buffered(in_flight);
    let mut acknowledged = 0;
    while let Some((sent, error)) = batches.next().await {
        if let Some(error) = error {
            return Err(error);
        }
        acknowledged += sent;
    }
    Ok(acknowledged)
}

/// A fresh topic `what` filled with the run's records through herald's
/// publisher (herald envelopes, so readers decode real events): the input
/// of the benchmarks that read.
pub async fn filled_topic(
    bench: &str,
    what: &str,
    common: &CommonArgs,
    resources: &RunResources,
) -> anyhow::Result<String> {
    let topic = resources.topic(what, common.partitions).await?;
    let workload = common.workload()?;
    let publisher = Publisher::new(&PublisherConfig::new(&common.brokers, SOURCE))?;
    let start = Instant::now();
    publish(&publisher, &workload, &topic, common.records, 10_000, 4)
        .await
        .map_err(|error| anyhow::anyhow!("pre-producing failed: {error}"))?;
    progress(format!(
        "{bench}: pre-produced {} records to {topic} at {} rec/s",
        common.records,
        per_second(rate(common.records, start.elapsed().as_secs_f64()))
    ));
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald::{Envelope, Event};
    use rdkafka::message::Headers;

    #[test]
    fn every_body_has_the_requested_length() {
        let w = Workload::new(256, 10_000, 1_000_000).expect("workload");
        for i in [0, 1, 9, 10, 99, 12_345, 999_999] {
            let body = serde_json::to_vec(&w.event(i)).expect("json");
            assert_eq!(body.len(), 256, "record {i}");
        }
    }

    #[test]
    fn bare_bytes_equal_serde_bytes() {
        let w = Workload::new(300, 7, 1_000).expect("workload");
        for i in [0, 5, 77, 999] {
            let BenchEvent::BenchRecord(e) = w.event(i);
            let mut bare = Vec::new();
            w.bare_payload(i, &e.event_id.to_string(), &e.key, &mut bare);
            let typed = serde_json::to_vec(&BenchEvent::BenchRecord(e)).expect("json");
            assert_eq!(
                String::from_utf8_lossy(&bare),
                String::from_utf8_lossy(&typed)
            );
        }
    }

    #[test]
    fn bare_headers_match_herald_headers_in_name_and_length() {
        let w = Workload::new(256, 10, 100).expect("workload");
        let event = w.event(3);
        let envelope = Envelope::encode(&event, SOURCE).expect("encode");
        let herald: Vec<(String, usize)> = envelope
            .headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.len()))
            .collect();
        let bare = w.bare_headers(&event.event_id().to_string(), &event.aggregate_id());
        let bare: Vec<(String, usize)> = bare
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map_or(0, <[u8]>::len)))
            .collect();
        assert_eq!(bare, herald);
    }

    #[test]
    fn events_decode_through_the_envelope() {
        let w = Workload::new(256, 10, 100).expect("workload");
        let event = w.event(42);
        let envelope = Envelope::encode(&event, SOURCE).expect("encode");
        assert_eq!(envelope.key, "k2");
        let back: BenchEvent = envelope.decode().expect("decode");
        assert_eq!(back, event);
    }

    #[test]
    fn too_small_a_payload_is_refused() {
        let error = Workload::new(64, 10, 100).expect_err("too small");
        assert!(error.to_string().contains("--payload-bytes 64"), "{error}");
    }
}

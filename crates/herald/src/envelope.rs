//! The envelope: one event as it travels on the wire — a key, a JSON payload
//! and headers (DESIGN.md "Events and the wire format").
//!
//! The headers carry herald's own fields (`event_type`, `event_id`,
//! `produced_at`), the W3C trace context, and the CloudEvents Kafka protocol
//! binding in binary mode (`ce_*` plus `content-type`), so any
//! CloudEvents-aware tool can read a herald record.

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use crate::event::Event;
use crate::handler::ErrorClass;
use crate::trace::{InvalidTraceparent, TraceContext};

/// Header names written on every record.
pub mod headers {
    /// The event's type name, e.g. `OrderCreated`.
    pub const EVENT_TYPE: &str = "event_type";
    /// The event's UUID.
    pub const EVENT_ID: &str = "event_id";
    /// When the envelope was produced (RFC 3339, UTC).
    pub const PRODUCED_AT: &str = "produced_at";
    /// The payload's media type, `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C vendor trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// CloudEvents spec version, always `1.0`.
    pub const CE_SPECVERSION: &str = "ce_specversion";
    /// CloudEvents id (= `event_id`).
    pub const CE_ID: &str = "ce_id";
    /// CloudEvents type (= `event_type`).
    pub const CE_TYPE: &str = "ce_type";
    /// CloudEvents source: the producing service.
    pub const CE_SOURCE: &str = "ce_source";
    /// CloudEvents time: when the event happened.
    pub const CE_TIME: &str = "ce_time";
    /// CloudEvents subject: the aggregate id.
    pub const CE_SUBJECT: &str = "ce_subject";
}

/// The media type of every herald payload.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// One encoded event with everything needed to put it on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique event id (`event_id`, `ce_id`).
    pub event_id: Uuid,
    /// Type name (`event_type`, `ce_type`).
    pub event_type: String,
    /// Record key: the aggregate id (`ce_subject`).
    pub key: String,
    /// When the event happened (`ce_time`).
    pub occurred_at: DateTime<Utc>,
    /// When the envelope was made (`produced_at`).
    pub produced_at: DateTime<Utc>,
    /// The producing service (`ce_source`), a URI reference like `/orders`.
    pub source: String,
    /// Trace context of the operation that produced the event, if any.
    pub trace: Option<TraceContext>,
    /// The JSON body, internally tagged by `event_type`.
    pub payload: Vec<u8>,
}

/// Why an event could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde could not serialize the event.
    #[error("cannot serialize event {event_type} ({event_id}): {source}")]
    Serialize {
        /// Type of the event.
        event_type: &'static str,
        /// Id of the event.
        event_id: Uuid,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// Why a record could not be turned into an envelope or an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record has no payload, or an empty one.
    #[error("record has an empty payload")]
    EmptyPayload,
    /// The record has no key.
    #[error("record has no key")]
    MissingKey,
    /// The key is not UTF-8.
    #[error("record key is not valid UTF-8")]
    InvalidKey,
    /// A required header is absent.
    #[error("record has no {name} header")]
    MissingHeader {
        /// The header's name.
        name: &'static str,
    },
    /// A header is present but its value is unusable.
    #[error("record header {name} is invalid: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `event_type` is not a member of the family being decoded.
    #[error("unknown event type {event_type:?}")]
    UnknownEventType {
        /// The type named by the record.
        event_type: String,
    },
    /// The payload is not JSON of the declared type.
    #[error("payload of {event_type} is not valid: {source}")]
    InvalidPayload {
        /// The type named by the record.
        event_type: String,
        /// The serde error (position and reason).
        #[source]
        source: serde_json::Error,
    },
    /// The payload's `event_type` differs from the header's.
    #[error("header event_type {header:?} does not match payload event_type {payload:?}")]
    TypeMismatch {
        /// The header's value.
        header: String,
        /// The payload's value.
        payload: String,
    },
}

impl DecodeError {
    /// The class written to the DLQ: unknown types are told apart from
    /// undecodable records.
    pub fn class(&self) -> ErrorClass {
        match self {
            DecodeError::UnknownEventType { .. } => ErrorClass::UnknownType,
            _ => ErrorClass::Decode,
        }
    }
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Envelope {
    /// Encodes a typed event, stamped as produced now by `source`.
    pub fn encode<E: Event>(event: &E, source: &str) -> Result<Self, EncodeError> {
        let payload = serde_json::to_vec(event).map_err(|source| EncodeError::Serialize {
            event_type: event.event_type(),
            event_id: event.event_id(),
            source,
        })?;
        Ok(Self {
            event_id: event.event_id(),
            event_type: event.event_type().to_owned(),
            key: event.aggregate_id(),
            occurred_at: event.occurred_at(),
            produced_at: Utc::now(),
            source: source.to_owned(),
            trace: None,
            payload,
        })
    }

    /// The same envelope carrying `trace` as its parent context.
    pub fn with_trace(mut self, trace: Option<TraceContext>) -> Self {
        self.trace = trace;
        self
    }

    /// The headers to write, in a stable order.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let event_id = self.event_id.to_string();
        let mut out = vec![
            (headers::EVENT_TYPE, self.event_type.clone()),
            (headers::EVENT_ID, event_id.clone()),
            (headers::PRODUCED_AT, rfc3339(&self.produced_at)),
            (headers::CONTENT_TYPE, JSON_CONTENT_TYPE.to_owned()),
            (headers::CE_SPECVERSION, "1.0".to_owned()),
            (headers::CE_ID, event_id),
            (headers::CE_TYPE, self.event_type.clone()),
            (headers::CE_SOURCE, self.source.clone()),
            (headers::CE_TIME, rfc3339(&self.occurred_at)),
            (headers::CE_SUBJECT, self.key.clone()),
        ];
        if let Some(trace) = &self.trace {
            out.push((headers::TRACEPARENT, trace.traceparent().to_owned()));
            if let Some(state) = trace.tracestate() {
                out.push((headers::TRACESTATE, state.to_owned()));
            }
        }
        out
    }

    /// Rebuilds an envelope from a record's key, payload and headers. It checks
    /// the envelope only; [`Envelope::decode`] checks the payload against a family.
    pub fn from_record<'a>(
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        record_headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Self, DecodeError> {
        let payload = match payload {
            Some(p) if !p.is_empty() => p.to_vec(),
            _ => return Err(DecodeError::EmptyPayload),
        };
        let key = std::str::from_utf8(key.ok_or(DecodeError::MissingKey)?)
            .map_err(|_| DecodeError::InvalidKey)?
            .to_owned();

        let mut found = RecordHeaders::default();
        for (name, value) in record_headers {
            let slot = match name {
                headers::EVENT_TYPE => &mut found.event_type,
                headers::EVENT_ID => &mut found.event_id,
                headers::PRODUCED_AT => &mut found.produced_at,
                headers::CE_TYPE => &mut found.ce_type,
                headers::CE_ID => &mut found.ce_id,
                headers::CE_SOURCE => &mut found.ce_source,
                headers::CE_TIME => &mut found.ce_time,
                headers::TRACEPARENT => &mut found.traceparent,
                headers::TRACESTATE => &mut found.tracestate,
                _ => continue,
            };
            // Last value wins, as in Kafka's own header lookup.
            *slot = Some(value.unwrap_or_default());
        }

        // The CloudEvents copy is read only when herald's own is absent.
        let event_type =
            match found.text(headers::EVENT_TYPE, found.event_type)? {
                Some(text) => text,
                None => found.text(headers::CE_TYPE, found.ce_type)?.ok_or(
                    DecodeError::MissingHeader {
                        name: headers::EVENT_TYPE,
                    },
                )?,
            }
            .to_owned();
        let event_id_text = match found.text(headers::EVENT_ID, found.event_id)? {
            Some(text) => text,
            None => found
                .text(headers::CE_ID, found.ce_id)?
                .ok_or(DecodeError::MissingHeader {
                    name: headers::EVENT_ID,
                })?,
        };
        let event_id = Uuid::parse_str(event_id_text).map_err(|e| DecodeError::InvalidHeader {
            name: headers::EVENT_ID,
            reason: e.to_string(),
        })?;
        let produced_at = match found.text(headers::PRODUCED_AT, found.produced_at)? {
            Some(text) => parse_time(headers::PRODUCED_AT, text)?,
            None => {
                return Err(DecodeError::MissingHeader {
                    name: headers::PRODUCED_AT,
                })
            }
        };
        let occurred_at = match found.text(headers::CE_TIME, found.ce_time)? {
            Some(text) => parse_time(headers::CE_TIME, text)?,
            None => produced_at,
        };
        let trace = found.trace(event_id);
        Ok(Self {
            event_id,
            event_type,
            key,
            occurred_at,
            produced_at,
            source: found
                .text(headers::CE_SOURCE, found.ce_source)?
                .unwrap_or_default()
                .to_owned(),
            trace,
            payload,
        })
    }

    /// Decodes the payload as a member of family `E`.
    ///
    /// Extra fields a newer producer added are ignored; a type that `E` does
    /// not know is [`DecodeError::UnknownEventType`], never a parse failure.
    pub fn decode<E: Event>(&self) -> Result<E, DecodeError> {
        if !E::is_known_type(&self.event_type) {
            return Err(DecodeError::UnknownEventType {
                event_type: self.event_type.clone(),
            });
        }
        if let Some(event) = E::decode_variant(&self.event_type, &self.payload) {
            return Ok(event);
        }
        let event: E = serde_json::from_slice(&self.payload).map_err(|source| {
            DecodeError::InvalidPayload {
                event_type: self.event_type.clone(),
                source,
            }
        })?;
        if event.event_type() != self.event_type {
            return Err(DecodeError::TypeMismatch {
                header: self.event_type.clone(),
                payload: event.event_type().to_owned(),
            });
        }
        Ok(event)
    }
}

/// The raw values of the headers the envelope reads.
#[derive(Default)]
struct RecordHeaders<'a> {
    event_type: Option<&'a [u8]>,
    event_id: Option<&'a [u8]>,
    produced_at: Option<&'a [u8]>,
    ce_type: Option<&'a [u8]>,
    ce_id: Option<&'a [u8]>,
    ce_source: Option<&'a [u8]>,
    ce_time: Option<&'a [u8]>,
    traceparent: Option<&'a [u8]>,
    tracestate: Option<&'a [u8]>,
}

impl RecordHeaders<'_> {
    /// `value` as text; borrowed, so that only what the envelope keeps is
    /// copied (this runs once per consumed record).
    /// The trace context, or `None` when the record has none or a
    /// malformed one: W3C Trace Context says to ignore a `traceparent` that
    /// cannot be parsed, and a record is not poison for want of a trace, so
    /// it is handled without one (the trace starts anew) and the drop is
    /// logged.
    fn trace(&self, event_id: Uuid) -> Option<TraceContext> {
        let parent = self.traceparent?;
        let parsed = std::str::from_utf8(parent)
            .map_err(|_| "not valid UTF-8".to_owned())
            .and_then(|parent| {
                let state = self
                    .tracestate
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .map(str::to_owned);
                TraceContext::new(parent, state)
                    .map_err(|e: InvalidTraceparent| e.reason.to_owned())
            });
        match parsed {
            Ok(trace) => Some(trace),
            Err(reason) => {
                tracing::warn!(
                    %event_id,
                    %reason,
                    "malformed traceparent header dropped: the record is handled without its trace context"
                );
                None
            }
        }
    }

    fn text<'v>(
        &self,
        name: &'static str,
        value: Option<&'v [u8]>,
    ) -> Result<Option<&'v str>, DecodeError> {
        value
            .map(|bytes| {
                std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidHeader {
                    name,
                    reason: "not valid UTF-8".to_owned(),
                })
            })
            .transpose()
    }
}

fn parse_time(name: &'static str, text: &str) -> Result<DateTime<Utc>, DecodeError> {
    if let Some(time) = parse_utc_time(text) {
        return Ok(time);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DecodeError::InvalidHeader {
            name,
            reason: e.to_string(),
        })
}

/// The form herald writes (`2026-12-06T06:35:12.123456Z`: UTC, `Z`, up to
/// nine fraction digits), read without chrono's general RFC 3339 parser,
/// which costs more than the rest of a header's handling (two of these per
/// consumed record). `None` for anything else, which chrono then reads (an
/// offset, a leap second, lower-case separators) or rejects.
fn parse_utc_time(text: &str) -> Option<DateTime<Utc>> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        bytes.get(range)?.iter().try_fold(0u32, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if bytes.len() < 20
        || bytes.last() != Some(&b'Z')
        || separators.iter().any(|(at, sep)| bytes[*at] != *sep)
    {
        return None;
    }
    let nanos = match bytes.len() {
        20 => 0,
        len if bytes[19] == b'.' && (22..=30).contains(&len) => {
            let digits = len - 21;
            number(20..len - 1)? * 10u32.pow(9 - u32::try_from(digits).ok()?)
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(number(0..4)?).ok()?,
        number(5..7)?,
        number(8..10)?,
    )?;
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if second > 59 {
        return None;
    }
    let time = chrono::NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    Some(date.and_time(time).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[test]
    fn the_fast_time_parse_agrees_with_chrono() {
        let chrono_of = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        };
        for text in [
            "2026-12-06T06:35:12Z",
            "2026-12-06T06:35:12.1Z",
            "2026-12-06T06:35:12.123456Z",
            "2026-12-06T06:35:12.123456789Z",
            "2024-02-29T23:59:59.999999Z",
            "0001-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_utc_time(text), chrono_of(text), "{text}");
            assert!(parse_utc_time(text).is_some(), "{text}");
        }
        // Left to chrono: other offsets, separators, leap seconds, digits.
        for text in [
            "2026-12-06T06:35:12+01:00",
            "2026-12-06 06:35:12Z",
            "2016-12-31T23:59:60Z",
            "2026-12-06T06:35:12.1234567891Z",
        ] {
            assert_eq!(parse_utc_time(text), None, "{text}");
            assert_eq!(
                parse_time(headers::CE_TIME, text).ok(),
                chrono_of(text),
                "{text}"
            );
        }
        // Refused by both.
        for text in [
            "2026-02-30T00:00:00Z",
            "2026-12-06T24:00:00Z",
            "2026-12-06T06:35:12.Z",
            "2026-1a-06T06:35:12Z",
            "",
        ] {
            assert_eq!(parse_utc_time(text), None, "{text}");
            assert!(parse_time(headers::CE_TIME, text).is_err(), "{text}");
        }
        // Every time herald writes reads back the same.
        let now = Utc::now();
        let written = rfc3339(&now);
        assert_eq!(
            parse_utc_time(&written).map(|t| t.timestamp_micros()),
            Some(now.timestamp_micros())
        );
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
    struct Opened {
        #[event(id)]
        event_id: Uuid,
        #[event(key)]
        account_id: Uuid,
        #[event(time)]
        timestamp: DateTime<Utc>,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
    struct Closed {
        #[event(id)]
        event_id: Uuid,
        #[event(key)]
        account_id: Uuid,
        #[event(time)]
        timestamp: DateTime<Utc>,
        reason: String,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
    #[serde(tag = "event_type")]
    #[event(aggregate = "account")]
    enum AccountEvent {
        Opened(Opened),
        Closed(Closed),
    }
    fn opened() -> AccountEvent {
        AccountEvent::Opened(Opened {
            event_id: Uuid::new_v4(),
            account_id: Uuid::new_v4(),
            timestamp: Utc::now(),
        })
    }

    fn as_record(env: &Envelope) -> Vec<(String, Vec<u8>)> {
        env.headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_bytes()))
            .collect()
    }

    fn from_parts(env: &Envelope, headers: &[(String, Vec<u8>)]) -> Result<Envelope, DecodeError> {
        Envelope::from_record(
            Some(env.key.as_bytes()),
            Some(&env.payload),
            headers
                .iter()
                .map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
        )
    }

    #[test]
    fn round_trips_through_headers_and_payload() {
        let event = opened();
        let trace = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("a=b".into()),
        )
        .ok();
        let env = Envelope::encode(&event, "/bank")
            .expect("encodes")
            .with_trace(trace);
        let back = from_parts(&env, &as_record(&env)).expect("envelope");
        // Times travel at microsecond precision.
        assert_eq!(back.event_id, env.event_id);
        assert_eq!(back.key, event.aggregate_id());
        assert_eq!(back.trace, env.trace);
        assert_eq!(back.source, "/bank");
        assert_eq!(back.decode::<AccountEvent>().expect("decodes"), event);
    }

    #[test]
    fn headers_follow_the_cloudevents_kafka_binding() {
        let event = opened();
        let env = Envelope::encode(&event, "/bank").expect("encodes");
        let h: std::collections::HashMap<_, _> = env.headers().into_iter().collect();
        assert_eq!(h[headers::CE_SPECVERSION], "1.0");
        assert_eq!(h[headers::CE_ID], event.event_id().to_string());
        assert_eq!(h[headers::CE_TYPE], "Opened");
        assert_eq!(h[headers::CE_SUBJECT], event.aggregate_id());
        assert_eq!(h[headers::CONTENT_TYPE], "application/json");
        assert!(h[headers::CE_TIME].ends_with('Z'));
        let body: serde_json::Value = serde_json::from_slice(&env.payload).expect("json");
        assert_eq!(body["event_type"], "Opened");
    }

    #[test]
    fn reads_a_newer_event_with_extra_fields() {
        let event = opened();
        let env = Envelope::encode(&event, "/bank").expect("encodes");
        let mut body: serde_json::Value = serde_json::from_slice(&env.payload).expect("json");
        body["loyalty_tier"] = serde_json::json!("gold");
        let newer = Envelope {
            payload: serde_json::to_vec(&body).expect("json"),
            ..env
        };
        assert_eq!(newer.decode::<AccountEvent>().expect("decodes"), event);
    }

    #[test]
    fn the_variant_fast_path_agrees_with_the_enum_decode() {
        let event = opened();
        let env = Envelope::encode(&event, "/bank").expect("encodes");
        assert_eq!(
            AccountEvent::decode_variant("Opened", &env.payload),
            Some(event)
        );
        // A body tagged otherwise than its header is left to the enum decode
        // (which reports the mismatch, below).
        assert_eq!(AccountEvent::decode_variant("Closed", &env.payload), None);

        // A struct that refuses unknown fields never sees the tag, on the
        // fast path as in the enum decode.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[derive(herald::EventPayload)]
        struct Strict {
            #[event(id)]
            event_id: Uuid,
            #[event(key)]
            account_id: Uuid,
            #[event(time)]
            timestamp: DateTime<Utc>,
        }
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
        #[serde(tag = "event_type")]
        #[event(aggregate = "account")]
        enum StrictEvent {
            Strict(Strict),
        }
        let strict = StrictEvent::Strict(Strict {
            event_id: Uuid::new_v4(),
            account_id: Uuid::new_v4(),
            timestamp: Utc::now(),
        });
        let env = Envelope::encode(&strict, "/bank").expect("encodes");
        assert_eq!(
            StrictEvent::decode_variant("Strict", &env.payload),
            Some(strict.clone())
        );
        assert_eq!(env.decode::<StrictEvent>().expect("decodes"), strict);
    }

    #[test]
    fn a_malformed_traceparent_is_dropped_not_fatal() {
        let env = Envelope::encode(&opened(), "/bank").expect("encodes");
        for bad in [&b"00-not-a-trace-id"[..], b"\xff\xfe", b""] {
            let mut headers = as_record(&env);
            headers.push((headers::TRACEPARENT.to_owned(), bad.to_vec()));
            headers.push((headers::TRACESTATE.to_owned(), b"k=v".to_vec()));
            let back = from_parts(&env, &headers).expect("still an envelope");
            assert_eq!(back.trace, None, "{bad:?}");
            assert_eq!(back.event_id, env.event_id);
        }
    }

    #[test]
    fn rejects_bad_records_with_typed_errors() {
        let env = Envelope::encode(&opened(), "/bank").expect("encodes");
        let headers = as_record(&env);

        let err = Envelope::from_record(Some(b"k"), Some(b""), std::iter::empty());
        assert!(matches!(err, Err(DecodeError::EmptyPayload)));

        let without_type: Vec<_> = headers
            .iter()
            .filter(|(k, _)| k != headers::EVENT_TYPE && k != headers::CE_TYPE)
            .cloned()
            .collect();
        assert!(matches!(
            from_parts(&env, &without_type),
            Err(DecodeError::MissingHeader { name: "event_type" })
        ));

        let mut bad_id = headers.clone();
        for (k, v) in bad_id.iter_mut() {
            if k == headers::EVENT_ID {
                *v = b"not-a-uuid".to_vec();
            }
        }
        assert!(matches!(
            from_parts(&env, &bad_id),
            Err(DecodeError::InvalidHeader {
                name: "event_id",
                ..
            })
        ));

        let renamed = Envelope {
            event_type: "Renamed".into(),
            ..env.clone()
        };
        let err = renamed.decode::<AccountEvent>().expect_err("unknown");
        assert_eq!(err.class(), ErrorClass::UnknownType);

        let garbage = Envelope {
            payload: b"{not json".to_vec(),
            ..env.clone()
        };
        let err = garbage.decode::<AccountEvent>().expect_err("bad json");
        assert!(matches!(err, DecodeError::InvalidPayload { .. }));
        assert_eq!(err.class(), ErrorClass::Decode);

        let mismatch = Envelope {
            event_type: "Closed".into(),
            ..env
        };
        assert!(matches!(
            mismatch.decode::<AccountEvent>(),
            Err(DecodeError::TypeMismatch { .. })
        ));
    }
}

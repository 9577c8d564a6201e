//! A consumed record, copied out of librdkafka into one buffer.
//!
//! rdkafka's `detach` copies a record into an `OwnedMessage` whose headers are
//! a librdkafka header list: one allocation per header name and value, and a
//! linear lookup per header on the way out. A herald record has a dozen
//! headers, so that copy cost more than the rest of a no-op record's
//! handling (`herald-bench consumer`). [`Record`] copies key, payload and
//! header values into one [`Bytes`] buffer and the header names into one
//! string (names herald writes are not copied: they are its constants), and
//! keeps ranges into them; its key is a cheap slice of the buffer, so
//! scheduling by key allocates nothing more.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;

use crate::dlq::OriginalRecord;

/// A byte range in [`Record::buffer`]; `u32` keeps the header index small.
type Span = Range<u32>;

/// One header: its name and value (a range of [`Record::buffer`]).
#[derive(Debug, Clone)]
struct HeaderSpan {
    name: HeaderName,
    value: Option<Span>,
}

/// A header's name: one herald writes (kept as its constant, so a herald
/// record's names cost no copy), or another (a range of [`Record::names`]).
#[derive(Debug, Clone)]
enum HeaderName {
    Known(&'static str),
    Other(Span),
}

/// The names herald writes: the envelope's and the parking redrives'.
const KNOWN_NAMES: [&str; 16] = {
    use crate::parking::headers as parking;
    use herald::headers as envelope;
    [
        envelope::EVENT_TYPE,
        envelope::EVENT_ID,
        envelope::PRODUCED_AT,
        envelope::CONTENT_TYPE,
        envelope::CE_SPECVERSION,
        envelope::CE_ID,
        envelope::CE_TYPE,
        envelope::CE_SOURCE,
        envelope::CE_TIME,
        envelope::CE_SUBJECT,
        envelope::TRACEPARENT,
        envelope::TRACESTATE,
        parking::REDRIVE_GROUP,
        parking::REDRIVE_OF,
        parking::REDRIVE_ACTION,
        parking::REDRIVE_PARKED,
    ]
};

/// A record the consumer runtime owns, detached from librdkafka.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Every earlier record of the partition was done when this one
    /// started ([`crate::RecordInfo::done_below`]).
    pub done_below: Option<i64>,
    buffer: Bytes,
    /// Header names, kept as text so that reading them needs no UTF-8 check.
    names: String,
    key: Option<Span>,
    payload: Option<Span>,
    headers: Vec<HeaderSpan>,
}

impl Record {
    /// Copies `message` (read from `topic`, the runtime's shared name).
    pub fn copy(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Self {
        // Each header read is a call into librdkafka plus a UTF-8 check of
        // its name, so each is read once: the first `SEEN` into this array
        // (enough for a herald record), any others read again below.
        const SEEN: usize = 16;
        let mut seen: [(&str, Option<&[u8]>); SEEN] = [("", None); SEEN];
        let (mut count, mut value_bytes) = (0, 0);
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                if let Some(slot) = seen.get_mut(count) {
                    *slot = (h.key, h.value);
                }
                value_bytes += h.value.map_or(0, <[u8]>::len);
                count += 1;
            }
        }
        let key = message.key();
        let payload = message.payload();
        let mut buffer = Vec::with_capacity(
            key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len) + value_bytes,
        );
        let mut names = String::new();
        let key = key.map(|k| append(&mut buffer, k));
        let payload = payload.map(|p| append(&mut buffer, p));
        let mut headers = Vec::with_capacity(count);
        let rest = message
            .headers()
            .into_iter()
            .flat_map(|hs| hs.iter().skip(SEEN).map(|h| (h.key, h.value)));
        for (name, value) in seen.into_iter().take(count).chain(rest) {
            let name = match KNOWN_NAMES.iter().find(|known| **known == name) {
                Some(known) => HeaderName::Known(known),
                None => {
                    let start = names.len();
                    names.push_str(name);
                    HeaderName::Other(to_u32(start)..to_u32(names.len()))
                }
            };
            let value = value.map(|v| append(&mut buffer, v));
            headers.push(HeaderSpan { name, value });
        }
        Self {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            done_below: None,
            buffer: Bytes::from(buffer),
            names,
            key,
            payload,
            headers,
        }
    }

    fn slice(&self, span: &Span) -> &[u8] {
        &self.buffer[span.start as usize..span.end as usize]
    }

    /// The key bytes.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_ref().map(|s| self.slice(s))
    }

    /// The key as a shared slice of the buffer (no copy).
    pub fn shared_key(&self) -> Option<Bytes> {
        self.key
            .as_ref()
            .map(|s| self.buffer.slice(s.start as usize..s.end as usize))
    }

    /// The payload bytes.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_ref().map(|s| self.slice(s))
    }

    /// The headers in record order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> + '_ {
        self.headers.iter().map(|h| {
            let name = match &h.name {
                HeaderName::Known(name) => name,
                HeaderName::Other(span) => self
                    .names
                    .get(span.start as usize..span.end as usize)
                    .unwrap_or_default(),
            };
            (name, h.value.as_ref().map(|v| self.slice(v)))
        })
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| *n == name)
            .and_then(|(_, value)| value)
    }

    /// The record as the dead-letter topic gets it: bytes untouched.
    pub fn original(&self) -> OriginalRecord {
        OriginalRecord {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
            key: self.key().map(<[u8]>::to_vec),
            payload: self.payload().map(<[u8]>::to_vec),
            headers: self
                .headers()
                .map(|(name, value)| (name.to_owned(), value.map(<[u8]>::to_vec)))
                .collect(),
        }
    }
}

/// Appends `bytes` to `buffer` and returns where they are.
fn append(buffer: &mut Vec<u8>, bytes: &[u8]) -> Span {
    let start = buffer.len();
    buffer.extend_from_slice(bytes);
    to_u32(start)..to_u32(buffer.len())
}

/// Kafka caps a record far below 4 GiB (`message.max.bytes`), so this never
/// saturates for anything librdkafka hands out.
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

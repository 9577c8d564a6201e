//! A consumed record, copied out of librdkafka into a buffer it shares with
//! the records polled with it.
//!
//! rdkafka's `detach` copies a record into an `OwnedMessage` whose headers are
//! a librdkafka header list: one allocation per header name and value, and a
//! linear lookup per header on the way out. A herald record has a dozen
//! headers, so that copy cost more than the rest of a no-op record's
//! handling (`herald-bench consumer`). A [`Batch`] copies the keys, payloads
//! and header values of the records polled together into one [`Bytes`]
//! buffer and their header names into one string (names herald writes are
//! not copied: they are its constants); each [`Record`] keeps ranges into
//! them. A record's key is a cheap slice of the buffer, so scheduling by
//! key allocates nothing more.

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

/// Records copied together: their bytes, header names and headers.
#[derive(Debug)]
struct Chunk {
    buffer: Bytes,
    /// Header names, kept as text so that reading them needs no UTF-8 check.
    names: String,
    headers: Vec<HeaderSpan>,
}

/// A record the consumer runtime owns, detached from librdkafka.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Every earlier record of the partition was done when this one
    /// started ([`crate::RecordInfo::done_below`]).
    pub done_below: Option<i64>,
    chunk: Arc<Chunk>,
    key: Option<Span>,
    payload: Option<Span>,
    /// Its headers in [`Chunk::headers`].
    headers: Span,
}

/// A record copied into a [`Batch`], not yet sealed.
struct Copied {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    key: Option<Span>,
    payload: Option<Span>,
    headers: Span,
}

/// Copies polled records into shared chunks.
///
/// The poll thread copies records and the scheduler's task drops them: an
/// allocation per record made on one thread and freed on another is what
/// glibc's allocator handles worst (each free takes the other thread's
/// arena lock, and the allocating thread's cache never refills); measured,
/// it cost the poll thread more than a third of its time. A batch copies
/// its records into a few chunks instead, each one allocation for up to
/// [`CHUNK_BYTES`], shared by its records.
#[derive(Default)]
pub(crate) struct Batch {
    buffer: Vec<u8>,
    names: String,
    headers: Vec<HeaderSpan>,
    copied: Vec<Copied>,
    sealed: Vec<Record>,
    /// Records still expected in this batch ([`Batch::expect`]).
    expected: usize,
    /// Bytes and headers per record in the last chunk, to size the next.
    bytes_per_record: usize,
    headers_per_record: usize,
}

/// The size at which a chunk is sealed and the next one begins. A chunk
/// lives as long as its longest-lived record (one waiting out a retry's
/// backoff holds its whole chunk), so it is kept small; and below glibc's
/// `FASTBIN_CONSOLIDATION_THRESHOLD` (64 KiB), as freeing a larger block
/// makes glibc consolidate the arena's free lists, each time.
const CHUNK_BYTES: usize = 32 * 1024;

impl Batch {
    /// About `records` records are to be pushed: chunks are sized for them
    /// at once instead of growing record by record.
    pub fn expect(&mut self, records: usize) {
        self.expected = records;
    }

    /// Sizes a new chunk's buffers for the records expected.
    fn start_chunk(&mut self) {
        let records = self.expected.max(1);
        let bytes = (records * self.bytes_per_record).min(CHUNK_BYTES) + self.bytes_per_record;
        self.buffer.reserve(bytes);
        let records = bytes / self.bytes_per_record.max(1);
        self.headers.reserve(records * self.headers_per_record);
        self.copied.reserve(records);
    }

    /// Copies `message` (read from `topic`, the runtime's shared name).
    pub fn push(&mut self, message: &BorrowedMessage<'_>, topic: Arc<str>) {
        if self.copied.is_empty() {
            self.start_chunk();
        }
        self.expected = self.expected.saturating_sub(1);
        // Each header read is a call into librdkafka plus a UTF-8 check of
        // its name, so each is read once: the first `SEEN` into this array
        // (enough for a herald record), any others read again below.
        const SEEN: usize = 16;
        let mut seen: [(&str, Option<&[u8]>); SEEN] = [("", None); SEEN];
        let mut count = 0;
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                if let Some(slot) = seen.get_mut(count) {
                    *slot = (h.key, h.value);
                }
                count += 1;
            }
        }
        let buffer = &mut self.buffer;
        let key = message.key().map(|k| append(buffer, k));
        let payload = message.payload().map(|p| append(buffer, p));
        let first_header = self.headers.len();
        let rest = message
            .headers()
            .into_iter()
            .flat_map(|hs| hs.iter().skip(SEEN).map(|h| (h.key, h.value)));
        for (name, value) in seen.into_iter().take(count).chain(rest) {
            let name = match KNOWN_NAMES.iter().find(|known| **known == name) {
                Some(known) => HeaderName::Known(known),
                None => {
                    let start = self.names.len();
                    self.names.push_str(name);
                    HeaderName::Other(to_u32(start)..to_u32(self.names.len()))
                }
            };
            let value = value.map(|v| append(buffer, v));
            self.headers.push(HeaderSpan { name, value });
        }
        self.copied.push(Copied {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            key,
            payload,
            headers: to_u32(first_header)..to_u32(self.headers.len()),
        });
        if self.buffer.len() >= CHUNK_BYTES {
            self.seal();
        }
    }

    /// The records copied so far, in the order they were pushed.
    pub fn take(&mut self) -> Vec<Record> {
        self.seal();
        std::mem::take(&mut self.sealed)
    }

    /// Makes a chunk of what was copied since the last seal.
    fn seal(&mut self) {
        if self.copied.is_empty() {
            return;
        }
        self.bytes_per_record = self.buffer.len() / self.copied.len();
        self.headers_per_record = self.headers.len().div_ceil(self.copied.len());
        let chunk = Arc::new(Chunk {
            buffer: Bytes::from(std::mem::take(&mut self.buffer)),
            names: std::mem::take(&mut self.names),
            headers: std::mem::take(&mut self.headers),
        });
        self.sealed.extend(self.copied.drain(..).map(|c| Record {
            topic: c.topic,
            partition: c.partition,
            offset: c.offset,
            done_below: None,
            chunk: Arc::clone(&chunk),
            key: c.key,
            payload: c.payload,
            headers: c.headers,
        }));
    }
}

impl Record {
    fn slice(&self, span: &Span) -> &[u8] {
        &self.chunk.buffer[span.start as usize..span.end as usize]
    }

    /// The key bytes.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_ref().map(|s| self.slice(s))
    }

    /// The key as a shared slice of the buffer (no copy).
    pub fn shared_key(&self) -> Option<Bytes> {
        self.key
            .as_ref()
            .map(|s| self.chunk.buffer.slice(s.start as usize..s.end as usize))
    }

    /// The payload bytes.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_ref().map(|s| self.slice(s))
    }

    /// The headers in record order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> + '_ {
        let headers = &self.chunk.headers[self.headers.start as usize..self.headers.end as usize];
        headers.iter().map(|h| {
            let name = match &h.name {
                HeaderName::Known(name) => name,
                HeaderName::Other(span) => self
                    .chunk
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

//! Per-key parking: once a record of key K is dead-lettered, K's later
//! records are not handled either; they are **parked** behind it, in order,
//! until a person redrives or discards them. Other keys of the partition
//! keep flowing and its commit keeps advancing. Without it a dead letter is
//! a reordering: an `OrderShipped` is applied while the `OrderCreated` before
//! it sits in the dead-letter topic.
//!
//! # Where the state lives (Kafka only, so every consumer has it)
//! - **Parked records** are dead letters too: each is written to
//!   `<topic>.dlq` (error class `parked`, header `dlq.parked_behind` = the
//!   offset of the key's dead letter) before its offset may be committed.
//!   The dead-letter topic is keyed like the source, so a parked key's dead
//!   letter and its parked records sit in one partition, in their order.
//! - **The parked-key table** is the compacted topic [`DEFAULT_PARKED_TOPIC`]
//!   (one partition, shared by every group): one record per (group, topic,
//!   partition, key), a JSON [`ParkedKey`] with the original offsets of the
//!   key's parked records, the dead letter first; an empty value once the
//!   key is unparked. Only the member that owns the partition writes its
//!   keys' entries, and it writes each (and waits for the broker's
//!   acknowledgement) before it commits past the record that changed it.
//! - A member that is assigned a partition reads the table to its end
//!   before it handles any record of that partition: after a restart, a
//!   rebalance or a SIGKILL of the previous owner, K is still parked.
//!
//! # Redrive and discard travel through the partition
//! A redrive writes a copy of each dead letter back to its original topic
//! and **partition**, with [`headers::REDRIVE_GROUP`] (only that group
//! handles it; every other group skips it) and [`headers::REDRIVE_OF`] (the
//! original offset). The partition's owner handles a redriven record only
//! when it is its key's head (the oldest parked offset); once handled, the
//! head moves on, and the key is unparked when its list is empty. A discard
//! is a copy with [`headers::REDRIVE_ACTION`] = `discard`: the owner drops
//! that offset from the list unhandled. So every change to a key's list is
//! made by one member, in the partition's order, and a new record of K that
//! arrives during a redrive parks behind the redriven ones.
//!
//! # Failure cases
//! - A member dies after a dead letter (or parked copy) was written and
//!   before the table entry: the record was not committed, so the next
//!   owner handles it again and writes both again (a second copy in the
//!   dead-letter topic, with the same original offset: readers keep one).
//! - It dies after the table entry and before the commit: the next owner
//!   finds the offset already parked and only commits it.
//! - A redriven record is handled and the member dies before its table
//!   entry: it is handled again (at least once, as any record; the inbox
//!   makes that one effect).
//! - A member cut off from the cluster, still running after its partition
//!   moved, can write one stale table entry; its commits are refused (its
//!   generation is stale), so the records it parked are handled again by the
//!   new owner, and the stale entry shows as a parked key whose records
//!   a person discards.
//! - The table cannot be read when a partition is assigned: the consumer
//!   stops with an error rather than handle records of a key it may not
//!   know is parked.
//! - Records without a key have no aggregate to park: they are dead-lettered
//!   and the partition continues.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::error::ClientError;
use crate::publisher::OutgoingRecord;

/// The parked-key table's topic unless configured otherwise.
pub const DEFAULT_PARKED_TOPIC: &str = "herald.parked";

/// What a consumer does with a key whose record it dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeadLetterMode {
    /// Park the key: its later records wait behind the dead letter (the
    /// default; herald's events are keyed by their aggregate).
    #[default]
    ParkKey,
    /// Dead-letter the record and go on with the key's next one (no order
    /// across the dead letter).
    Continue,
}

/// Header names of redriven records (kept out of the `dlq.*` namespace, which
/// a dead letter rewrites, so that they survive a second failure).
pub mod headers {
    /// The consumer group that is to handle the redriven record; every other
    /// group skips it.
    pub const REDRIVE_GROUP: &str = "herald-redrive-group";
    /// The record's original offset in its partition (its identity in the
    /// parked-key table).
    pub const REDRIVE_OF: &str = "herald-redrive-of";
    /// `replay` (handle it) or `discard` (drop it from the key's list).
    pub const REDRIVE_ACTION: &str = "herald-redrive-action";
    /// How many times the record was redriven (the loop guard's count).
    pub const REDRIVES: &str = "herald-redrives";
    /// Dead-letter header of a parked record: the original offset of the
    /// key's dead letter it waits behind.
    pub const PARKED_BEHIND: &str = "dlq.parked_behind";
    /// Dead-letter header of a record whose dead letter parked its key
    /// (`true`).
    pub const PARKS_KEY: &str = "dlq.parks_key";
    /// On a redrive of a letter that parked its key or was parked (`true`):
    /// once the key is no longer parked, the letter was resolved (handled or
    /// discarded) and its group skips it. A redrive without it (a dead
    /// letter of a consumer that continued) is handled.
    pub const REDRIVE_PARKED: &str = "herald-redrive-parked";
}

/// One parked key, as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParkedKey {
    /// The consumer group it is parked for.
    pub group: String,
    /// The source topic.
    pub topic: String,
    /// The source partition.
    pub partition: i32,
    /// The key as text (lossy for a key that is not UTF-8).
    pub key: String,
    /// The key's bytes, hex-encoded (exact).
    pub key_hex: String,
    /// Original offsets of the key's parked records, in order: the dead
    /// letter first.
    pub offsets: Vec<i64>,
    /// When the key was parked.
    pub since: DateTime<Utc>,
}

impl ParkedKey {
    /// The key's bytes.
    pub fn key_bytes(&self) -> Vec<u8> {
        from_hex(&self.key_hex).unwrap_or_else(|| self.key.clone().into_bytes())
    }
}

/// What a redriven record asks of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedriveAction {
    /// Handle it.
    Replay,
    /// Drop it from its key's parked list without handling it.
    Discard,
}

impl RedriveAction {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            RedriveAction::Replay => "replay",
            RedriveAction::Discard => "discard",
        }
    }
}

/// The table record's key: one entry per group, topic, partition and key.
fn entry_key(group: &str, topic: &str, partition: i32, key_hex: &str) -> String {
    format!("{group}\u{1f}{topic}\u{1f}{partition}\u{1f}{key_hex}")
}

/// The table record that sets `key`'s parked list (or unparks it when
/// `offsets` is empty).
pub(crate) fn entry(
    table: &str,
    group: &str,
    topic: &str,
    partition: i32,
    key: &[u8],
    offsets: &[i64],
    since: DateTime<Utc>,
) -> OutgoingRecord {
    let key_hex = to_hex(key);
    let payload = if offsets.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&ParkedKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            key: String::from_utf8_lossy(key).into_owned(),
            key_hex: key_hex.clone(),
            offsets: offsets.to_vec(),
            since,
        })
        .unwrap_or_default()
    };
    OutgoingRecord {
        topic: table.to_owned(),
        key: Some(entry_key(group, topic, partition, &key_hex).into_bytes()),
        payload,
        headers: Vec::new(),
        event_id: uuid::Uuid::nil(),
    }
}

/// Reads the parked-key table `table` to its end: every key parked now,
/// for `group` only when given. `config` must hold `bootstrap.servers` (and
/// any security settings).
///
/// Blocking: call it from `spawn_blocking` in async code.
pub fn read_parked(
    config: &ClientConfig,
    table: &str,
    group: Option<&str>,
    timeout: Duration,
) -> Result<Vec<ParkedKey>, ClientError> {
    let kafka = |operation| move |source| ClientError::Kafka { operation, source };
    let mut config = config.clone();
    config
        // assign() needs a group id; this reader never joins nor commits.
        .set("group.id", "herald-parked-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false");
    let reader: BaseConsumer = config.create().map_err(ClientError::Config)?;
    let deadline = Instant::now() + timeout;
    let metadata = until_deadline(deadline, |left| reader.fetch_metadata(Some(table), left))
        .map_err(kafka("reading the parked-key table's metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == table && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ClientError::Setting {
            setting: "parked_topic",
            reason: format!("the parked-key table {table:?} does not exist"),
        });
    }
    // Where each partition ends now: the table is read up to there.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = until_deadline(deadline, |left| {
            reader.fetch_watermarks(table, partition, left)
        })
        .map_err(kafka("reading the parked-key table's offsets"))?;
        if high > low {
            ends.insert(partition, high);
            tpl.add_partition_offset(table, partition, Offset::Beginning)
                .map_err(kafka("assigning the parked-key table"))?;
        }
    }
    let mut entries: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    if !ends.is_empty() {
        reader
            .assign(&tpl)
            .map_err(kafka("assigning the parked-key table"))?;
    }
    while !ends.is_empty() {
        if Instant::now() >= deadline {
            return Err(ClientError::Setting {
                setting: "parked_topic",
                reason: format!(
                    "the parked-key table {table:?} was not read to its end in {timeout:?}"
                ),
            });
        }
        let Some(message) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.map_err(kafka("reading the parked-key table"))?;
        if let Some(key) = message.key() {
            entries.insert(key.to_vec(), message.payload().unwrap_or_default().to_vec());
        }
        if ends
            .get(&message.partition())
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&message.partition());
        }
    }
    Ok(entries
        .into_values()
        .filter(|value| !value.is_empty())
        .filter_map(|value| serde_json::from_slice::<ParkedKey>(&value).ok())
        .filter(|parked| group.is_none_or(|g| parked.group == g))
        .collect())
}

/// `call` (given the time left), made again after a failure until it
/// succeeds or `deadline` passes (then its last error). For reads that may meet a cluster in
/// flux: a broker that just died or left the metadata fails a request with
/// a local error (`DestroyBroker`, `AllBrokersDown`, …) that the next one,
/// sent to another broker, does not meet. A consumer that gave up at the
/// first one would stop over a read it can simply make again.
fn until_deadline<T>(
    deadline: Instant,
    mut call: impl FnMut(Duration) -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match call(left) {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "reading the parked-key table failed; trying again");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_any_key() {
        for key in [&b""[..], b"order-1", b"\x00\xff\x10 a"] {
            assert_eq!(from_hex(&to_hex(key)).as_deref(), Some(key));
        }
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn an_entry_without_offsets_unparks() {
        let since = Utc::now();
        let set = entry("t", "g", "orders", 2, b"k", &[5, 9], since);
        let parked: ParkedKey = serde_json::from_slice(&set.payload).expect("json");
        assert_eq!(parked.offsets, vec![5, 9]);
        assert_eq!(parked.key_bytes(), b"k");
        let cleared = entry("t", "g", "orders", 2, b"k", &[], since);
        assert!(cleared.payload.is_empty());
        assert_eq!(cleared.key, set.key, "the same table entry");
    }
}

//! The invariant checker of a fault run, for your own pipeline: what your
//! producer committed, what a `read_committed` consumer sees on the topic,
//! what your handlers applied in your database, and what was
//! dead-lettered. It reports every event lost, duplicated (on the topic or
//! in your effects), applied out of its key's order, or dead-lettered, each
//! dead letter with its original bytes.
//!
//! ```no_run
//! # async fn run(kafka: herald_test::Kafka, pool: sqlx::PgPool) {
//! use herald_test::invariants::Check;
//! // What the producer committed, each key's events in creation order
//! // (here: a transactional outbox, read back in id order).
//! let committed: Vec<(uuid::Uuid, String)> = sqlx::query_as(
//!     "SELECT event_id, aggregate_id FROM herald_outbox ORDER BY id",
//! )
//! .fetch_all(&pool)
//! .await
//! .unwrap();
//! // How many times your handlers applied each event.
//! let effects: Vec<(uuid::Uuid, i64)> =
//!     sqlx::query_as("SELECT event_id, count(*) FROM my_effects GROUP BY event_id")
//!         .fetch_all(&pool)
//!         .await
//!         .unwrap();
//! let report = Check::new()
//!     .committed(committed)
//!     .effects(effects.into_iter().map(|(id, n)| (id, n as u64)))
//!     .read(&kafka, "order-events", 6, Some("order-events.dlq"));
//! report.assert_clean("after the broker restart");
//! # }
//! ```
//!
//! What counts as a failure ([`Report::is_clean`]): a committed event that
//! is neither on the topic nor dead-lettered (lost); an event a
//! `read_committed` reader sees twice; an effect applied more than once; an
//! event on the topic, not dead-lettered, with no effect (when effects are
//! given); a key whose events sit on the topic out of their committed order.
//! Dead letters are listed, not failures: whether one is expected is the
//! scenario's call.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use uuid::Uuid;

use crate::Kafka;

/// One dead letter as the checker reads it from the DLQ topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its event id, when its headers name one.
    pub event_id: Option<Uuid>,
    /// The original record key.
    pub key: Option<String>,
    /// The error class (`dlq.error_class`).
    pub error_class: Option<String>,
    /// The error (`dlq.error`).
    pub error: Option<String>,
    /// The original payload bytes, untouched.
    pub payload: Vec<u8>,
}

/// What a run did, judged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Events the producer committed.
    pub committed: usize,
    /// Records a `read_committed` reader saw on the topic.
    pub consumed: usize,
    /// Committed events neither on the topic nor dead-lettered.
    pub lost: Vec<Uuid>,
    /// Events seen more than once on the topic.
    pub duplicated_on_topic: Vec<Uuid>,
    /// Events applied more than once, with how often.
    pub duplicated_effects: Vec<(Uuid, u64)>,
    /// Events on the topic, not dead-lettered, never applied (only when
    /// effects were given).
    pub missing_effects: Vec<Uuid>,
    /// Keys whose events are on the topic out of their committed order,
    /// with the committed positions in topic order.
    pub misordered: Vec<(String, Vec<usize>)>,
    /// Records on the topic that are not herald envelopes.
    pub undecodable: usize,
    /// The dead letters.
    pub dead_letters: Vec<DeadLetter>,
}

impl Report {
    /// Nothing lost, duplicated or misordered.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated_on_topic.is_empty()
            && self.duplicated_effects.is_empty()
            && self.missing_effects.is_empty()
            && self.misordered.is_empty()
    }

    /// Panics with the report (and `context`: a seed, a timeline) unless
    /// the run is clean.
    pub fn assert_clean(&self, context: &str) {
        assert!(self.is_clean(), "{self}\n{context}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn first<T: fmt::Debug>(items: &[T]) -> String {
            let shown: Vec<&T> = items.iter().take(5).collect();
            if items.len() > 5 {
                format!("{shown:?} …")
            } else {
                format!("{shown:?}")
            }
        }
        writeln!(
            f,
            "committed {}, consumed {}, dead letters {}, undecodable {}",
            self.committed,
            self.consumed,
            self.dead_letters.len(),
            self.undecodable
        )?;
        writeln!(f, "lost: {} {}", self.lost.len(), first(&self.lost))?;
        writeln!(
            f,
            "duplicated on the topic: {} {}",
            self.duplicated_on_topic.len(),
            first(&self.duplicated_on_topic)
        )?;
        writeln!(
            f,
            "duplicated effects: {} {}",
            self.duplicated_effects.len(),
            first(&self.duplicated_effects)
        )?;
        writeln!(
            f,
            "missing effects: {} {}",
            self.missing_effects.len(),
            first(&self.missing_effects)
        )?;
        write!(
            f,
            "misordered keys: {} {}",
            self.misordered.len(),
            first(&self.misordered)
        )
    }
}

/// What to judge a run by; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Check {
    committed: Vec<(Uuid, String)>,
    effects: Option<BTreeMap<Uuid, u64>>,
}

impl Check {
    /// Nothing committed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The events the producer committed: `(event id, key)`, each key's in
    /// creation order.
    pub fn committed(mut self, events: impl IntoIterator<Item = (Uuid, String)>) -> Self {
        self.committed.extend(events);
        self
    }

    /// How many times the handlers applied each event (read from your
    /// database); events not listed count as never applied.
    pub fn effects(mut self, counts: impl IntoIterator<Item = (Uuid, u64)>) -> Self {
        let effects = self.effects.get_or_insert_with(BTreeMap::new);
        for (id, n) in counts {
            *effects.entry(id).or_default() += n;
        }
        self
    }

    /// Reads `topic` (`partitions` of them) and, if given, the DLQ topic
    /// (all of its partitions) to their ends with `read_committed`, and
    /// judges.
    pub fn read(&self, kafka: &Kafka, topic: &str, partitions: i32, dlq: Option<&str>) -> Report {
        use rdkafka::message::Headers;
        use rdkafka::Message;
        let header = |message: &rdkafka::message::OwnedMessage, name: &str| {
            message.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let mut undecodable = 0;
        let consumed: Vec<(Uuid, String)> = kafka
            .read_to_end(topic, partitions, "read_committed")
            .iter()
            .filter_map(|message| {
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned());
                let id = header(message, herald::envelope::headers::EVENT_ID)
                    .and_then(|id| id.parse::<Uuid>().ok());
                match (id, key) {
                    (Some(id), Some(key)) => Some((id, key)),
                    _ => {
                        undecodable += 1;
                        None
                    }
                }
            })
            .collect();
        // No DLQ topic: nothing was ever dead-lettered. (A DLQ the broker
        // created on first write has the broker's partition count, not the
        // topic's.)
        let dlq = dlq.and_then(|dlq| Some((dlq, partition_count(kafka, dlq)?)));
        let dead_letters = dlq.map_or_else(Vec::new, |(dlq, dlq_partitions)| {
            kafka
                .read_to_end(dlq, dlq_partitions, "read_committed")
                .iter()
                .map(|message| DeadLetter {
                    event_id: header(message, herald::envelope::headers::EVENT_ID)
                        .and_then(|id| id.parse().ok()),
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    error_class: header(message, "dlq.error_class"),
                    error: header(message, "dlq.error"),
                    payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                })
                .collect()
        });
        let mut report = self.judge(&consumed, dead_letters);
        report.undecodable = undecodable;
        report
    }

    /// Judges `consumed` (`(event id, key)` in each partition's offset
    /// order) and `dead_letters` against what was committed and applied.
    pub fn judge(&self, consumed: &[(Uuid, String)], dead_letters: Vec<DeadLetter>) -> Report {
        let dead: BTreeSet<Uuid> = dead_letters.iter().filter_map(|d| d.event_id).collect();
        let mut seen: BTreeMap<Uuid, u64> = BTreeMap::new();
        for (id, _) in consumed {
            *seen.entry(*id).or_default() += 1;
        }
        let lost = self
            .committed
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !seen.contains_key(id) && !dead.contains(id))
            .collect();
        let duplicated_on_topic = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        let (duplicated_effects, missing_effects) = match &self.effects {
            None => (Vec::new(), Vec::new()),
            Some(effects) => (
                effects
                    .iter()
                    .filter(|(_, n)| **n > 1)
                    .map(|(id, n)| (*id, *n))
                    .collect(),
                seen.keys()
                    .filter(|id| !dead.contains(id) && effects.get(id).is_none_or(|n| *n == 0))
                    .copied()
                    .collect(),
            ),
        };
        // Per key: the committed position of each event, in topic order
        // (first sighting); they must rise.
        let mut position: BTreeMap<Uuid, usize> = BTreeMap::new();
        let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, key) in &self.committed {
            let next = per_key.entry(key.as_str()).or_default();
            position.insert(*id, *next);
            *next += 1;
        }
        let mut order: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut first_sighting = BTreeSet::new();
        for (id, key) in consumed {
            if let (Some(p), true) = (position.get(id), first_sighting.insert(*id)) {
                order.entry(key.as_str()).or_default().push(*p);
            }
        }
        let misordered = order
            .into_iter()
            .filter(|(_, positions)| positions.windows(2).any(|w| w[0] > w[1]))
            .map(|(key, positions)| (key.to_owned(), positions))
            .collect();
        Report {
            committed: self.committed.len(),
            consumed: consumed.len(),
            lost,
            duplicated_on_topic,
            duplicated_effects,
            missing_effects,
            misordered,
            undecodable: 0,
            dead_letters,
        }
    }
}

/// Whether `topic` exists on the cluster.
/// How many partitions `topic` has; `None` when it does not exist.
fn partition_count(kafka: &Kafka, topic: &str) -> Option<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer = kafka.config().create::<BaseConsumer>().ok()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .ok()?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())?;
    i32::try_from(found.partitions().len()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    #[test]
    fn a_clean_run_is_clean() {
        let e = ids(3);
        let check = Check::new()
            .committed([(e[0], "a".into()), (e[1], "a".into()), (e[2], "b".into())])
            .effects(e.iter().map(|id| (*id, 1)));
        let consumed = [(e[2], "b".into()), (e[0], "a".into()), (e[1], "a".into())];
        let report = check.judge(&consumed, Vec::new());
        assert!(report.is_clean(), "{report}");
        assert_eq!((report.committed, report.consumed), (3, 3));
    }

    #[test]
    fn lost_duplicated_and_misordered_events_are_reported() {
        let e = ids(4);
        let check = Check::new()
            .committed(e.iter().map(|id| (*id, "k".to_owned())))
            .effects([(e[0], 2), (e[1], 1), (e[2], 1)]);
        // e[1] after e[2], e[0] twice, e[3] never.
        let consumed = [
            (e[0], "k".into()),
            (e[2], "k".into()),
            (e[1], "k".into()),
            (e[0], "k".into()),
        ];
        let report = check.judge(&consumed, Vec::new());
        assert_eq!(report.lost, vec![e[3]]);
        assert_eq!(report.duplicated_on_topic, vec![e[0]]);
        assert_eq!(report.duplicated_effects, vec![(e[0], 2)]);
        assert_eq!(report.misordered, vec![("k".to_owned(), vec![0, 2, 1])]);
        assert!(!report.is_clean());
    }

    #[test]
    fn a_dead_letter_is_neither_lost_nor_a_missing_effect() {
        let e = ids(2);
        let check = Check::new()
            .committed(e.iter().map(|id| (*id, "k".to_owned())))
            .effects([(e[1], 1)]);
        let dead = DeadLetter {
            event_id: Some(e[0]),
            key: Some("k".into()),
            error_class: Some("permanent".into()),
            error: Some("no".into()),
            payload: b"{}".to_vec(),
        };
        let consumed = [(e[0], "k".into()), (e[1], "k".into())];
        let report = check.judge(&consumed, vec![dead]);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.dead_letters.len(), 1);
    }
}

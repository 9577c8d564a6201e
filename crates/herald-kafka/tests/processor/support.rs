//! Events, the test transform, output readers and assertions shared by the
//! processor tests. (Small helpers are copied from `tests/runtime/support.rs`
//! so the two test binaries stay independent.)

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use herald::{Envelope, Event, HandlerError};
use herald_kafka::processor::{Input, ProcessorConfig};
use herald_kafka::{OutgoingRecord, Publisher, PublisherConfig};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use herald_test::events::{steps, Step, TestEvent};

/// The output of one step: which input it came from, and who made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct Done {
    #[event(id)]
    pub event_id: Uuid,
    pub input_id: Uuid,
    #[event(key)]
    pub key: String,
    pub seq: u64,
    pub instance: String,
    #[event(time)]
    pub at: DateTime<Utc>,
}

/// The output family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "test")]
pub enum OutEvent {
    Done(Done),
}

/// Logs to the test's output what `RUST_LOG` asks for (e.g.
/// `herald_kafka=debug`); without it, herald's errors only. librdkafka's
/// own errors are left out by default: a test that kills its broker makes
/// thousands, and they would bury the failure's message in CI's log.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,librdkafka=off,rdkafka=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub fn publisher(kafka: &herald_test::Kafka) -> Publisher {
    Publisher::new(&PublisherConfig::new(kafka.brokers(), "/herald-tests")).expect("publisher")
}

/// Publishes every event and asserts each was acknowledged.
pub async fn publish_all(publisher: &Publisher, topic: &str, events: &[TestEvent]) {
    for chunk in events.chunks(10_000) {
        for result in publisher.publish_batch(topic, chunk).await {
            result.expect("published");
        }
    }
}

/// The `Done` output of a step, made by `instance`.
pub fn done_output(
    out_topic: &str,
    instance: &str,
    step: &Step,
    input: &Input,
) -> Result<OutgoingRecord, HandlerError> {
    input.output(
        out_topic,
        &OutEvent::Done(Done {
            event_id: Uuid::new_v4(),
            input_id: step.event_id,
            key: step.key.clone(),
            seq: step.seq,
            instance: instance.to_owned(),
            at: Utc::now(),
        }),
    )
}

/// A processor configuration for the tests: small batches by default, quick
/// group membership, and a short retry policy.
pub fn config(
    kafka: &herald_test::Kafka,
    group: &str,
    topic: &str,
    instance: &str,
) -> ProcessorConfig {
    init_tracing();
    ProcessorConfig::new(kafka.brokers(), group, [topic], instance)
        .source("/herald-tests/processor")
        .batch_size(200)
        .batch_time(Duration::from_millis(200))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Collected {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Collected {
    /// A copy of `message`'s key, payload and headers.
    pub fn of(message: &impl Message) -> Self {
        Self {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn envelope(&self) -> Envelope {
        Envelope::from_record(
            self.key.as_deref(),
            self.payload.as_deref(),
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
        )
        .expect("an output envelope")
    }

    pub fn done(&self) -> Done {
        match self.envelope().decode::<OutEvent>().expect("an OutEvent") {
            OutEvent::Done(done) => done,
        }
    }
}

/// Reads every partition of a topic from the beginning, in the background,
/// with the given isolation level, until dropped.
pub struct Collector {
    records: Arc<Mutex<Vec<Collected>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    pub fn start(
        kafka: &herald_test::Kafka,
        topic: &str,
        partitions: i32,
        isolation: &str,
    ) -> Self {
        let consumer: BaseConsumer = kafka
            .config()
            .set("isolation.level", isolation)
            // librdkafka wants a group for assign(); nothing is committed.
            .set("group.id", herald_test::unique_name("reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .expect("collector consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let records = Arc::clone(&records);
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::SeqCst) {
                    match consumer.poll(Duration::from_millis(50)) {
                        // Sweep records (key `herald.sweep`, always
                        // aborted) are no processor's output.
                        Some(Ok(m)) if m.key() == Some(b"herald.sweep") => {}
                        Some(Ok(m)) => {
                            let collected = Collected::of(&m);
                            records.lock().expect("lock").push(collected);
                        }
                        Some(Err(error)) => eprintln!("collector: {error}"),
                        None => {}
                    }
                }
            }
        });
        Self {
            records,
            stop,
            thread: Some(thread),
        }
    }

    pub fn len(&self) -> usize {
        self.records.lock().expect("lock").len()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Distinct input ids among `dones`.
pub fn distinct_inputs(dones: &[Done]) -> usize {
    dones
        .iter()
        .map(|d| d.input_id)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Asserts exactly one output per input (by input event id) and, per key,
/// the outputs in input order.
pub fn assert_exactly_once_in_order(dones: &[Done], inputs: &[TestEvent]) {
    let mut count: HashMap<Uuid, usize> = HashMap::new();
    for d in dones {
        *count.entry(d.input_id).or_default() += 1;
    }
    let duplicates: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "{} inputs have more than one committed output, e.g. {:?}",
        duplicates.len(),
        duplicates.iter().take(5).collect::<Vec<_>>()
    );
    let missing: Vec<String> = inputs
        .iter()
        .filter(|e| !count.contains_key(&e.event_id()))
        .map(|TestEvent::Step(step)| format!("{}#{}", step.key, step.seq))
        .collect();
    assert!(
        missing.is_empty(),
        "{} inputs have no committed output, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    assert_eq!(dones.len(), inputs.len(), "exactly one output per input");

    let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for d in dones {
        by_key.entry(&d.key).or_default().push(d.seq);
    }
    for (key, seqs) in by_key {
        let expected: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{key}: outputs out of input order");
    }
}

/// Every committed output (`read_committed`) of `topic`, as `Done`s.
/// [`herald_test::Kafka::read_to_end`] waits for the transactions written
/// to the topic to be decided first: a processor's committed offsets can
/// be visible a moment before its transaction's outputs are.
pub fn committed_dones(kafka: &herald_test::Kafka, topic: &str, partitions: i32) -> Vec<Done> {
    read_all(kafka, topic, partitions, "read_committed")
        .iter()
        .map(Collected::done)
        .collect()
}

/// Everything in `topic` right now, read with `isolation` to the end of every
/// partition (the last stable offset for `read_committed`).
pub fn read_all(
    kafka: &herald_test::Kafka,
    topic: &str,
    partitions: i32,
    isolation: &str,
) -> Vec<Collected> {
    kafka
        .read_to_end(topic, partitions, isolation)
        .iter()
        // Sweep records (key `herald.sweep`, always aborted) are no
        // processor's output.
        .filter(|m| m.key() != Some(b"herald.sweep"))
        .map(Collected::of)
        .collect()
}

/// Waits until the group has committed every input of `topic`.
pub async fn wait_all_committed(
    kafka: &herald_test::Kafka,
    group: &str,
    topic: &str,
    partitions: i32,
    limit: Duration,
) {
    if let Err(why) = all_committed_within(kafka, group, topic, partitions, limit).await {
        panic!("{why}");
    }
}

/// [`wait_all_committed`], with the time-out as an error for a test that
/// has more to say about it (stats, a broker's log).
pub async fn all_committed_within(
    kafka: &herald_test::Kafka,
    group: &str,
    topic: &str,
    partitions: i32,
    limit: Duration,
) -> Result<(), String> {
    let end = kafka.end_offsets(topic, partitions);
    committed_to_within(kafka, group, topic, &end, limit).await
}

/// [`all_committed_within`] to `end` offsets asked for beforehand: after a
/// kill, a partition without a leader yet cannot tell its end.
pub async fn committed_to_within(
    kafka: &herald_test::Kafka,
    group: &str,
    topic: &str,
    end: &BTreeMap<i32, i64>,
    limit: Duration,
) -> Result<(), String> {
    let partitions = end.len() as i32;
    let start = Instant::now();
    loop {
        // A broker just restarted may not answer at once: ask again.
        let now = kafka.try_committed(group, topic, partitions);
        if now.as_ref() == Ok(end) {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(format!(
                "timed out after {limit:?} waiting for the group to commit every input: committed {now:?}, end {end:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub use herald_test::wait_until;

/// One private broker or cluster at a time: JVM brokers and their
/// processors side by side on a small machine time out sessions and judge
/// the machine, not the processor.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

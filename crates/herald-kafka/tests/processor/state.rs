//! State that survives restarts: a count per key kept in a
//! `ChangelogTable`, changed inside the transactions (with aborts that must
//! roll it back), and restored from its changelog by the next instance.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::{HandlerError, RetryPolicy};
use herald_kafka::processor::{ChangelogRecord, ChangelogTable, Input, Processor, Transform};
use herald_kafka::OutgoingRecord;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 10;
const PER_KEY: u64 = 60;

struct Counter {
    counts: ChangelogTable<u64>,
    out: String,
}

impl Transform<TestEvent> for Counter {
    async fn process(
        &mut self,
        TestEvent::Step(step): TestEvent,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let n = self.counts.get(&step.key).copied().unwrap_or(0) + 1;
        let change = self.counts.put(step.key.clone(), n)?;
        if input.attempt == 1 && step.seq % 10 == 3 {
            // The change above is in memory only: rollback must undo it.
            return Err(HandlerError::transient("flaky"));
        }
        Ok(vec![
            change,
            done_output(&self.out, &n.to_string(), &step, &input)?,
        ])
    }

    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        self.counts.restore(record)
    }

    fn commit(&mut self) {
        self.counts.commit();
    }

    fn rollback(&mut self) {
        self.counts.rollback();
    }
}

async fn run_until_committed(
    kafka: &herald_test::Kafka,
    group: &str,
    input: &str,
    output: &str,
    changelog: &str,
) {
    let config = config(kafka, group, input, "stateful-1")
        .changelog(changelog)
        .retry(RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            multiplier: 2.0,
            deadline: None,
        });
    let counter = Counter {
        counts: ChangelogTable::new(changelog),
        out: output.to_owned(),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Processor::new(config, counter)
            .expect("processor")
            .run(stop.clone().cancelled_owned()),
    );
    wait_all_committed(kafka, group, input, 1, Duration::from_secs(120)).await;
    stop.cancel();
    task.await.expect("task").expect("processor stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_restored_from_its_changelog_after_a_restart() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-state-in", 1).await;
    let output = kafka.topic("proc-state-out", 1).await;
    let changelog = kafka.topic("proc-state-changelog", 3).await;
    let group = herald_test::unique_name("proc-state");
    let inputs = steps(KEYS, PER_KEY);
    let (first, second) = inputs.split_at(inputs.len() / 2);
    let publisher = publisher(&kafka);

    publish_all(&publisher, input.name(), first).await;
    run_until_committed(
        &kafka,
        &group,
        input.name(),
        output.name(),
        changelog.name(),
    )
    .await;
    // A new instance (empty memory) must continue the counts.
    publish_all(&publisher, input.name(), second).await;
    run_until_committed(
        &kafka,
        &group,
        input.name(),
        output.name(),
        changelog.name(),
    )
    .await;

    let dones: Vec<Done> = committed_dones(&kafka, output.name(), 1);
    assert_exactly_once_in_order(&dones, &inputs);
    for d in &dones {
        assert_eq!(
            d.instance,
            (d.seq + 1).to_string(),
            "count of {} at step {}",
            d.key,
            d.seq
        );
    }
    let mut latest: BTreeMap<String, u64> = BTreeMap::new();
    for r in read_all(&kafka, changelog.name(), 3, "read_committed") {
        let key = String::from_utf8(r.key.clone().expect("key")).expect("utf-8");
        let value: u64 =
            serde_json::from_slice(r.payload.as_deref().expect("value")).expect("json");
        latest.insert(key, value);
    }
    assert_eq!(latest.len(), KEYS);
    assert!(
        latest.values().all(|v| *v == PER_KEY),
        "final counts: {latest:?}"
    );
}

/// Commits a change to `topic` every few milliseconds, in transactions of
/// ten, until `stop` is set or `limit` passes. Returns whether it was
/// stopped (rather than running out of time).
fn busy_writer(
    kafka: &herald_test::Kafka,
    topic: &str,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    limit: Duration,
) -> std::thread::JoinHandle<bool> {
    let producer: BaseProducer = kafka
        .config()
        .set(
            "transactional.id",
            herald_test::unique_name("proc-busy-writer"),
        )
        .create()
        .expect("producer");
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let timeout = Duration::from_secs(30);
        producer.init_transactions(timeout).expect("init");
        let deadline = Instant::now() + limit;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return false;
            }
            producer.begin_transaction().expect("begin");
            for _ in 0..10 {
                n += 1;
                let key = format!("key-{}", n % 100);
                let value = n.to_string();
                producer
                    .send(BaseRecord::to(&topic).key(&key).payload(&value))
                    .expect("send");
            }
            producer.commit_transaction(timeout).expect("commit");
            committed.fetch_add(10, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    })
}

/// A processor that starts beside another instance which keeps committing
/// to the changelog restores up to the end it saw when it began, and starts.
/// (Restoring "until the partition's end" never ends while someone writes:
/// every fetch returns new records.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_ends_while_another_instance_keeps_writing() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-busy-in", 1).await;
    let output = kafka.topic("proc-busy-out", 1).await;
    let changelog = kafka.topic("proc-busy-changelog", 1).await;
    let group = herald_test::unique_name("proc-busy");
    let inputs = steps(1, 1);
    publish_all(&publisher(&kafka), input.name(), &inputs).await;

    let stop_writer = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = busy_writer(
        &kafka,
        changelog.name(),
        Arc::clone(&stop_writer),
        Arc::clone(&written),
        Duration::from_secs(150),
    );
    wait_until(
        "the writer's first commits",
        Duration::from_secs(30),
        || written.load(Ordering::SeqCst) >= 100,
    )
    .await;

    // Waits up to 120 s: less than the writer's own limit.
    run_until_committed(
        &kafka,
        &group,
        input.name(),
        output.name(),
        changelog.name(),
    )
    .await;
    let written_when_started = written.load(Ordering::SeqCst);
    stop_writer.store(true, Ordering::SeqCst);
    assert!(
        writer.join().expect("writer"),
        "the writer ran out of time before the processor started"
    );
    assert_eq!(
        read_all(&kafka, output.name(), 1, "read_committed").len(),
        1,
        "the one input has its output"
    );
    eprintln!(
        "the writer had committed {written_when_started} changes when the processor was done"
    );
}

//! State partitioned like the input (`ProcessorConfig::partitioned_state`):
//! several instances share a group's work, a count per key follows its
//! partition from instance to instance (restored on assignment, dropped on
//! revocation), and duplicates of events completed by another instance are
//! still recognised; also when instances are SIGKILLed mid-transaction and
//! their partitions move while their last transactions are still open.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;

use herald::HandlerError;
use herald_kafka::processor::{ChangelogRecord, ChangelogTable, Input, Processor, Transform};
use herald_kafka::OutgoingRecord;
use rdkafka::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const PARTITIONS: i32 = 4;
const KEYS: usize = 24;
const PER_KEY: u64 = 40;
/// How long the group may take to work off one phase's inputs.
const PHASE: Duration = Duration::from_secs(120);

/// A count of the inputs per key, kept in a partitioned changelog table;
/// each output carries the count (as `Done::instance`).
struct Counter {
    counts: ChangelogTable<u64>,
    out: String,
    /// Slow enough that a transaction is open most of the time (for kills).
    slow: bool,
}

impl Transform<TestEvent> for Counter {
    async fn process(
        &mut self,
        TestEvent::Step(step): TestEvent,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        if self.slow {
            std::thread::sleep(Duration::from_micros(200));
        }
        let n = self.counts.get(&step.key).copied().unwrap_or(0) + 1;
        let change = self.counts.put_in(input.partition, step.key.clone(), n)?;
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

    fn revoked(&mut self, partitions: &[i32]) {
        self.counts.drop_partitions(partitions);
    }
}

/// One running instance.
struct Instance {
    stop: CancellationToken,
    task: JoinHandle<Result<(), herald_kafka::processor::ProcessorError>>,
}

/// A processor of `input` counting into `changelog`, with partitioned
/// state.
fn counting(
    kafka: &herald_test::Kafka,
    group: &str,
    topics: (&str, &str, &str),
    id: &str,
) -> Processor<TestEvent, Counter> {
    let (input, output, changelog) = topics;
    let config = config(kafka, group, input, id)
        .changelog(changelog)
        .partitioned_state(true);
    let counter = Counter {
        counts: ChangelogTable::new(changelog),
        out: output.to_owned(),
        slow: false,
    };
    Processor::new(config, counter).expect("processor")
}

impl Instance {
    fn start(
        kafka: &herald_test::Kafka,
        group: &str,
        topics: (&str, &str, &str),
        id: &str,
    ) -> Self {
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(counting(kafka, group, topics, id).run(stop.clone().cancelled_owned()));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("task")
            .expect("processor stops cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_state_follows_its_partitions_from_instance_to_instance() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-part-in", PARTITIONS).await;
    let output = kafka.topic("proc-part-out", PARTITIONS).await;
    let changelog = kafka.topic("proc-part-changelog", PARTITIONS).await;
    let group = herald_test::unique_name("proc-part");
    let topics = (input.name(), output.name(), changelog.name());
    let inputs = steps(KEYS, PER_KEY);
    let phases: Vec<&[TestEvent]> = inputs.chunks(inputs.len() / 4).collect();
    let publisher = publisher(&kafka);
    let input_topic = input.name().to_owned();
    let work_off = |phase: &'static str| {
        let (kafka, group, input) = (&kafka, &group, &input_topic);
        async move {
            if let Err(why) = all_committed_within(kafka, group, input, PARTITIONS, PHASE).await {
                panic!("{phase}: {why}");
            }
        }
    };

    // One instance holds every partition.
    let a = Instance::start(&kafka, &group, topics, "a");
    publish_all(&publisher, input.name(), phases[0]).await;
    work_off("a alone").await;

    // Three share them: partitions move from a to b and c, whose state
    // must come from a's changelog records.
    let b = Instance::start(&kafka, &group, topics, "b");
    let c = Instance::start(&kafka, &group, topics, "c");
    publish_all(&publisher, input.name(), phases[1]).await;
    work_off("a, b and c").await;

    // a leaves; its partitions go to b and c. Copies of events a completed
    // (same event ids, as an at-least-once relay would publish them again)
    // reach whoever owns their partition now, and are dropped there.
    a.stop().await;
    publish_all(&publisher, input.name(), &phases[0][..KEYS * 2]).await;
    publish_all(&publisher, input.name(), phases[2]).await;
    work_off("b and c, with copies of a's inputs").await;

    // b leaves and d comes: b's partitions go to c and d.
    let d = Instance::start(&kafka, &group, topics, "d");
    b.stop().await;
    publish_all(&publisher, input.name(), phases[3]).await;
    work_off("c and d").await;
    c.stop().await;
    d.stop().await;

    let dones: Vec<Done> = committed_dones(&kafka, output.name(), PARTITIONS);
    assert_exactly_once_in_order(&dones, &inputs);
    assert_counts_are_step_numbers(&dones);
    // Every change is in its input's partition of the changelog, and the
    // last one per key is the key's count.
    let partition_of = |topic: &str| -> BTreeMap<String, i32> {
        kafka
            .read_to_end(topic, PARTITIONS, "read_committed")
            .iter()
            .filter(|m| m.key() != Some(b"herald.sweep"))
            .map(|m| {
                let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8");
                (key, m.partition())
            })
            .collect()
    };
    assert_eq!(partition_of(changelog.name()), partition_of(input.name()));
    let mut latest: BTreeMap<String, u64> = BTreeMap::new();
    for record in read_all(&kafka, changelog.name(), PARTITIONS, "read_committed") {
        let key = String::from_utf8(record.key.clone().expect("key")).expect("utf-8");
        let value: u64 =
            serde_json::from_slice(record.payload.as_deref().expect("value")).expect("json");
        latest.insert(key, value);
    }
    assert_eq!(latest.len(), KEYS);
    assert!(
        latest.values().all(|v| *v == PER_KEY),
        "final counts: {latest:?}"
    );
}

/// The count carried by each output is its step's number: the state of
/// every key followed its partition through every handover.
fn assert_counts_are_step_numbers(dones: &[Done]) {
    let wrong: Vec<String> = dones
        .iter()
        .filter(|d| d.instance != (d.seq + 1).to_string())
        .map(|d| format!("{} step {} counted {}", d.key, d.seq, d.instance))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} outputs with a wrong count, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

const ENV_TOPICS: &str = "HERALD_PROCESSOR_PARTITIONED_TOPICS";
const ENV_GROUP: &str = "HERALD_PROCESSOR_PARTITIONED_GROUP";
const ENV_ID: &str = "HERALD_PROCESSOR_PARTITIONED_ID";

/// The child process of the kill test: one counting instance, slow, with
/// transactions of up to 500 inputs or a second. Only runs when spawned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of partitioned::instances_killed_mid_transaction_hand_their_state_over"]
async fn partitioned_child() {
    let (Ok(topics), Ok(group), Ok(id)) = (
        std::env::var(ENV_TOPICS),
        std::env::var(ENV_GROUP),
        std::env::var(ENV_ID),
    ) else {
        return;
    };
    let kafka = herald_test::kafka().expect("kafka");
    let topics: Vec<&str> = topics.split(',').collect();
    let (input, output, changelog) = (topics[0], topics[1], topics[2]);
    let config = config(&kafka, &group, input, &id)
        .changelog(changelog)
        .partitioned_state(true)
        .batch_size(500)
        .batch_time(Duration::from_secs(1));
    let counter = Counter {
        counts: ChangelogTable::new(changelog),
        out: output.to_owned(),
        slow: true,
    };
    Processor::new(config, counter)
        .expect("processor")
        .run(std::future::pending())
        .await
        .expect("processor ran");
}

fn spawn_child(topics: (&str, &str, &str), group: &str, id: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "partitioned::partitioned_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(
            ENV_TOPICS,
            format!("{},{},{}", topics.0, topics.1, topics.2),
        )
        .env(ENV_GROUP, group)
        .env(ENV_ID, id)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child processor")
}

/// The child processes, SIGKILLed when dropped (also when the test fails:
/// they would run forever).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const KILL_PARTITIONS: i32 = 6;
const KILL_KEYS: usize = 60;
const KILL_PER_KEY: u64 = 100;
const KILLS: usize = 5;
const INSTANCES: [&str; 3] = ["a", "b", "c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_killed_mid_transaction_hand_their_state_over() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-part-kill-in", KILL_PARTITIONS).await;
    let output = kafka.topic("proc-part-kill-out", KILL_PARTITIONS).await;
    let changelog = kafka
        .topic("proc-part-kill-changelog", KILL_PARTITIONS)
        .await;
    let topics = (input.name(), output.name(), changelog.name());
    let group = herald_test::unique_name("proc-part-kill");
    let inputs = steps(KILL_KEYS, KILL_PER_KEY);
    let total = inputs.len();
    publish_all(&publisher(&kafka), input.name(), &inputs).await;
    // Progress as the broker has it, committed or not.
    let uncommitted = Collector::start(&kafka, output.name(), KILL_PARTITIONS, "read_uncommitted");

    let mut children = Children(
        INSTANCES
            .iter()
            .map(|id| spawn_child(topics, &group, id))
            .collect(),
    );
    let mut rng = rand::thread_rng();
    for kill in 0..KILLS {
        let target = uncommitted.len() + rng.gen_range(200..total / (KILLS + 2));
        wait_until("progress", Duration::from_secs(120), || {
            uncommitted.len() >= target
        })
        .await;
        // The victim's partitions go to the others once the group drops
        // it; its restart (same id: its zombie is fenced) takes some back.
        let victim = rng.gen_range(0..INSTANCES.len());
        children.0[victim].kill().expect("SIGKILL");
        children.0[victim].wait().expect("reaped");
        eprintln!(
            "kill {kill}: instance {} at {} outputs written (committed or not)",
            INSTANCES[victim],
            uncommitted.len()
        );
        children.0[victim] = spawn_child(topics, &group, INSTANCES[victim]);
    }
    let done = all_committed_within(
        &kafka,
        &group,
        input.name(),
        KILL_PARTITIONS,
        Duration::from_secs(240),
    )
    .await;
    drop(children);
    drop(uncommitted);
    if let Err(why) = done {
        panic!("{why}");
    }

    let committed = committed_dones(&kafka, output.name(), KILL_PARTITIONS);
    let written = read_all(&kafka, output.name(), KILL_PARTITIONS, "read_uncommitted").len();
    eprintln!(
        "{total} inputs, {} committed outputs, {written} outputs written in all",
        committed.len()
    );
    assert_exactly_once_in_order(&committed, &inputs);
    assert_counts_are_step_numbers(&committed);
    assert!(
        written > committed.len(),
        "expected the kills to land mid-transaction ({written} written, {} committed)",
        committed.len()
    );
}

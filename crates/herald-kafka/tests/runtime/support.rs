//! Events, producers and waiting helpers shared by the runtime tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use herald_kafka::{Consumer, Publisher, PublisherConfig};
use tokio_util::sync::CancellationToken;

pub use herald_test::events::{steps, Step, TestEvent};

pub fn publisher(kafka: &herald_test::Kafka) -> Publisher {
    Publisher::new(&PublisherConfig::new(kafka.brokers(), "/herald-tests")).expect("publisher")
}

/// Publishes every event and asserts each was acknowledged.
pub async fn publish_all(publisher: &Publisher, topic: &str, events: &[TestEvent]) {
    for result in publisher.publish_batch(topic, events).await {
        result.expect("published");
    }
}

/// What handlers saw, in the order they saw it.
#[derive(Debug, Default, Clone)]
pub struct Seen(pub Arc<Mutex<Vec<HandledStep>>>);

/// One handled step: key, seq, partition, offset.
pub type HandledStep = (String, u64, i32, i64);

impl Seen {
    pub fn record(&self, step: &Step, partition: i32, offset: i64) {
        self.0
            .lock()
            .expect("lock")
            .push((step.key.clone(), step.seq, partition, offset));
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("lock").len()
    }

    /// Sequences per key, in handling order.
    pub fn by_key(&self) -> BTreeMap<String, Vec<u64>> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (key, seq, _, _) in self.0.lock().expect("lock").iter() {
            out.entry(key.clone()).or_default().push(*seq);
        }
        out
    }
}

/// Asserts that every key's steps were handled in order 0..per_key (each
/// at least once; a redelivery repeats a suffix, never skips back past a
/// step that was not handled).
pub fn assert_complete_and_ordered(seen: &Seen, keys: usize, per_key: u64) {
    let by_key = seen.by_key();
    assert_eq!(by_key.len(), keys, "every key handled");
    for (key, seqs) in by_key {
        let mut expected_next = 0;
        for seq in &seqs {
            assert!(
                *seq <= expected_next,
                "{key}: step {seq} handled before step {expected_next}: {seqs:?}"
            );
            if *seq == expected_next {
                expected_next += 1;
            }
        }
        assert_eq!(expected_next, per_key, "{key}: all steps handled: {seqs:?}");
    }
}

pub use herald_test::wait_until;

/// Runs `consumer` until `done` holds (checked as [`wait_until`] does, and
/// failing after `limit` with `what`), then stops it and waits for its
/// shutdown, which must succeed.
pub async fn run_until(
    consumer: Consumer,
    what: &str,
    limit: Duration,
    done: impl FnMut() -> bool,
) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));
    wait_until(what, limit, done).await;
    stop.cancel();
    task.await.expect("task").expect("consumer ran");
}

/// What a child consumer process is told: its topic, group and log file.
const CHILD_ENV: [&str; 3] = [
    "HERALD_CHILD_TOPIC",
    "HERALD_CHILD_GROUP",
    "HERALD_CHILD_LOG",
];

/// Inside a child consumer process: its topic, group and log file; `None`
/// when the test runs on its own (it is then not a child and does nothing).
pub fn child_settings() -> Option<(String, String, String)> {
    let [topic, group, log] = CHILD_ENV.map(|name| std::env::var(name).ok());
    Some((topic?, group?, log?))
}

/// Starts this test binary again as a child process that runs only the
/// ignored test `test` (a consumer the caller SIGKILLs), on `topic` in
/// `group`, logging to `log`.
pub fn spawn_child(
    test: &str,
    topic: &str,
    group: &str,
    log: &std::path::Path,
) -> std::process::Child {
    use std::process::Stdio;
    std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV[0], topic)
        .env(CHILD_ENV[1], group)
        .env(CHILD_ENV[2], log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child consumer")
}

/// An append-only log a child process writes one line per handled record
/// to: one write per line on an O_APPEND file, so a SIGKILL never tears one.
pub struct LineLog(Mutex<std::fs::File>);

impl LineLog {
    pub fn open(path: &str) -> Arc<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("log");
        Arc::new(Self(Mutex::new(file)))
    }

    pub fn line(&self, line: &str) {
        use std::io::Write;
        self.0
            .lock()
            .expect("lock")
            .write_all(format!("{line}\n").as_bytes())
            .expect("write");
    }
}

/// A consumer running on its own task until [`Running::finish`].
pub struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), herald_kafka::ClientError>>,
}

impl Running {
    pub fn start(consumer: Consumer) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));
        Self { stop, task }
    }

    /// Stops it and asserts that its shutdown succeeded.
    pub async fn finish(self) {
        self.stop.cancel();
        self.task.await.expect("task").expect("consumer ran");
    }
}

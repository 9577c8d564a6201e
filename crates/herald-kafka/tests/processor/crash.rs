//! Exactly-once under crashes: a processor process is SIGKILLed at random
//! points, mid-transaction, and restarted under the same instance id. A
//! `read_committed` reader of the outputs sees exactly one output per input,
//! in per-key order, while a `read_uncommitted` reader sees more: the aborted
//! duplicates that the transactions hide.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herald_kafka::processor::{Input, Processor};
use rand::Rng;

use crate::support::*;

const KEYS: usize = 100;
const PER_KEY: u64 = 500;
const PARTITIONS: i32 = 3;
const KILLS: usize = 5;
const INSTANCE: &str = "crash-worker";

const ENV_IN: &str = "HERALD_PROCESSOR_CRASH_IN";
const ENV_OUT: &str = "HERALD_PROCESSOR_CRASH_OUT";
const ENV_GROUP: &str = "HERALD_PROCESSOR_CRASH_GROUP";

/// The child process: a processor writing one `Done` per step, slowly
/// enough that transactions of 1,000 inputs stay open for a while, so kills
/// land mid-transaction. Only runs when spawned by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of crash::processor_killed_mid_transaction_commits_each_output_once"]
async fn crash_child() {
    let (Ok(input), Ok(output), Ok(group)) = (
        std::env::var(ENV_IN),
        std::env::var(ENV_OUT),
        std::env::var(ENV_GROUP),
    ) else {
        return;
    };
    let kafka = herald_test::kafka().expect("kafka");
    let config = config(&kafka, &group, &input, INSTANCE)
        .batch_size(1000)
        .batch_time(Duration::from_secs(5))
        // Static membership: the restarted child takes over its dead
        // predecessor's partitions without waiting for a session timeout.
        .set("group.instance.id", INSTANCE);
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let output = output.clone();
        async move {
            // Slow enough that a transaction is open most of the time.
            std::thread::sleep(Duration::from_micros(100));
            Ok(vec![done_output(&output, INSTANCE, &step, &input)?])
        }
    };
    Processor::new(config, transform)
        .expect("processor")
        .run(std::future::pending())
        .await
        .expect("processor ran");
}

fn spawn_child(input: &str, output: &str, group: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash::crash_child", "--exact", "--ignored", "--nocapture"])
        .env(ENV_IN, input)
        .env(ENV_OUT, output)
        .env(ENV_GROUP, group)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child processor")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_killed_mid_transaction_commits_each_output_once() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-crash-in", PARTITIONS).await;
    let output = kafka.topic("proc-crash-out", PARTITIONS).await;
    let inputs = steps(KEYS, PER_KEY);
    let total = inputs.len();
    publish_all(&publisher(&kafka), input.name(), &inputs).await;
    let group = herald_test::unique_name("proc-crash");
    // Progress as the broker has it, committed or not.
    let uncommitted = Collector::start(&kafka, output.name(), PARTITIONS, "read_uncommitted");

    let mut rng = rand::thread_rng();
    for kill in 0..KILLS {
        let before = uncommitted.len();
        let mut child = spawn_child(input.name(), output.name(), &group);
        let target = before + rng.gen_range(1_000..total / KILLS);
        wait_until("child progress", Duration::from_secs(120), || {
            uncommitted.len() >= target
        })
        .await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        eprintln!(
            "kill {kill}: {} outputs written so far (committed or not)",
            uncommitted.len()
        );
    }

    let mut child = spawn_child(input.name(), output.name(), &group);
    wait_all_committed(
        &kafka,
        &group,
        input.name(),
        PARTITIONS,
        Duration::from_secs(240),
    )
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    drop(uncommitted);

    let committed = committed_dones(&kafka, output.name(), PARTITIONS);
    let everything: Vec<Done> = read_all(&kafka, output.name(), PARTITIONS, "read_uncommitted")
        .iter()
        .map(Collected::done)
        .collect();
    eprintln!(
        "{total} inputs, {} committed outputs, {} outputs written in all",
        committed.len(),
        everything.len()
    );
    assert_exactly_once_in_order(&committed, &inputs);
    // The kills really landed mid-transaction: duplicates were written and
    // only the transactions keep them from read_committed readers.
    assert!(
        everything.len() > committed.len(),
        "expected aborted duplicates in the log ({} written, {} committed)",
        everything.len(),
        committed.len()
    );
    assert_eq!(distinct_inputs(&everything), total);
}

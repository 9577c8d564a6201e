//! A broker outage longer than the transaction timeout (issue #20, scenario
//! 1): the processor, mid-stream with a transaction open, loses its only
//! broker for 40 s. It must come back by itself (a fresh transactional
//! producer, fence-safe, resuming from the committed offsets), keep
//! running, and commit exactly one output per input, in key order.

use std::time::{Duration, Instant};

use herald_kafka::processor::{Input, Processor, ProcessorStats};
use herald_test::private::PrivateKafka;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 50;
const PER_PHASE: u64 = 50;
const PARTITIONS: i32 = 3;
const OUTAGE: Duration = Duration::from_secs(40);

/// The steps of `KEYS` keys numbered `from..from + PER_PHASE`.
fn phase(from: u64) -> Vec<TestEvent> {
    (from..from + PER_PHASE)
        .flat_map(|seq| (0..KEYS).map(move |k| herald_test::events::step(&format!("key-{k}"), seq)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_broker_outage_mid_transaction_is_survived_exactly_once() {
    // The shared broker proves the installation; the outage is on a broker
    // of this test's own.
    if herald_test::kafka().is_none() {
        return;
    }
    let mut broker = tokio::task::spawn_blocking(PrivateKafka::start)
        .await
        .expect("private broker");
    let kafka = herald_test::Kafka::at(broker.brokers());
    let input = kafka.topic("outage-in", PARTITIONS).await;
    let output = kafka.topic("outage-out", PARTITIONS).await;
    let publisher = publisher(&kafka);
    let first = phase(0);
    publish_all(&publisher, input.name(), &first).await;

    let group = herald_test::unique_name("outage");
    let out = output.name().to_owned();
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let out = out.clone();
        async move {
            // Slow enough that a transaction is open when the broker dies.
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(vec![done_output(&out, "outage", &step, &input)?])
        }
    };
    let config = config(&kafka, &group, input.name(), "outage")
        // Shorter than the outage: the broker aborts the open transaction
        // while the producer cannot hear of it.
        .transaction_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(10));
    let processor = Processor::new(config, transform).expect("processor");
    let stats = processor.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));
    wait_until(
        "a third of the inputs committed",
        Duration::from_secs(120),
        || ProcessorStats::get(&stats.committed_inputs) >= first.len() as u64 / 3,
    )
    .await;

    broker.kill();
    let killed = Instant::now();
    eprintln!("broker killed: {stats:?}");
    wait_until("the outage's length", OUTAGE * 2, || {
        killed.elapsed() >= OUTAGE
    })
    .await;
    let mut broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .expect("restart");
    let second = phase(PER_PHASE);
    publish_all(&publisher, input.name(), &second).await;

    let restarted = Instant::now();
    if let Err(why) = all_committed_within(
        &kafka,
        &group,
        input.name(),
        PARTITIONS,
        Duration::from_secs(240),
    )
    .await
    {
        panic!(
            "{why}\nprocessor after the restart: {stats:?}\nbroker running: {}\nthe broker's log (last lines):\n{}",
            broker.is_running(),
            broker.log_tail(80)
        );
    }
    eprintln!(
        "every input committed {:?} after the second phase was published",
        restarted.elapsed()
    );
    assert!(
        !task.is_finished(),
        "the processor is still running after the outage (restarts: {})",
        ProcessorStats::get(&stats.restarts)
    );
    eprintln!(
        "processor restarts during the outage: {}",
        ProcessorStats::get(&stats.restarts)
    );
    let dones: Vec<Done> = read_all(&kafka, output.name(), PARTITIONS, "read_committed")
        .iter()
        .map(Collected::done)
        .collect();
    let inputs: Vec<TestEvent> = first.into_iter().chain(second).collect();
    assert_exactly_once_in_order(&dones, &inputs);
    stop.cancel();
    task.await
        .expect("task")
        .expect("processor stopped cleanly");
    // The topics go first, while their broker still answers.
    drop((input, output));
}

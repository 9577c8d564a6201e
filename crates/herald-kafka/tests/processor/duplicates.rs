//! Duplicate inputs: the same event published twice (two records, same
//! `event_id`, different offsets), before and after a processor restart,
//! yields one committed output. The same input without deduplication yields
//! two, which shows the check can fail.

use std::time::Duration;

use herald::Event;
use herald_kafka::processor::{Deduplication, Input, Processor};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 20;
const PER_KEY: u64 = 10;
const PARTITIONS: i32 = 3;

/// Runs a processor of `group` until it committed every input, then stops
/// it; returns how many duplicates it dropped.
async fn run_until_committed(
    kafka: &herald_test::Kafka,
    group: &str,
    input: &str,
    output: &str,
    deduplication: Option<Deduplication>,
) -> u64 {
    let config = config(kafka, group, input, "dedup-1").deduplication(deduplication);
    let output = output.to_owned();
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let output = output.clone();
        async move { Ok(vec![done_output(&output, "dedup-1", &step, &input)?]) }
    };
    let processor = Processor::new(config, transform).expect("processor");
    let stats = processor.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));
    wait_all_committed(kafka, group, input, PARTITIONS, Duration::from_secs(120)).await;
    stop.cancel();
    task.await.expect("task").expect("processor stops cleanly");
    stats.duplicates()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_twice_is_processed_once_across_a_restart() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-dup-in", PARTITIONS).await;
    let output = kafka.topic("proc-dup-out", PARTITIONS).await;
    let plain_output = kafka.topic("proc-dup-plain-out", PARTITIONS).await;
    let group = herald_test::unique_name("proc-dup");
    let completed = kafka.topic("proc-dup-completed", 1).await;
    let dedup = Deduplication {
        topic: Some(completed.name().to_owned()),
        ..Deduplication::default()
    };
    let inputs = steps(KEYS, PER_KEY);
    let (first, second) = inputs.split_at(inputs.len() / 2);
    let publisher = publisher(&kafka);

    // The first half, then copies of every third event of it (as an
    // at-least-once relay would re-publish a batch), then the second half.
    let copies_before: Vec<_> = first.iter().step_by(3).cloned().collect();
    publish_all(&publisher, input.name(), first).await;
    publish_all(&publisher, input.name(), &copies_before).await;
    publish_all(&publisher, input.name(), second).await;
    let dropped = run_until_committed(
        &kafka,
        &group,
        input.name(),
        output.name(),
        Some(dedup.clone()),
    )
    .await;
    assert_eq!(dropped, copies_before.len() as u64, "copies dropped");

    // After a restart (ids restored from the topic): copies of the second
    // half, and one more of the first.
    let mut copies_after: Vec<_> = second.iter().step_by(4).cloned().collect();
    copies_after.push(first[0].clone());
    publish_all(&publisher, input.name(), &copies_after).await;
    let dropped =
        run_until_committed(&kafka, &group, input.name(), output.name(), Some(dedup)).await;
    assert_eq!(
        dropped,
        copies_after.len() as u64,
        "copies dropped after the restart"
    );

    let dones: Vec<Done> = committed_dones(&kafka, output.name(), PARTITIONS);
    assert_exactly_once_in_order(&dones, &inputs);

    // The same input, without deduplication: every copy makes an output.
    let plain_group = herald_test::unique_name("proc-dup-plain");
    let dropped = run_until_committed(
        &kafka,
        &plain_group,
        input.name(),
        plain_output.name(),
        None,
    )
    .await;
    assert_eq!(dropped, 0);
    let plain: Vec<Done> = read_all(&kafka, plain_output.name(), PARTITIONS, "read_committed")
        .iter()
        .map(Collected::done)
        .collect();
    assert_eq!(
        plain.len(),
        inputs.len() + copies_before.len() + copies_after.len(),
        "without deduplication each copy is processed"
    );
    let first_id = first[0].event_id();
    assert_eq!(
        plain.iter().filter(|d| d.input_id == first_id).count(),
        3,
        "{first_id} was published three times"
    );
}

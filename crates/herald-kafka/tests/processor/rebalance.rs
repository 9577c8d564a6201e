//! Rebalances mid-stream: 2 instances, then 3, then 1. Revoked partitions'
//! open transactions are committed (or aborted) before they move, so the
//! outputs hold exactly one per input, in per-key order.

use std::sync::Arc;
use std::time::Duration;

use herald_kafka::processor::{Input, Processor, ProcessorStats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 60;
const PER_KEY: u64 = 200;
const PARTITIONS: i32 = 6;

struct Member {
    stop: CancellationToken,
    task: JoinHandle<Result<(), herald_kafka::ProcessorError>>,
    stats: Arc<ProcessorStats>,
}

fn member(kafka: &herald_test::Kafka, group: &str, input: &str, output: &str, n: usize) -> Member {
    let out = output.to_owned();
    let name = format!("m{n}");
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let (out, name) = (out.clone(), name.clone());
        async move {
            // Slow enough that the stream is still flowing while members
            // come and go.
            std::thread::sleep(Duration::from_millis(1));
            Ok(vec![done_output(&out, &name, &step, &input)?])
        }
    };
    let config = config(kafka, group, input, &format!("member-{n}"));
    let processor = Processor::new(config, transform).expect("processor");
    let stats = processor.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));
    Member { stop, task, stats }
}

async fn leave(member: Member) -> Arc<ProcessorStats> {
    member.stop.cancel();
    member
        .task
        .await
        .expect("task")
        .expect("member leaves cleanly");
    member.stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_three_then_one_instance_commit_each_output_once() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-rebalance-in", PARTITIONS).await;
    let output = kafka.topic("proc-rebalance-out", PARTITIONS).await;
    let inputs = steps(KEYS, PER_KEY);
    let total = inputs.len();
    publish_all(&publisher(&kafka), input.name(), &inputs).await;
    let group = herald_test::unique_name("proc-rebalance");
    let progress = Collector::start(&kafka, output.name(), PARTITIONS, "read_committed");

    let mut members = vec![
        member(&kafka, &group, input.name(), output.name(), 0),
        member(&kafka, &group, input.name(), output.name(), 1),
    ];
    wait_until("a third of the stream", Duration::from_secs(120), || {
        progress.len() >= total / 3
    })
    .await;
    members.push(member(&kafka, &group, input.name(), output.name(), 2));
    wait_until("two thirds of the stream", Duration::from_secs(120), || {
        progress.len() >= 2 * total / 3
    })
    .await;
    let mut stats = Vec::new();
    let last = members.pop().expect("third member");
    for m in members {
        stats.push(leave(m).await);
    }
    wait_all_committed(
        &kafka,
        &group,
        input.name(),
        PARTITIONS,
        Duration::from_secs(180),
    )
    .await;
    stats.push(leave(last).await);
    drop(progress);

    let committed: Vec<Done> = committed_dones(&kafka, output.name(), PARTITIONS);
    assert_exactly_once_in_order(&committed, &inputs);
    for (i, s) in stats.iter().enumerate() {
        eprintln!(
            "member: committed {} inputs in {} transactions, {} aborted",
            s.committed_inputs(),
            s.committed(),
            s.aborted()
        );
        assert!(s.committed_inputs() > 0, "member {i} took part");
    }
}

//! The exactly-once processor on a replicated cluster of the test's own
//! (three nodes, RF 3, `min.insync.replicas` 2; issue #18) when a broker
//! dies with SIGKILL in the middle of a run: the node that coordinates the
//! processor's transactions (or else its group), chosen among the leaders
//! of the input's and output's partitions, so that one kill takes a
//! partition leader and a coordinator at once.
//!
//! The input topic is filled, one processor transforms each input into one
//! output, and once a third of the inputs are committed the node is
//! killed. The processor must come through by itself (the module docs: an
//! abortable error aborts and rewinds, a fatal one restarts it with fresh
//! clients; a transaction the broker timed out is the supervisor's
//! business, and a failover much shorter than the transaction timeout must
//! not cause one), still running at the end. Judged with `read_committed`:
//!
//! - the group's committed offsets reach the end of every input partition;
//! - each input has exactly one committed output, and each key's outputs
//!   are in input order (the aborted attempts the failover caused stay
//!   invisible).

use std::sync::Arc;
use std::time::Duration;

use herald_kafka::processor::{Input, Processor, ProcessorStats};
use herald_test::cluster::PrivateKafkaCluster;
use herald_test::faults::Timeline;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 100;
const PER_KEY: u64 = 150;
const PARTITIONS: i32 = 3;
const INSTANCE: &str = "cluster";

/// Whom to kill: the transaction coordinator's node when it leads one of
/// `leaders`, else the group coordinator's when it does, else the leader
/// of the first of `leaders`; with why.
fn victim(leaders: &[i32], transactions: i32, group: i32) -> (i32, &'static str) {
    if leaders.contains(&transactions) {
        (transactions, "transaction coordinator and partition leader")
    } else if leaders.contains(&group) {
        (group, "group coordinator and partition leader")
    } else {
        (leaders[0], "partition leader")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_leader_killed_mid_run_commits_each_output_once() {
    // The shared broker proves the installation; the kill is on a cluster
    // of this test's own.
    if herald_test::kafka().is_none() {
        return;
    }
    let _serial = one_at_a_time().await;
    let timeline = Timeline::new();
    let mut cluster = tokio::task::spawn_blocking(PrivateKafkaCluster::start)
        .await
        .expect("the cluster");
    let kafka = cluster.kafka();
    let input = kafka.topic("cluster-in", PARTITIONS).await;
    let output = kafka.topic("cluster-out", PARTITIONS).await;
    let inputs = steps(KEYS, PER_KEY);
    let total = inputs.len() as u64;
    publish_all(&publisher(&kafka), input.name(), &inputs).await;
    // Asked for now: every input is there, and every partition has its
    // leader.
    let end = kafka.end_offsets(input.name(), PARTITIONS);
    timeline.note(format!(
        "cluster up at {}, {total} inputs published",
        cluster.brokers()
    ));

    let group = herald_test::unique_name("cluster-proc");
    let config = config(&kafka, &group, input.name(), INSTANCE);
    let transactional_id = config.transactional_id();
    let out = output.name().to_owned();
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let out = out.clone();
        async move { Ok(vec![done_output(&out, INSTANCE, &step, &input)?]) }
    };
    let stats = Arc::new(ProcessorStats::default());
    let processor = Processor::new(config, transform)
        .expect("processor")
        .with_stats(Arc::clone(&stats));
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));

    wait_until(
        "a third of the inputs committed",
        Duration::from_secs(120),
        || stats.committed_inputs() >= total / 3,
    )
    .await;
    let (victim, why) = tokio::task::block_in_place(|| {
        let leaders: Vec<i32> = [input.name(), output.name()]
            .iter()
            .flat_map(|topic| (0..PARTITIONS).map(|p| cluster.leader(topic, p)))
            .collect();
        let transactions = cluster.transaction_coordinator(&transactional_id);
        let coordinator = cluster.group_coordinator(&group);
        timeline.note(format!(
            "leaders of input and output partitions {leaders:?}, transaction coordinator \
             {transactions}, group coordinator {coordinator}"
        ));
        let (victim, why) = victim(&leaders, transactions, coordinator);
        cluster.kill(victim);
        (victim, why)
    });
    let at_kill = stats.committed_inputs();
    timeline.note(format!(
        "[SIGKILL] node {victim} ({why}) with {at_kill} of {total} inputs committed"
    ));

    let survivor = cluster.node_other_than(&[victim]);
    let context = || {
        format!(
            "{}\nprocessor: {stats:?}\nprocessor task ended: {}\nthe log of node {survivor} (last lines):\n{}",
            timeline.text(),
            task.is_finished(),
            cluster.log_tail(survivor, 40)
        )
    };
    assert!(
        at_kill < total,
        "the kill fell after the run\n{}",
        context()
    );
    let failover = tokio::task::block_in_place(|| cluster.wait_failover(victim));
    timeline.note(format!(
        "every leadership off node {victim} after {failover:?}; {} inputs committed",
        stats.committed_inputs()
    ));
    if let Err(why) =
        committed_to_within(&kafka, &group, input.name(), &end, Duration::from_secs(120)).await
    {
        panic!("{why}\n{}", context());
    }
    timeline.note(format!(
        "every input committed; restarts {}, aborted transactions {}",
        stats.restarts(),
        stats.aborted()
    ));
    assert!(
        !task.is_finished(),
        "the processor came through the failover by itself\n{}",
        context()
    );

    let dones: Vec<Done> = committed_dones(&kafka, output.name(), PARTITIONS);
    eprintln!("{} committed outputs for {total} inputs", dones.len());
    assert_exactly_once_in_order(&dones, &inputs);
    stop.cancel();
    task.await
        .expect("task")
        .expect("the processor stopped cleanly");
}

//! Rebalances: members join and leave mid-stream; every record is handled,
//! each key stays in order, and the group's commits end exactly at the end
//! of every partition.

use std::sync::Arc;
use std::time::Duration;

use herald_kafka::{Consumer, ConsumerConfig, ConsumerStats, RecordInfo, Router};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 125;
const PER_KEY: u64 = 40;

fn member(
    kafka: &herald_test::Kafka,
    group: &str,
    topic: &str,
    seen: &Seen,
) -> (Consumer, std::sync::Arc<ConsumerStats>) {
    let router = Router::new().handle("recorder", {
        let seen = seen.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let seen = seen.clone();
            async move {
                // Slow enough that the stream outlasts the group's joins.
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let config = ConsumerConfig::new(kafka.brokers(), group, [topic])
        .concurrency(8)
        .commit_interval(Duration::from_millis(200));
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    (consumer, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_mid_stream_without_loss() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("rebalance", 6).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let total = KEYS * PER_KEY as usize;
    let group = herald_test::unique_name("rebalance");
    let seen = Seen::default();

    let mut members = Vec::new();
    for _ in 0..2 {
        let (consumer, stats) = member(&kafka, &group, topic.name(), &seen);
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));
        members.push((stop, task, stats));
    }
    wait_until("a third of the stream", Duration::from_secs(120), || {
        seen.len() >= total / 3
    })
    .await;
    let (consumer, stats) = member(&kafka, &group, topic.name(), &seen);
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));
    let third = Arc::clone(&stats);
    members.push((stop, task, stats));
    // The third member joined once it holds partitions: a rebalance moved
    // them while the others were mid-stream.
    wait_until("the third member assigned", Duration::from_secs(60), || {
        third.assigned_partitions() > 0
    })
    .await;
    eprintln!(
        "third member assigned after {} of {total} records",
        seen.len()
    );

    wait_until("two thirds of the stream", Duration::from_secs(120), || {
        seen.len() >= 2 * total / 3
    })
    .await;
    let (stop, task, first_stats) = members.remove(0);
    stop.cancel();
    task.await.expect("task").expect("member left");

    wait_until("every key complete", Duration::from_secs(180), || {
        seen.by_key()
            .values()
            .map(|seqs| seqs.iter().copied().max().map_or(0, |m| m + 1))
            .sum::<u64>()
            >= total as u64
    })
    .await;
    let mut all_stats = vec![first_stats];
    for (stop, task, stats) in members {
        stop.cancel();
        task.await.expect("task").expect("member left");
        all_stats.push(stats);
    }

    assert_complete_and_ordered(&seen, KEYS, PER_KEY);
    for stats in &all_stats {
        assert!(stats.assignments() > 0, "every member was given partitions");
        // The broker may refuse an asynchronous commit sent while a
        // rebalance starts (REBALANCE_IN_PROGRESS): that is its fencing at
        // work, and the next commit supersedes it. What must hold is below:
        // every record handled in order, and the group's final commits at
        // the end of every partition.
        eprintln!(
            "member: {} commits refused during rebalances",
            stats.commit_failures()
        );
    }
    assert_eq!(
        kafka.committed(&group, topic.name(), 6),
        kafka.end_offsets(topic.name(), 6),
        "the group's commits reach the end of every partition"
    );
}

/// A partition taken away while its keys wait for a concurrency slot, and
/// given back to the same member: those keys must start again when their
/// records come back (a revoke once kept their entries, emptied, whenever
/// another record of the partition was still running; records that came
/// back queued behind them and never started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_given_back_to_its_member_keeps_every_waiting_key_flowing() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    const KEYS: usize = 100;
    const PER_KEY: u64 = 50;
    let topic = kafka.topic("given-back", 2).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let total = KEYS * PER_KEY as usize;
    let group = herald_test::unique_name("given-back");
    let seen = Seen::default();
    // Two keys at a time over 100: most keys of a partition wait for a slot,
    // and a revoked partition mostly has a record running (what kept its
    // waiting keys' entries).
    let slow = |seen: &Seen| {
        let router = Router::new().handle("recorder", {
            let seen = seen.clone();
            move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    seen.record(&step, record.partition, record.offset);
                    Ok(())
                }
            }
        });
        let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
            .concurrency(2)
            .commit_interval(Duration::from_millis(100));
        let consumer = Consumer::new(config, router).expect("consumer");
        let stats = consumer.stats();
        (consumer, stats)
    };
    let (first, first_stats) = slow(&seen);
    let stop_first = CancellationToken::new();
    let first_task = tokio::spawn(first.run(stop_first.clone().cancelled_owned()));
    wait_until("the first member assigned", Duration::from_secs(60), || {
        first_stats.assigned_partitions() == 2
    })
    .await;
    // Three times: a second member joins (one partition moves to it) and
    // leaves (it moves back), each time mid-stream.
    for round in 0..3 {
        wait_until("progress", Duration::from_secs(60), || {
            seen.len() >= (round + 1) * total / 8
        })
        .await;
        let (second, second_stats) = slow(&seen);
        let stop_second = CancellationToken::new();
        let second_task = tokio::spawn(second.run(stop_second.clone().cancelled_owned()));
        wait_until(
            "the second member assigned",
            Duration::from_secs(60),
            || second_stats.assigned_partitions() > 0,
        )
        .await;
        stop_second.cancel();
        second_task.await.expect("task").expect("member left");
        wait_until("the partition given back", Duration::from_secs(60), || {
            first_stats.assigned_partitions() == 2
        })
        .await;
    }
    wait_until("every key complete", Duration::from_secs(120), || {
        seen.by_key()
            .values()
            .map(|seqs| seqs.iter().copied().max().map_or(0, |m| m + 1))
            .sum::<u64>()
            >= total as u64
    })
    .await;
    herald_test::poll_until(
        "the group's commits at the end of both partitions",
        Duration::from_secs(60),
        async || {
            let (committed, end) = (
                kafka.committed(&group, topic.name(), 2),
                kafka.end_offsets(topic.name(), 2),
            );
            if committed == end {
                Ok(())
            } else {
                Err(format!("committed {committed:?}, end {end:?}"))
            }
        },
    )
    .await;
    stop_first.cancel();
    first_task.await.expect("task").expect("member left");
    assert_complete_and_ordered(&seen, KEYS, PER_KEY);
}

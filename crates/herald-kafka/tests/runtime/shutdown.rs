//! Graceful shutdown: running handlers finish, their offsets are committed,
//! and nothing after the first unfinished record is.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_handlers_complete_and_are_committed_before_exit() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("shutdown", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(12, 10)).await;

    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let seen = Seen::default();
    let router = Router::new().handle("slow", {
        let (started, finished, seen) = (started.clone(), finished.clone(), seen.clone());
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let (started, finished, seen) = (started.clone(), finished.clone(), seen.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                seen.record(&step, record.partition, record.offset);
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    let group = herald_test::unique_name("shutdown");
    let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
        .concurrency(6)
        .shutdown_timeout(Duration::from_secs(20));
    let consumer = Consumer::new(config, router).expect("consumer");
    // Stop while a full round of handlers is mid-sleep.
    run_until(
        consumer,
        "handlers running",
        Duration::from_secs(60),
        || started.load(Ordering::SeqCst) >= 9,
    )
    .await;

    let started = started.load(Ordering::SeqCst);
    assert_eq!(
        finished.load(Ordering::SeqCst),
        started,
        "every started handler completed"
    );
    assert!(started < 120, "shutdown stopped the stream early");

    // The commit of each partition is exactly its first unhandled offset.
    let mut handled: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
    for (_, _, partition, offset) in seen.0.lock().expect("lock").iter() {
        handled.entry(*partition).or_default().insert(*offset);
    }
    let committed = kafka.committed(&group, topic.name(), 3);
    for (partition, offsets) in handled {
        let first_gap = (0..).find(|o| !offsets.contains(o)).expect("a gap");
        assert_eq!(
            committed.get(&partition),
            Some(&first_gap),
            "partition {partition}"
        );
    }
}

/// A consumer whose tokio runtime shuts down under it (taking the task
/// that runs its records) stops and leaves its group, instead of holding
/// its partitions while nothing handles their records: the other member
/// then gets every partition and handles what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_runtime_shuts_down_leaves_its_partitions_to_the_group() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("runtime-gone", 2).await;
    let publisher = publisher(&kafka);
    publish_all(&publisher, topic.name(), &steps(8, 5)).await;
    let group = herald_test::unique_name("runtime-gone");
    let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()]);

    let handled_first = Arc::new(AtomicUsize::new(0));
    let first = Consumer::new(
        config.clone(),
        Router::new().handle("first", {
            let handled = handled_first.clone();
            move |_: TestEvent, _: RecordInfo| {
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        }),
    )
    .expect("first consumer");
    let first_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    first_runtime.spawn(first.run(std::future::pending()));
    wait_until(
        "the first member handled its first records",
        Duration::from_secs(60),
        || handled_first.load(Ordering::SeqCst) > 0,
    )
    .await;
    first_runtime.shutdown_background();

    // Records that only the second member can handle.
    let later: Vec<TestEvent> = (0..8)
        .map(|k| herald_test::events::step(&format!("key-{k}"), 5))
        .collect();
    publish_all(&publisher, topic.name(), &later).await;
    let seen = Seen::default();
    let second = Consumer::new(
        config,
        Router::new().handle("second", {
            let seen = seen.clone();
            move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
                let seen = seen.clone();
                async move {
                    seen.record(&step, record.partition, record.offset);
                    Ok(())
                }
            }
        }),
    )
    .expect("second consumer");
    let stats = second.stats();
    run_until(
        second,
        "the second member owning both partitions and handling the later records",
        Duration::from_secs(60),
        || {
            let later_keys: BTreeSet<String> = seen
                .0
                .lock()
                .expect("lock")
                .iter()
                .filter(|(_, seq, _, _)| *seq == 5)
                .map(|(key, _, _, _)| key.clone())
                .collect();
            stats.assigned_partitions() == 2 && later_keys.len() == 8
        },
    )
    .await;
}

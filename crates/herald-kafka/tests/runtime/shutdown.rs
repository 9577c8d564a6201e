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

//! A dependency outage is not a poison record: when handlers fail
//! transiently across keys, the circuit breaker pauses the consumer and the
//! failing records wait, however long the outage lasts, instead of being
//! dead-lettered once the retry policy gives up. One key failing alone is
//! still dead-lettered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::{HandlerError, RetryPolicy};
use herald_kafka::{CircuitBreaker, Consumer, ConsumerConfig, ConsumerStats, RecordInfo, Router};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 100;
const PER_KEY: u64 = 50;

/// Gives up on a transient failure within half a second: without the
/// breaker, an outage of a few seconds dead-letters what it meets.
fn impatient() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        multiplier: 2.0,
        deadline: Some(Duration::from_millis(500)),
    }
}

/// A consumer whose handler fails transiently while `up` is false (for
/// every key, or only for `only_key`).
fn consumer_of(
    kafka: &herald_test::Kafka,
    topic: &str,
    seen: &Seen,
    up: &Arc<AtomicBool>,
    only_key: Option<&'static str>,
    breaker: Option<CircuitBreaker>,
) -> (Consumer, Arc<ConsumerStats>, String) {
    let group = herald_test::unique_name("outage");
    let router = Router::new().handle("dependent", {
        let (seen, up) = (seen.clone(), Arc::clone(up));
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let (seen, up) = (seen.clone(), Arc::clone(&up));
            async move {
                let affected = only_key.is_none_or(|k| k == step.key);
                if affected && !up.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("database unavailable"));
                }
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let config = ConsumerConfig::new(kafka.brokers(), &group, [topic])
        .concurrency(8)
        .retry(impatient())
        .circuit_breaker(breaker)
        .commit_interval(Duration::from_millis(100));
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    (consumer, stats, group)
}

fn quick_probes() -> CircuitBreaker {
    CircuitBreaker {
        probe_initial: Duration::from_millis(100),
        probe_max: Duration::from_millis(400),
        ..CircuitBreaker::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_across_keys_pauses_the_consumer_and_dead_letters_nothing() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("outage", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let seen = Seen::default();
    let up = Arc::new(AtomicBool::new(false));
    let (consumer, stats, group) =
        consumer_of(&kafka, topic.name(), &seen, &up, None, Some(quick_probes()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));

    wait_until("the breaker open", Duration::from_secs(60), || {
        stats.breaker_open() == 1
    })
    .await;
    // The outage goes on for many times the retry policy's deadline, with
    // the waiting records probing: none of them may give up.
    let retried_at_open = stats.retried();
    let outage = std::time::Instant::now();
    wait_until("three seconds of outage", Duration::from_secs(10), || {
        outage.elapsed() >= Duration::from_secs(3)
    })
    .await;
    assert_eq!(
        stats.breaker_open(),
        1,
        "still open while the dependency is down"
    );
    assert_eq!(
        stats.dead_lettered(),
        0,
        "nothing dead-lettered during the outage"
    );
    assert!(
        stats.retried() - retried_at_open < 200,
        "the open breaker probes, it does not retry every record on its own schedule"
    );
    assert_eq!(
        seen.len(),
        0,
        "nothing handled while the dependency is down"
    );

    up.store(true, Ordering::SeqCst);
    let total = KEYS * PER_KEY as usize;
    wait_until("every record handled", Duration::from_secs(60), || {
        seen.len() >= total
    })
    .await;
    assert_eq!(stats.breaker_open(), 0, "closed again");
    assert!(stats.breaker_trips() >= 1);
    assert_eq!(stats.dead_lettered(), 0);
    herald_test::poll_until(
        "the commits at the end of every partition",
        Duration::from_secs(30),
        async || {
            let (committed, end) = (
                kafka.committed(&group, topic.name(), 3),
                kafka.end_offsets(topic.name(), 3),
            );
            if committed == end {
                Ok(())
            } else {
                Err(format!("committed {committed:?}, end {end:?}"))
            }
        },
    )
    .await;
    stop.cancel();
    task.await.expect("task").expect("consumer ran");
    assert_complete_and_ordered(&seen, KEYS, PER_KEY);
}

/// Without the breaker the same outage dead-letters records: what the test
/// above guards against is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_breaker_the_same_outage_dead_letters_records() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("outage-off", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let seen = Seen::default();
    let up = Arc::new(AtomicBool::new(false));
    let (consumer, stats, _) = consumer_of(&kafka, topic.name(), &seen, &up, None, None);
    run_until(consumer, "dead letters", Duration::from_secs(60), || {
        stats.dead_lettered() >= 8
    })
    .await;
    assert_eq!(stats.breaker_trips(), 0);
}

/// One key that keeps failing while the others succeed is a poison key,
/// not an outage: its records are dead-lettered, the breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_failing_alone_is_dead_lettered_and_the_breaker_stays_closed() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("outage-one-key", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let seen = Seen::default();
    let up = Arc::new(AtomicBool::new(false));
    let (consumer, stats, _) = consumer_of(
        &kafka,
        topic.name(),
        &seen,
        &up,
        Some("key-7"),
        Some(quick_probes()),
    );
    let total = KEYS * PER_KEY as usize;
    run_until(
        consumer,
        "every record handled or dead-lettered",
        Duration::from_secs(90),
        || seen.len() + stats.dead_lettered() as usize >= total,
    )
    .await;
    assert_eq!(stats.breaker_trips(), 0, "never opened");
    assert_eq!(
        stats.dead_lettered(),
        PER_KEY,
        "key-7's records, and only those, dead-lettered"
    );
    assert_eq!(seen.len(), total - PER_KEY as usize);
}

/// The breaker open, and then the broker dies: the group's coordinator is
/// gone, every partition is revoked (the waiting records give up: they are
/// the next owner's now) and later given back. The consumer must fetch
/// again once the dependency is back: librdkafka keeps a partition's pause
/// across a revoke, and a breaker with no waiting record left to probe with
/// must not stay open. Found by the fault harness example
/// (`examples/fault_harness.rs`): both stalled the consumer for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_the_breaker_is_open_neither_stalls_nor_repeats() {
    if herald_test::kafka().is_none() {
        return;
    }
    let mut broker = tokio::task::spawn_blocking(herald_test::private::PrivateKafka::start)
        .await
        .expect("private broker");
    let kafka = herald_test::Kafka::at(broker.brokers());
    let topic = kafka.topic("outage-restart", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let seen = Seen::default();
    let up = Arc::new(AtomicBool::new(false));
    let (consumer, stats, _) =
        consumer_of(&kafka, topic.name(), &seen, &up, None, Some(quick_probes()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));
    wait_until("the breaker open", Duration::from_secs(60), || {
        stats.breaker_open() == 1
    })
    .await;
    broker.kill();
    let killed = std::time::Instant::now();
    // Down past the session timeout (10 s): a full revoke.
    wait_until("the broker's outage", Duration::from_secs(30), || {
        killed.elapsed() >= Duration::from_secs(12)
    })
    .await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .expect("restart");
    up.store(true, Ordering::SeqCst);
    let total = KEYS * PER_KEY as usize;
    wait_until("every record handled", Duration::from_secs(120), || {
        seen.len() >= total
    })
    .await;
    stop.cancel();
    task.await.expect("task").expect("consumer ran");
    assert_complete_and_ordered(&seen, KEYS, PER_KEY);
    assert_eq!(
        seen.len(),
        total,
        "records that waited when their partitions were revoked gave up instead of applying twice"
    );
    assert_eq!(stats.dead_lettered(), 0);
    drop(broker);
}

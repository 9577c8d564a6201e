//! At-least-once delivery with transient failures, per-key order under
//! concurrency, and commits that end exactly at the end of the topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::{HandlerError, RetryPolicy};
use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};

use crate::support::*;

const KEYS: usize = 60;
const PER_KEY: u64 = 20;
/// Every 7th step fails this many times before it succeeds.
const FAILURES: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_handled_in_key_order_despite_transient_failures() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("delivery", 3).await;
    let events = steps(KEYS, PER_KEY);
    publish_all(&publisher(&kafka), topic.name(), &events).await;

    let seen = Seen::default();
    let attempts: Arc<Mutex<HashMap<uuid::Uuid, u32>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let router = Router::new().handle("recorder", {
        let (seen, attempts, running, max_running) = (
            seen.clone(),
            attempts.clone(),
            running.clone(),
            max_running.clone(),
        );
        move |event: TestEvent, record: RecordInfo| {
            let (seen, attempts, running, max_running) = (
                seen.clone(),
                attempts.clone(),
                running.clone(),
                max_running.clone(),
            );
            async move {
                let TestEvent::Step(step) = event;
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                // Let other keys overlap with this one.
                tokio::time::sleep(Duration::from_millis(1)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                if step.seq % 7 == 3 {
                    let mut attempts = attempts.lock().expect("lock");
                    let n = attempts.entry(step.event_id).or_default();
                    *n += 1;
                    assert_eq!(*n, record.attempt, "attempt number is reported");
                    if *n <= FAILURES {
                        return Err(HandlerError::transient("database briefly unavailable"));
                    }
                }
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let group = herald_test::unique_name("delivery");
    let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
        .concurrency(32)
        .retry(RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            multiplier: 2.0,
            deadline: None,
        });
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();

    let total = KEYS * PER_KEY as usize;
    run_until(
        consumer,
        "every record handled",
        Duration::from_secs(120),
        || seen.len() >= total,
    )
    .await;

    assert_complete_and_ordered(&seen, KEYS, PER_KEY);
    assert_eq!(
        seen.len(),
        total,
        "no redelivery without a crash or rebalance"
    );
    let retried_steps = events
        .iter()
        .filter(|TestEvent::Step(s)| s.seq % 7 == 3)
        .count() as u64;
    assert_eq!(stats.retried(), retried_steps * FAILURES as u64);
    assert_eq!(stats.dead_lettered(), 0);
    assert!(
        max_running.load(Ordering::SeqCst) > 1,
        "keys ran in parallel"
    );
    assert!(
        max_running.load(Ordering::SeqCst) <= 32,
        "concurrency is bounded"
    );
    assert_eq!(
        kafka.committed(&group, topic.name(), 3),
        kafka.end_offsets(topic.name(), 3),
        "everything handled is committed at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_pause_fetching_instead_of_buffering() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("backpressure", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(50, 20)).await;

    let seen = Seen::default();
    let router = Router::new().handle("slow", {
        let seen = seen.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let config = ConsumerConfig::new(
        kafka.brokers(),
        herald_test::unique_name("bp"),
        [topic.name()],
    )
    .concurrency(4)
    .max_in_flight(20);
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    let mut peak = 0;
    run_until(consumer, "all handled", Duration::from_secs(120), || {
        peak = peak.max(stats.in_flight());
        seen.len() >= 1000
    })
    .await;
    assert_complete_and_ordered(&seen, 50, 20);
    // Fetching pauses at the limit; what librdkafka had already fetched for
    // the poll in progress may overshoot it by one record.
    assert!(peak <= 21, "in-flight records stayed bounded, peak {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_through_a_small_in_flight_limit_all_arrive() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("many-keys", 12).await;
    let events = steps(5000, 8);
    publish_all(&publisher(&kafka), topic.name(), &events).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let router = Router::new().handle("count", {
        let handled = handled.clone();
        move |_event: TestEvent, _record: RecordInfo| {
            let handled = handled.clone();
            async move {
                handled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    });
    let config = ConsumerConfig::new(
        kafka.brokers(),
        herald_test::unique_name("many"),
        [topic.name()],
    )
    .concurrency(64)
    .max_in_flight(1000);
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    run_until(
        consumer,
        "every record handled",
        Duration::from_secs(120),
        || handled.load(Ordering::Relaxed) >= events.len(),
    )
    .await;
    assert_eq!(stats.handled(), events.len() as u64);
}

/// Handlers that finish without waiting complete on the poll thread; the
/// others move to tokio tasks after their first poll. Mixed within one key,
/// both kinds keep the key's order, with `inline_start` on and off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_finish_at_once_and_records_that_wait_keep_key_order() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    const KEYS: usize = 40;
    const PER_KEY: u64 = 25;
    let topic = kafka.topic("inline", 3).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;

    for inline in [true, false] {
        let seen = Seen::default();
        let router = Router::new().handle("mixed", {
            let seen = seen.clone();
            move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
                let seen = seen.clone();
                async move {
                    // Every third step waits, so one key alternates between
                    // records finished in place and records on a task.
                    if step.seq % 3 == 1 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    seen.record(&step, record.partition, record.offset);
                    Ok(())
                }
            }
        });
        let group = herald_test::unique_name("inline");
        let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
            .concurrency(8)
            .inline_start(inline);
        let consumer = Consumer::new(config, router).expect("consumer");
        let total = KEYS * PER_KEY as usize;
        run_until(
            consumer,
            "every record handled",
            Duration::from_secs(120),
            || seen.len() >= total,
        )
        .await;
        assert_complete_and_ordered(&seen, KEYS, PER_KEY);
        assert_eq!(seen.len(), total, "inline_start({inline}): no redelivery");
        assert_eq!(
            kafka.committed(&group, topic.name(), 3),
            kafka.end_offsets(topic.name(), 3),
            "inline_start({inline}): everything handled is committed"
        );
    }
}

/// A handler call cut off by the handler timeout is dropped at once, not
/// when its retry comes: whatever it held (a transaction with row locks, a
/// place in an inbox batch that other events wait on) is released while
/// the record waits out its backoff, however long that is. The call here
/// holds a channel's sender and hangs; the retry is an hour away, so only
/// a drop at the timeout closes the channel within the test's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_call_cut_off_by_its_timeout_is_dropped_before_the_retry_waits() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("cut-off", 1).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(1, 1)).await;

    let (held, released) = tokio::sync::oneshot::channel::<()>();
    let held = Arc::new(Mutex::new(Some(held)));
    let router = Router::new().handle("hangs", {
        move |_: TestEvent, _: RecordInfo| {
            let held = held.lock().expect("lock").take();
            async move {
                // The first call keeps the sender until it is dropped.
                let _held = held;
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    });
    let config = ConsumerConfig::new(
        kafka.brokers(),
        herald_test::unique_name("cut-off"),
        [topic.name()],
    )
    .handler_timeout(Duration::from_millis(300))
    .retry(RetryPolicy {
        max_attempts: 2,
        initial_delay: Duration::from_secs(3600),
        max_delay: Duration::from_secs(3600),
        multiplier: 2.0,
        deadline: None,
    });
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));

    let dropped = tokio::time::timeout(Duration::from_secs(60), released).await;
    assert!(
        matches!(dropped, Ok(Err(_))),
        "the call cut off at its timeout was dropped, not kept until its retry"
    );
    wait_until(
        "the record waiting for its retry",
        Duration::from_secs(30),
        || stats.retried() == 1,
    )
    .await;
    stop.cancel();
    task.await.expect("task").expect("consumer stopped");
}

//! Run with: `scripts/services.sh up && cargo run -p herald-kafka --example fault_harness`
//!
//! Puts a consumer and its handler through faults, the way you would put
//! your own through them: the handler hangs once for one key (cut off by
//! the handler timeout and retried) and fails twice for another
//! (`herald_test::handler_faults`); a ghost member takes half the
//! partitions and gives them back (`herald_test::churn`); and a broker of
//! its own (`herald_test::private`) is killed with SIGKILL and started
//! again while the handler's database is away (the handler fails across
//! keys: the circuit breaker pauses it). Then the
//! invariant checker (`herald_test::invariants`) reads the topic and its
//! DLQ with `read_committed`, compares them with what was committed and
//! with what the handler applied, and prints the report: events lost,
//! duplicated on the topic or in effects, misordered, dead-lettered.
//!
//! Swap in your own handler (and read its effects from your database) to
//! check it the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::{Event as _, HandlerError};
use herald_kafka::{Consumer, ConsumerConfig, Publisher, PublisherConfig, RecordInfo, Router};
use herald_test::churn::GhostMember;
use herald_test::events::{steps, TestEvent};
use herald_test::handler_faults::HandlerFaults;
use herald_test::invariants::Check;
use herald_test::private::PrivateKafka;
use tokio_util::sync::CancellationToken;

const KEYS: usize = 50;
const PER_KEY: u64 = 40;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // RUST_LOG=herald_kafka=info shows the consumer's side of the faults.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut broker = tokio::task::spawn_blocking(PrivateKafka::start).await?;
    let kafka = herald_test::Kafka::at(broker.brokers());
    let topic = kafka.topic("harness", 3).await;
    let events = steps(KEYS, PER_KEY);
    let (first, second) = events.split_at(events.len() / 2);
    let publisher = Publisher::new(&PublisherConfig::new(kafka.brokers(), "/harness"))?;
    for result in publisher.publish_batch(topic.name(), first).await {
        result?;
    }
    // What the producer committed: each key's events in creation order.
    let committed: Vec<(uuid::Uuid, String)> = events
        .iter()
        .map(|e| {
            let TestEvent::Step(step) = e;
            (e.event_id(), step.key.clone())
        })
        .collect();

    // The handler under test. Its "database" counts how often each event
    // was applied; it is away while `database_up` is false.
    let applied: Arc<Mutex<BTreeMap<uuid::Uuid, u64>>> = Arc::default();
    let database_up = Arc::new(AtomicBool::new(true));
    // Faults in the handler itself, per key: a hang past the handler
    // timeout, and two transient failures.
    let faults = HandlerFaults::new()
        .hang("key-2", Duration::from_secs(3600), 1)
        .fail_transiently("key-5", 2);
    let router = Router::new().handle("harnessed", {
        let (applied, up) = (Arc::clone(&applied), Arc::clone(&database_up));
        let faults = faults.clone();
        move |event: TestEvent, _record: RecordInfo| {
            let (applied, up, faults) = (Arc::clone(&applied), Arc::clone(&up), faults.clone());
            async move {
                let TestEvent::Step(step) = &event;
                faults.inject(&step.key).await?;
                if !up.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("database unavailable"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                *applied
                    .lock()
                    .map_err(|_| HandlerError::permanent("poisoned"))?
                    .entry(event.event_id())
                    .or_default() += 1;
                Ok(())
            }
        }
    });
    let group = herald_test::unique_name("harness");
    let consumer = Consumer::new(
        ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
            .concurrency(16)
            .handler_timeout(Duration::from_secs(2)),
        router,
    )?;
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));
    let count = || applied.lock().map(|a| a.len()).unwrap_or_default();
    let total = events.len();

    wait("the first half handled", || count() >= first.len()).await;
    println!("fault: a ghost member joins the group, holds its partitions, leaves");
    let ghost = GhostMember::join(kafka.config(), &group, &[topic.name()]);
    ghost.wait_assigned(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(move || ghost.leave()).await?;
    println!("handler faults so far: {:?}", faults.fired());
    println!("fault: the database goes away; the second half arrives");
    database_up.store(false, Ordering::SeqCst);
    for result in publisher.publish_batch(topic.name(), second).await {
        result?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("fault: broker SIGKILL while the database is away, 5 s down");
    broker.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await?;
    println!("the broker is back; the database 3 s later");
    tokio::time::sleep(Duration::from_secs(3)).await;
    database_up.store(true, Ordering::SeqCst);
    wait("every event handled", || count() >= total).await;
    stop.cancel();
    running.await??;

    let effects: Vec<(uuid::Uuid, u64)> = applied
        .lock()
        .map(|a| a.iter().map(|(id, n)| (*id, *n)).collect())
        .unwrap_or_default();
    let report = Check::new().committed(committed).effects(effects).read(
        &kafka,
        topic.name(),
        3,
        Some(&format!("{}.dlq", topic.name())),
    );
    println!("{report}");
    report.assert_clean("fault_harness example");
    drop(broker);
    Ok(())
}

/// Waits until `done` holds, for at most two minutes.
async fn wait(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{what} after {:.1} s", start.elapsed().as_secs_f64());
}

//! Run with: `cargo run -p herald-examples --example consumer`
//! (on an embedded Kafka; set `KAFKA_BROKERS=127.0.0.1:9092` after
//! `scripts/services.sh up` to run it on a real broker).
//!
//! A typed consumer with retries and dead letters: payments are published
//! for a few orders; the handler fails once, transiently, for one of them
//! (retried, then applied) and permanently for a payment it cannot accept
//! (dead-lettered to `payments.dlq` with its original bytes and the
//! reason, and — per-key parking — the same order's later payment waits
//! behind it in the DLQ instead of overtaking it). Every other order's
//! payments are applied in their order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use herald::{HandlerError, RetryPolicy};
use herald_examples::{Error, ExampleKafka};
use herald_kafka::{Consumer, ConsumerConfig, Publisher, PublisherConfig, RecordInfo, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A payment for an order.
#[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
struct PaymentReceived {
    #[event(id)]
    event_id: Uuid,
    #[event(key)]
    order_id: String,
    amount_cents: i64,
    #[event(time)]
    at: DateTime<Utc>,
}

/// The payments topic's event family (one type here).
#[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
enum PaymentEvent {
    PaymentReceived(PaymentReceived),
}

/// The handler's state: its "database" (each order's applied amounts, in
/// order) and the order whose first payment meets a dependency hiccup.
#[derive(Debug, Clone, Default)]
struct Ledger {
    applied: Arc<Mutex<BTreeMap<String, Vec<i64>>>>,
    flaky_once: Arc<Mutex<Option<String>>>,
}

fn payment(order: &str, amount_cents: i64) -> PaymentEvent {
    PaymentEvent::PaymentReceived(PaymentReceived {
        event_id: Uuid::new_v4(),
        order_id: order.to_owned(),
        amount_cents,
        at: Utc::now(),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Topics of this run's own, on an embedded cluster unless
    // KAFKA_BROKERS names one.
    let run = Uuid::new_v4().simple().to_string();
    let topic = format!("payments-{run}");
    let dlq = herald_kafka::dlq::default_dlq_topic(&topic);
    let kafka = ExampleKafka::start(
        std::env::var("KAFKA_BROKERS").ok(),
        &[(&topic, 3), (&dlq, 3)],
    )
    .await?;
    let brokers = kafka.brokers().to_owned();
    let order = |n: u32| format!("order-{n}-{run}");

    // Three orders, two payments each; order 2's first payment is refused
    // for good (a negative amount), order 3's first fails once.
    let publisher = Publisher::new(&PublisherConfig::new(&brokers, "/examples/consumer"))?;
    let events = [
        payment(&order(1), 1_000),
        payment(&order(2), -5),
        payment(&order(3), 2_500),
        payment(&order(1), 250),
        payment(&order(2), 700),
        payment(&order(3), 100),
    ];
    for result in publisher.publish_batch(&topic, &events).await {
        result?;
    }
    println!("published {} payments to {topic}", events.len());

    // The handler's state, handed to each call by the router.
    let state = Ledger::default();
    *state.flaky_once.lock().expect("flaky") = Some(order(3));
    let router = Router::with_state(state.clone()).handle(
        "ledger",
        |state: Ledger,
         PaymentEvent::PaymentReceived(payment): PaymentEvent,
         record: RecordInfo| async move {
            if payment.amount_cents < 0 {
                // Retrying cannot help: straight to the DLQ.
                return Err(HandlerError::permanent(format!(
                    "negative amount {}",
                    payment.amount_cents
                )));
            }
            let mut flaky = state.flaky_once.lock().expect("flaky");
            if flaky.as_deref() == Some(payment.order_id.as_str()) {
                *flaky = None;
                // A dependency hiccup: retried with backoff.
                return Err(HandlerError::transient("the ledger timed out"));
            }
            drop(flaky);
            println!(
                "applied {} cents to {} (partition {}, offset {})",
                payment.amount_cents, payment.order_id, record.partition, record.offset
            );
            state
                .applied
                .lock()
                .expect("ledger")
                .entry(payment.order_id)
                .or_default()
                .push(payment.amount_cents);
            Ok(())
        },
    );
    let config = ConsumerConfig::new(&brokers, format!("examples-{run}"), [topic.as_str()])
        .retry(RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .commit_interval(Duration::from_millis(200));
    let consumer = Consumer::new(config, router)?;
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));

    // Order 2's payments go to the DLQ (the refused one and the one parked
    // behind it); the other four are applied.
    let start = Instant::now();
    while stats.handled() < 4 || stats.dead_lettered() < 2 {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the consumer did not finish within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.await??;
    println!(
        "consumer: {} handled, {} retried, {} dead-lettered",
        stats.handled(),
        stats.retried(),
        stats.dead_lettered()
    );

    let mut reader = rdkafka::ClientConfig::new();
    reader.set("bootstrap.servers", &brokers);
    let letters = tokio::task::spawn_blocking(move || {
        herald_kafka::dlq::read_dead_letters(&reader, &dlq, 100)
    })
    .await??;
    let ours: Vec<_> = letters
        .iter()
        .filter(|l| l.key.as_deref() == Some(order(2).as_bytes()))
        .collect();
    for letter in &ours {
        println!(
            "dead letter: event {:?}, class {:?}, error {:?}, parked {}",
            letter.event_id(),
            letter.header("dlq.error_class"),
            letter.header("dlq.error"),
            letter.is_parked()
        );
    }
    let ledger = state.applied.lock().expect("ledger").clone();
    println!("ledger: {ledger:?}");
    assert_eq!(ledger.get(&order(1)), Some(&vec![1_000, 250]));
    assert_eq!(ledger.get(&order(3)), Some(&vec![2_500, 100]));
    assert_eq!(
        ledger.get(&order(2)),
        None,
        "order 2 waits behind its poison payment"
    );
    assert_eq!(
        ours.len(),
        2,
        "the refused payment and the one parked behind it"
    );
    println!("ok");
    Ok(())
}

//! Run with: `scripts/services.sh up && cargo run -p herald-examples --example processor`
//! (it needs a real Kafka for its transactions: `KAFKA_BROKERS`, default
//! `127.0.0.1:9092`).
//!
//! An exactly-once processor: every placed order gets one invoice. Orders
//! arrive at least once — three of them twice, with the same `event_id`
//! at a new offset, as an at-least-once relay resends after a crash. The
//! processor commits each batch's invoices together with its input offsets
//! in one Kafka transaction, and drops an input whose event it has already
//! processed, so a `read_committed` reader of the invoices sees exactly one
//! per order.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use herald::{Event as _, HandlerError};
use herald_examples::{Error, ExampleKafka};
use herald_kafka::processor::{Input, Processor, ProcessorConfig};
use herald_kafka::{Publisher, PublisherConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An order was placed.
#[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
struct OrderPlaced {
    #[event(id)]
    event_id: Uuid,
    #[event(key)]
    order_id: String,
    total_cents: i64,
    #[event(time)]
    at: DateTime<Utc>,
}

/// The orders topic's family.
#[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
enum OrderEvent {
    OrderPlaced(OrderPlaced),
}

/// An invoice for an order: the processor's output.
#[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
struct InvoiceIssued {
    #[event(id)]
    event_id: Uuid,
    #[event(key)]
    order_id: String,
    total_cents: i64,
    #[event(time)]
    at: DateTime<Utc>,
}

/// The invoices topic's family.
#[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
enum InvoiceEvent {
    InvoiceIssued(InvoiceIssued),
}

const ORDERS: usize = 10;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let run = Uuid::new_v4().simple().to_string();
    let (orders, invoices) = (format!("orders-{run}"), format!("invoices-{run}"));
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let kafka = ExampleKafka::start(Some(brokers), &[(&orders, 3), (&invoices, 3)]).await?;

    // Ten orders, and three of them again (the same events: the same ids).
    let placed: Vec<OrderEvent> = (0..ORDERS)
        .map(|i| {
            OrderEvent::OrderPlaced(OrderPlaced {
                event_id: Uuid::new_v4(),
                order_id: format!("order-{i}"),
                total_cents: 1_000 + i as i64,
                at: Utc::now(),
            })
        })
        .collect();
    let publisher = Publisher::new(&PublisherConfig::new(kafka.brokers(), "/examples/orders"))?;
    for event in placed.iter().chain(&placed[..3]) {
        publisher.publish(&orders, event).await?;
    }
    println!("published {} orders, 3 of them twice", placed.len());

    let config = ProcessorConfig::new(
        kafka.brokers(),
        format!("invoicing-{run}"),
        [&orders],
        "invoicing-1",
    )
    .source("/examples/invoicing");
    let processor = Processor::new(config, {
        let invoices = invoices.clone();
        move |OrderEvent::OrderPlaced(order): OrderEvent, input: Input| {
            let invoices = invoices.clone();
            async move {
                let invoice = InvoiceEvent::InvoiceIssued(InvoiceIssued {
                    event_id: Uuid::new_v4(),
                    order_id: order.order_id,
                    total_cents: order.total_cents,
                    at: Utc::now(),
                });
                // Committed with the input's offset, or not at all.
                Ok::<_, HandlerError>(vec![input.output(&invoices, &invoice)?])
            }
        }
    })?;
    let stats = processor.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(processor.run(stop.clone().cancelled_owned()));

    // Until every input, duplicates included, is committed.
    let start = Instant::now();
    while stats.committed_inputs() < (ORDERS + 3) as u64 {
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the processor did not commit every input within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.await??;
    println!(
        "processor: {} inputs committed, {} duplicates dropped, {} transactions",
        stats.committed_inputs(),
        stats.duplicates(),
        stats.committed()
    );

    let issued = kafka.read_to_end(&invoices, "read_committed").await?;
    for (order, invoice) in &issued {
        println!("invoice {invoice} for {order}");
    }
    let mut per_order: Vec<&str> = issued.iter().map(|(order, _)| order.as_str()).collect();
    per_order.sort_unstable();
    let mut expected: Vec<String> = placed.iter().map(|e| e.aggregate_id()).collect();
    expected.sort_unstable();
    assert_eq!(
        per_order, expected,
        "one invoice per order, duplicates dropped"
    );
    println!("ok");
    Ok(())
}

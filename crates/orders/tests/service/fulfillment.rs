//! The fulfillment processor end to end: orders reserve or are rejected,
//! cancellations release, outputs are read with read_committed, and the stock
//! survives a restart of the processor (rebuilt from its changelogs).

use std::time::Duration;

use orders::app::Components;
use orders::fulfillment::FulfillmentEvent;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

async fn place(client: &reqwest::Client, base: &str, sku: &str, quantity: u32) -> Uuid {
    let body = json!({
        "customer_id": Uuid::new_v4(),
        "currency": "EUR",
        "items": [{ "sku": sku, "quantity": quantity, "unit_price": "1.00" }]
    });
    let response = client
        .post(format!("{base}/orders"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    created["id"].as_str().expect("id").parse().expect("uuid")
}

/// Reads fulfillment events (read_committed) until `n` have arrived.
async fn read(reader: &StreamConsumer, n: usize, into: &mut Vec<FulfillmentEvent>) {
    while into.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(60), reader.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} fulfillment events: {into:?}", into.len()));
        // A topic created a moment ago may not be in the reader's metadata yet.
        let Ok(message) = message else { continue };
        let envelope = herald_kafka::envelope_of(&message).expect("envelope");
        into.push(envelope.decode().expect("fulfillment event"));
    }
}

fn describe(event: &FulfillmentEvent) -> (&'static str, Uuid) {
    match event {
        FulfillmentEvent::InventoryReserved(e) => ("reserved", e.order_id),
        FulfillmentEvent::OrderRejected(e) => ("rejected", e.order_id),
        FulfillmentEvent::InventoryReleased(e) => ("released", e.order_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_reserved_released_and_survives_a_processor_restart() {
    let Some(p) = pipeline_of(Components {
        processor: false,
        ..Components::ALL
    })
    .await
    else {
        return;
    };
    let client = reqwest::Client::new();
    let reader: StreamConsumer = p
        .kafka
        .config()
        .set("group.id", herald_test::unique_name("fulfillment-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    reader
        .subscribe(&[&p.config.fulfillment_topic])
        .expect("subscribe");
    let mut events = Vec::new();

    // First incarnation. Stock of WIDGET starts at 5; GONE-1 is out of stock.
    let first = p.config.fulfillment_processor().expect("processor");
    let stop = CancellationToken::new();
    let running = tokio::spawn(first.run(stop.clone().cancelled_owned()));
    // One at a time: orders of different keys live on different partitions,
    // so only waiting for each answer fixes the order they meet the stock in.
    let a = place(&client, &p.base, "WIDGET", 3).await;
    read(&reader, 1, &mut events).await;
    let b = place(&client, &p.base, "GONE-1", 1).await;
    read(&reader, 2, &mut events).await;
    let c = place(&client, &p.base, "WIDGET", 3).await;
    read(&reader, 3, &mut events).await;
    let cancel = client
        .post(format!("{}/orders/{a}/cancel", p.base))
        .json(&json!({"reason": "no longer needed"}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), 200);
    read(&reader, 4, &mut events).await;
    let d = place(&client, &p.base, "WIDGET", 4).await;
    read(&reader, 5, &mut events).await;
    stop.cancel();
    running.await.expect("task").expect("first processor");
    let seen: Vec<_> = events.iter().map(describe).collect();
    assert_eq!(
        seen,
        [
            ("reserved", a),
            ("rejected", b),
            ("rejected", c),
            ("released", a),
            ("reserved", d)
        ],
        "stock 5: A takes 3, C finds 2, A's release brings 5 back, D takes 4"
    );

    // Second incarnation, same instance id: the stock (1 WIDGET left) must
    // come back from the changelog, not from the initial 5.
    let second = p.config.fulfillment_processor().expect("processor");
    let stop = CancellationToken::new();
    let running = tokio::spawn(second.run(stop.clone().cancelled_owned()));
    let e = place(&client, &p.base, "WIDGET", 2).await;
    read(&reader, 6, &mut events).await;
    let f = place(&client, &p.base, "WIDGET", 1).await;
    read(&reader, 7, &mut events).await;
    stop.cancel();
    running.await.expect("task").expect("second processor");
    let seen: Vec<_> = events[5..].iter().map(describe).collect();
    assert_eq!(
        seen,
        [("rejected", e), ("reserved", f)],
        "one WIDGET left after the restart"
    );
    let FulfillmentEvent::OrderRejected(rejected) = &events[5] else {
        unreachable!()
    };
    assert_eq!(rejected.out_of_stock, ["WIDGET"]);
    p.stop().await;
}

//! The whole pipeline against real Kafka and PostgreSQL: orders go through
//! the API, the outbox, the relay and Kafka into the read model and the
//! notification log; a poison event lands in the DLQ and is replayed once its
//! cause is fixed.

use std::time::Duration;

use herald_kafka::{Publisher, PublisherConfig};
use orders::domain::{OrderCreated, OrderEvent, OrderShipped};
use serde_json::json;
use uuid::Uuid;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_to_the_read_model_and_notifications() {
    let Some(p) = pipeline().await else { return };
    let client = reqwest::Client::new();
    let customer = Uuid::new_v4();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut order = valid_order();
        order["customer_id"] = json!(customer);
        ids.push(p.create_order(&client, &order).await);
    }
    let ship = client
        .post(format!("{}/orders/{}/ship", p.base, ids[0]))
        .send()
        .await
        .expect("ship");
    assert_eq!(ship.status(), 200);
    let cancel = client
        .post(format!("{}/orders/{}/cancel", p.base, ids[1]))
        .json(&json!({"reason": "found it cheaper"}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), 200);

    let shipped = eventually(
        &client,
        &format!("{}/orders/{}", p.base, ids[0]),
        "shipped in the read model",
        |b| b["status"] == "shipped",
    )
    .await;
    assert_eq!(shipped["version"], 2);
    assert_eq!(shipped["last_event_type"], "OrderShipped");
    let cancelled = eventually(
        &client,
        &format!("{}/orders/{}", p.base, ids[1]),
        "cancelled in the read model",
        |b| b["status"] == "cancelled",
    )
    .await;
    assert_eq!(cancelled["cancel_reason"], "found it cheaper");
    let listed = eventually(
        &client,
        &format!("{}/orders?customer_id={customer}", p.base),
        "three orders listed",
        |b| b["orders"].as_array().is_some_and(|o| o.len() == 3),
    )
    .await;
    let statuses: Vec<&str> = listed["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| o["status"].as_str().expect("status"))
        .collect();
    assert!(statuses.contains(&"created"));

    // One notification per event, exactly once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM notifications ORDER BY id")
            .fetch_all(&p.pool)
            .await
            .expect("notifications");
        if kinds.len() >= 5 {
            assert_eq!(kinds.len(), 5, "{kinds:?}");
            assert_eq!(kinds.iter().filter(|k| *k == "order_created").count(), 3);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "notifications: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = client
        .get(format!("{}/metrics", p.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("herald_relay_published_total 5"),
        "{metrics}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_replayed_after_the_fix() {
    let Some(p) = pipeline().await else { return };
    let publisher =
        Publisher::new(&PublisherConfig::new(p.kafka.brokers(), "/tests")).expect("publisher");
    // A shipment for an order the read model has never seen: impossible,
    // retried as transient a bounded number of times, then dead-lettered.
    let order_id = Uuid::now_v7();
    let shipped = OrderEvent::OrderShipped(OrderShipped {
        event_id: Uuid::new_v4(),
        order_id,
        version: 2,
        timestamp: chrono::Utc::now(),
    });
    publisher
        .publish(&p.config.topics.events, &shipped)
        .await
        .expect("published");

    let dlq = format!("{}.dlq", p.config.topics.events);
    let client_config = p.kafka.config();
    let letters = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (config, topic) = (client_config.clone(), dlq.clone());
            let letters = tokio::task::spawn_blocking(move || {
                herald_kafka::dlq::read_dead_letters(&config, &topic, 10)
            })
            .await
            .expect("task")
            .unwrap_or_default();
            if !letters.is_empty() {
                break letters;
            }
            assert!(std::time::Instant::now() < deadline, "no dead letter");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.event_id(), Some(herald::Event::event_id(&shipped)));
    assert_eq!(
        letter.header("dlq.error_class").as_deref(),
        Some("transient")
    );
    assert_eq!(letter.header("dlq.attempts").as_deref(), Some("3"));
    assert!(orders::dlq::describe(letter).contains("class=transient"));

    // Fix the cause (the missing OrderCreated arrives), then replay.
    let created = OrderEvent::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        order_id,
        customer_id: Uuid::new_v4(),
        items: vec![orders::domain::OrderItem {
            sku: "A".into(),
            quantity: 1,
            unit_price: "5.00".parse().expect("decimal"),
        }],
        total: "5.00".parse().expect("decimal"),
        currency: "EUR".into(),
        version: 1,
        timestamp: chrono::Utc::now(),
    });
    publisher
        .publish(&p.config.topics.events, &created)
        .await
        .expect("published");
    let client = reqwest::Client::new();
    eventually(
        &client,
        &format!("{}/orders/{order_id}", p.base),
        "the created order",
        |b| b["status"] == "created",
    )
    .await;

    let letter_refs: Vec<&herald_kafka::dlq::DeadLetter> = letters.iter().collect();
    let replayed = orders::dlq::replay(&p.pool, &publisher, &dlq, &letter_refs)
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    assert_eq!(
        orders::dlq::replay(&p.pool, &publisher, &dlq, &letter_refs)
            .await
            .expect("replay again"),
        0,
        "a replay is recorded and not repeated"
    );
    let view = eventually(
        &client,
        &format!("{}/orders/{order_id}", p.base),
        "the replayed shipment",
        |b| b["status"] == "shipped",
    )
    .await;
    assert_eq!(
        view["last_event_id"],
        herald::Event::event_id(&shipped).to_string()
    );
    p.stop().await;
}

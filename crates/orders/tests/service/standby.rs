//! Two `orders run` started against the same Kafka and PostgreSQL by
//! mistake (issue #20, scenario 9): neither takes the other down, the
//! fulfillment processor stays single-active (the second stands by and says
//! so in `/readyz`), and when the active process stops the other takes over:
//! every order gets exactly one outcome.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use orders::fulfillment::FulfillmentEvent;
use serde_json::Value;

use crate::support::*;

const PARTITIONS: i32 = 3;

struct Processes(Vec<Option<Child>>);

impl Drop for Processes {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self.0.iter_mut().filter_map(Option::take).collect();
        herald_test::stop_gracefully(&mut children, Duration::from_secs(30));
    }
}

async fn readiness(client: &reqwest::Client, base: &str) -> Result<Value, String> {
    let response = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let ok = response.status().is_success();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if ok {
        Ok(body)
    } else {
        Err(body.to_string())
    }
}

/// Outcomes per order on the fulfillment topic, read `read_committed`.
fn outcomes(kafka: &herald_test::Kafka, topic: &str) -> BTreeMap<uuid::Uuid, usize> {
    let mut per_order = BTreeMap::new();
    for message in kafka.read_to_end(topic, PARTITIONS, "read_committed") {
        let event: FulfillmentEvent = herald_kafka::envelope_of(&message)
            .expect("envelope")
            .decode()
            .expect("fulfillment event");
        let order = match event {
            FulfillmentEvent::InventoryReserved(e) => e.order_id,
            FulfillmentEvent::OrderRejected(e) => e.order_id,
            FulfillmentEvent::InventoryReleased(e) => e.order_id,
        };
        *per_order.entry(order).or_default() += 1;
    }
    per_order
}

async fn place_orders(client: &reqwest::Client, base: &str, n: usize) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let response = client
            .post(format!("{base}/orders"))
            .json(&valid_order())
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        ids.push(body["id"].as_str().expect("id").parse().expect("uuid"));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orders_run_stands_by_and_takes_over_the_processor() {
    let (Some(kafka), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let db = postgres.database().await;
    let topic = herald_test::unique_name("order-events");
    let fulfillment = format!("{topic}-fulfillment");
    let group_prefix = herald_test::unique_name("standby");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-standby"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let ports = [herald_test::free_port(), herald_test::free_port()];
    let mut processes = Processes(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let log = std::fs::File::create(log_dir.join(format!("run-{i}.log"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_orders"))
            .args(["run", "--http-addr", &format!("127.0.0.1:{port}")])
            .env("KAFKA_BROKERS", kafka.brokers())
            .env("DATABASE_URL", db.url())
            .env("ORDERS_EVENTS_TOPIC", &topic)
            .env("ORDERS_FULFILLMENT_TOPIC", &fulfillment)
            .env("ORDERS_GROUP_PREFIX", &group_prefix)
            .env("ORDERS_TOPIC_PARTITIONS", PARTITIONS.to_string())
            .env("RUST_LOG", "warn")
            // Not about authentication.
            .env("ORDERS_AUTH", "none")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("orders run");
        processes.0.push(Some(child));
        if i == 0 {
            // The first is the active one: it holds the lock before the
            // second asks.
            let base = format!("http://127.0.0.1:{port}");
            herald_test::poll_until("the first ready", Duration::from_secs(120), async || {
                let body = readiness(&reqwest::Client::new(), &base).await?;
                match body["checks"]["components"]["fulfillment"].as_str() {
                    Some("running") => Ok(()),
                    other => Err(format!("fulfillment {other:?}: {body}")),
                }
            })
            .await;
        }
    }
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let client = reqwest::Client::new();
    let second =
        herald_test::poll_until("the second ready", Duration::from_secs(120), async || {
            readiness(&client, &bases[1]).await
        })
        .await;
    assert_eq!(
        second["checks"]["components"]["fulfillment"], "standing_by",
        "one fulfillment processor at a time: {second}"
    );
    let first = readiness(&client, &bases[0])
        .await
        .expect("the first stays ready");
    assert_eq!(first["checks"]["components"]["fulfillment"], "running");

    // Orders through both APIs: both processes serve.
    let mut ids = place_orders(&client, &bases[0], 20).await;
    ids.extend(place_orders(&client, &bases[1], 20).await);
    herald_test::poll_until(
        "an outcome per order",
        Duration::from_secs(120),
        async || {
            let seen = outcomes(&kafka, &fulfillment);
            if ids.iter().all(|id| seen.contains_key(id)) {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} orders have an outcome",
                    seen.len(),
                    ids.len()
                ))
            }
        },
    )
    .await;

    // The active one stops: the other takes over.
    let mut active = vec![processes.0[0].take().expect("first")];
    let ended = herald_test::stop_gracefully(&mut active, Duration::from_secs(60));
    assert!(ended[0].is_some_and(|s| s.success()), "{ended:?}");
    herald_test::poll_until(
        "the second takes over",
        Duration::from_secs(60),
        async || {
            let body = readiness(&client, &bases[1]).await?;
            match body["checks"]["components"]["fulfillment"].as_str() {
                Some("running") => Ok(()),
                other => Err(format!("fulfillment {other:?}")),
            }
        },
    )
    .await;
    ids.extend(place_orders(&client, &bases[1], 20).await);
    let seen = herald_test::poll_until(
        "an outcome per order",
        Duration::from_secs(120),
        async || {
            let seen = outcomes(&kafka, &fulfillment);
            if ids.iter().all(|id| seen.contains_key(id)) {
                Ok(seen)
            } else {
                Err(format!(
                    "{} of {} orders have an outcome",
                    seen.len(),
                    ids.len()
                ))
            }
        },
    )
    .await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "orders with more than one outcome: {twice:?}"
    );
    assert_eq!(seen.len(), ids.len(), "outcomes only for these orders");
    drop(processes);
    std::fs::remove_dir_all(&log_dir).ok();
}

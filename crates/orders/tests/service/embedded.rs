//! The embedded default: `orders` with nothing configured runs the whole
//! pipeline on a SQLite file and librdkafka's in-process mock cluster, and an
//! order round-trips to the read model. No external service is needed.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_with_nothing_configured_round_trips_an_order() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let data = std::env::temp_dir().join(herald_test::unique_name("orders-embedded"));
    let log_path = data.with_extension("log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_orders"))
        .env_remove("KAFKA_BROKERS")
        .env_remove("DATABASE_URL")
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ORDERS_DATA_DIR", &data)
        .env("RUST_LOG", "info,rdkafka=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start orders");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually(
        &client,
        &format!("{base}/readyz"),
        "the embedded pipeline ready",
        |b| b["status"] == "ready",
    )
    .await;

    let response = client
        .post(format!("{base}/orders"))
        .json(&json!({
            "customer_id": uuid::Uuid::new_v4(),
            "currency": "EUR",
            "items": [{ "sku": "BOOK-1", "quantity": 2, "unit_price": "12.50" }]
        }))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    let id = created["id"].as_str().expect("id");
    let view = eventually(
        &client,
        &format!("{base}/orders/{id}"),
        "the order in the read model",
        |b| b["last_event_type"] == "OrderCreated",
    )
    .await;
    assert_eq!(view["total"], "25.00");
    let ship = client
        .post(format!("{base}/orders/{id}/ship"))
        .send()
        .await
        .expect("ship");
    assert_eq!(ship.status(), 200);
    eventually(
        &client,
        &format!("{base}/orders/{id}"),
        "shipped in the read model",
        |b| b["status"] == "shipped",
    )
    .await;

    // SIGTERM: a graceful stop.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "orders did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "exit {status}: {output}");
    assert!(
        output.contains("DEVELOPMENT MODE"),
        "the banner says so: {output}"
    );
    assert!(
        data.join("orders.sqlite").exists(),
        "the SQLite file is under the data folder"
    );
    std::fs::remove_dir_all(&data).ok();
    std::fs::remove_file(&log_path).ok();
}

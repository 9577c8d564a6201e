//! The embedded default: `orders` with nothing configured runs the whole
//! pipeline on a SQLite file and librdkafka's in-process mock cluster, and an
//! order round-trips to the read model. No external service is needed.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::eventually;

/// `orders` with nothing configured but `env`, in a child process.
struct Embedded {
    child: std::process::Child,
    base: String,
    data: std::path::PathBuf,
    log_path: std::path::PathBuf,
}

impl Embedded {
    fn start(env: &[(&str, String)]) -> Embedded {
        let port = herald_test::free_port();
        let data = std::env::temp_dir().join(herald_test::unique_name("orders-embedded"));
        let log_path = data.with_extension("log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_orders"))
            .env_remove("KAFKA_BROKERS")
            .env_remove("DATABASE_URL")
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("ORDERS_DATA_DIR", &data)
            .env("RUST_LOG", "info,rdkafka=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start orders");
        Embedded {
            child,
            base: format!("http://127.0.0.1:{port}"),
            data,
            log_path,
        }
    }

    /// Waits until `/readyz` says ready, then creates an order; its id.
    async fn create_order(&self, client: &reqwest::Client) -> String {
        let base = &self.base;
        eventually(
            client,
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
        created["id"].as_str().expect("id").to_owned()
    }

    /// SIGTERM, then waits for the exit; the exit status and the log.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "orders did not stop on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let output = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        std::fs::remove_file(&self.log_path).ok();
        (status, output)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_with_nothing_configured_round_trips_an_order() {
    let embedded = Embedded::start(&[]);
    let base = embedded.base.clone();
    let data = embedded.data.clone();
    let client = reqwest::Client::new();
    let id = embedded.create_order(&client).await;
    let id = id.as_str();
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
    let (status, output) = embedded.stop().await;
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
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans leave over OTLP/HTTP: a
/// stand-in collector receives the API's, the relay's and the consumers'
/// spans under the configured service name, at the latest when the process
/// flushes at exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post({
            let received = Arc::clone(&received);
            move |body: axum::body::Bytes| async move {
                received.lock().expect("received").extend_from_slice(&body);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let embedded = Embedded::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "orders-otlp-check".to_owned()),
    ]);
    let client = reqwest::Client::new();
    let id = embedded.create_order(&client).await;
    eventually(
        &client,
        &format!("{}/orders/{id}", embedded.base),
        "the order in the read model",
        |b| b["last_event_type"] == "OrderCreated",
    )
    .await;
    let data = embedded.data.clone();
    let (status, output) = embedded.stop().await;
    std::fs::remove_dir_all(&data).ok();
    assert!(status.success(), "exit {status}: {output}");

    // Protobuf keeps strings as they are: look for them in the bodies.
    let bytes = received.lock().expect("received").clone();
    let has = |text: &str| bytes.windows(text.len()).any(|w| w == text.as_bytes());
    for expected in [
        "orders-otlp-check",
        "POST /orders",
        "outbox enqueue",
        "order-events publish",
        "order-events process",
    ] {
        assert!(
            has(expected),
            "no {expected:?} in what the collector received ({} bytes)",
            bytes.len()
        );
    }
}

//! The API over a real socket (issue #20, scenario 11): answers that
//! layers make before any handler runs keep the JSON error shape, and a
//! database that is away answers 503 with `Retry-After`, not 500.

use std::sync::Arc;
use std::time::Duration;

use orders::api::{router, AppState, REQUEST_TIMEOUT};
use orders::domain::Topics;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The API served on a free port, its database reached through `proxy`.
async fn serve(db: &herald_test::TestDatabase, proxy: &herald_test::FaultProxy) -> String {
    let direct = db.pool().await;
    orders::store::postgres::migrate(&direct)
        .await
        .expect("migrate");
    direct.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect(&db.url_via(proxy.address()))
        .await
        .expect("pool through the proxy");
    let state = AppState {
        store: orders::store::Store::Postgres(pool),
        topics: Topics {
            events: "order-events-socket-tests".into(),
        },
        kafka: None,
        metrics: Arc::default(),
        consumers: Vec::new(),
        health: Default::default(),
        auth: orders::api::auth::Auth::None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{address}")
}

/// The error code of a JSON error response, asserting its content type.
async fn error_code(response: reqwest::Response) -> String {
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "JSON error shape, not {content_type:?}"
    );
    let body: Value = response.json().await.expect("json body");
    body["error"]["code"].as_str().expect("code").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_socket_limits_timeouts_and_a_lost_database_keep_the_error_shape() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let target = {
        let options = db.options();
        format!("{}:{}", options.get_host(), options.get_port())
    };
    let proxy = herald_test::FaultProxy::start(&target);
    let base = serve(&db, &proxy).await;
    let client = reqwest::Client::new();

    // Healthy: an order is accepted.
    let created = client
        .post(format!("{base}/orders"))
        .json(&valid_order())
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);

    // A body over the limit, announced by its Content-Length: refused by
    // the limit layer before the JSON extractor reads anything.
    let oversized = format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000));
    let response = client
        .post(format!("{base}/orders"))
        .header("content-type", "application/json")
        .header("content-length", oversized.len())
        .body(oversized)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 413);
    assert_eq!(error_code(response).await, "payload_too_large");

    // A client that announces a body and never sends it: the timeout layer
    // answers once REQUEST_TIMEOUT has passed.
    let address = base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "POST /orders HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
             content-length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(REQUEST_TIMEOUT * 3, async {
        loop {
            let n = slow.read(&mut chunk).await.expect("read");
            answer.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&answer);
            if n == 0 || text.contains("\"code\"") {
                return;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server answers a stalled upload");
    let text = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(text.starts_with("http/1.1 408"), "{text}");
    assert!(text.contains("content-type: application/json"), "{text}");
    assert!(text.contains("\"request_timeout\""), "{text}");

    // The database goes away: 503 with Retry-After and the error shape.
    proxy.cut();
    let response = client
        .post(format!("{base}/orders"))
        .json(&valid_order())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 503);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    assert!(retry_after.is_some_and(|s| s > 0), "Retry-After in seconds");
    assert_eq!(error_code(response).await, "unavailable");

    // And back: the same request is accepted again.
    proxy.restore();
    herald_test::poll_until(
        "the API accepting orders again",
        Duration::from_secs(30),
        async || {
            let status = client
                .post(format!("{base}/orders"))
                .json(&valid_order())
                .send()
                .await
                .map_err(|e| e.to_string())?
                .status();
            if status == 201 {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;
}

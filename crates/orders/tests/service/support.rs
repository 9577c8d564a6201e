//! Fresh databases, random topics, and request helpers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use orders::api::{router, AppState};
use orders::app::{Application, Components, Config};
use orders::domain::Topics;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The API on a fresh, migrated database (no Kafka needed).
pub struct Api {
    pub router: axum::Router,
    pub pool: PgPool,
    pub _db: herald_test::TestDatabase,
}

/// The API without authentication (`--auth none`).
pub async fn api() -> Option<Api> {
    api_with(orders::api::auth::Auth::None).await
}

/// The API authenticating with `auth`.
pub async fn api_with(auth: orders::api::auth::Auth) -> Option<Api> {
    let postgres = herald_test::postgres()?;
    let db = postgres.database().await;
    let pool = db.pool().await;
    orders::store::postgres::migrate(&pool)
        .await
        .expect("migrate");
    let state = AppState {
        store: orders::store::Store::Postgres(pool.clone()),
        topics: Topics {
            events: "order-events-api-tests".into(),
        },
        kafka: None,
        metrics: Arc::default(),
        consumers: Vec::new(),
        health: Default::default(),
        auth,
    };
    Some(Api {
        router: router(state),
        pool,
        _db: db,
    })
}

/// A raw request; returns status and JSON body (Null when not JSON).
pub async fn send(router: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = router.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub fn post_json(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .expect("request")
}

pub fn valid_order() -> Value {
    json!({
        "customer_id": uuid::Uuid::new_v4(),
        "currency": "EUR",
        "items": [
            { "sku": "BOOK-1", "quantity": 2, "unit_price": "12.50" },
            { "sku": "PEN-2", "quantity": 1, "unit_price": "0.99" }
        ]
    })
}

/// Asserts the error shape and returns the error object.
pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) -> Value {
    assert_eq!(status, expected, "{body}");
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    error.clone()
}

/// The whole pipeline in this process on port 0: fresh database, random
/// topics and groups.
pub struct Pipeline {
    pub base: String,
    pub pool: PgPool,
    pub config: Config,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub _db: herald_test::TestDatabase,
    pub kafka: herald_test::Kafka,
}

pub fn config(kafka: &herald_test::Kafka, db: &herald_test::TestDatabase, topic: &str) -> Config {
    config_for(kafka.brokers(), db, topic)
}

/// A configuration on `db` whose Kafka is at `brokers` (e.g. a mock
/// cluster), with random topic and group names.
pub fn config_without_kafka(db: &herald_test::TestDatabase, brokers: &str) -> Config {
    Config {
        // The mock cluster has no transactions.
        delivery: herald_kafka::Delivery::AtLeastOnce,
        ..config_at(brokers, db)
    }
}

/// A configuration on `db` whose Kafka is at `brokers`, with random topic
/// and group names.
pub fn config_at(brokers: &str, db: &herald_test::TestDatabase) -> Config {
    config_for(brokers, db, &herald_test::unique_name("order-events"))
}

fn config_for(brokers: &str, db: &herald_test::TestDatabase, topic: &str) -> Config {
    Config {
        brokers: brokers.to_owned(),
        database: orders::app::Database::Postgres(Box::new(db.options())),
        embedded: false,
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        metrics_addr: Some("127.0.0.1:0".parse().expect("addr")),
        kafka_settings: Vec::new(),
        topics: Topics {
            events: topic.to_owned(),
        },
        fulfillment_topic: format!("{topic}-fulfillment"),
        instance_id: "0".to_owned(),
        stock: orders::fulfillment::Stock {
            out_of_stock: ["GONE-1".to_owned()].into_iter().collect(),
            initial: 5,
        },
        processor_batch: 50,
        group_prefix: herald_test::unique_name("orders"),
        partitions: 3,
        topic_durability: herald_kafka::TopicDurability::cluster_default(),
        concurrency: 16,
        retry: herald::RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            multiplier: 2.0,
            deadline: None,
        },
        relay_batch: 200,
        delivery: herald_kafka::Delivery::ExactlyOnce,
        outbox_retention: Duration::from_secs(3600),
        inbox_retention: Duration::from_secs(3600),
        db_pool: 10,
        migrate: true,
        // Not about authentication: the tests that are use auth.rs's.
        auth: orders::api::auth::AuthConfig::none(),
    }
}

pub async fn pipeline() -> Option<Pipeline> {
    pipeline_of(Components::ALL).await
}

/// The pipeline with only `components` running in it.
pub async fn pipeline_of(components: Components) -> Option<Pipeline> {
    pipeline_configured(components, |_, _| {}).await
}

/// The pipeline with `components`, its configuration changed by
/// `configure` (given the test's database) before it starts.
pub async fn pipeline_configured(
    components: Components,
    configure: impl FnOnce(&mut Config, &herald_test::TestDatabase),
) -> Option<Pipeline> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            // The consumers' retries are logged at info: a test that
            // counts them shows why one happened.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,herald_kafka::consumer=info".into()),
        )
        .with_test_writer()
        .try_init();
    let kafka = herald_test::kafka()?;
    let postgres = herald_test::postgres()?;
    let db = postgres.database().await;
    let topic = herald_test::unique_name("order-events");
    let mut config = config(&kafka, &db, &topic);
    if components.api {
        // /metrics on the API's own port, where these tests scrape it.
        config.metrics_addr = None;
    }
    configure(&mut config, &db);
    let app = Application::build(config.clone(), components)
        .await
        .expect("build");
    let base = format!("http://127.0.0.1:{}", app.port());
    let pool = app.store().postgres().expect("postgres").clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    Some(Pipeline {
        base,
        pool,
        config,
        stop,
        task,
        _db: db,
        kafka,
    })
}

impl Pipeline {
    /// `POST /orders` with `order`; asserts 201 and returns the new id.
    pub async fn create_order(&self, client: &reqwest::Client, order: &Value) -> String {
        let response = client
            .post(format!("{}/orders", self.base))
            .json(order)
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("task").expect("pipeline ran");
        // Topics are random per test: remove them.
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            self.kafka.config().create().expect("admin");
        let fulfillment = orders::fulfillment::Topics::of(&self.config.fulfillment_topic);
        let names: Vec<String> = [
            self.config.topics.events.clone(),
            format!("{}.dlq", self.config.topics.events),
            self.config.fulfillment_topic.clone(),
        ]
        .into_iter()
        .chain(fulfillment.internal().map(str::to_owned))
        .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin
            .delete_topics(&refs, &rdkafka::admin::AdminOptions::new())
            .await;
    }
}

/// Polls `GET url` until `done(body)` holds (bounded).
pub async fn eventually(
    client: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    herald_test::poll_until(
        &format!("{what} at {url}"),
        Duration::from_secs(60),
        async || {
            let response = client.get(url).send().await.map_err(|e| e.to_string())?;
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            if done(&body) {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        },
    )
    .await
}

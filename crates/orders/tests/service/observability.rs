//! What an operator sees: `/metrics` counts what was done, the Grafana
//! dashboard queries only metrics the service exports, and `/readyz` follows
//! its dependencies going away and coming back.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use orders::app::{Application, Components};
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// One sample line of the OpenMetrics text.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, Vec::new()),
            };
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("value"),
            }
        })
        .collect()
}

/// The sum of `name` over the series that carry every label of `with`.
fn sum(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    samples(text)
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Scrapes until `done` holds (bounded), returning the last scrape.
async fn scrape_until(
    client: &reqwest::Client,
    base: &str,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    herald_test::poll_until(what, Duration::from_secs(60), async || {
        let text = scrape(client, base).await;
        if done(&text) {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await
}

/// The metric names a dashboard's queries use (`herald_*` and `orders_*`).
fn dashboard_metrics(dashboard: &Value) -> BTreeSet<String> {
    fn walk(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    let mut token = String::new();
                    for c in expr.chars().chain(std::iter::once(' ')) {
                        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                            token.push(c);
                        } else {
                            if token.starts_with("herald_") || token.starts_with("orders_") {
                                out.insert(token.clone());
                            }
                            token.clear();
                        }
                    }
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

/// Whether the scrape exports `name` as a query writes it: counters as
/// `<base>_total`, histograms as `<base>_bucket|_count|_sum`.
fn exported(text: &str, name: &str) -> bool {
    let declared = |base: &str, kind: &str| text.contains(&format!("# TYPE {base} {kind}\n"));
    if let Some(base) = name.strip_suffix("_total") {
        return declared(base, "counter");
    }
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return declared(base, "histogram");
        }
    }
    declared(name, "gauge")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_done_and_the_dashboard_uses_only_exported_names() {
    let Some(p) = pipeline().await else { return };
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(p.create_order(&client, &valid_order()).await);
    }
    let response = client
        .post(format!("{}/orders/{}/ship", p.base, ids[0]))
        .send()
        .await
        .expect("ship");
    assert_eq!(response.status(), 200);
    // A request that matches no route is labelled as such, not by its path.
    let response = client
        .get(format!("{}/no/such/route", p.base))
        .send()
        .await
        .expect("404");
    assert_eq!(response.status(), 404);

    // 5 events: 4 created, 1 shipped. Drive until both consumers are idle.
    // The relay counts a batch after its mark commits, which may be after the
    // consumers handled it: wait for both.
    scrape_until(&client, &p.base, "both consumers to handle 5 events", |t| {
        ["projection", "notifications"].iter().all(|c| {
            sum(
                t,
                "herald_consumer_records_handled_total",
                &[("consumer", c)],
            ) == 5.0
        }) && sum(t, "herald_relay_published_total", &[]) == 5.0
    })
    .await;
    // A scrape reads the database figures (the backlog) before the
    // counters: the one that saw the last batch counted may have read the
    // backlog just before that batch's mark committed. The next scrape
    // reads it after.
    let text = scrape(&client, &p.base).await;
    for consumer in ["projection", "notifications"] {
        let with = [("consumer", consumer)];
        assert_eq!(
            sum(&text, "herald_consumer_records_consumed_total", &with),
            5.0
        );
        assert_eq!(sum(&text, "herald_consumer_retries_total", &with), 0.0);
        assert_eq!(sum(&text, "herald_consumer_in_flight_records", &with), 0.0);
        assert_eq!(
            sum(
                &text,
                "herald_consumer_handler_duration_seconds_count",
                &with
            ),
            5.0
        );
        assert_eq!(
            sum(
                &text,
                "herald_consumer_handler_duration_seconds_count",
                &[("consumer", consumer), ("event_type", "OrderCreated")]
            ),
            4.0
        );
        assert!(sum(&text, "herald_consumer_assigned_partitions", &with) > 0.0);
    }
    assert_eq!(sum(&text, "herald_relay_published_total", &[]), 5.0);
    assert_eq!(
        sum(
            &text,
            "herald_publisher_records_published_total",
            &[("publisher", "relay")]
        ),
        5.0
    );
    assert_eq!(
        sum(&text, "herald_publisher_latency_seconds_count", &[]),
        5.0
    );
    assert!(sum(&text, "herald_relay_batch_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(sum(&text, "herald_outbox_backlog", &[]), 0.0);
    assert_eq!(
        sum(
            &text,
            "orders_http_requests_total",
            &[("method", "POST"), ("route", "/orders"), ("status", "201")]
        ),
        4.0
    );
    assert_eq!(
        sum(
            &text,
            "orders_http_requests_total",
            &[("route", "/orders/{id}/ship"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &text,
            "orders_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    assert!(
        !text.contains(&ids[0]),
        "an order id became a label:\n{text}"
    );
    assert_eq!(sum(&text, "orders_post_commit_seconds_count", &[]), 4.0);
    // Each consumer's inbox holds one row per event it applied. A scrape
    // reads the database before the counters, so the scrape that saw the
    // last record handled may have counted the inbox a moment before it.
    scrape_until(&client, &p.base, "5 inbox rows per consumer group", |t| {
        let groups: Vec<Sample> = samples(t)
            .into_iter()
            .filter(|s| s.name == "herald_inbox_rows")
            .collect();
        groups.len() == 2 && groups.iter().all(|s| s.value == 5.0)
    })
    .await;
    // The fulfillment topology committed every input of both steps: the
    // SKUs step 4 × 2 reservation requests, the orders step the 4 + 1 order
    // events and the 8 answers.
    let text = scrape_until(
        &client,
        &p.base,
        "the processor to commit its inputs",
        |t| {
            sum(
                t,
                "herald_processor_inputs_committed_total",
                &[("step", "skus")],
            ) == 8.0
                && sum(
                    t,
                    "herald_processor_inputs_committed_total",
                    &[("step", "orders")],
                ) == 13.0
        },
    )
    .await;
    assert!(sum(&text, "herald_processor_transactions_committed_total", &[]) >= 1.0);
    // Lag comes from librdkafka's statistics (every 5 s): every owned
    // partition reports, and nothing is behind.
    let text = scrape_until(&client, &p.base, "lag per partition", |t| {
        ["projection", "notifications"].iter().all(|c| {
            samples(t)
                .iter()
                .filter(|s| s.name == "herald_consumer_lag")
                .filter(|s| s.labels.iter().any(|(k, v)| k == "consumer" && v == c))
                .count()
                == 3
        })
    })
    .await;
    assert_eq!(sum(&text, "herald_consumer_lag", &[]), 0.0, "{text}");

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/herald-pipeline.json"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let used = dashboard_metrics(&dashboard);
    assert!(
        used.len() >= 10,
        "the dashboard queries too little: {used:?}"
    );
    let missing: Vec<&String> = used.iter().filter(|m| !exported(&text, m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not export: {missing:?}\n{text}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_and_kafka_away_and_back() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let proxy = herald_test::FaultProxy::start(&format!(
        "{}:{}",
        db.options().get_host(),
        db.options().get_port()
    ));
    // Kafka here is librdkafka's mock cluster, whose broker this test can
    // take down and bring back; a real broker is shared with other tests.
    let (kafka_tx, kafka_rx) = std::sync::mpsc::channel::<bool>();
    let (servers_tx, servers_rx) = std::sync::mpsc::channel();
    let mock = std::thread::spawn(move || {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        servers_tx.send(cluster.bootstrap_servers()).expect("send");
        while let Ok(up) = kafka_rx.recv() {
            if up {
                cluster.broker_up(1).expect("broker up");
            } else {
                cluster.broker_down(1).expect("broker down");
            }
        }
    });
    let brokers = servers_rx.recv().expect("mock servers");

    let mut config = config_without_kafka(&db, &brokers);
    config.database = orders::app::Database::Postgres(Box::new(
        PgConnectOptions::from_str(&db.url_via(proxy.address())).expect("url"),
    ));
    let app = Application::build(
        config,
        Components {
            api: true,
            ..Components::NONE
        },
    )
    .await
    .expect("build");
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();
    let ready = |body: &Value| body["status"] == "ready";
    let url = format!("{base}/readyz");
    eventually(&client, &url, "ready at start", ready).await;

    proxy.cut();
    let body = eventually(&client, &url, "not ready without the database", |b| {
        b["status"] == "not_ready"
    })
    .await;
    assert_eq!(body["checks"]["database"], json!(false));
    proxy.restore();
    eventually(&client, &url, "ready again with the database", ready).await;

    kafka_tx.send(false).expect("down");
    let body = eventually(&client, &url, "not ready without Kafka", |b| {
        b["status"] == "not_ready"
    })
    .await;
    assert_eq!(body["checks"]["kafka"], json!(false));
    kafka_tx.send(true).expect("up");
    eventually(&client, &url, "ready again with Kafka", ready).await;
    // Liveness never depended on either.
    let health: Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");

    stop.cancel();
    task.await.expect("task").expect("ran");
    drop(kafka_tx);
    mock.join().expect("mock thread");
}

/// A relay or worker process serves only the operations routes on its
/// metrics port: `/metrics` with its own components' metrics, health and
/// readiness, and no order routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_only_operations_routes_on_its_metrics_port() {
    let Some(p) = pipeline_of(Components {
        relay: true,
        projection: true,
        ..Components::NONE
    })
    .await
    else {
        return;
    };
    let client = reqwest::Client::new();
    let text = scrape_until(&client, &p.base, "the projection assigned", |t| {
        sum(
            t,
            "herald_consumer_assigned_partitions",
            &[("consumer", "projection")],
        ) == 3.0
    })
    .await;
    assert!(
        text.contains("# TYPE herald_relay_published counter\n"),
        "{text}"
    );
    assert!(
        !text.contains("consumer=\"notifications\""),
        "only this process's components: {text}"
    );
    eventually(&client, &format!("{}/readyz", p.base), "ready", |b| {
        b["status"] == "ready" && b["checks"]["consumers"]["projection"] == "assigned"
    })
    .await;
    let response = client
        .post(format!("{}/orders", p.base))
        .json(&valid_order())
        .send()
        .await
        .expect("post");
    assert_eq!(
        response.status(),
        404,
        "no order routes on the metrics port"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "route_not_found");
    p.stop().await;
}

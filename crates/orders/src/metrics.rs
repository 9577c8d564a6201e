//! `/metrics` in the OpenMetrics text format (Prometheus scrapes it), from
//! one [`Registry`] per process: the collectors of the herald components
//! running here, the HTTP API's own figures, and database figures read at
//! scrape time. Labels are bounded: component names, topics, partitions,
//! event types, routes and status codes, never order or event ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::OutboxStatus;
use herald_kafka::metrics::{encode_counter, encode_metric, latency_histogram};
use herald_kafka::processor::ProcessorStats;
use herald_kafka::{ConsumerStats, PublisherStats, RelayStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of the HTTP request metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The request method.
    pub method: String,
    /// The matched route template (`/orders/{id}`), or `unmatched`.
    pub route: String,
    /// The response status code.
    pub status: u16,
}

/// Labels of the inbox size gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    consumer_group: String,
}

/// Figures read from the database when `/metrics` is scraped.
#[derive(Debug)]
struct DatabaseFigures {
    outbox_backlog: Gauge,
    outbox_oldest_age: Gauge<f64, AtomicU64>,
    outbox_parked: Gauge,
    inbox_rows: Family<GroupLabels, Gauge>,
    dlq_replays: AtomicU64,
}

impl Collector for DatabaseFigures {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let e = &mut encoder;
        encode_metric(
            e,
            "herald_outbox_backlog",
            "Outbox rows not yet published.",
            &self.outbox_backlog,
        )?;
        encode_metric(
            e,
            "herald_outbox_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished outbox row.",
            &self.outbox_oldest_age,
        )?;
        encode_metric(
            e,
            "herald_outbox_parked",
            "Outbox events parked after the broker refused them; their aggregates wait.",
            &self.outbox_parked,
        )?;
        encode_metric(
            e,
            "herald_inbox_rows",
            "Inbox rows retained, per consumer group.",
            &self.inbox_rows,
        )?;
        encode_counter(
            e,
            "herald_dlq_replays",
            "Dead letters replayed with `orders dlq replay` (its replay log).",
            self.dlq_replays.load(Ordering::Relaxed),
        )?;
        Ok(())
    }
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    post_commit: Histogram,
    http_requests: Family<RouteLabels, Counter>,
    http_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    database: Arc<DatabaseFigures>,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            registry: Mutex::new(Registry::default()),
            post_commit: latency_histogram(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency_histogram),
            database: Arc::new(DatabaseFigures {
                outbox_backlog: Gauge::default(),
                outbox_oldest_age: Gauge::default(),
                outbox_parked: Gauge::default(),
                inbox_rows: Family::default(),
                dlq_replays: AtomicU64::default(),
            }),
        };
        {
            let mut registry = metrics.registry();
            registry.register(
                "orders_post_commit_seconds",
                "Time from receiving POST /orders to its database commit",
                metrics.post_commit.clone(),
            );
            registry.register(
                "orders_http_requests",
                "HTTP requests served, by method, route and status",
                metrics.http_requests.clone(),
            );
            registry.register(
                "orders_http_request_duration_seconds",
                "HTTP request durations, by method, route and status",
                metrics.http_seconds.clone(),
            );
            registry.register_collector(Box::new(Arc::clone(&metrics.database)));
        }
        metrics
    }
}

impl Metrics {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a consumer's metrics under the label `consumer=<name>`.
    pub fn register_consumer(&self, name: &str, stats: Arc<ConsumerStats>) {
        self.registry()
            .sub_registry_with_label(("consumer".into(), name.to_owned().into()))
            .register_collector(Box::new(stats));
    }

    /// Adds a relay's metrics.
    pub fn register_relay(&self, stats: Arc<RelayStats>) {
        self.registry().register_collector(Box::new(stats));
    }

    /// Adds a publisher's metrics under the label `publisher=<name>`.
    pub fn register_publisher(&self, name: &str, stats: Arc<PublisherStats>) {
        self.registry()
            .sub_registry_with_label(("publisher".into(), name.to_owned().into()))
            .register_collector(Box::new(stats));
    }

    /// Adds an exactly-once processor's metrics under the label
    /// `step=<name>` (the fulfillment topology has two).
    pub fn register_processor(&self, name: &str, stats: Arc<ProcessorStats>) {
        self.registry()
            .sub_registry_with_label(("step".into(), name.to_owned().into()))
            .register_collector(Box::new(stats));
    }

    /// Records the time from receiving `POST /orders` to its commit.
    pub fn observe_commit(&self, d: Duration) {
        self.post_commit.observe(d.as_secs_f64());
    }

    /// Records one served HTTP request.
    pub fn observe_request(&self, labels: &RouteLabels, d: Duration) {
        self.http_requests.get_or_create(labels).inc();
        self.http_seconds
            .get_or_create(labels)
            .observe(d.as_secs_f64());
    }

    /// Updates the figures read from the database (kept as they were when
    /// one cannot be read).
    pub fn set_database_figures(
        &self,
        outbox: Option<&OutboxStatus>,
        inbox_rows: Option<&[(String, i64)]>,
        dlq_replays: Option<u64>,
        outbox_parked: Option<i64>,
    ) {
        let figures = &self.database;
        if let Some(parked) = outbox_parked {
            figures.outbox_parked.set(parked);
        }
        if let Some(status) = outbox {
            figures.outbox_backlog.set(status.backlog);
            figures
                .outbox_oldest_age
                .set(status.oldest_unpublished_age().as_secs_f64());
        }
        if let Some(rows) = inbox_rows {
            figures.inbox_rows.clear();
            for (group, count) in rows {
                figures
                    .inbox_rows
                    .get_or_create(&GroupLabels {
                        consumer_group: group.clone(),
                    })
                    .set(*count);
            }
        }
        if let Some(replays) = dlq_replays {
            figures.dlq_replays.store(replays, Ordering::Relaxed);
        }
    }

    /// The OpenMetrics text of everything registered.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

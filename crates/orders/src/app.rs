//! Wiring: typed configuration, and the [`Application`] that runs the API,
//! the relay and the consumers of one process with one shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use herald::RetryPolicy;
use herald_kafka::{
    Consumer, ConsumerConfig, Publisher, PublisherConfig, RecordInfo, Relay, RelayConfig, Router,
};
use herald_postgres::{Inbox, PgOutbox};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cli::SettingsArgs;
use crate::db::{self, Topics};
use crate::domain::OrderEvent;
use crate::metrics::Metrics;

/// The typed configuration of a process, checked at start-up.
#[derive(Clone)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// PostgreSQL connection (the URL itself is never kept or logged).
    pub database: PgConnectOptions,
    /// Where the API (or the ops endpoints) listen.
    pub http_addr: SocketAddr,
    /// Where relay/worker processes serve /metrics, if not `http_addr`.
    pub metrics_addr: Option<SocketAddr>,
    /// librdkafka pass-through settings.
    pub kafka_settings: Vec<(String, String)>,
    /// Topic names.
    pub topics: Topics,
    /// The fulfillment output topic.
    pub fulfillment_topic: String,
    /// The fulfillment processor's instance id.
    pub instance_id: String,
    /// Fulfillment stock settings.
    pub stock: crate::fulfillment::Stock,
    /// Inputs per fulfillment transaction.
    pub processor_batch: usize,
    /// Consumer group prefix.
    pub group_prefix: String,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Keys in parallel per consumer.
    pub concurrency: usize,
    /// Consumer retries.
    pub retry: RetryPolicy,
    /// Relay batch size.
    pub relay_batch: usize,
    /// Keep published outbox rows this long.
    pub outbox_retention: Duration,
    /// Keep inbox rows this long.
    pub inbox_retention: Duration,
    /// Connections per process.
    pub db_pool: u32,
    /// Apply migrations at start.
    pub migrate: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Settings values may hold secrets (SASL passwords): keys only.
        let keys: Vec<&str> = self
            .kafka_settings
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        f.debug_struct("Config")
            .field("brokers", &self.brokers)
            .field(
                "database",
                &format_args!(
                    "{}:{}/{}",
                    self.database.get_host(),
                    self.database.get_port(),
                    self.database.get_database().unwrap_or("")
                ),
            )
            .field("http_addr", &self.http_addr)
            .field("kafka_settings", &keys)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Checks the command line; errors name the setting.
    pub fn from_args(args: &SettingsArgs) -> anyhow::Result<Self> {
        let Some(brokers) = args.kafka_brokers.clone().filter(|b| !b.trim().is_empty()) else {
            bail!("KAFKA_BROKERS (--kafka-brokers) is not set");
        };
        let Some(url) = args
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            bail!("DATABASE_URL (--database-url) is not set");
        };
        // The parse error may quote the URL, password included: not shown.
        let database: PgConnectOptions = url.parse().map_err(|_| {
            anyhow::anyhow!("DATABASE_URL (--database-url) is not a valid postgres:// URL")
        })?;
        if args.events_topic.trim().is_empty() {
            bail!("ORDERS_EVENTS_TOPIC (--events-topic) must not be empty");
        }
        if args.instance_id.trim().is_empty() {
            bail!("ORDERS_INSTANCE_ID (--instance-id) must not be empty");
        }
        if args.fulfillment_topic.trim().is_empty() {
            bail!("ORDERS_FULFILLMENT_TOPIC (--fulfillment-topic) must not be empty");
        }
        if args.retry_initial_ms == 0 {
            bail!("ORDERS_RETRY_INITIAL_MS (--retry-initial-ms) must be at least 1");
        }
        Ok(Self {
            brokers,
            database,
            http_addr: args.http_addr,
            metrics_addr: args.metrics_addr,
            kafka_settings: args.kafka_settings.clone(),
            topics: Topics {
                events: args.events_topic.clone(),
            },
            fulfillment_topic: args.fulfillment_topic.clone(),
            instance_id: args.instance_id.clone(),
            stock: crate::fulfillment::Stock {
                out_of_stock: args
                    .out_of_stock
                    .iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                initial: args.initial_stock,
            },
            processor_batch: args.processor_batch as usize,
            group_prefix: args.group_prefix.clone(),
            partitions: args.topic_partitions,
            concurrency: args.concurrency as usize,
            retry: args.retry(),
            relay_batch: args.relay_batch as usize,
            outbox_retention: Duration::from_secs(args.outbox_retention_hours * 3600),
            inbox_retention: Duration::from_secs(args.inbox_retention_hours * 3600),
            db_pool: args.db_pool,
            migrate: true,
        })
    }

    /// A publisher with the pass-through settings.
    pub fn publisher(&self) -> anyhow::Result<Publisher> {
        Publisher::new(
            &PublisherConfig::new(&self.brokers, db::SOURCE).set_all(self.kafka_settings.clone()),
        )
        .context("creating the Kafka producer (check --kafka-setting / KAFKA_SETTINGS)")
    }

    /// A database pool (connects lazily).
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(self.db_pool)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.database.clone())
            .await
            .context("connecting to DATABASE_URL")
    }

    /// The consumer group of a worker kind.
    pub fn group(&self, kind: &str) -> String {
        format!("{}-{kind}", self.group_prefix)
    }

    fn admin_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.kafka_settings {
            config.set(k, v);
        }
        config
    }

    fn consumer(&self, kind: &str, router: Router) -> anyhow::Result<Consumer> {
        let mut config = ConsumerConfig::new(
            &self.brokers,
            self.group(kind),
            [self.topics.events.clone()],
        )
        .concurrency(self.concurrency)
        .max_in_flight(self.concurrency.max(1) * 16)
        .retry(self.retry.clone());
        for (k, v) in &self.kafka_settings {
            config = config
                .set(k.clone(), v.clone())
                .set_producer(k.clone(), v.clone());
        }
        Consumer::new(config, router).with_context(|| format!("configuring the {kind} consumer"))
    }
}

impl Config {
    /// The exactly-once fulfillment processor of this configuration.
    pub fn fulfillment_processor(
        &self,
    ) -> anyhow::Result<herald_kafka::Processor<OrderEvent, crate::fulfillment::Fulfillment>> {
        let mut config = herald_kafka::ProcessorConfig::new(
            &self.brokers,
            self.group("fulfillment"),
            [self.topics.events.clone()],
            &self.instance_id,
        )
        .source("/orders/fulfillment")
        .batch_size(self.processor_batch)
        .retry(self.retry.clone());
        for topic in crate::fulfillment::changelog_topics(&self.fulfillment_topic) {
            config = config.changelog(topic);
        }
        for (k, v) in &self.kafka_settings {
            config = config
                .set(k.clone(), v.clone())
                .set_producer(k.clone(), v.clone());
        }
        let transform =
            crate::fulfillment::Fulfillment::new(&self.fulfillment_topic, self.stock.clone());
        herald_kafka::Processor::new(config, transform)
            .context("configuring the fulfillment processor")
    }
}

/// Creates the service's topics if they do not exist.
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .admin_config()
        .create()
        .context("creating the Kafka admin client (check --kafka-setting)")?;
    let names = [
        config.topics.events.clone(),
        format!("{}.dlq", config.topics.events),
        config.fulfillment_topic.clone(),
    ];
    let changelogs = crate::fulfillment::changelog_topics(&config.fulfillment_topic);
    let mut topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, config.partitions, TopicReplication::Fixed(-1)))
        .collect();
    // The processor's state: compacted, so the latest value per key stays.
    topics.extend(changelogs.iter().map(|n| {
        NewTopic::new(n, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact")
    }));
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("creating topics (is KAFKA_BROKERS reachable?)")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Which parts run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Components {
    /// The HTTP API.
    pub api: bool,
    /// The outbox relay.
    pub relay: bool,
    /// The projection consumer.
    pub projection: bool,
    /// The notifications consumer.
    pub notifications: bool,
    /// The exactly-once fulfillment processor.
    pub processor: bool,
}

impl Components {
    /// Everything.
    pub const ALL: Components = Components {
        api: true,
        relay: true,
        projection: true,
        notifications: true,
        processor: true,
    };
    /// Nothing (add what you need).
    pub const NONE: Components = Components {
        api: false,
        relay: false,
        projection: false,
        notifications: false,
        processor: false,
    };
}

/// The running parts of one process.
pub struct Application {
    listener: TcpListener,
    config: Config,
    components: Components,
    pool: PgPool,
    publisher: Publisher,
    metrics: Arc<Metrics>,
}

fn projection_router(inbox: Inbox) -> Router {
    Router::new().handle::<OrderEvent, _>(
        "projection",
        move |event: OrderEvent, record: RecordInfo| {
            let inbox = inbox.clone();
            async move {
                let id = record.envelope.event_id;
                inbox
                    .apply(id, move |conn| {
                        Box::pin(async move { db::project(conn, &event).await })
                    })
                    .await
                    .map(|_| ())
            }
        },
    )
}

fn notifications_router(inbox: Inbox) -> Router {
    Router::new().handle::<OrderEvent, _>(
        "notifications",
        move |event: OrderEvent, record: RecordInfo| {
            let inbox = inbox.clone();
            async move {
                let id = record.envelope.event_id;
                inbox
                    .apply(id, move |conn| {
                        Box::pin(async move { db::notify(conn, &event).await })
                    })
                    .await
                    .map(|_| ())
            }
        },
    )
}

impl Application {
    /// Connects, migrates (if configured), creates topics, and binds the
    /// listening socket (port 0 picks a free one: see [`Application::port`]).
    pub async fn build(config: Config, components: Components) -> anyhow::Result<Self> {
        let pool = config.pool().await?;
        if config.migrate {
            db::migrate(&pool)
                .await
                .context("applying database migrations")?;
        }
        let publisher = config.publisher()?;
        if components.relay
            || components.projection
            || components.notifications
            || components.processor
        {
            ensure_topics(&config).await?;
        }
        let addr = if components.api {
            config.http_addr
        } else {
            config.metrics_addr.unwrap_or_else(|| {
                SocketAddr::new(
                    config.http_addr.ip(),
                    config.http_addr.port().saturating_add(1),
                )
            })
        };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr} (HTTP_ADDR / METRICS_ADDR)"))?;
        Ok(Self {
            listener,
            config,
            components,
            pool,
            publisher,
            metrics: Arc::default(),
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs until `shutdown` is cancelled, then stops the parts in order:
    /// the API stops accepting, consumers drain and commit, the relay
    /// finishes its batch.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            config,
            components,
            pool,
            publisher,
            metrics,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();

        if components.relay {
            let relay = Relay::new(
                PgOutbox::new(pool.clone()),
                publisher.clone(),
                RelayConfig {
                    batch_size: config.relay_batch,
                    ..RelayConfig::default()
                },
            );
            metrics.register_relay(relay.stats());
            let stop = shutdown.clone();
            tasks.spawn(async move {
                relay.run(stop.cancelled_owned()).await;
                Ok(())
            });
            let (pool, stop, retention) = (pool.clone(), shutdown.clone(), config.outbox_retention);
            tasks.spawn(async move {
                retention_loop(stop, || {
                    herald_postgres::outbox::purge_published(&pool, retention, 10_000)
                })
                .await;
                Ok(())
            });
        }
        let consumers = [
            (
                components.projection,
                "projection",
                projection_router as fn(Inbox) -> Router,
            ),
            (
                components.notifications,
                "notifications",
                notifications_router,
            ),
        ];
        for (enabled, kind, router) in consumers {
            if !enabled {
                continue;
            }
            let inbox = Inbox::batched(
                pool.clone(),
                config.group(kind),
                config.concurrency,
                Duration::from_millis(2),
            );
            let consumer = config.consumer(kind, router(inbox))?;
            metrics.register_consumer(kind, consumer.stats());
            let stop = shutdown.clone();
            tasks.spawn(async move {
                consumer
                    .run(stop.cancelled_owned())
                    .await
                    .with_context(|| format!("the {kind} consumer"))
            });
        }
        if components.processor {
            let processor = config.fulfillment_processor()?;
            metrics.register_processor(processor.stats());
            let stop = shutdown.clone();
            tasks.spawn(async move {
                processor
                    .run(stop.cancelled_owned())
                    .await
                    .context("the fulfillment processor")
            });
        }
        if components.projection || components.notifications {
            let (pool, stop, retention) = (pool.clone(), shutdown.clone(), config.inbox_retention);
            tasks.spawn(async move {
                retention_loop(stop, || {
                    herald_postgres::inbox::purge_processed(&pool, retention, 10_000)
                })
                .await;
                Ok(())
            });
        }

        let state = AppState {
            pool: pool.clone(),
            topics: config.topics.clone(),
            kafka: Some(publisher.clone()),
            metrics,
        };
        let app = if components.api {
            api::router(state)
        } else {
            api::ops_router(state)
        };
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .context("serving HTTP")
        });

        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.context("a task panicked").and_then(|r| r);
            if let Err(error) = result {
                tracing::error!(
                    error = format!("{error:#}"),
                    "component failed; shutting down"
                );
                shutdown.cancel();
                first_error.get_or_insert(error);
            }
        }
        let _ = publisher.flush(Duration::from_secs(5));
        pool.close().await;
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Runs `purge` every minute until `stop`, draining in batches.
async fn retention_loop<F, Fut>(stop: CancellationToken, purge: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, herald_postgres::StoreError>>,
{
    loop {
        loop {
            match purge().await {
                Ok(n) if n >= 10_000 => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "retention purge failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

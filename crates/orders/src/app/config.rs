//! The typed configuration of a process, read once from the command line
//! and the environment and checked at start-up (errors name the setting),
//! and the clients it makes: the pool, the store, the publisher, the
//! consumers and the fulfillment processor.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use herald::RetryPolicy;
use herald_kafka::{
    Consumer, ConsumerConfig, Delivery, ExactlyOnceConfig, Publisher, PublisherConfig, Router,
};
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::api::auth::AuthConfig;
use crate::cli::SettingsArgs;
use crate::domain::{Topics, SOURCE};
use crate::store::Store;

/// The typed configuration of a process, checked at start-up.
#[derive(Clone)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The database (a PostgreSQL URL is never kept as text or logged).
    pub database: Database,
    /// The embedded development mode: SQLite and librdkafka's in-process
    /// mock cluster, started by [`Application::build`] (which fills in
    /// `brokers`).
    pub embedded: bool,
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
    /// Replication of created topics, and what every topic of the service
    /// must have at start-up (default: the cluster's).
    pub topic_durability: herald_kafka::TopicDurability,
    /// Keys in parallel per consumer.
    pub concurrency: usize,
    /// Consumer retries.
    pub retry: RetryPolicy,
    /// Relay batch size.
    pub relay_batch: usize,
    /// How the relay publishes (at least once in the embedded mode).
    pub delivery: Delivery,
    /// Keep published outbox rows this long.
    pub outbox_retention: Duration,
    /// Keep inbox rows this long.
    pub inbox_retention: Duration,
    /// Connections per process.
    pub db_pool: u32,
    /// Apply migrations at start.
    pub migrate: bool,
    /// How the API authenticates callers (checked when the process serves
    /// the API).
    pub auth: AuthConfig,
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
                &match &self.database {
                    Database::Postgres(o) => format!(
                        "postgres {}:{}/{}",
                        o.get_host(),
                        o.get_port(),
                        o.get_database().unwrap_or("")
                    ),
                    Database::Sqlite(path) => format!("sqlite {}", path.display()),
                },
            )
            .field("http_addr", &self.http_addr)
            .field("kafka_settings", &keys)
            .field("topics", &self.topics)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Which database a process uses.
#[derive(Clone)]
pub enum Database {
    /// PostgreSQL (production).
    Postgres(Box<PgConnectOptions>),
    /// A SQLite file (the embedded development mode).
    Sqlite(std::path::PathBuf),
}

impl Config {
    /// Checks the command line; errors name the setting. With neither
    /// KAFKA_BROKERS nor DATABASE_URL set, the embedded development mode.
    pub fn from_args(args: &SettingsArgs) -> anyhow::Result<Self> {
        let brokers = args.kafka_brokers.clone().filter(|b| !b.trim().is_empty());
        let url = args
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty());
        let (brokers, database, embedded) = match (brokers, url) {
            (None, None) => (
                String::new(),
                Database::Sqlite(args.data_dir.join("orders.sqlite")),
                true,
            ),
            (Some(brokers), Some(url)) => {
                // The parse error may quote the URL, password included: not shown.
                let options: PgConnectOptions = url.parse().map_err(|_| {
                    anyhow::anyhow!("DATABASE_URL (--database-url) is not a valid postgres:// URL")
                })?;
                (brokers, Database::Postgres(Box::new(options)), false)
            }
            (Some(_), None) => bail!(
                "KAFKA_BROKERS is set but DATABASE_URL (--database-url) is not: set both, or neither for the embedded development mode"
            ),
            (None, Some(_)) => bail!(
                "DATABASE_URL is set but KAFKA_BROKERS (--kafka-brokers) is not: set both, or neither for the embedded development mode"
            ),
        };
        if args.events_topic.trim().is_empty() {
            bail!("ORDERS_EVENTS_TOPIC (--events-topic) must not be empty");
        }
        if args.instance_id.trim().is_empty() {
            bail!("ORDERS_INSTANCE_ID (--instance-id) must not be empty");
        }
        if args.fulfillment_topic.trim().is_empty() {
            bail!("ORDERS_FULFILLMENT_TOPIC (--fulfillment-topic) must not be empty");
        }
        let delivery = match (args.delivery, embedded) {
            (Some(Delivery::ExactlyOnce), true) => bail!(
                "ORDERS_DELIVERY (--delivery) exactly-once needs a real Kafka broker: the embedded \
                 mode's mock cluster has no transactions (set KAFKA_BROKERS and DATABASE_URL)"
            ),
            (_, true) => Delivery::AtLeastOnce,
            (chosen, false) => chosen.unwrap_or_default(),
        };
        if args.retry_initial_ms == 0 {
            bail!("ORDERS_RETRY_INITIAL_MS (--retry-initial-ms) must be at least 1");
        }
        let topic_durability = topic_durability(
            args.topic_replication_factor,
            args.topic_min_insync_replicas,
        )?;
        Ok(Self {
            brokers,
            database,
            embedded,
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
            topic_durability,
            concurrency: args.consumer_concurrency as usize,
            retry: args.retry(),
            relay_batch: args.relay_batch as usize,
            delivery,
            outbox_retention: Duration::from_secs(args.outbox_retention_hours * 3600),
            inbox_retention: Duration::from_secs(args.inbox_retention_hours * 3600),
            db_pool: args.db_pool,
            migrate: true,
            auth: AuthConfig::from_args(&args.auth, embedded)?,
        })
    }

    /// The publisher's configuration, with the pass-through settings.
    pub fn publisher_config(&self) -> PublisherConfig {
        PublisherConfig::new(&self.brokers, SOURCE).set_all(self.kafka_settings.clone())
    }

    /// A publisher with the pass-through settings.
    pub fn publisher(&self) -> anyhow::Result<Publisher> {
        Publisher::new(&self.publisher_config())
            .context("creating the Kafka producer (check --kafka-setting / KAFKA_SETTINGS)")
    }

    /// A PostgreSQL pool; an error in the embedded mode (this command needs
    /// DATABASE_URL).
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        let Database::Postgres(options) = &self.database else {
            bail!("this command needs DATABASE_URL and KAFKA_BROKERS (the embedded mode keeps no shared database)");
        };
        PgPoolOptions::new()
            .max_connections(self.db_pool)
            // Below the API's request timeout (10 s), so that a database
            // that is away answers 503 with Retry-After, not 408.
            .acquire_timeout(Duration::from_secs(5))
            .connect_with((**options).clone())
            .await
            .map_err(|error| {
                // The URL's TLS parameters decide a failed handshake.
                // rustls's verdict on a certificate comes back as an I/O error.
                let tls = matches!(error, sqlx::Error::Tls(_))
                    || error.to_string().contains("certificate");
                let what = if tls {
                    "connecting to DATABASE_URL (the TLS handshake failed: check its sslmode \
                     and sslrootcert, and the server certificate's name)"
                } else {
                    "connecting to DATABASE_URL"
                };
                anyhow::Error::new(error).context(what)
            })
    }

    /// The store: PostgreSQL, or the embedded mode's SQLite file (created
    /// with its folder when missing). Migrations run when `migrate` is set.
    pub async fn store(&self) -> anyhow::Result<Store> {
        match &self.database {
            Database::Postgres(_) => {
                let pool = self.pool().await?;
                if self.migrate {
                    crate::store::postgres::migrate(&pool)
                        .await
                        .context("applying database migrations")?;
                }
                Ok(Store::Postgres(pool))
            }
            Database::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).with_context(|| {
                        format!(
                            "creating the data folder {} (ORDERS_DATA_DIR / --data-dir)",
                            dir.display()
                        )
                    })?;
                }
                let database = herald_sqlite::SqliteConfig::new(path)
                    .open()
                    .await
                    .with_context(|| {
                        format!("opening {} (ORDERS_DATA_DIR / --data-dir)", path.display())
                    })?;
                if self.migrate {
                    crate::store::sqlite::migrate(database.pool())
                        .await
                        .context("applying the SQLite migrations")?;
                }
                Ok(Store::Sqlite(database))
            }
        }
    }

    /// The exactly-once relay's identity: transactional ids
    /// `<group prefix>-relay-<slot>` and the checkpoint topic `<group
    /// prefix>-relay-checkpoints`, one pair per deployment (per outbox).
    pub fn relay_exactly_once(&self) -> ExactlyOnceConfig {
        ExactlyOnceConfig {
            transactional_id_prefix: format!("{}-relay", self.group_prefix),
            checkpoint_topic: format!("{}-relay-checkpoints", self.group_prefix),
            topic_durability: self.topic_durability,
            ..ExactlyOnceConfig::default()
        }
    }

    /// The consumer group of a worker kind.
    pub fn group(&self, kind: &str) -> String {
        format!("{}-{kind}", self.group_prefix)
    }

    /// A librdkafka configuration of the brokers with the pass-through
    /// settings, for admin clients and the command-line readers.
    pub fn kafka_client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.kafka_settings {
            config.set(k, v);
        }
        config
    }

    /// The consumer of worker kind `kind`, handling with `router`.
    pub(super) fn consumer(&self, kind: &str, router: Router) -> anyhow::Result<Consumer> {
        let mut config = ConsumerConfig::new(
            &self.brokers,
            self.group(kind),
            [self.topics.events.clone()],
        )
        .concurrency(self.concurrency)
        .max_in_flight(self.concurrency.max(1) * 16)
        .retry(self.retry.clone())
        .topic_durability(self.topic_durability);
        for (k, v) in &self.kafka_settings {
            config = config
                .set(k.clone(), v.clone())
                .set_producer(k.clone(), v.clone());
        }
        Consumer::new(config, router).with_context(|| format!("configuring the {kind} consumer"))
    }
}

/// The durability of the service's topics from ORDERS_TOPIC_REPLICATION_FACTOR
/// and ORDERS_TOPIC_MIN_INSYNC_REPLICAS (each `None`: the cluster's).
pub(super) fn topic_durability(
    replication_factor: Option<u16>,
    min_insync_replicas: Option<u16>,
) -> anyhow::Result<herald_kafka::TopicDurability> {
    if let (Some(replicas), Some(min_insync)) = (replication_factor, min_insync_replicas) {
        // Every acks=all write would be refused: the relay could publish nothing.
        if min_insync > replicas {
            bail!(
                "ORDERS_TOPIC_MIN_INSYNC_REPLICAS (--topic-min-insync-replicas) is {min_insync}, \
                 more than ORDERS_TOPIC_REPLICATION_FACTOR (--topic-replication-factor) {replicas}: \
                 no write could be acknowledged"
            );
        }
    }
    let durability = herald_kafka::TopicDurability::cluster_default()
        .replication_factor(replication_factor)
        .min_insync_replicas(min_insync_replicas);
    durability
        .validate()
        .context("ORDERS_TOPIC_REPLICATION_FACTOR / ORDERS_TOPIC_MIN_INSYNC_REPLICAS")?;
    Ok(durability)
}

impl Config {
    /// The fulfillment topology of this configuration: its two exactly-once
    /// processors, with state partitioned like their inputs so that any
    /// number of instances (distinct `--instance-id`s) share the work.
    pub fn fulfillment_processor(&self) -> anyhow::Result<crate::fulfillment::Topology> {
        let topics = crate::fulfillment::Topics::of(&self.fulfillment_topic);
        let orders = self
            .fulfillment_step(
                "fulfillment",
                [self.topics.events.clone(), topics.sku_answers.clone()],
                &topics.order_state,
            )
            // An order event the outbox relay published twice (at least
            // once, or an older relay) gets one fulfillment outcome.
            .deduplication(Some(herald_kafka::processor::Deduplication {
                topic: Some(topics.order_completed.clone()),
                ..herald_kafka::processor::Deduplication::default()
            }));
        // Its inputs come from a transactional producer only: no duplicates.
        let skus = self
            .fulfillment_step(
                "fulfillment-skus",
                [topics.sku_requests.clone()],
                &topics.sku_stock,
            )
            .deduplication(None);
        Ok(crate::fulfillment::Topology {
            orders: herald_kafka::Processor::new(
                orders,
                crate::fulfillment::OrderStep::new(&topics),
            )
            .context("configuring the fulfillment orders step")?,
            skus: herald_kafka::Processor::new(
                skus,
                crate::fulfillment::SkuStep::new(&topics, self.stock.clone()),
            )
            .context("configuring the fulfillment SKUs step")?,
        })
    }

    /// The settings both fulfillment steps share.
    fn fulfillment_step(
        &self,
        group: &str,
        inputs: impl IntoIterator<Item = String>,
        changelog: &str,
    ) -> herald_kafka::ProcessorConfig {
        let mut config = herald_kafka::ProcessorConfig::new(
            &self.brokers,
            self.group(group),
            inputs,
            &self.instance_id,
        )
        .source(format!("/orders/{group}"))
        .batch_size(self.processor_batch)
        .retry(self.retry.clone())
        .topic_durability(self.topic_durability)
        .changelog(changelog)
        .partitioned_state(true);
        for (k, v) in &self.kafka_settings {
            config = config
                .set(k.clone(), v.clone())
                .set_producer(k.clone(), v.clone());
        }
        config
    }
}

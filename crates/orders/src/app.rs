//! Wiring: typed configuration, and the [`Application`] that runs the API,
//! the relay and the consumers of one process with one shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use herald::RetryPolicy;
use herald_kafka::{
    Consumer, ConsumerConfig, Delivery, ExactlyOnceConfig, Publisher, PublisherConfig, Relay,
    RelayConfig, Router, TransactionalRelay,
};
use herald_postgres::PgOutbox;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::auth::{Auth, AuthConfig};
use crate::api::{self, AppState};
use crate::cli::SettingsArgs;
use crate::domain::OrderEvent;
use crate::domain::{Topics, SOURCE};
use crate::metrics::Metrics;
use crate::store::{Effect, Store};
use crate::supervisor::{single_active, supervise, Health};

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
        // An order event the outbox relay published twice (at least once,
        // or an older relay) gets one fulfillment outcome.
        config = config.deduplication(Some(herald_kafka::processor::Deduplication {
            topic: Some(crate::fulfillment::completed_topic(&self.fulfillment_topic)),
            ..herald_kafka::processor::Deduplication::default()
        }));
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

/// The topics that keep state: the fulfillment processor's two changelogs
/// and its completed ids, and the consumers' parked-key table. Compacted,
/// one partition each.
fn state_topics(config: &Config) -> [String; 4] {
    let [stock, reservations] = crate::fulfillment::changelog_topics(&config.fulfillment_topic);
    [
        stock,
        reservations,
        crate::fulfillment::completed_topic(&config.fulfillment_topic),
        herald_kafka::parking::DEFAULT_PARKED_TOPIC.to_owned(),
    ]
}

/// The service's topics with their partitions, the processor's state last.
fn topic_plan(config: &Config) -> Vec<(String, i32)> {
    let mut plan = vec![
        (config.topics.events.clone(), config.partitions),
        (format!("{}.dlq", config.topics.events), config.partitions),
        (config.fulfillment_topic.clone(), config.partitions),
    ];
    plan.extend(state_topics(config).map(|topic| (topic, 1)));
    plan
}

/// How long the start-up of a process that needs Kafka waits for a broker
/// to answer.
const KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an API alone waits: it does not need Kafka to take orders, so
/// it waits only long enough to catch a bad setting.
const API_KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks that the Kafka settings reach the cluster, so that a wrong
/// password, CA or security protocol fails the start-up naming the setting
/// to fix. A cluster that is only away fails just the processes that need
/// it now: an API alone keeps taking orders into the outbox.
async fn check_kafka(config: &Config, required: bool) -> anyhow::Result<()> {
    let timeout = if required {
        KAFKA_CHECK_TIMEOUT
    } else {
        API_KAFKA_CHECK_TIMEOUT
    };
    match herald_kafka::check_cluster(&config.kafka_client_config(), timeout).await {
        Ok(()) => Ok(()),
        Err(error) if required || error.is_configuration() => Err(anyhow::Error::new(error)
            .context("connecting to KAFKA_BROKERS (--kafka-brokers) with the --kafka-setting / KAFKA_SETTINGS values")),
        Err(error) => {
            tracing::warn!(error = %error, "Kafka is not reachable now; the API keeps taking orders into the outbox");
            Ok(())
        }
    }
}

/// Creates the service's topics if they do not exist.
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .kafka_client_config()
        .create()
        .context("creating the Kafka admin client (check --kafka-setting)")?;
    let plan = topic_plan(config);
    let compacted = state_topics(config);
    let topics: Vec<NewTopic> = plan
        .iter()
        .map(|(name, partitions)| {
            let topic = NewTopic::new(name, *partitions, TopicReplication::Fixed(-1));
            // State: compacted, so the latest value per key stays.
            if compacted.contains(name) {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
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
    store: Store,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    /// The embedded mode's in-process Kafka; dropped after everything else.
    mock_cluster: Option<EmbeddedKafka>,
    /// The API's authentication.
    auth: Auth,
    /// An API process's `--metrics-addr` listener (its /metrics is then
    /// served there, not on the public port).
    metrics_listener: Option<TcpListener>,
}

/// librdkafka's in-process mock cluster, kept on a thread of its own (the
/// handle is not `Send`); it stops when this value drops.
pub struct EmbeddedKafka {
    bootstrap_servers: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedKafka {
    /// Starts a one-broker mock cluster with `topics` (name, partitions).
    pub fn start(topics: Vec<(String, i32)>) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".to_owned())
            .spawn(move || {
                match rdkafka::mocking::MockCluster::new(1) {
                    Ok(cluster) => {
                        // The mock has no admin API worth the name: create
                        // the topics on the cluster itself.
                        for (topic, partitions) in &topics {
                            if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                        let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                        // Until the application drops its handle.
                        let _ = stopped.recv();
                        drop(cluster);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the embedded Kafka thread")?;
        let bootstrap_servers = ready_rx
            .recv()
            .context("the embedded Kafka thread died")?
            .context("starting librdkafka's in-process mock cluster")?;
        Ok(Self {
            bootstrap_servers,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The banner of an API on real services without authentication.
fn no_auth_banner(config: &Config, port: u16) -> String {
    format!(
        "\n  ================================================================\n  \
         orders: AUTHENTICATION IS OFF (--auth none / ORDERS_AUTH=none)\n  \
         api       http://{ip}:{port}\n  \
         Anyone who reaches this port may place, read, cancel and ship\n  \
         any customer's orders. Set ORDERS_JWT_SECRET (--jwt-secret) or\n  \
         ORDERS_JWT_PUBLIC_KEY (--jwt-public-key) and drop --auth none.\n  \
         ================================================================\n",
        ip = config.http_addr.ip(),
    )
}

/// The development-mode banner: what runs where, and that it is not for
/// production.
fn banner(config: &Config, port: u16) -> String {
    let database = match &config.database {
        Database::Sqlite(path) => path.display().to_string(),
        Database::Postgres(_) => "PostgreSQL".to_owned(),
    };
    format!(
        "\n  ================================================================\n  \
         orders: DEVELOPMENT MODE (embedded, nothing configured)\n  \
         database  SQLite file {database}\n  \
         kafka     librdkafka's in-process mock cluster at {brokers}\n  \
         api       http://{ip}:{port}  (try POST /orders, then GET /orders/{{id}})\n  \
         Not for production: Kafka lives and dies with this process, and\n  \
         the fulfillment step's exactly-once guarantee is NOT in force.\n  \
         The relay runs at-least-once (the mock cluster has no\n  \
         transactions): a crash can publish an event twice.\n  \
         Set KAFKA_BROKERS and DATABASE_URL to run on real services.\n  \
         ================================================================\n",
        brokers = config.brokers,
        ip = config.http_addr.ip(),
    )
}

impl Application {
    /// Connects (or, in the embedded mode, starts SQLite and the mock
    /// cluster), migrates (if configured), creates topics, and binds the
    /// listening socket (port 0 picks a free one: see [`Application::port`]).
    pub async fn build(mut config: Config, components: Components) -> anyhow::Result<Self> {
        // First: a missing or bad key fails the start-up before connecting.
        let auth = if components.api {
            config.auth.build()?
        } else {
            Auth::None
        };
        let mock_cluster = if config.embedded {
            let kafka = EmbeddedKafka::start(topic_plan(&config))?;
            config.brokers = kafka.bootstrap_servers().to_owned();
            Some(kafka)
        } else {
            None
        };
        let store = config.store().await?;
        let publisher = config.publisher()?;
        let needs_topics = components.relay
            || components.projection
            || components.notifications
            || components.processor;
        if !config.embedded {
            check_kafka(&config, needs_topics).await?;
            if needs_topics {
                ensure_topics(&config).await?;
            }
            if components.relay {
                let topic = config.topics.events.as_str();
                herald_kafka::check_record_limits(
                    &config.publisher_config(),
                    &[topic],
                    KAFKA_CHECK_TIMEOUT,
                )
                .await
                .with_context(|| {
                    format!(
                        "checking that {topic} takes the relay's record batches \
                         (--kafka-setting message.max.bytes / batch.size)"
                    )
                })?;
            }
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
        // Off the public port, so that it can be kept from the callers.
        let metrics_listener = match (components.api, config.metrics_addr) {
            (true, Some(addr)) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr} (METRICS_ADDR / --metrics-addr)"))?,
            ),
            _ => None,
        };
        if config.embedded {
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            println!("{}", banner(&config, port));
            tracing::warn!("embedded development mode: not for production");
        } else if components.api && matches!(auth, Auth::None) {
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            println!("{}", no_auth_banner(&config, port));
            tracing::warn!("authentication is off (--auth none): anyone may act as any customer");
        }
        Ok(Self {
            listener,
            config,
            components,
            store,
            publisher,
            metrics: Arc::default(),
            mock_cluster,
            auth,
            metrics_listener,
        })
    }

    /// The `--metrics-addr` port of an API process given one.
    pub fn metrics_port(&self) -> Option<u16> {
        let listener = self.metrics_listener.as_ref()?;
        listener.local_addr().ok().map(|a| a.port())
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The Kafka bootstrap servers in use (the mock cluster's in the
    /// embedded mode).
    pub fn brokers(&self) -> &str {
        &self.config.brokers
    }

    /// Runs until `shutdown` is cancelled, then stops the parts in order:
    /// the API stops accepting, consumers drain and commit, the relay
    /// finishes its batch.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            config,
            components,
            store,
            publisher,
            metrics,
            mock_cluster,
            auth,
            metrics_listener,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();
        let mut consumers = Vec::new();
        let health = Health::default();
        let relay_config = RelayConfig {
            batch_size: config.relay_batch,
            ..RelayConfig::default()
        };

        if components.relay {
            let stop = shutdown.clone().cancelled_owned();
            let relay: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                match &store {
                    Store::Postgres(pool) if config.delivery == Delivery::ExactlyOnce => {
                        let relay = TransactionalRelay::new(
                            PgOutbox::new(pool.clone()),
                            &config.publisher_config(),
                            relay_config,
                            config.relay_exactly_once(),
                        )
                        .await
                        .context(
                            "starting the exactly-once relay (ORDERS_DELIVERY / --delivery; \
                             check --kafka-setting)",
                        )?;
                        metrics.register_publisher("relay", relay.publisher_stats());
                        metrics.register_relay(relay.stats());
                        Box::pin(relay.run(stop))
                    }
                    Store::Postgres(pool) => {
                        let relay = Relay::new(
                            PgOutbox::new(pool.clone()),
                            publisher.clone(),
                            relay_config,
                        );
                        metrics.register_publisher("relay", publisher.stats());
                        metrics.register_relay(relay.stats());
                        Box::pin(relay.run(stop))
                    }
                    Store::Sqlite(database) => {
                        let relay = Relay::new(database.outbox(), publisher.clone(), relay_config);
                        metrics.register_publisher("relay", publisher.stats());
                        metrics.register_relay(relay.stats());
                        Box::pin(relay.run(stop))
                    }
                };
            tasks.spawn(async move {
                relay.await;
                Ok(())
            });
            if let Store::Postgres(pool) = &store {
                let (pool, stop, retention) =
                    (pool.clone(), shutdown.clone(), config.outbox_retention);
                tasks.spawn(async move {
                    retention_loop(stop, || {
                        herald_postgres::outbox::purge_published(&pool, retention, 10_000)
                    })
                    .await;
                    Ok(())
                });
            }
        }
        for (enabled, kind) in [
            (components.projection, Effect::Projection),
            (components.notifications, Effect::Notifications),
        ] {
            if !enabled {
                continue;
            }
            let router = store.consumer_router(kind, config.group(kind.name()));
            // Made once here, so that bad configuration fails the start-up.
            let first = config.consumer(kind.name(), router)?;
            let stats = first.stats();
            metrics.register_consumer(kind.name(), Arc::clone(&stats));
            consumers.push((kind.name().to_owned(), Arc::clone(&stats)));
            let (stop, health) = (shutdown.clone(), health.clone());
            let (store, config) = (store.clone(), config.clone());
            let mut first = Some(first);
            tasks.spawn(async move {
                supervise(kind.name(), health, stop.clone(), move || {
                    let consumer = match first.take() {
                        Some(consumer) => consumer,
                        None => {
                            let router = store.consumer_router(kind, config.group(kind.name()));
                            config
                                .consumer(kind.name(), router)?
                                .with_stats(Arc::clone(&stats))
                        }
                    };
                    let stop = stop.clone();
                    Ok(async move {
                        consumer
                            .run(stop.cancelled_owned())
                            .await
                            .with_context(|| format!("the {} consumer", kind.name()))
                    })
                })
                .await
            });
        }
        if components.processor {
            if config.embedded {
                tracing::warn!(
                    "fulfillment processor on librdkafka's mock cluster: exactly-once is NOT in force \
                     (the mock accepts transactions without their semantics)"
                );
            }
            // Made once here, so that bad configuration fails the start-up.
            let first = config.fulfillment_processor()?;
            let stats = first.stats();
            metrics.register_processor(Arc::clone(&stats));
            let (stop, health, config) = (shutdown.clone(), health.clone(), config.clone());
            let pool = store.postgres().cloned();
            let mut first = Some(first);
            tasks.spawn(async move {
                // The processor starts itself again after a broker outage;
                // what it gives up on (fenced by a newer instance, a panic)
                // is made anew here, with backoff.
                supervise("fulfillment", health.clone(), stop.clone(), move || {
                    let processor = match first.take() {
                        Some(processor) => processor,
                        None => config
                            .fulfillment_processor()?
                            .with_stats(Arc::clone(&stats)),
                    };
                    let (stop, health, pool) = (stop.clone(), health.clone(), pool.clone());
                    let lock = format!("orders-fulfillment {}", processor.transactional_id());
                    Ok(async move {
                        // One active instance per transactional id: a second
                        // process started against the same database stands by.
                        let _held = match &pool {
                            Some(pool) => {
                                match single_active(pool, &lock, "fulfillment", &health, &stop)
                                    .await?
                                {
                                    Some(conn) => Some(conn),
                                    None => return Ok(()),
                                }
                            }
                            None => None,
                        };
                        health.running("fulfillment");
                        processor
                            .run(stop.cancelled_owned())
                            .await
                            .context("the fulfillment processor")
                    })
                })
                .await
            });
        }
        if let (true, Store::Postgres(pool)) =
            (components.projection || components.notifications, &store)
        {
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
            store: store.clone(),
            topics: config.topics.clone(),
            kafka: Some(publisher.clone()),
            metrics,
            consumers,
            health,
            auth,
        };
        // Only an API process has a metrics listener of its own.
        let app = match &metrics_listener {
            Some(_) => api::router_without_metrics(state.clone()),
            None if components.api => api::router(state.clone()),
            None => api::ops_router(state.clone()),
        };
        if let Some(listener) = metrics_listener {
            let (ops, stop) = (api::ops_router(state), shutdown.clone());
            tasks.spawn(async move {
                axum::serve(listener, ops)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .context("serving the metrics port (METRICS_ADDR)")
            });
        }
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
        store.close().await;
        drop(mock_cluster);
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

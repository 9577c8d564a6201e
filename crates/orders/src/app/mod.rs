//! Wiring: typed configuration, and the [`Application`] that runs the API,
//! the relay and the consumers of one process with one shutdown signal.
//!
//! # Layout
//! - [`config`]: [`Config`], read from the command line and checked at
//!   start-up, and the clients it makes.
//! - [`kafka`]: the service's topics ([`ensure_topics`]) and the start-up
//!   check of the cluster.
//! - [`embedded`]: [`EmbeddedKafka`], the development mode's in-process
//!   mock cluster.
//! - this file: which [`Components`] run, and the [`Application`] that
//!   builds and supervises them.

pub mod config;
pub mod embedded;
pub mod kafka;

pub use config::{Config, Database};
pub use embedded::EmbeddedKafka;
pub use kafka::ensure_topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_kafka::{Delivery, Publisher, Relay, RelayConfig, TransactionalRelay};
use herald_postgres::PgOutbox;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::kafka::{check_kafka, topic_plan, KAFKA_CHECK_TIMEOUT};
use crate::api::auth::Auth;
use crate::api::{self, AppState};
use crate::metrics::Metrics;
use crate::store::{Effect, Store};
use crate::supervisor::{single_active, supervise, Health};

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
            for (step, stats) in ["orders", "skus"].into_iter().zip(&stats) {
                metrics.register_processor(step, Arc::clone(stats));
            }
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
                        None => config.fulfillment_processor()?.with_stats(stats.clone()),
                    };
                    let (stop, health, pool) = (stop.clone(), health.clone(), pool.clone());
                    let lock = format!("orders-fulfillment {}", processor.transactional_id());
                    Ok(async move {
                        // One active process per instance id (its
                        // transactional ids): a second one started against
                        // the same database stands by. Distinct ids share
                        // the work.
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

//! Test support for herald's own test suites: access to the real Kafka broker
//! and PostgreSQL server that `scripts/services.sh up` starts, with a random
//! topic and a fresh database per test so tests run in parallel and leave
//! nothing behind.
//!
//! A test that needs a service asks for it first:
//!
//! ```no_run
//! # async fn t() {
//! let Some(kafka) = herald_test::kafka() else { return };
//! let topic = kafka.topic("smoke", 3).await;
//! # }
//! ```
//!
//! When the service is unreachable the test is skipped with a loud message,
//! unless `CI` is set: then it fails, because CI must never skip silently.
//!
//! This crate reads `KAFKA_BROKERS`, `DATABASE_URL`, the `--secure`
//! endpoints ([`secure`]), `HERALD_FAULT_SEED` and `CI`: it is test
//! support, never a dependency of the libraries themselves.
//!
//! # Layout
//! - [`events`]: the `Step` / `TestEvent` family the tests send.
//! - [`kafka`] / [`Kafka`]: brokers, random topics ([`TestTopic`]), client configs.
//! - [`postgres`] / [`Postgres`]: fresh databases ([`TestDatabase`]).
//! - [`private`]: a Kafka broker and a PostgreSQL cluster of one test's
//!   own, to kill, pause and start again.
//! - [`cluster`]: a three-node replicated Kafka cluster of one test's own,
//!   whose partition leaders can be killed and whose nodes can be
//!   restarted one by one.
//! - [`faults`]: a seeded fault [`faults::Schedule`] (`HERALD_FAULT_SEED`
//!   replays it) and the [`faults::Timeline`] a failing run prints.
//! - [`handler_faults`]: panics, hangs and failures injected into your own
//!   handler, per key.
//! - [`churn`]: consumer-group churn, a [`churn::GhostMember`] that takes
//!   partitions from your members and gives them back.
//! - [`invariants`]: the checker of a fault run: lost, duplicated and
//!   misordered events, and dead letters with their bytes.
//! - [`proxy`] / [`FaultProxy`]: a TCP proxy whose connections can be cut,
//!   reset, black-holed or delayed.

pub mod churn;
pub mod cluster;
pub mod events;
pub mod faults;
pub mod handler_faults;
pub mod invariants;
pub mod private;
pub mod proxy;

pub use proxy::FaultProxy;

use std::net::{TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// A free TCP port on 127.0.0.1 (nothing holds it once this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The last `lines` lines of the text file at `path` (empty when it cannot
/// be read): for a failure to show what a server or service was doing.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Asks every child to stop (SIGTERM: the graceful path production runs),
/// then waits up to `limit` for them all and kills those still running.
/// Returns how each ended, in order.
pub fn stop_gracefully(
    children: &mut [std::process::Child],
    limit: Duration,
) -> Vec<Option<std::process::ExitStatus>> {
    for child in children.iter() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    let deadline = std::time::Instant::now() + limit;
    children
        .iter_mut()
        .map(|child| {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            child.wait().ok()
        })
        .collect()
}

/// Default broker address, as printed by `scripts/services.sh up`.
pub const DEFAULT_KAFKA_BROKERS: &str = "127.0.0.1:9092";
/// Default database URL, as printed by `scripts/services.sh up`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://herald:herald@127.0.0.1:5432/herald";

/// A name unique to this test run: `<prefix>-<random>`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn reachable(addresses: &str) -> bool {
    addresses.split(',').any(|address| {
        address
            .trim()
            .to_socket_addrs()
            .map(|mut addrs| {
                addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
            })
            .unwrap_or(false)
    })
}

fn unavailable(service: &str, variable: &str, value: &str) {
    let message = format!(
        "{service} is not reachable at {variable}={value}; start it with `scripts/services.sh up`"
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI is set, so tests never skip: {message}");
    }
    eprintln!("\n*** SKIPPED: {message} ***\n");
}

/// The real Kafka broker, or `None` (after a loud message) when it is not
/// running and `CI` is not set.
pub fn kafka() -> Option<Kafka> {
    let brokers =
        std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| DEFAULT_KAFKA_BROKERS.to_owned());
    if reachable(&brokers) {
        Some(Kafka { brokers })
    } else {
        unavailable("Kafka", "KAFKA_BROKERS", &brokers);
        None
    }
}

/// The real PostgreSQL server, or `None` (after a loud message) when it is
/// not running and `CI` is not set.
pub fn postgres() -> Option<Postgres> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let postgres = Postgres::at(&url)
        .unwrap_or_else(|e| panic!("DATABASE_URL={url:?} is not a PostgreSQL URL: {e}"));
    let address = format!(
        "{}:{}",
        postgres.options.get_host(),
        postgres.options.get_port()
    );
    if reachable(&address) {
        Some(postgres)
    } else {
        unavailable("PostgreSQL", "DATABASE_URL", &url);
        None
    }
}

/// The secured services of `scripts/services.sh up --secure`, as its `env`
/// prints them: Kafka's SASL_SSL listener and PostgreSQL's TLS-only role.
#[derive(Debug, Clone)]
pub struct Secure {
    /// `KAFKA_SECURE_BROKERS`: the SASL_SSL listener.
    pub brokers: String,
    /// `KAFKA_SASL_MECHANISM`.
    pub sasl_mechanism: String,
    /// `KAFKA_SASL_USERNAME`.
    pub sasl_username: String,
    /// `KAFKA_SASL_PASSWORD` (a throwaway test secret).
    pub sasl_password: String,
    /// `HERALD_TLS_CA`: the throwaway CA that signed both servers'
    /// certificates.
    pub ca: std::path::PathBuf,
    /// `DATABASE_URL_TLS`: the TLS-only role, `sslmode=verify-full`.
    pub database_url: String,
}

/// The defaults `scripts/services.sh` uses for `--secure`, by the name its
/// `env` prints them under.
const SECURE_DEFAULTS: [(&str, &str); 4] = [
    ("KAFKA_SECURE_BROKERS", "127.0.0.1:9094"),
    ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
    ("KAFKA_SASL_USERNAME", "herald"),
    ("KAFKA_SASL_PASSWORD", "herald-scram-secret"),
];

/// The TLS-only role `scripts/services.sh up --secure` creates, as
/// `user:password`, for the default `DATABASE_URL_TLS`.
const SECURE_DATABASE_CREDENTIALS: &str = "herald_tls:herald-tls-secret";

fn secure_setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        SECURE_DEFAULTS
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| (*value).to_owned())
            .unwrap_or_default()
    })
}

/// The secured services, or `None` (after a loud message; a panic when
/// `CI` is set) when `scripts/services.sh up --secure` has not run.
pub fn secure() -> Option<Secure> {
    let brokers = secure_setting("KAFKA_SECURE_BROKERS");
    let ca = std::env::var_os("HERALD_TLS_CA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tls/ca.crt")
        });
    if !ca.is_file() || !reachable(&brokers) {
        unavailable(
            "the --secure services",
            "KAFKA_SECURE_BROKERS / HERALD_TLS_CA",
            &format!("{brokers} / {}", ca.display()),
        );
        return None;
    }
    let database_url = std::env::var("DATABASE_URL_TLS").unwrap_or_else(|_| {
        format!(
            "postgres://{}@localhost:5432/herald?sslmode=verify-full&sslrootcert={}",
            SECURE_DATABASE_CREDENTIALS,
            ca.display()
        )
    });
    Some(Secure {
        brokers,
        sasl_mechanism: secure_setting("KAFKA_SASL_MECHANISM"),
        sasl_username: secure_setting("KAFKA_SASL_USERNAME"),
        sasl_password: secure_setting("KAFKA_SASL_PASSWORD"),
        ca,
        database_url,
    })
}

impl Secure {
    /// The librdkafka settings that reach the SASL_SSL listener.
    pub fn kafka_settings(&self) -> Vec<(String, String)> {
        [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", self.sasl_mechanism.as_str()),
            ("sasl.username", self.sasl_username.as_str()),
            ("sasl.password", self.sasl_password.as_str()),
            ("ssl.ca.location", &self.ca.to_string_lossy()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
    }

    /// Options for `db` (a database of the plain server) through the
    /// TLS-only role, verifying the server's certificate.
    pub fn database_options(&self, db: &TestDatabase) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.database_url)
            .unwrap_or_else(|e| panic!("DATABASE_URL_TLS is not a PostgreSQL URL: {e}"))
            .database(db.name())
    }

    /// The password in [`Secure::database_url`] (a throwaway test secret).
    pub fn database_password(&self) -> &str {
        let authority = self
            .database_url
            .split_once("://")
            .map_or("", |(_, rest)| rest);
        authority
            .split_once('@')
            .and_then(|(credentials, _)| credentials.split_once(':'))
            .map_or("", |(_, password)| password)
    }

    /// [`Secure::database_options`] as a URL, for child processes.
    pub fn database_url_of(&self, db: &TestDatabase) -> String {
        with_database(&self.database_url, db.name())
    }
}

/// Waits until `done()` holds, checking every 20 ms; panics after `limit`
/// with `what`, so a stuck component fails loudly instead of hanging.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    poll_until(what, limit, async || {
        if done() {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
}

/// Calls `probe` every 20 ms until it returns `Ok`, and returns that value.
/// Panics after `limit` with `what` and the last `Err` (what was seen), so a
/// stuck component fails loudly instead of hanging.
pub async fn poll_until<T>(
    what: &str,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; last seen:\n{seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long [`Kafka::read_to_end`] waits, at most, for a `read_committed`
/// read's partitions to have no undecided transaction.
pub const STABLE_WAIT: Duration = Duration::from_secs(10);

/// Handle on the test Kafka cluster.
#[derive(Debug, Clone)]
pub struct Kafka {
    brokers: String,
}

impl Kafka {
    /// The broker(s) at `brokers` (e.g. a [`private::PrivateKafka`]).
    pub fn at(brokers: impl Into<String>) -> Kafka {
        Kafka {
            brokers: brokers.into(),
        }
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// A client config pointing at the brokers, for producers, consumers and admins.
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }

    /// The group's committed offset per partition of `topic` (partitions
    /// without a commit are absent).
    pub fn committed(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> std::collections::BTreeMap<i32, i64> {
        self.try_committed(group, topic, partitions)
            .expect("committed offsets")
    }

    /// [`Kafka::committed`], or the error of a broker that does not answer
    /// in time (one just restarted, say): for probes that poll.
    pub fn try_committed(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<std::collections::BTreeMap<i32, i64>, String> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        // `read_uncommitted` makes librdkafka ask without `require_stable`:
        // the broker answers with the offsets committed so far instead of
        // UNSTABLE_OFFSET_COMMIT while a transaction holds pending offsets.
        // A pending offset is not committed, so the answer is the same; a
        // probe that polls must not stall behind a transaction the broker
        // is slow to resolve after a restart (seen as OperationTimedOut for
        // minutes in `processor/outage.rs`).
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", group)
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect())
    }

    /// The end offset (high watermark) of every partition of `topic`.
    pub fn end_offsets(
        &self,
        topic: &str,
        partitions: i32,
    ) -> std::collections::BTreeMap<i32, i64> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = self.config().create().expect("consumer");
        (0..partitions)
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, high)
            })
            .collect()
    }

    /// Every record of `topic` (partitions `0..partitions`) from its start
    /// to the end each partition had when the read began, read with
    /// `isolation` (`read_committed`: the end is the last stable offset, and
    /// aborted records are skipped). Records of one partition come in offset
    /// order. Panics after two minutes.
    ///
    /// The end is fixed at the start: a topic someone keeps writing to
    /// would otherwise never end (librdkafka's partition EOF needs a fetch
    /// that comes back empty).
    ///
    /// With `read_committed`, the read first waits (up to
    /// [`STABLE_WAIT`]) until every transaction that had written to a
    /// partition is decided, i.e. its last stable offset has reached the
    /// high watermark it had: the transaction coordinator answers a
    /// producer's commit before it writes the commit markers, and the
    /// group coordinator applies a transaction's offsets apart from its
    /// other partitions' markers, so a transaction its producer (or its
    /// committed offsets) reports as committed can still be invisible to a
    /// `read_committed` reader for a moment. After the wait (a transaction
    /// still open: a producer at work, or one killed mid-transaction that
    /// no successor fenced yet), the end is the last stable offset then.
    pub fn read_to_end(
        &self,
        topic: &str,
        partitions: i32,
        isolation: &str,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Message, Offset};
        let consumer: BaseConsumer = self
            .config()
            .set("isolation.level", isolation)
            // librdkafka wants a group for assign(); nothing is committed.
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .expect("reader");
        let mut ends = std::collections::BTreeMap::new();
        let mut done = std::collections::BTreeSet::new();
        let mut tpl = rdkafka::TopicPartitionList::new();
        let stable_by = std::time::Instant::now() + STABLE_WAIT;
        let uncommitted: Option<BaseConsumer> = (isolation == "read_committed").then(|| {
            self.config()
                .set("isolation.level", "read_uncommitted")
                .create()
                .expect("watermark client")
        });
        for p in 0..partitions {
            let (low, high) = if let Some(uncommitted) = &uncommitted {
                stable_watermarks(&consumer, uncommitted, topic, p, stable_by)
            } else {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(30))
                    .expect("watermarks")
            };
            if high <= low {
                // An empty partition never reports its end.
                done.insert(p);
            }
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("assignment");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while done.len() < ends.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "reading {topic} to its end took too long"
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    if message.offset() + 1 >= ends[&message.partition()] {
                        done.insert(message.partition());
                    }
                    out.push(message.detach());
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    done.insert(p);
                }
                Some(Err(error)) => eprintln!("reader of {topic}: {error}"),
                None => {
                    // The last records before the end may be transaction
                    // markers, which are never returned: the position
                    // moves past them.
                    for e in consumer.position().expect("positions").elements() {
                        if let Offset::Offset(o) = e.offset() {
                            if o >= ends[&e.partition()] {
                                done.insert(e.partition());
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Creates a topic with a random name and `partitions` partitions; it is
    /// deleted when the returned value is dropped.
    pub async fn topic(&self, prefix: &str, partitions: i32) -> TestTopic {
        let name = unique_name(prefix);
        create_topic(&self.config(), &name, partitions).await;
        TestTopic {
            name,
            config: self.config(),
        }
    }
}

/// The low watermark and the last stable offset of `topic`'s partition
/// `p` (`reader` reads `read_committed`, `uncommitted` does not), once
/// that has reached the high watermark the partition had when asked, or
/// at `by`, whichever comes first (see [`Kafka::read_to_end`]).
fn stable_watermarks(
    reader: &rdkafka::consumer::BaseConsumer,
    uncommitted: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    p: i32,
    by: std::time::Instant,
) -> (i64, i64) {
    use rdkafka::consumer::Consumer;
    let (_, high) = uncommitted
        .fetch_watermarks(topic, p, Duration::from_secs(30))
        .expect("high watermark");
    loop {
        let (low, stable) = reader
            .fetch_watermarks(topic, p, Duration::from_secs(30))
            .expect("last stable offset");
        if stable >= high {
            return (low, stable);
        }
        if std::time::Instant::now() >= by {
            eprintln!(
                "{topic}[{p}]: a transaction is still open after {STABLE_WAIT:?} \
                 (last stable offset {stable}, high watermark {high}); reading to {stable}"
            );
            return (low, stable);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates `name` with `partitions` partitions and the cluster's default
/// replication (-1): one replica on the one-node broker; on the three-node
/// cluster three, as its `min.insync.replicas` of 2 needs for `acks=all`.
pub async fn create_topic(config: &ClientConfig, name: &str, partitions: i32) {
    if let Err(error) = try_create_topic(config, name, partitions).await {
        panic!("cannot create topic {name}: {error}");
    }
}

/// [`create_topic`] that returns the error instead of panicking: for
/// callers that report it (the benchmarks).
pub async fn try_create_topic(
    config: &ClientConfig,
    name: &str,
    partitions: i32,
) -> Result<(), rdkafka::error::KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(-1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for result in results {
        if let Err((_, code)) = result {
            return Err(rdkafka::error::KafkaError::AdminOp(code));
        }
    }
    Ok(())
}

/// A topic that exists for one test.
#[derive(Debug)]
pub struct TestTopic {
    name: String,
    config: ClientConfig,
}

impl TestTopic {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestTopic {
    fn drop(&mut self) {
        let config = self.config.clone();
        let names = [self.name.clone(), format!("{}.dlq", self.name)];
        clean_up(async move {
            let Ok(admin) = config.create::<AdminClient<DefaultClientContext>>() else {
                return;
            };
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            // Bounded: a test whose private broker is already gone must
            // not wait out librdkafka's default (minutes) to learn it.
            let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
            let _ = admin.delete_topics(&refs, &options).await;
        });
    }
}

/// Runs a `Drop`'s async clean-up to its end on a thread and runtime of its
/// own: the drop may run inside a runtime, which must not block on it.
fn clean_up(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    })
    .join();
}

/// Handle on the test PostgreSQL server.
#[derive(Debug, Clone)]
pub struct Postgres {
    options: PgConnectOptions,
    url: String,
}

impl Postgres {
    /// The server at the admin URL `url` (databases are created through
    /// it), whether or not it answers.
    pub fn at(url: &str) -> Result<Postgres, sqlx::Error> {
        Ok(Postgres {
            options: PgConnectOptions::from_str(url)?,
            url: url.to_owned(),
        })
    }

    /// Creates an empty database with a random name; it is dropped (with any
    /// connections still open to it) when the returned value is dropped.
    pub async fn database(&self) -> TestDatabase {
        let name = unique_name("herald_test").replace('-', "_");
        self.create_database(&name)
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"))
    }

    /// [`Postgres::database`] with the name `name`, returning the error
    /// instead of panicking: for callers that report it (the benchmarks).
    pub async fn create_database(&self, name: &str) -> Result<TestDatabase, sqlx::Error> {
        let mut admin = self.options.connect().await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        admin.close().await.ok();
        Ok(TestDatabase {
            admin: self.options.clone(),
            options: self.options.clone().database(name),
            url: with_database(&self.url, name),
            name: name.to_owned(),
        })
    }
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDatabase {
    admin: PgConnectOptions,
    options: PgConnectOptions,
    url: String,
    name: String,
}

/// `url` with its database (the path) replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(query) => format!("{root}/{database}?{query}"),
        None => format!("{root}/{database}"),
    }
}

impl TestDatabase {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options for this database.
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// A URL for this database, for child processes.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool on this database. Tests relax durability
    /// (`synchronous_commit=off`): a crash of the server is not what they test.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(16)
            .connect_with(
                self.options
                    .clone()
                    .options([("synchronous_commit", "off")]),
            )
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        clean_up(async move {
            if let Ok(mut conn) = admin.connect().await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

impl TestDatabase {
    /// This database's URL with the host and port replaced by `address`
    /// (e.g. a [`FaultProxy`]).
    pub fn url_via(&self, address: std::net::SocketAddr) -> String {
        let url = self.url();
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let host_start = rest.find('@').map_or(0, |i| i + 1);
        let host_end = rest[host_start..]
            .find('/')
            .map_or(rest.len(), |i| host_start + i);
        format!(
            "{}{}{}{}",
            &url[..scheme_end],
            &rest[..host_start],
            address,
            &rest[host_end..]
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            super::with_database("postgres://u:p@h:5432/herald?sslmode=disable", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(
            super::with_database("postgres://h", "t2"),
            "postgres://h/t2"
        );
    }
}

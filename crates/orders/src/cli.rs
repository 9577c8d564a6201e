//! The `orders` command line. Every flag is also an environment variable, and
//! a bad value fails at start-up with a message naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The order pipeline of the herald reference service.
#[derive(Debug, Parser)]
#[command(name = "orders", version, about)]
pub struct Cli {
    /// What to run (default: `run`, everything in one process).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings shared by every subcommand.
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// The `orders` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// API + relay + consumers in one process (the default).
    Run,
    /// Only the HTTP API.
    Api,
    /// Only the outbox relay.
    Relay,
    /// Only the exactly-once fulfillment processor (order-events →
    /// fulfillment-events in Kafka transactions). Run any number, each with
    /// its own --instance-id: they share the work.
    Processor,
    /// Only the consumers (projection and notifications).
    Worker {
        /// Run one consumer only.
        #[arg(long, value_enum)]
        only: Option<WorkerKind>,
    },
    /// Apply herald's and the service's database migrations.
    Migrate,
    /// Inspect and replay dead letters.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect the outbox.
    Outbox {
        /// What to do.
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Post orders to the API and measure until the read model has them all.
    Load(LoadArgs),
    /// Print a bearer token for trying the API (signed with --jwt-secret,
    /// or --jwt-private-key).
    Token(TokenArgs),
}

/// The consumers of `orders worker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkerKind {
    /// Keeps the order read model.
    Projection,
    /// Writes the notification log.
    Notifications,
}

/// `orders dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (the newest per original record) and the keys
    /// parked behind them, with their parked records.
    List {
        /// Which letters.
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// At most this many letters, oldest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the group that failed them. A parked key's
    /// dead letter goes first and its parked records follow in their
    /// order; the consumer unparks the key once all are handled.
    Replay(DlqActionArgs),
    /// Drop dead letters for good: a parked key's records are taken off its
    /// list unhandled, and the key is unparked once the list is empty.
    Discard(DlqActionArgs),
    /// The audit trail of replays and discards, newest first.
    History {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters a `dlq` command takes.
#[derive(Debug, Clone, Args)]
pub struct DlqFilterArgs {
    /// The dead-letter topic (default: the events topic's).
    #[arg(long)]
    pub topic: Option<String>,
    /// The consumer group that failed them.
    #[arg(long)]
    pub group: Option<String>,
    /// The record key (order id).
    #[arg(long)]
    pub key: Option<String>,
    /// The event type (`OrderCreated`, …).
    #[arg(long = "event-type")]
    pub event_type: Option<String>,
    /// The error class (`transient`, `permanent`, `decode`, `unknown_type`,
    /// `parked`).
    #[arg(long)]
    pub class: Option<String>,
    /// Failed at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Failed before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

/// `orders dlq replay` and `orders dlq discard`.
#[derive(Debug, Clone, Args)]
pub struct DlqActionArgs {
    /// Which letters.
    #[command(flatten)]
    pub filter: DlqFilterArgs,
    /// These event ids, by name: the loop guard does not hold them back.
    #[arg(long = "event-id", required_unless_present_any = ["all", "key"])]
    pub event_ids: Vec<uuid::Uuid>,
    /// Every letter the filters select.
    #[arg(long)]
    pub all: bool,
    /// At most this many records per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Print what would be sent, send nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Letters of records redriven this many times already are held back
    /// unless named with --event-id.
    #[arg(long = "max-redrives", default_value_t = 3)]
    pub max_redrives: u32,
    /// Why (kept in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who (kept in the audit trail; default: the OS user).
    #[arg(long, env = "USER", default_value = "unknown")]
    pub actor: String,
}

/// `orders outbox …`
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Backlog, age of the oldest unpublished row, retained rows, relay
    /// checkpoints, and events the broker refused (parked or not yet).
    Status,
    /// Queue a parked event again (after fixing what the broker refused);
    /// its aggregate's later events follow it.
    Retry(ResolveArgs),
    /// Never publish a parked event; its aggregate's later events flow.
    Discard(ResolveArgs),
    /// The audit trail of retries and discards, newest first.
    History {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

/// Which parked events, and why.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// The parked events.
    #[arg(long = "event-id", required = true)]
    pub event_ids: Vec<uuid::Uuid>,
    /// Why (recorded in the audit trail).
    #[arg(long)]
    pub reason: String,
    /// Who (recorded in the audit trail; default: the OS user).
    #[arg(long)]
    pub actor: Option<String>,
}

/// `orders load`
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// How many orders.
    #[arg(long, default_value_t = 1000)]
    pub orders: usize,
    /// Target orders per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// The API's base URL (default: the local one, from --http-addr).
    #[arg(long)]
    pub api: Option<String>,
    /// Give up waiting for the read model after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Sign the synthetic customers' tokens with this PEM private key (RSA:
    /// RS256, P-256: ES256) instead of --jwt-secret (HS256). Without
    /// either, requests carry no token (for an API run with --auth none).
    #[arg(long, env = "ORDERS_JWT_PRIVATE_KEY")]
    pub jwt_private_key: Option<PathBuf>,
}

/// `orders token`
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The customer (the token's subject).
    #[arg(long)]
    pub customer: uuid::Uuid,
    /// A scope to grant (repeatable; e.g. orders:ship).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Valid this many seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_secs: u64,
    /// Sign with this PEM private key (RSA: RS256, P-256: ES256) instead of
    /// --jwt-secret (HS256).
    #[arg(long, env = "ORDERS_JWT_PRIVATE_KEY")]
    pub jwt_private_key: Option<PathBuf>,
}

/// How the API authenticates (`orders run` and `orders api` use these; the
/// other subcommands ignore them, but for `orders load` and `orders token`,
/// which sign with the secret). Its Debug output redacts the secret.
#[derive(Clone, Args)]
pub struct AuthArgs {
    /// `jwt`: the order routes need `Authorization: Bearer <JWT>`; `none`:
    /// no authentication, anyone acts as any customer [default: jwt; none
    /// in the embedded development mode unless a key is given].
    #[arg(long = "auth", env = "ORDERS_AUTH", value_enum, global = true)]
    pub mode: Option<crate::api::auth::AuthMode>,
    /// The HS256 shared secret (at least 32 bytes). Never logged.
    #[arg(long, env = "ORDERS_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A PEM file of the issuer's public key: RSA for RS256, P-256 for
    /// ES256 (instead of --jwt-secret).
    #[arg(long, env = "ORDERS_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,
    /// When set, tokens need this `iss`.
    #[arg(long, env = "ORDERS_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// When set, tokens need this `aud`.
    #[arg(long, env = "ORDERS_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
}

impl std::fmt::Debug for AuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthArgs")
            .field("mode", &self.mode)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .finish()
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings shared by the subcommands.
#[derive(Debug, Args)]
pub struct SettingsArgs {
    /// Kafka bootstrap servers (`host:port,…`). Unset together with
    /// DATABASE_URL: the embedded development mode.
    #[arg(long, env = "KAFKA_BROKERS", global = true)]
    pub kafka_brokers: Option<String>,
    /// PostgreSQL URL. Never logged.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the API listens.
    #[arg(
        long,
        env = "HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub http_addr: SocketAddr,
    /// Where relay and worker processes serve /metrics, /healthz and /readyz
    /// (default: HTTP_ADDR's port + 1; 0 picks a free port). Given to a
    /// process with the API, /metrics moves there off the public port.
    #[arg(long, env = "METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// A librdkafka setting passed through to every client, `key=value`
    /// (repeatable; e.g. security.protocol=SASL_SSL). Values are never logged.
    #[arg(long = "kafka-setting", env = "KAFKA_SETTINGS", value_delimiter = ',', value_parser = parse_key_value, global = true, hide_env_values = true)]
    pub kafka_settings: Vec<(String, String)>,
    /// The order events topic.
    #[arg(
        long,
        env = "ORDERS_EVENTS_TOPIC",
        default_value = "order-events",
        global = true
    )]
    pub events_topic: String,
    /// The fulfillment output topic.
    #[arg(
        long,
        env = "ORDERS_FULFILLMENT_TOPIC",
        default_value = "fulfillment-events",
        global = true
    )]
    pub fulfillment_topic: String,
    /// Prefix of the consumer group ids (`<prefix>-projection`, …).
    #[arg(
        long,
        env = "ORDERS_GROUP_PREFIX",
        default_value = "orders",
        global = true
    )]
    pub group_prefix: String,
    /// This fulfillment processor instance's stable id: its Kafka
    /// transactional ids are `<group>-<instance id>`, so a restart under the
    /// same id fences the previous incarnation. Instances with distinct ids
    /// share the work (a second process with the same id stands by).
    #[arg(long, env = "ORDERS_INSTANCE_ID", default_value = "0", global = true)]
    pub instance_id: String,
    /// SKUs the fulfillment processor treats as out of stock (comma list).
    #[arg(
        long,
        env = "ORDERS_OUT_OF_STOCK",
        value_delimiter = ',',
        global = true
    )]
    pub out_of_stock: Vec<String>,
    /// Units of a SKU in stock the first time the processor sees it.
    #[arg(long, env = "ORDERS_INITIAL_STOCK", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..), global = true)]
    pub initial_stock: i64,
    /// Inputs per fulfillment transaction (at most).
    #[arg(long, env = "ORDERS_PROCESSOR_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000), global = true)]
    pub processor_batch: u32,
    /// Partitions of topics this service creates.
    #[arg(long, env = "ORDERS_TOPIC_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=1000), global = true)]
    pub topic_partitions: i32,
    /// Replicas of each partition of the topics this service creates
    /// (default: the cluster's `default.replication.factor`). At start-up
    /// every topic of the service, created or existing, must have at least
    /// this many.
    #[arg(long, env = "ORDERS_TOPIC_REPLICATION_FACTOR", value_parser = clap::value_parser!(u16).range(1..=64), global = true)]
    pub topic_replication_factor: Option<u16>,
    /// `min.insync.replicas` of the topics this service creates (default:
    /// the cluster's): replicas that must have an event before the relay's
    /// `acks=all` producer counts it as published. At start-up every topic
    /// of the service must have at least this.
    #[arg(long, env = "ORDERS_TOPIC_MIN_INSYNC_REPLICAS", value_parser = clap::value_parser!(u16).range(1..=64), global = true)]
    pub topic_min_insync_replicas: Option<u16>,
    /// Keys handled in parallel per consumer. (Not `--concurrency`: that is
    /// `orders load`'s requests in flight.)
    #[arg(long = "consumer-concurrency", env = "ORDERS_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000), global = true)]
    pub consumer_concurrency: u32,
    /// Attempts per record before dead-lettering (transient failures).
    #[arg(long, env = "ORDERS_RETRY_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub retry_attempts: u32,
    /// First retry delay bound, in milliseconds (doubles per attempt).
    #[arg(
        long,
        env = "ORDERS_RETRY_INITIAL_MS",
        default_value_t = 100,
        global = true
    )]
    pub retry_initial_ms: u64,
    /// Largest retry delay, in milliseconds.
    #[arg(
        long,
        env = "ORDERS_RETRY_MAX_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub retry_max_ms: u64,
    /// How the relay publishes: `exactly-once` (the default with real
    /// Kafka: each batch is a Kafka transaction with a checkpoint, so
    /// `read_committed` readers see every event once) or `at-least-once`
    /// (a relay crash can publish a batch again; the embedded mode's only
    /// choice, its mock cluster having no transactions).
    #[arg(long, env = "ORDERS_DELIVERY", global = true, value_parser = clap::value_parser!(herald_kafka::Delivery))]
    pub delivery: Option<herald_kafka::Delivery>,
    /// Outbox rows per relay batch.
    #[arg(long, env = "ORDERS_RELAY_BATCH", default_value_t = herald_kafka::RelayConfig::default().batch_size as u32, value_parser = clap::value_parser!(u32).range(1..=100_000), global = true)]
    pub relay_batch: u32,
    /// Keep published outbox rows this many hours (then purge).
    #[arg(
        long,
        env = "ORDERS_OUTBOX_RETENTION_HOURS",
        default_value_t = 24,
        global = true
    )]
    pub outbox_retention_hours: u64,
    /// Keep inbox rows this many hours (longer than any redelivery window).
    #[arg(
        long,
        env = "ORDERS_INBOX_RETENTION_HOURS",
        default_value_t = 168,
        global = true
    )]
    pub inbox_retention_hours: u64,
    /// Database connections per process.
    #[arg(long, env = "ORDERS_DB_POOL", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub db_pool: u32,
    /// Folder of the embedded mode's files.
    #[arg(long, env = "ORDERS_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: std::path::PathBuf,
    /// Log format (level from RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Authentication of the order routes.
    #[command(flatten)]
    pub auth: AuthArgs,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| "expected key=value (e.g. security.protocol=SASL_SSL)".to_owned())?;
    if k.trim().is_empty() {
        return Err("the key is empty".to_owned());
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

impl SettingsArgs {
    /// The retry policy of the consumers.
    pub fn retry(&self) -> herald::RetryPolicy {
        herald::RetryPolicy {
            max_attempts: self.retry_attempts,
            initial_delay: Duration::from_millis(self.retry_initial_ms),
            max_delay: Duration::from_millis(self.retry_max_ms.max(self.retry_initial_ms)),
            multiplier: 2.0,
            deadline: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_and_flags_parse() {
        let cli = Cli::try_parse_from([
            "orders",
            "--kafka-brokers",
            "k:9092",
            "--kafka-setting",
            "security.protocol=SASL_SSL",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .expect("parses");
        assert!(cli.command.is_none());
        assert_eq!(cli.settings.kafka_brokers.as_deref(), Some("k:9092"));
        assert_eq!(
            cli.settings.kafka_settings,
            [("security.protocol".into(), "SASL_SSL".into())]
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Cli::try_parse_from(["orders", "--http-addr", "nowhere"]).expect_err("bad addr");
        assert!(err.to_string().contains("--http-addr"), "{err}");
        let err =
            Cli::try_parse_from(["orders", "--kafka-setting", "novalue"]).expect_err("bad kv");
        assert!(err.to_string().contains("--kafka-setting"), "{err}");
        let err =
            Cli::try_parse_from(["orders", "--concurrency", "0"]).expect_err("bad concurrency");
        assert!(err.to_string().contains("--concurrency"), "{err}");
        let err = Cli::try_parse_from(["orders", "--topic-replication-factor", "0"])
            .expect_err("bad replication factor");
        assert!(
            err.to_string().contains("--topic-replication-factor"),
            "{err}"
        );
    }

    #[test]
    fn load_takes_its_documented_flags() {
        let cli = Cli::try_parse_from([
            "orders",
            "load",
            "--orders",
            "10",
            "--rate",
            "5",
            "--concurrency",
            "4",
            "--api",
            "http://x",
        ])
        .expect("parses");
        let Some(Command::Load(args)) = cli.command else {
            panic!("not load");
        };
        assert_eq!((args.orders, args.rate, args.concurrency), (10, 5, 4));
        assert_eq!(args.api.as_deref(), Some("http://x"));
    }

    #[test]
    fn auth_flags_are_global_and_the_secret_stays_out_of_debug_output() {
        use crate::api::auth::AuthMode;
        const SECRET: &str = "a-cli-test-secret-of-32-bytes-or-more";
        // Empty brokers and URL: the embedded mode, whatever the
        // environment says.
        let embedded = ["--kafka-brokers", "", "--database-url", ""];
        let real = [
            "--kafka-brokers",
            "k:9092",
            "--database-url",
            "postgres://u:p@h/db",
        ];
        let parse = |args: &[&str]| {
            let mut all = vec!["orders"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).expect("parses")
        };
        let cli = parse(&[&real[..], &["api", "--jwt-secret", SECRET]].concat());
        let config = crate::app::Config::from_args(&cli.settings).expect("config");
        assert_eq!(config.auth.mode, AuthMode::Jwt);
        let shown = format!("{cli:?} {config:?}");
        assert!(!shown.contains(SECRET), "{shown}");

        // Defaults: jwt on real services (the key is checked by the API
        // only), none in the embedded mode unless a key is given.
        let cli = parse(&[&real[..], &["relay"]].concat());
        let config = crate::app::Config::from_args(&cli.settings).expect("config");
        assert_eq!(config.auth.mode, AuthMode::Jwt);
        let cli = parse(&[&embedded[..], &["--jwt-secret", ""]].concat());
        let config = crate::app::Config::from_args(&cli.settings).expect("config");
        assert_eq!(config.auth.mode, AuthMode::None);
        let cli = parse(&[&embedded[..], &["--jwt-secret", SECRET]].concat());
        let config = crate::app::Config::from_args(&cli.settings).expect("config");
        assert_eq!(config.auth.mode, AuthMode::Jwt);
        let cli = parse(&[&real[..], &["run", "--auth", "none"]].concat());
        let config = crate::app::Config::from_args(&cli.settings).expect("config");
        assert_eq!(config.auth.mode, AuthMode::None);

        let err = Cli::try_parse_from(["orders", "--auth", "basic"]).expect_err("bad mode");
        assert!(err.to_string().contains("--auth"), "{err}");
    }

    #[test]
    fn token_and_load_take_their_keys() {
        let id = uuid::Uuid::new_v4().to_string();
        let cli = Cli::try_parse_from([
            "orders",
            "token",
            "--customer",
            &id,
            "--scope",
            "orders:ship",
            "--jwt-secret",
            "s",
        ])
        .expect("parses");
        let Some(Command::Token(args)) = cli.command else {
            panic!("not token");
        };
        assert_eq!(args.customer.to_string(), id);
        assert_eq!(args.scopes, ["orders:ship"]);
        assert_eq!(cli.settings.auth.jwt_secret.as_deref(), Some("s"));
        let cli =
            Cli::try_parse_from(["orders", "load", "--jwt-private-key", "k.pem"]).expect("parses");
        let Some(Command::Load(args)) = cli.command else {
            panic!("not load");
        };
        assert_eq!(args.jwt_private_key, Some(PathBuf::from("k.pem")));
    }

    #[test]
    fn worker_takes_only() {
        let cli =
            Cli::try_parse_from(["orders", "worker", "--only", "projection"]).expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Worker {
                only: Some(WorkerKind::Projection)
            })
        ));
    }
}

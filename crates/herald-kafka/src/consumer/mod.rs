//! The consumer runtime: at-least-once delivery to typed handlers, in order
//! per key, in parallel across keys, with retries, dead letters and commits
//! that never pass an unfinished record.
//!
//! ```no_run
//! # use herald_kafka::consumer::{Consumer, ConsumerConfig, Router};
//! # async fn run(router: Router) -> Result<(), herald_kafka::ClientError> {
//! let config = ConsumerConfig::new("127.0.0.1:9092", "projection", ["order-events"])
//!     .concurrency(32);
//! let consumer = Consumer::new(config, router)?;
//! consumer.run(async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```
//!
//! How it works: one dedicated thread owns the librdkafka consumer. It
//! polls, copies each polled batch into a few shared buffers, and hands the
//! records to the scheduler, a tokio task that queues each record behind
//! the earlier records of its key and starts at most `concurrency` keys at
//! a time: it polls each record's handling once itself, and what then still
//! waits continues as tokio tasks ([`ConsumerConfig::inline_start`]). The
//! scheduler reports finished records back in batches; per partition, the
//! poll thread commits the lowest offset not yet done. Decoding and
//! handling thus run beside the polling, on another core.
//! When `max_in_flight` records are buffered it pauses fetching (memory stays
//! bounded) and resumes as records finish. On revoke the scheduler drops the
//! revoked partitions' queued records; the poll thread waits (bounded) for
//! their running ones, commits them, and forgets them: nothing is ever
//! committed for a partition this instance no longer owns. On shutdown it
//! stops fetching, waits for the running records within a deadline,
//! commits, and closes (leaving the group).
//!
//! Layout: `runtime` (the poll thread: offsets, commits, pausing,
//! rebalances), `scheduler` (per-key queues and concurrency), `process`
//! (one record: decode, handlers, retries, dead letters), `record` (the
//! copied records), `offsets` (what is safe to commit), `breaker`, `stored`
//! (offsets kept in a store), `router` (typed handlers).

mod breaker;
mod offsets;
mod process;
mod record;
pub mod router;
mod runtime;
mod scheduler;
mod stored;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use herald::{DecodeError, Envelope, RetryPolicy};
use rdkafka::message::Headers;
use rdkafka::ClientConfig;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::admin::TopicDurability;
use crate::error::ClientError;
use crate::group::GroupConfig;
use crate::metrics::{
    encode_gauge, latency_histogram, DeadLetterLabels, HandlerLabels, PartitionLabels,
};
pub use crate::parking::DeadLetterMode;
use crate::publisher::PRODUCER_DEFAULTS;
use crate::settings;
pub use breaker::CircuitBreaker;
pub use router::{Handler, IntoHandler, RecordInfo, Router, Stateful, Stateless, WithState};

/// The envelope of a record read with rdkafka: its key, payload and headers
/// as [`Envelope::from_record`] reads them.
pub fn envelope_of(message: &impl rdkafka::Message) -> Result<Envelope, DecodeError> {
    Envelope::from_record(
        message.key(),
        message.payload(),
        message
            .headers()
            .into_iter()
            .flat_map(|h| h.iter())
            .map(|h| (h.key, h.value)),
    )
}

/// librdkafka consumer settings the runtime uses unless overridden.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    ("enable.partition.eof", "false"),
    ("session.timeout.ms", "10000"),
    ("max.poll.interval.ms", "300000"),
    ("isolation.level", "read_committed"),
    ("partition.assignment.strategy", "cooperative-sticky"),
    // librdkafka's default (1 s) postpones a partition's next fetch by that
    // long whenever its prefetch queue was full: a consumer whose handlers
    // are slower than the fetcher then drains the queue and sits idle for
    // the rest of the second. At 10 ms `herald-bench consumer` went from
    // 135k to 242k records/s.
    ("fetch.queue.backoff.ms", "10"),
];

/// Settings the runtime owns: overriding them would break its guarantees.
const CONSUMER_FIXED: &[(&str, &str)] = &[
    // Offsets are committed by the runtime, only for finished records.
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// The default limit of one handler call ([`ConsumerConfig::handler_timeout`]).
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

/// Configuration of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// What the processor is configured with too.
    pub(crate) group: GroupConfig,
    pub(crate) concurrency: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) revoke_timeout: Duration,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) detailed_metrics: bool,
    pub(crate) inline_start: bool,
    pub(crate) circuit_breaker: Option<CircuitBreaker>,
    pub(crate) dead_letter_mode: DeadLetterMode,
    pub(crate) parked_topic: String,
    pub(crate) parked_read_timeout: Duration,
    pub(crate) stored_offsets: Option<stored::StoredOffsets>,
}

impl ConsumerConfig {
    /// A consumer of `topics` in group `group_id` with production defaults:
    /// 64 keys in parallel, 10,000 records in flight, [`RetryPolicy::default`],
    /// unknown event types skipped, dead letters to `<topic>.dlq`, commits
    /// every second, a handler call cut off after 60 s.
    pub fn new<T: Into<String>>(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            group: GroupConfig::new(brokers, group_id, topics),
            concurrency: 64,
            max_in_flight: 10_000,
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            handler_timeout: Some(DEFAULT_HANDLER_TIMEOUT),
            detailed_metrics: true,
            inline_start: true,
            circuit_breaker: Some(CircuitBreaker::default()),
            dead_letter_mode: DeadLetterMode::default(),
            parked_topic: crate::parking::DEFAULT_PARKED_TOPIC.to_owned(),
            parked_read_timeout: Duration::from_secs(30),
            stored_offsets: None,
        }
    }

    /// Keeps the consumer's offsets in `store` ([`herald::offsets`]): the
    /// handlers record each record's position in their own transaction
    /// (e.g. `herald_postgres::Inbox::apply_at` with
    /// [`RecordInfo::position`]), and each assigned partition starts at the
    /// later of its stored offset and its Kafka commit, which then only
    /// serves lag monitoring. Keys still run in parallel: each record tells
    /// the store how far its partition is done ([`RecordInfo::done_below`]).
    ///
    /// `herald-bench inbox --records 30000 --batch-wait-ms 0`: 6,975 rec/s
    /// with offsets and no row per event, 7,098 with an inbox row per event
    /// (both `Inbox::batched`), 5,676 with neither.
    pub fn offsets_in(mut self, store: impl herald::OffsetStore) -> Self {
        self.stored_offsets = Some(stored::StoredOffsets::new(store));
        self
    }

    /// How many keys are handled at the same time (records of one key always
    /// run one after another).
    pub fn concurrency(mut self, keys: usize) -> Self {
        self.concurrency = keys;
        self
    }

    /// How many records may be received but not finished before fetching
    /// pauses (bounds memory when handlers are slow). Fetching resumes below
    /// half of it: librdkafka drops what it prefetched for a paused
    /// partition, so pausing often would fetch the same data again and again.
    pub fn max_in_flight(mut self, records: usize) -> Self {
        self.max_in_flight = records;
        self
    }

    /// How transient handler failures are retried before dead-lettering.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.group.retry = policy;
        self
    }

    /// The circuit breaker that tells a dependency outage from poison
    /// records ([`CircuitBreaker`]; on by default). `None` turns it off:
    /// then every transient failure is dead-lettered once the retry policy
    /// gives up, however many keys fail together.
    pub fn circuit_breaker(mut self, breaker: impl Into<Option<CircuitBreaker>>) -> Self {
        self.circuit_breaker = breaker.into();
        self
    }

    /// Dead-letter records whose `event_type` no handler knows, instead of
    /// skipping (and counting) them.
    pub fn dead_letter_unknown(mut self, enabled: bool) -> Self {
        self.group.dead_letter_unknown = enabled;
        self
    }

    /// What happens to a key whose record was dead-lettered: parked, its
    /// later records waiting behind the dead letter until it is redriven or
    /// discarded ([`DeadLetterMode::ParkKey`], the default; see
    /// [`crate::parking`]), or nothing ([`DeadLetterMode::Continue`]).
    pub fn dead_letter_mode(mut self, mode: DeadLetterMode) -> Self {
        self.dead_letter_mode = mode;
        self
    }

    /// The compacted topic that holds the parked keys
    /// ([`crate::parking::DEFAULT_PARKED_TOPIC`] unless set), created at
    /// start when missing.
    pub fn parked_topic(mut self, topic: impl Into<String>) -> Self {
        self.parked_topic = topic.into();
        self
    }

    /// How durable the parked-key table is when the consumer creates it
    /// (default: as the cluster's default; see [`TopicDurability`]).
    pub fn topic_durability(mut self, durability: TopicDurability) -> Self {
        self.group.topic_durability = durability;
        self
    }

    /// How long an assignment may take to read the parked keys of its
    /// partitions (30 s) before the consumer stops with an error.
    pub fn parked_read_timeout(mut self, timeout: Duration) -> Self {
        self.parked_read_timeout = timeout;
        self
    }

    /// The dead-letter topic is the record's topic plus this suffix (`.dlq`).
    pub fn dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.group.dlq_suffix = suffix.into();
        self
    }

    /// How often finished offsets are committed.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How long shutdown waits for running handlers before committing what
    /// finished and leaving.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.group.shutdown_timeout = timeout;
        self
    }

    /// How long a revoke waits for the revoked partitions' running handlers.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// How long one handler call may take (60 s by default; `None`: no
    /// limit). A call that takes longer is cut off (its future is dropped,
    /// so a database transaction it held rolls back) and counts as a
    /// transient failure: it is retried with backoff like any other, feeds
    /// the circuit breaker (a dependency that hangs is a dependency that is
    /// away) and is dead-lettered when the retry policy gives up. Without a
    /// limit, a handler that hangs holds its key, and the partition's
    /// commit, for good.
    pub fn handler_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.handler_timeout = timeout.into();
        self
    }

    /// Whether to keep the detailed metrics of [`ConsumerStats`]: handler
    /// durations, dead letters by topic, event type and error class, and the
    /// lag of each owned partition (from librdkafka's statistics, every
    /// `statistics.interval.ms`: 5 s unless set). On by default; the plain
    /// counters are kept either way.
    pub fn detailed_metrics(mut self, enabled: bool) -> Self {
        self.detailed_metrics = enabled;
        self
    }

    /// Whether a record's handling starts in the scheduler's task (on by
    /// default).
    ///
    /// On: the scheduler polls each record's handlers once where it
    /// dequeued the record. Handling that finishes without waiting never
    /// leaves that task; handling that waits (a database call, a retry's
    /// backoff) continues on a tokio task from its first wait on. This saves
    /// two task hand-offs per record, which for quick handlers cost more
    /// than the handling. Off: every record is handled on a tokio task of
    /// its batch, which spreads handlers that compute for long before their
    /// first wait over the runtime's worker threads instead of delaying the
    /// start of other keys' records.
    pub fn inline_start(mut self, enabled: bool) -> Self {
        self.inline_start = enabled;
        self
    }

    /// Overrides or adds a librdkafka consumer setting (SASL, TLS, timeouts…).
    /// `enable.auto.commit` and `enable.auto.offset.store` are the runtime's own.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.group.settings.insert(key.into(), value.into());
        self
    }

    /// Overrides or adds a librdkafka setting of the dead-letter producer.
    pub fn set_producer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.group
            .producer_settings
            .insert(key.into(), value.into());
        self
    }

    fn validate(&self) -> Result<(), ClientError> {
        let bad = |setting, reason: &str| {
            Err(ClientError::Setting {
                setting,
                reason: reason.to_owned(),
            })
        };
        self.group.validate("runtime", CONSUMER_FIXED)?;
        if self.handler_timeout.is_some_and(|t| t.is_zero()) {
            return bad(
                "handler_timeout",
                "must be longer than zero (None: no limit)",
            );
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be at least 1");
        }
        if self.max_in_flight < self.concurrency {
            return bad("max_in_flight", "must be at least `concurrency`");
        }
        if self.dead_letter_mode == DeadLetterMode::ParkKey && self.parked_topic.is_empty() {
            return bad("parked_topic", "must not be empty while keys are parked");
        }
        Ok(())
    }

    pub(crate) fn consumer_client_config(&self) -> ClientConfig {
        // The lag gauges come from librdkafka's statistics.
        let statistics = self
            .detailed_metrics
            .then_some(("statistics.interval.ms", "5000"));
        self.group
            .consumer_client_config(statistics, CONSUMER_FIXED)
    }

    /// The dead-letter producer: it shares the consumer's security settings.
    pub(crate) fn producer_client_config(&self) -> ClientConfig {
        settings::layered(
            &self.group.brokers,
            settings::table(PRODUCER_DEFAULTS)
                .chain(settings::security(&self.group.settings))
                .chain(settings::pairs(&self.group.producer_settings)),
        )
    }
}

crate::metrics::stats! {
    /// Counters of what a consumer did, readable while it runs (one method
    /// per figure). Register it with a Prometheus registry to export them
    /// (see [`crate::metrics`]).
    pub struct ConsumerStats {
        /// Records received from Kafka.
        consumed: counter("herald_consumer_records_consumed", "Records received from Kafka."),
        /// Records all of whose handlers succeeded.
        handled: counter(
            "herald_consumer_records_handled",
            "Records all of whose handlers succeeded."
        ),
        /// Handler retries after a transient failure.
        retried: counter("herald_consumer_retries", "Handler retries after transient failures."),
        /// Records written to a dead-letter topic.
        dead_lettered: internal,
        /// Dead-letter writes that failed (each is tried again, with backoff up
        /// to 5 s; the record stays uncommitted meanwhile).
        dead_letter_failures: counter(
            "herald_consumer_dead_letter_write_failures",
            "Dead-letter writes that failed (retried; the record stays uncommitted)."
        ),
        /// Records skipped because no handler knows their type.
        skipped_unknown: counter(
            "herald_consumer_skipped_unknown",
            "Records of unknown event types skipped."
        ),
        /// Offset commits that failed (they are retried).
        commit_failures: counter(
            "herald_consumer_commit_failures",
            "Offset commits that failed (retried)."
        ),
        /// Records received but not finished, right now.
        in_flight: gauge(
            "herald_consumer_in_flight_records",
            "Records received and not finished."
        ),
        /// Partitions assigned to this member, right now.
        assigned_partitions: gauge(
            "herald_consumer_assigned_partitions",
            "Partitions this member owns."
        ),
        /// Assignments received (each rebalance that gave this member partitions).
        assignments: counter(
            "herald_consumer_assignments",
            "Rebalances that assigned partitions to this member."
        ),
        /// Assignment callbacks of any size: above zero once this member joined
        /// its group, even when the group left it without partitions.
        rebalances: internal,
        /// 1 while the circuit breaker is open (partitions paused because
        /// handlers fail transiently across keys), else 0.
        breaker_open: gauge(
            "herald_consumer_breaker_open",
            "1 while the circuit breaker holds the partitions paused."
        ),
        /// Times the circuit breaker opened.
        breaker_trips: counter(
            "herald_consumer_breaker_trips",
            "Times the circuit breaker opened (handlers failing transiently across keys)."
        ),
        /// Handler calls cut off by [`ConsumerConfig::handler_timeout`].
        handler_timeouts: counter(
            "herald_consumer_handler_timeouts",
            "Handler calls cut off after the handler timeout (retried as transient failures)."
        ),
        /// Records parked behind an earlier dead letter of their key.
        parked: counter(
            "herald_consumer_records_parked",
            "Records parked behind an earlier dead letter of their key."
        ),
        /// Redriven records handled (each moves its key's parked list on).
        redriven: counter("herald_consumer_records_redriven", "Redriven records handled."),
        /// Parked records discarded by a person.
        discarded: counter(
            "herald_consumer_records_discarded",
            "Parked records discarded by a person."
        ),
        /// Keys parked in this member's partitions, right now.
        parked_keys: gauge(
            "herald_consumer_parked_keys",
            "Keys parked behind a dead letter in this member's partitions."
        ),
        /// Records those keys hold (their dead letters included), right now.
        parked_records: gauge(
            "herald_consumer_parked_records",
            "Records the parked keys hold, their dead letters included."
        ),
        /// When the oldest of those keys was parked (Unix milliseconds; 0 when
        /// none is).
        parked_oldest_since_ms: internal,
    }
    metrics {
        /// Handler durations per handler and event type, successes and failures
        /// alike (detailed metrics).
        handler_seconds: Family<HandlerLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram) => (
                "herald_consumer_handler_duration_seconds",
                "Handler durations, by handler and event type."
            ),
        /// Dead letters written, per source topic, event type and error class.
        dead_letters: Family<DeadLetterLabels, Counter> = Family::default() => (
            "herald_consumer_dead_lettered",
            "Records written to a dead-letter topic, by topic, event type and error class."
        ),
        /// Per owned partition: high watermark (last stable offset under
        /// `read_committed`) − committed offset, as of librdkafka's last
        /// statistics (detailed metrics).
        lag: Family<PartitionLabels, Gauge> = Family::default() => (
            "herald_consumer_lag",
            "Records behind per owned partition: high watermark minus committed offset."
        ),
    }
}

impl Collector for ConsumerStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.encode_figures(&mut encoder)?;
        let oldest = self.parked_oldest_since_ms();
        let age_seconds = if oldest == 0 {
            0
        } else {
            let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
            now.saturating_sub(oldest) / 1000
        };
        encode_gauge(
            &mut encoder,
            "herald_consumer_parked_oldest_age_seconds",
            "Age of the oldest parked key (0 when none is parked).",
            age_seconds,
        )
    }
}

/// A consumer group member that runs a [`Router`] over its topics: records
/// of one key in order, keys concurrently, retries with backoff, dead
/// letters to `<topic>.dlq`, and commits of finished offsets only.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
/// # struct OrderPlaced {
/// #     #[event(id)] event_id: uuid::Uuid,
/// #     #[event(key)] order_id: uuid::Uuid,
/// #     #[event(time)] at: chrono::DateTime<chrono::Utc>,
/// # }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
/// # #[serde(tag = "event_type")]
/// # #[event(aggregate = "order")]
/// # enum OrderEvent { OrderPlaced(OrderPlaced) }
/// use herald::HandlerError;
/// use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
/// # async fn run() -> Result<(), herald_kafka::ClientError> {
/// let router = Router::new().handle(
///     "projection",
///     |event: OrderEvent, record: RecordInfo| async move {
///         let OrderEvent::OrderPlaced(placed) = event;
///         println!("{} at offset {}", placed.order_id, record.offset);
///         // Err(HandlerError::transient(..)) retries; ::permanent dead-letters.
///         Ok::<_, HandlerError>(())
///     },
/// );
/// let config = ConsumerConfig::new("127.0.0.1:9092", "projection", ["order-events"])
///     .concurrency(32);
/// let consumer = Consumer::new(config, router)?;
/// // Runs until the future completes, then drains and commits.
/// consumer
///     .run(async { tokio::signal::ctrl_c().await.ok(); })
///     .await
/// # }
/// ```
pub struct Consumer {
    config: ConsumerConfig,
    router: Router,
    stats: Arc<ConsumerStats>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group_id", &self.config.group.group_id)
            .field("topics", &self.config.group.topics)
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Validates the configuration. Nothing connects until [`Consumer::run`].
    pub fn new<S>(config: ConsumerConfig, router: Router<S>) -> Result<Self, ClientError> {
        config.validate()?;
        let router = router.erase_state();
        if router.handlers.is_empty() {
            return Err(ClientError::Setting {
                setting: "router",
                reason: "no handler registered".to_owned(),
            });
        }
        Ok(Self {
            config,
            router,
            stats: Arc::default(),
        })
    }

    /// Live counters of this consumer.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Counts into `stats` instead of counters of its own: a consumer made
    /// again after a failure (by a supervisor) goes on with the series the
    /// first one exported.
    pub fn with_stats(mut self, stats: Arc<ConsumerStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Joins the group and handles records until `shutdown` completes, then
    /// drains, commits and leaves the group. Must be called inside a tokio
    /// runtime (handlers run on it).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ClientError> {
        runtime::run(self.config, self.router, self.stats, shutdown).await
    }
}

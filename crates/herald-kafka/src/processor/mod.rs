//! Exactly-once consume → transform → produce with Kafka transactions
//! (DESIGN.md guarantee 6).
//!
//! A [`Transform`] turns one typed input event into zero or more output
//! records for any topics. The [`Processor`] runs it: the outputs of a batch
//! of inputs, the dead letters of poison inputs, and the consumer offsets of
//! those inputs are committed in **one Kafka transaction**, so a
//! `read_committed` reader of the outputs sees the effect of every input
//! exactly once, whatever crashes, restarts or rebalances happen.
//!
//! ```no_run
//! use herald::HandlerError;
//! use herald_kafka::processor::{Input, Processor, ProcessorConfig};
//! # #[derive(serde::Serialize, serde::Deserialize)] #[serde(tag = "event_type")] enum OrderEvent {}
//! # impl herald::Event for OrderEvent { const AGGREGATE_TYPE: &'static str = "order"; const EVENT_TYPES: &'static [&'static str] = &[];
//! #   fn event_type(&self) -> &'static str { match *self {} } fn event_id(&self) -> uuid::Uuid { match *self {} }
//! #   fn aggregate_id(&self) -> String { match *self {} } fn occurred_at(&self) -> chrono::DateTime<chrono::Utc> { match *self {} } }
//! # fn fulfil(e: &OrderEvent) -> OrderEvent { match *e {} }
//! # async fn run() -> Result<(), herald_kafka::processor::ProcessorError> {
//! let config = ProcessorConfig::new("127.0.0.1:9092", "fulfillment", ["order-events"], "worker-1")
//!     .source("/fulfillment");
//! let processor = Processor::new(config, |event: OrderEvent, input: Input| async move {
//!     // Key = aggregate id, envelope headers, and the input's trace context.
//!     Ok::<_, HandlerError>(vec![input.output("fulfillment-events", &fulfil(&event))?])
//! })?;
//! processor.run(async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```
//!
//! # How it works
//!
//! One dedicated thread owns the `read_committed` consumer (auto-commit off)
//! and the transactional producer (`transactional.id` =
//! `<group_id>-<instance_id>`, see [`ProcessorConfig::new`]). At start it
//! calls `init_transactions`, which fences any earlier instance with the same
//! id and aborts its open transaction. Then it polls and, per input in
//! partition order: begins a transaction if none is open, runs the transform
//! (on the caller's tokio runtime), and produces its outputs. When the
//! batch is full or old enough it awaits their delivery, sends the inputs'
//! next offsets with the consumer's group metadata
//! (`send_offsets_to_transaction`, so a member fenced by a rebalance cannot
//! commit) and commits.
//!
//! # What a transaction costs
//!
//! librdkafka speaks the transaction protocol of before KIP-890 (also with
//! Kafka 4 brokers): the producer adds every partition it writes to, and
//! the consumer group's offsets, to the transaction in round trips of
//! their own, and right after a commit the coordinator refuses them
//! (`CONCURRENT_TRANSACTIONS`) until it has written the commit markers;
//! librdkafka then waits a fixed 20 ms (partitions) or `retry.backoff.ms`
//! (offsets) before it tries again. So for the first 20 ms after a commit
//! (or abort) outputs are held back, and produced when that time is over
//! or the transaction is done, whichever comes first (at most 10,000 are
//! held; the producer's `linger.ms` is 0, since held outputs come all at
//! once); and the offsets are sent once the outputs are delivered. Each
//! transaction then adds about four round trips to the coordinator to an
//! at-least-once batch.
//! The debug event `transaction committed` gives each transaction's time
//! split (`begin_us`, `process_us`, `offsets_us`, `deliveries_us`,
//! `commit_us`); `herald-bench processor` reports it.
//!
//! - **Transient failure** (a transform's [`HandlerError::transient`], or an
//!   abortable Kafka error): the transaction is aborted, every partition in
//!   it is rewound (seek) to the first offset it had in the transaction —
//!   the last committed offset — and processing resumes after a backoff from
//!   the [`RetryPolicy`](herald::RetryPolicy) (the failing input's partition
//!   is paused meanwhile; the others continue).
//! - **Poison input** (undecodable, a permanent error, a panic, retries
//!   exhausted, or an output Kafka refuses for good): the transaction is
//!   aborted and rewound likewise, and when the input comes round again it is
//!   dead-lettered *inside* the transaction — the record built by
//!   [`dead_letter`](crate::dlq::dead_letter) is one of the outputs — so the
//!   partition keeps flowing and the dead letter is written exactly once.
//!   (When the failing input is the first of its transaction nothing is
//!   redone: it is dead-lettered at once.)
//! - **Fatal producer error** (fenced by a newer instance, or librdkafka's
//!   fatal state): the instance stops at once, logs why, and
//!   [`Processor::run`] returns [`ProcessorError::Fenced`] or
//!   [`ProcessorError::Fatal`]. Nothing of the open transaction is committed.
//! - **Rebalance**: before partitions are revoked (in the consumer context's
//!   pre-rebalance callback, while they are still ours) the open transaction
//!   is committed — or aborted if that fails or the assignment was lost — so
//!   the next owner starts exactly where this instance's outputs end.
//! - **Shutdown**: when the `shutdown` future completes, the running
//!   transform gets `shutdown_timeout` to finish, the open transaction is
//!   committed, and the consumer leaves the group.
//!
//! Inputs are transformed one at a time, in order: per-key order holds
//! trivially, and scale comes from partitions spread over instances.
//!
//! # State
//!
//! A transform that keeps state (a stock count per SKU, say) emits every
//! change as a record to a compacted changelog topic — just another output,
//! so it commits or aborts with the rest. [`changelog::ChangelogTable`] keeps
//! such a table in memory with uncommitted changes apart, and
//! [`ProcessorConfig::changelog`] makes the processor restore it at start
//! (`read_committed`, to the end, after fencing the previous incarnation so
//! no zombie commits behind its back) through [`Transform::restore`]. The
//! processor calls [`Transform::commit`] / [`Transform::rollback`] after each
//! transaction so the table follows what Kafka kept. See
//! [`changelog`] for the limits (state is restored once, at start).
//! [`ProcessorConfig::partitioned_state`] partitions the state like the
//! input instead, so several instances can share a group's work: each
//! changelog partition is restored when its input partition is assigned,
//! and dropped ([`Transform::revoked`]) when it is revoked.
//!
//! # Repartitioning
//!
//! An output's key is its event's aggregate id ([`Input::output`]), so a
//! transform re-keys by emitting an event of another aggregate: a
//! "reserve SKU *s*" request keyed by SKU, made from an order keyed by
//! order id. Written to an internal topic that a next processor consumes,
//! it moves the work to the partition that owns that key's state, and an
//! answer keyed by the original id moves it back. Each hop is exactly
//! once on its own: the outputs commit with the inputs' offsets, and the
//! next processor reads `read_committed`. To join the answers with the
//! first processor's own input, subscribe it to both topics with one
//! partition count and [`ProcessorConfig::partitioned_state`], which
//! co-partitions them. The `orders` service's fulfillment topology
//! (`orders/src/fulfillment/`) goes from order to SKU and back this way.
//!
//! # Duplicate inputs
//!
//! An input whose `event_id` this processor already completed (the same
//! event published twice by an at-least-once producer, at another offset)
//! produces no output and no state change, and its offset advances in the
//! transaction as usual: the completed ids are transactional state of
//! their own, on by default. See [`dedup`] for the window and its limits.
//!
//! # At least once
//!
//! [`ProcessorConfig::guarantee`]`(`[`Guarantee::AtLeastOnce`]`)` runs the
//! same loop without transactions: no `transactional.id` (so no fencing),
//! the outputs and dead letters of a batch go out through an idempotent
//! producer, and when the batch is full or old enough every delivery is
//! awaited before the inputs' offsets are committed through the consumer.
//! A crash, a failed delivery or commit, or a lost assignment makes the
//! batch's inputs come again: outputs may be duplicated, never lost (a
//! failed delivery or commit rewinds to the last committed offsets like an
//! abort, but what was written stays written). A failing input does not
//! make its neighbours redo their work: the batch before it is committed
//! first (with any output the failing input made before it failed). Poison
//! is dead-lettered, and the dead letter delivered, before its offset is
//! committed. Use it when the outputs' consumers are idempotent, or to
//! measure what the transactions cost (`herald-bench processor`).
//!
//! # librdkafka's mock cluster
//!
//! The in-process mock cluster (`test.mock.num.brokers`, used by the
//! embedded development mode) accepts the transactional calls but does not
//! implement transaction semantics faithfully (fencing, aborted records
//! hidden from `read_committed` readers). There the processor runs but
//! **exactly-once is not in force**; the embedded mode says so in its log.
//! herald's exactly-once tests all run on the real broker.

pub mod changelog;
mod config;
pub mod dedup;
mod runtime;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herald::{Envelope, Event, HandlerError, TraceContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio_util::sync::CancellationToken;

use crate::error::ClientError;
use crate::publisher::OutgoingRecord;
pub use changelog::{ChangelogRecord, ChangelogTable};
pub use config::{Guarantee, ProcessorConfig};
pub use dedup::Deduplication;

/// What a transform knows about the input it handles.
#[derive(Debug, Clone)]
pub struct Input {
    /// The topic the input came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The processor's consumer group.
    pub group_id: Arc<str>,
    /// The decoded envelope (event id, key, times, trace context).
    pub envelope: Arc<Envelope>,
    /// 1 on the first try, 2 on the first retry, and so on.
    pub attempt: u32,
    pub(crate) source: Arc<str>,
}

impl Input {
    /// The trace context of the input, carried into its outputs.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.envelope.trace.as_ref()
    }

    /// The output record for `event` on `topic`: key = the event's aggregate
    /// id, the envelope headers (`ce_source` = [`ProcessorConfig::source`]),
    /// and the input's trace context. An event that cannot be serialized is a
    /// bug no retry fixes, so it is a permanent error (the input is
    /// dead-lettered).
    pub fn output<O: Event>(&self, topic: &str, event: &O) -> Result<OutgoingRecord, HandlerError> {
        let envelope = Envelope::encode(event, &self.source).map_err(HandlerError::permanent)?;
        Ok(self.output_envelope(topic, envelope))
    }

    /// The output record for an already encoded envelope; it gets the
    /// input's trace context unless it has one of its own.
    pub fn output_envelope(&self, topic: &str, mut envelope: Envelope) -> OutgoingRecord {
        if envelope.trace.is_none() {
            envelope.trace = self.envelope.trace.clone();
        }
        OutgoingRecord::from_envelope(topic, &envelope)
    }
}

/// Turns one input event of family `E` into output records.
///
/// Implemented for every
/// `FnMut(E, Input) -> impl Future<Output = Result<Vec<OutgoingRecord>, HandlerError>>`;
/// implement it on a struct for a stateful transform (see
/// [`changelog::ChangelogTable`]).
///
/// The processor calls the methods from one thread, one at a time.
pub trait Transform<E: Event>: Send + 'static {
    /// The outputs of `event`, to any topics (build them with
    /// [`Input::output`]). They are committed together with the input's
    /// offset, or not at all. Return [`HandlerError::transient`] to have the
    /// input retried with backoff, [`HandlerError::permanent`] to dead-letter
    /// it. A call whose transaction aborts is made again later: any in-memory
    /// change it made must be undone by [`Transform::rollback`].
    fn process(
        &mut self,
        event: E,
        input: Input,
    ) -> impl Future<Output = Result<Vec<OutgoingRecord>, HandlerError>> + Send;

    /// One record of a changelog topic ([`ProcessorConfig::changelog`]),
    /// during the restore at start, in offset order per partition. An error
    /// stops the start-up. The default ignores changelogs.
    ///
    /// With [`ProcessorConfig::partitioned_state`] the restore happens when
    /// input partitions are assigned, for the same partitions of each
    /// changelog, before the first input of those partitions; an error then
    /// stops the processor (restartable).
    ///
    /// After a restart ([`ProcessorConfig::restart`]) the changelogs are
    /// restored again, after [`Transform::rollback`], over the state the
    /// transform already holds: a restore must set what a record says (as
    /// [`changelog::ChangelogTable`] does), not add to it.
    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        let _ = record;
        Ok(())
    }

    /// Everything [`Transform::process`] returned since the last commit or
    /// rollback is now committed in Kafka: make in-memory changes permanent.
    fn commit(&mut self) {}

    /// Everything since the last commit was discarded (aborted transaction,
    /// or a failed call): undo in-memory changes; the inputs come again.
    fn rollback(&mut self) {}

    /// Outputs that close the open transaction (at least once: the batch),
    /// asked for once when it is about to commit, after its last input; not
    /// when it aborts ([`Transform::rollback`] follows then). `partitions`
    /// are the input partitions with inputs in it; return each output with
    /// the one it belongs to (with [`ProcessorConfig::partitioned_state`] a
    /// changelog record goes to that partition). An error aborts the
    /// transaction, and its inputs come again. For state cheaper written
    /// once per transaction than once per input (the duplicate-input filter
    /// writes its completed ids this way). The default has none.
    fn closing(&mut self, partitions: &[i32]) -> Result<Vec<(i32, OutgoingRecord)>, HandlerError> {
        let _ = partitions;
        Ok(Vec::new())
    }

    /// With [`ProcessorConfig::partitioned_state`]: the state of these
    /// partitions is no longer this instance's (their input partitions were
    /// revoked, after the open transaction was committed or rolled back, or
    /// the processor restarts): drop it, e.g. with
    /// [`ChangelogTable::drop_partitions`]. The next owner restores it. The
    /// default keeps everything.
    fn revoked(&mut self, partitions: &[i32]) {
        let _ = partitions;
    }
}

impl<E, F, Fut> Transform<E> for F
where
    E: Event,
    F: FnMut(E, Input) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<OutgoingRecord>, HandlerError>> + Send,
{
    fn process(
        &mut self,
        event: E,
        input: Input,
    ) -> impl Future<Output = Result<Vec<OutgoingRecord>, HandlerError>> + Send {
        self(event, input)
    }
}

/// Why a processor stopped or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessorError {
    /// Bad configuration, or a client that could not be created.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Another instance with the same `transactional.id` started: this one is
    /// a zombie and stopped without committing its open transaction.
    #[error("processor fenced: another instance took over transactional.id {transactional_id:?} ({code:?}: {reason}); this instance stopped and committed nothing further")]
    Fenced {
        /// The contested transactional id.
        transactional_id: String,
        /// librdkafka's error code.
        code: RDKafkaErrorCode,
        /// librdkafka's explanation.
        reason: String,
    },
    /// The broker aborted the open transaction while the processor could
    /// not reach it (the transaction outlived `transaction_timeout`), and
    /// bumped the producer's epoch: the producer reports itself fenced,
    /// though no other instance took over. Unlike [`ProcessorError::Fenced`]
    /// the caller should start a fresh processor (a new transform whose
    /// state the changelogs restore), as a supervisor would; `run` does not
    /// restart itself for it (see [`ProcessorError::is_restartable`]).
    #[error("processor {transactional_id:?}: the broker aborted its transaction while it could not be reached, and its producer is fenced ({code:?}: {reason})")]
    TransactionExpired {
        /// The producer's transactional id.
        transactional_id: String,
        /// librdkafka's error code.
        code: RDKafkaErrorCode,
        /// librdkafka's explanation.
        reason: String,
    },
    /// The producer or consumer hit an error librdkafka calls fatal.
    #[error("fatal Kafka error in processor {transactional_id:?} while {operation} ({code:?}): {reason}")]
    Fatal {
        /// The producer's transactional id.
        transactional_id: String,
        /// What the processor was doing.
        operation: &'static str,
        /// librdkafka's error code.
        code: RDKafkaErrorCode,
        /// librdkafka's explanation.
        reason: String,
    },
    /// A Kafka operation failed in a way the processor cannot recover from
    /// safely (it stops rather than risk skipping inputs).
    #[error("processor {transactional_id:?}: {operation} failed: {source}")]
    Kafka {
        /// The producer's transactional id.
        transactional_id: String,
        /// What the processor was doing.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// A Kafka call did not return within its timeout and a grace period
    /// (a librdkafka defect: see the `send_offsets` notes in the processor
    /// runtime). Its producer is abandoned; a restarted processor fences
    /// it and aborts its transaction.
    #[error("processor {transactional_id:?}: {operation} did not return within {waited:?}; its producer is abandoned")]
    Hung {
        /// The producer's transactional id.
        transactional_id: String,
        /// What the processor was doing.
        operation: &'static str,
        /// How long the processor waited.
        waited: std::time::Duration,
    },
    /// A changelog could not be read to its end at start-up.
    #[error("restoring state from changelog {topic:?} failed: {reason}")]
    Restore {
        /// The changelog topic.
        topic: String,
        /// What went wrong.
        reason: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The processor thread panicked or could not start.
    #[error("processor thread failed: {0}")]
    Thread(String),
}

impl ProcessorError {
    /// Whether this instance was fenced by a newer one with its id.
    pub fn is_fenced(&self) -> bool {
        matches!(self, ProcessorError::Fenced { .. })
    }

    /// Whether the broker aborted the open transaction while the processor
    /// could not reach it: start a fresh processor (no other instance is
    /// involved, unlike [`ProcessorError::is_fenced`]).
    pub fn is_transaction_expired(&self) -> bool {
        matches!(self, ProcessorError::TransactionExpired { .. })
    }

    /// Whether a processor that stopped on this error may be started again
    /// with fresh clients ([`ProcessorConfig::restart`]): yes after Kafka
    /// errors, fatal producer states and changelogs that could not be read
    /// (what a broker outage leaves behind); no for
    /// [`ProcessorError::TransactionExpired`] (restarted in place, with the
    /// transform's state rolled back and restored on top, the orders
    /// service's broker-outage scenario produced duplicate outcomes in 2 of
    /// 2 runs, cause not yet found; a fresh processor, as its supervisor
    /// makes, did not); no when another live instance
    /// fenced this one (starting again would fence it back, and the two
    /// would take turns), for bad configuration, for a transform that
    /// rejected its own changelog, and after a panic on the processor
    /// thread (the transform's state is then unknown).
    pub fn is_restartable(&self) -> bool {
        match self {
            ProcessorError::Fatal { .. }
            | ProcessorError::Kafka { .. }
            | ProcessorError::Hung { .. } => true,
            ProcessorError::Client(ClientError::Kafka { .. }) => true,
            ProcessorError::Restore { source, .. } => source
                .as_ref()
                .is_none_or(|s| s.downcast_ref::<HandlerError>().is_none()),
            ProcessorError::Fenced { .. }
            | ProcessorError::TransactionExpired { .. }
            | ProcessorError::Client(_)
            | ProcessorError::Thread(_) => false,
        }
    }
}

crate::metrics::stats! {
    /// Counters of what a processor did, readable while it runs (one method
    /// per figure); a Prometheus collector (see [`crate::metrics`]).
    pub struct ProcessorStats {
        /// Inputs received from Kafka (redeliveries after a rewind count again).
        consumed: counter(
            "herald_processor_inputs_consumed",
            "Inputs received (redeliveries after a rewind count again)."
        ),
        /// Successful transform calls.
        processed: internal,
        /// Output records produced (into transactions that may still abort).
        produced: counter(
            "herald_processor_outputs_produced",
            "Outputs produced into transactions (which may still abort)."
        ),
        /// Dead letters produced (into transactions that may still abort).
        dead_lettered: counter(
            "herald_processor_dead_lettered",
            "Poison inputs dead-lettered inside a transaction."
        ),
        /// Inputs skipped because their type is unknown to the family.
        skipped_unknown: internal,
        /// Transient transform failures that will be retried.
        retried: counter("herald_processor_retries", "Transient transform failures retried."),
        /// Committed transactions (at least once: batches whose offsets were
        /// committed).
        committed: counter(
            "herald_processor_transactions_committed",
            "Committed processor transactions."
        ),
        /// Inputs whose offsets were committed.
        committed_inputs: counter(
            "herald_processor_inputs_committed",
            "Inputs whose offsets were committed with their outputs."
        ),
        /// Aborted transactions (at least once: batches rewound to be redone).
        aborted: counter(
            "herald_processor_transactions_aborted",
            "Aborted processor transactions."
        ),
        /// Inputs dropped as duplicates of an already processed event
        /// ([`ProcessorConfig::deduplication`]), counted when their
        /// transaction commits (an aborted one's inputs come round again).
        duplicates: counter(
            "herald_processor_duplicates_dropped",
            "Inputs dropped because their event was already processed."
        ),
        /// Times the processor stopped on a restartable error and was started
        /// again with fresh clients ([`ProcessorConfig::restart`]).
        restarts: counter(
            "herald_processor_restarts",
            "Times the processor was started again with fresh clients after a failure."
        ),
        /// 1 while the processor waits to be started again after a failure.
        restarting: gauge(
            "herald_processor_restarting",
            "1 while the processor waits to be started again after a failure."
        ),
    }
}

impl prometheus_client::collector::Collector for ProcessorStats {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        self.encode_figures(&mut encoder)
    }
}

/// An exactly-once processor: a consumer group member that runs a
/// [`Transform`] over its input topics inside Kafka transactions.
pub struct Processor<E, T> {
    config: ProcessorConfig,
    transform: T,
    stats: Arc<ProcessorStats>,
    _family: std::marker::PhantomData<fn() -> E>,
}

impl<E, T> std::fmt::Debug for Processor<E, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("group_id", &self.config.group.group_id)
            .field("guarantee", &self.config.guarantee)
            .field("transactional_id", &self.config.transactional_id())
            .field("topics", &self.config.group.topics)
            .finish_non_exhaustive()
    }
}

impl<E: Event, T: Transform<E>> Processor<E, T> {
    /// Validates the configuration. Nothing connects until [`Processor::run`].
    pub fn new(config: ProcessorConfig, transform: T) -> Result<Self, ProcessorError> {
        config.validate()?;
        Ok(Self {
            config,
            transform,
            stats: Arc::default(),
            _family: std::marker::PhantomData,
        })
    }

    /// Live counters of this processor.
    pub fn stats(&self) -> Arc<ProcessorStats> {
        Arc::clone(&self.stats)
    }

    /// Its producer's `transactional.id` (`<group>-<instance>`).
    pub fn transactional_id(&self) -> String {
        self.config.transactional_id()
    }

    /// Counts into `stats` instead of counters of its own: a processor made
    /// again after a failure (by a supervisor) goes on with the series the
    /// first one exported.
    pub fn with_stats(mut self, stats: Arc<ProcessorStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Fences earlier incarnations, restores the changelogs, joins the group
    /// and processes inputs until `shutdown` completes (then commits and
    /// leaves) or an error stops it. Must be called inside a tokio runtime:
    /// the transform runs on it.
    ///
    /// After a restartable error ([`ProcessorError::is_restartable`]: a
    /// broker outage's aftermath, say) it starts again by itself, as
    /// [`ProcessorConfig::restart`] says: the transform's uncommitted
    /// changes are rolled back, a fresh transactional producer fences
    /// whatever the old one left open, the changelogs are restored again
    /// and consumption resumes from the committed offsets. Nothing is
    /// skipped or committed twice: that is the transaction protocol's work.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProcessorError> {
        let stop = CancellationToken::new();
        let Processor {
            config,
            transform,
            stats,
            ..
        } = self;
        let run = async {
            let Some((topic, settings)) = config.deduplication_in_force() else {
                return supervise(config, transform, stats, &stop).await;
            };
            ensure_completed_topic(&config, &topic, &stats, &stop).await?;
            let ids = dedup::CompletedIds::new(topic.clone(), settings, config.partitioned_state);
            let transform = dedup::Deduplicated::new(transform, ids, Arc::clone(&stats));
            supervise(config.changelog(topic), transform, stats, &stop).await
        };
        tokio::pin!(run, shutdown);
        tokio::select! {
            result = &mut run => return result,
            () = &mut shutdown => stop.cancel(),
        }
        run.await
    }
}

/// Runs the engine, and again after each restartable failure (with backoff)
/// until `stop`.
async fn supervise<E: Event, T: Transform<E>>(
    config: ProcessorConfig,
    mut transform: T,
    stats: Arc<ProcessorStats>,
    stop: &CancellationToken,
) -> Result<(), ProcessorError> {
    let mut failures: u32 = 0;
    loop {
        let started = std::time::Instant::now();
        let (result, back) = runtime::run(
            config.clone(),
            transform,
            Arc::clone(&stats),
            stop.clone().cancelled_owned(),
        )
        .await;
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let (Some(policy), Some(back)) = (config.restart.as_ref(), back) else {
            return Err(error);
        };
        if stop.is_cancelled() || !error.is_restartable() {
            return Err(error);
        }
        transform = back;
        // What was not committed is gone with the old clients.
        transform.rollback();
        // A run that lasted starts the backoff over.
        if started.elapsed() >= RESTART_RESET_AFTER {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = policy.pause(failures);
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %error,
            failures,
            ?delay,
            transactional_id = %config.transactional_id(),
            "processor failed; starting it again with fresh clients (committed offsets and \
             changelogs are where it resumes)"
        );
        if !wait_to_restart(delay, &stats, stop).await {
            return Ok(());
        }
    }
}

/// Waits `delay` before a restart, reported as restarting meanwhile;
/// `false` when `stop` came first.
async fn wait_to_restart(
    delay: Duration,
    stats: &ProcessorStats,
    stop: &CancellationToken,
) -> bool {
    stats.restarting.store(1, Ordering::Relaxed);
    let waited = tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = stop.cancelled() => false,
    };
    stats.restarting.store(0, Ordering::Relaxed);
    waited
}

/// A run shorter than this counts towards the restart backoff.
const RESTART_RESET_AFTER: Duration = Duration::from_secs(60);

/// Creates the completed-ids topic, trying again (as [`ProcessorConfig::restart`]
/// allows) while the brokers cannot be reached.
async fn ensure_completed_topic(
    config: &ProcessorConfig,
    topic: &str,
    stats: &ProcessorStats,
    stop: &CancellationToken,
) -> Result<(), ProcessorError> {
    let mut failures: u32 = 0;
    loop {
        let client = config.restore_client_config();
        // Partitioned state: as many partitions as the input (the start-up
        // check in the runtime tells a mismatch by name).
        let partitions = match config.group.topics.first() {
            Some(input) if config.partitioned_state => {
                crate::admin::partition_count(&client, input, config.operation_timeout)
                    .map(|n| i32::try_from(n).unwrap_or(i32::MAX).max(1))
            }
            _ => Ok(1),
        };
        let created = match partitions {
            Ok(partitions) => {
                crate::admin::ensure_compacted_topic(
                    &client,
                    topic,
                    partitions,
                    config.group.topic_durability,
                    config.operation_timeout,
                )
                .await
            }
            Err(error) => Err(error),
        };
        let error = match created {
            Ok(_) => return Ok(()),
            Err(error) => ProcessorError::from(error),
        };
        let Some(policy) = config.restart.as_ref().filter(|_| error.is_restartable()) else {
            return Err(error);
        };
        failures = failures.saturating_add(1);
        let delay = policy.pause(failures);
        tracing::error!(%error, ?delay, "cannot create the processor's completed-ids topic; trying again");
        if !wait_to_restart(delay, stats, stop).await {
            return Ok(());
        }
    }
}

//! The processor thread: owns the `read_committed` consumer and the
//! transactional producer, runs the transform per input, and begins, commits
//! or aborts the transactions (see the module documentation of
//! [`processor`](super) for the rules). At least once, the same loop runs
//! batches instead of transactions: "commit" awaits the deliveries, then
//! commits the offsets through the consumer; "abort" rewinds.
//!
//! # Layout
//! - this file: the `Engine` the poll loop and the rebalance callbacks
//!   share, the thread that runs it (`run`) and the poll loop.
//! - `input`: one input, from decoding to being part of the open batch.
//! - `failures`: failed transform calls, retries and dead letters.
//! - `transactions`: the producer, and beginning, committing and aborting
//!   a transaction (or, at least once, a batch).
//! - `rebalance`: partitions revoked and assigned, rewinds and pauses.
//! - `partitioned`: state partitioned like the input, restored on
//!   assignment and dropped on revocation.

mod failures;
mod input;
mod partitioned;
mod rebalance;
mod transactions;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use herald::{Event, RetryPolicy};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer as _, ThreadedProducer};
use tokio_util::sync::CancellationToken;

use super::changelog::read_to_end;
use super::{Guarantee, ProcessorConfig, ProcessorError, ProcessorStats, Transform};
use crate::error::is_fenced_code;
use crate::error::ClientError;
use crate::poll_thread::{self, PollThread, TopicNames};

use self::failures::Attempts;
use self::rebalance::ProcessorContext;
use self::transactions::{init_transactions, sweep_at_start, Txn, TxnProducerContext};

/// A topic-partition.
type Tp = (Arc<str>, i32);
/// One input: topic, partition, offset.
type InputRef = (Arc<str>, i32, i64);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never leaves this state half-updated in a way that matters more
    // than stopping the processor would.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything the poll loop and the rebalance callback both touch. They run
/// on the same thread; the mutex only makes the context `Sync`.
struct Engine<E, T> {
    transform: T,
    /// Threaded: its own thread serves delivery reports, which librdkafka
    /// needs while `abort_transaction` / `commit_transaction` wait. Shared
    /// with the thread that sends the offsets to a transaction (see
    /// `Engine::send_offsets`), which may outlive the engine.
    producer: Arc<ThreadedProducer<TxnProducerContext>>,
    tokio: tokio::runtime::Handle,
    stats: Arc<ProcessorStats>,
    stopping: CancellationToken,
    guarantee: Guarantee,
    group_id: Arc<str>,
    source: Arc<str>,
    transactional_id: String,
    topics_label: String,
    retry: RetryPolicy,
    dead_letter_unknown: bool,
    dlq_suffix: String,
    batch_size: usize,
    batch_time: Duration,
    operation_timeout: Duration,
    shutdown_timeout: Duration,
    topics: TopicNames,
    /// Topics this instance has swept of earlier instances' open
    /// transactions (see `crate::sweep`).
    swept: HashSet<Arc<str>>,
    txn: Option<Txn>,
    /// Exactly once: until then, outputs are held back rather than
    /// produced (right after a commit or abort; see
    /// `Engine::release_held`).
    hold_until: Option<Instant>,
    failures: HashMap<InputRef, Attempts>,
    /// Partitions to seek back to these offsets before the next poll.
    rewind: HashMap<Tp, i64>,
    /// Inputs whose failure aborted a transaction with earlier inputs: when
    /// they come again, the earlier inputs are committed first, so one
    /// failing input makes its neighbours redo their work once, not on
    /// every retry.
    commit_before: HashSet<InputRef>,
    paused: HashSet<Tp>,
    resume_at: Option<Instant>,
    /// Consecutive failed transactions (Kafka errors), for the backoff.
    kafka_failures: u32,
    fatal: Option<ProcessorError>,
    /// The consumer is closing: rebalance callbacks touch no transaction.
    closing: bool,
    /// State partitioned like the input, when configured.
    partitioned: Option<self::partitioned::PartitionedState>,
    _family: PhantomData<fn() -> E>,
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    /// Whether batches are Kafka transactions (exactly once).
    fn transactional(&self) -> bool {
        self.guarantee == Guarantee::ExactlyOnce
    }

    /// Records a fatal error if `error` (or the producer's state) is fatal.
    fn check_fatal(&mut self, operation: &'static str, error: &KafkaError) -> bool {
        if self.fatal.is_some() {
            return true;
        }
        let txn_fatal = matches!(error, KafkaError::Transaction(e) if e.is_fatal());
        let code = error.rdkafka_error_code();
        let client_fatal = self.producer.client().fatal_error();
        if !txn_fatal && client_fatal.is_none() && !code.is_some_and(is_fenced_code) {
            return false;
        }
        let (code, reason) =
            client_fatal.unwrap_or((code.unwrap_or(RDKafkaErrorCode::Fatal), error.to_string()));
        let fenced = is_fenced_code(code) || error.rdkafka_error_code().is_some_and(is_fenced_code);
        // A transaction that outlives `transaction.timeout.ms` while the
        // broker cannot be reached is aborted by its coordinator, which bumps
        // the producer's epoch: the producer then reports itself fenced,
        // though no other instance exists. Told apart by what came before:
        // Kafka errors or lost brokers since the last commit. A live zombie
        // (paused, or hung in its transform) meets the fence with no such
        // errors and stops as fenced. Either way this processor stops; the
        // distinction tells its supervisor to start a fresh one at once
        // (should a network-partitioned zombie be restarted on this rule,
        // its fresh producer fences the newer instance, which sees a fence
        // out of the blue and stops: one instance goes on, and the
        // transactions keep every output exactly once).
        let unreachable =
            self.kafka_failures > 0 || self.producer.context().unreachable.load(Ordering::Relaxed);
        if fenced && unreachable {
            tracing::warn!(
                transactional_id = %self.transactional_id, ?code, %reason, operation,
                "the broker aborted the open transaction while it could not be reached (it outlived transaction_timeout); \
                 the processor stops for a fresh one to take over"
            );
            self.fatal = Some(ProcessorError::TransactionExpired {
                transactional_id: self.transactional_id.clone(),
                code,
                reason,
            });
        } else if fenced {
            tracing::error!(
                transactional_id = %self.transactional_id, ?code, %reason, operation,
                "processor fenced: another instance with the same transactional.id has started; this instance stops without committing"
            );
            self.fatal = Some(ProcessorError::Fenced {
                transactional_id: self.transactional_id.clone(),
                code,
                reason,
            });
        } else {
            tracing::error!(
                transactional_id = %self.transactional_id, ?code, %reason, operation,
                "fatal Kafka error: the processor stops"
            );
            self.fatal = Some(ProcessorError::Fatal {
                transactional_id: self.transactional_id.clone(),
                operation,
                code,
                reason,
            });
        }
        true
    }

    fn txn_due(&self) -> bool {
        self.txn
            .as_ref()
            .is_some_and(|t| t.inputs >= self.batch_size || t.started.elapsed() >= self.batch_time)
    }

    fn poll_timeout(&self) -> Duration {
        let mut timeout = Duration::from_millis(100);
        if let Some(txn) = &self.txn {
            timeout = timeout.min(self.batch_time.saturating_sub(txn.started.elapsed()));
        }
        if let Some(at) = self.resume_at {
            timeout = timeout.min(at.saturating_duration_since(Instant::now()));
        }
        if let Some(until) = self
            .hold_until
            .filter(|_| self.txn.as_ref().is_some_and(|t| !t.held.is_empty()))
        {
            // Held outputs go out when the hold ends, inputs or not.
            timeout = timeout.min(until.saturating_duration_since(Instant::now()));
        }
        timeout
    }
}

/// How one run of the engine ended, with the transform when it came back
/// (it does not after a panic on the processor thread).
pub(crate) type Ended<T> = (Result<(), ProcessorError>, Option<T>);

pub(crate) async fn run<E: Event, T: Transform<E>>(
    config: ProcessorConfig,
    transform: T,
    stats: Arc<ProcessorStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> Ended<T> {
    let stopping = CancellationToken::new();
    let stop = Arc::new(AtomicBool::new(false));
    let tokio = tokio::runtime::Handle::current();
    let transactional_id = config.transactional_id();
    let thread_stop = Arc::clone(&stop);
    let thread_stopping = stopping.clone();
    let thread = PollThread::spawn(format!("herald-processor-{transactional_id}"), move || {
        run_engine(
            config,
            transform,
            stats,
            tokio,
            thread_stopping,
            &thread_stop,
        )
    });
    let thread = match thread {
        Ok(thread) => thread,
        Err(reason) => return (Err(ProcessorError::Thread(reason)), None),
    };
    let ended = thread
        .supervise(shutdown, || {
            tracing::info!(%transactional_id, "processor stopping");
            stop.store(true, Ordering::SeqCst);
            stopping.cancel();
        })
        .await;
    // After a panic the transform went down with the thread: what it held
    // may be half-changed, so it is not reused.
    let ended = ended
        .outcome
        .unwrap_or_else(|reason| (Err(ProcessorError::Thread(reason)), None));
    tracing::info!(%transactional_id, ok = ended.0.is_ok(), "processor stopped");
    ended
}

/// Early returns of [`run_engine`] before the engine owns the transform.
macro_rules! or_return {
    ($result:expr, $transform:expr) => {
        match $result {
            Ok(value) => value,
            Err(error) => return (Err(error.into()), Some($transform)),
        }
    };
}

/// Runs the engine on this thread until it stops; hands the transform back
/// with the result, so that the caller can run it again.
fn run_engine<E: Event, T: Transform<E>>(
    config: ProcessorConfig,
    mut transform: T,
    stats: Arc<ProcessorStats>,
    tokio: tokio::runtime::Handle,
    stopping: CancellationToken,
    stop: &AtomicBool,
) -> Ended<T> {
    let transactional_id = config.transactional_id();
    let producer: ThreadedProducer<TxnProducerContext> = or_return!(
        config
            .producer_client_config()
            .create_with_context(TxnProducerContext {
                refused: Mutex::new(Vec::new()),
                undelivered: Mutex::new(None),
                unreachable: AtomicBool::new(false),
            })
            .map_err(ClientError::Config),
        transform
    );
    if config.guarantee == Guarantee::AtLeastOnce {
        tracing::warn!(
            instance = %transactional_id,
            "processor runs at least once (no Kafka transactions): after a crash or a failed commit, outputs may be duplicated"
        );
    } else {
        or_return!(
            init_transactions(&producer, &config, &transactional_id),
            transform
        );
    }

    // Before the restore and the group: a changelog record or an offset an
    // earlier instance left in an open transaction must neither be
    // committed later nor hold back the restore or the consumer (see
    // `sweep_at_start`). Output topics are swept before this instance's
    // first output to them.
    let changelogs: Vec<Arc<str>> = config
        .changelogs
        .iter()
        .map(|t| Arc::from(t.as_str()))
        .collect();
    let mut swept = HashSet::new();
    if config.guarantee == Guarantee::ExactlyOnce {
        let partitions = or_return!(
            sweep_at_start(
                &producer,
                &config,
                &transactional_id,
                &changelogs.iter().collect::<Vec<_>>()
            ),
            transform
        );
        tracing::info!(%transactional_id, partitions, "changelogs and group offsets swept of earlier instances' open transactions");
        swept.extend(changelogs.iter().cloned());
    }

    // Partitioned state is restored per partition as the group assigns
    // them; whatever a previous run of this transform held is not ours
    // until then.
    let partitioned = if config.partitioned_state {
        let client = config.restore_client_config();
        let partitions = or_return!(
            self::partitioned::check_partition_counts(
                &client,
                &config.group.topics,
                &changelogs,
                config.operation_timeout,
            ),
            transform
        );
        let all: Vec<i32> = (0..i32::try_from(partitions).unwrap_or(i32::MAX)).collect();
        transform.revoked(&all);
        Some(self::partitioned::PartitionedState::new(
            changelogs,
            client,
            config.restore_timeout,
        ))
    } else {
        None
    };
    // State is restored after the fencing (exactly once), so no zombie can
    // commit a change the restore would miss, and before the first input.
    for topic in config.changelogs.iter().filter(|_| partitioned.is_none()) {
        let read = read_to_end(
            &config.restore_client_config(),
            topic,
            config.restore_timeout,
            |record| transform.restore(record),
        );
        let read = or_return!(read, transform);
        tracing::info!(changelog = %topic, records = read, "state restored");
    }

    let engine = Arc::new(Mutex::new(Engine {
        transform,
        producer: Arc::new(producer),
        tokio,
        stats,
        stopping,
        guarantee: config.guarantee,
        group_id: Arc::from(config.group.group_id.as_str()),
        source: Arc::from(config.source.as_str()),
        transactional_id: transactional_id.clone(),
        topics_label: config.group.topics.join(","),
        retry: config.group.retry.clone(),
        dead_letter_unknown: config.group.dead_letter_unknown,
        dlq_suffix: config.group.dlq_suffix.clone(),
        batch_size: config.batch_size,
        batch_time: config.batch_time,
        operation_timeout: config.operation_timeout,
        shutdown_timeout: config.group.shutdown_timeout,
        topics: TopicNames::default(),
        swept,
        txn: None,
        hold_until: None,
        failures: HashMap::new(),
        rewind: HashMap::new(),
        commit_before: HashSet::new(),
        paused: HashSet::new(),
        resume_at: None,
        kafka_failures: 0,
        fatal: None,
        closing: false,
        partitioned,
        _family: PhantomData,
    }));
    let result = (|| {
        let consumer: BaseConsumer<ProcessorContext<E, T>> = config
            .consumer_client_config()
            .create_with_context(ProcessorContext {
                engine: Arc::clone(&engine),
            })
            .map_err(ClientError::Config)?;
        poll_thread::subscribe(&consumer, &config.group.topics)?;
        tracing::info!(%transactional_id, group = %config.group.group_id, topics = ?config.group.topics, "processor started");

        let result = poll_loop(&consumer, &engine, stop);
        lock(&engine).closing = true;
        consumer.unsubscribe();
        // Dropping the consumer closes it: it leaves the group.
        drop(consumer);
        result
    })();
    // The consumer (and its context's handle on the engine) is gone: the
    // engine is ours alone again, and with it the transform.
    let transform = Arc::try_unwrap(engine).ok().map(|engine| {
        let engine = engine
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        engine.transform
    });
    (result, transform)
}

fn poll_loop<E: Event, T: Transform<E>>(
    consumer: &BaseConsumer<ProcessorContext<E, T>>,
    engine: &Mutex<Engine<E, T>>,
    stop: &AtomicBool,
) -> Result<(), ProcessorError> {
    loop {
        let timeout = {
            let mut e = lock(engine);
            if let Some(error) = e.fatal.take() {
                return Err(error);
            }
            if e.txn_due() {
                e.commit(consumer);
            } else {
                e.release_when_due(consumer);
            }
            // After the commit: a commit that ends in an abort schedules
            // rewinds, and the poll below must not hand out an input from
            // beyond them (it would be committed ahead of the inputs the
            // abort sends round again: out of order, or lost on a crash).
            if e.fatal.is_none() {
                e.before_poll(consumer);
            }
            if let Some(error) = e.fatal.take() {
                return Err(error);
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            e.poll_timeout()
        };
        // Never hold the lock across poll: rebalance callbacks run inside it.
        match consumer.poll(timeout) {
            Some(Ok(message)) => {
                let mut e = lock(engine);
                e.handle(consumer, &message);
                e.release_when_due(consumer);
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "consumer error");
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let e = lock(engine);
                    return Err(ProcessorError::Fatal {
                        transactional_id: e.transactional_id.clone(),
                        operation: "consuming",
                        code,
                        reason,
                    });
                }
            }
            None => {}
        }
    }
    // Graceful shutdown: what is done is committed. (A failing final commit
    // is aborted; the next owner of the partitions redoes its inputs.)
    let mut e = lock(engine);
    if e.txn.is_some() {
        e.commit(consumer);
    }
    match e.fatal.take() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

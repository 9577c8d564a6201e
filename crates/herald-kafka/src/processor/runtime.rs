//! The processor thread: owns the `read_committed` consumer and the
//! transactional producer, runs the transform per input, and begins, commits
//! or aborts the transactions (see the module documentation of
//! [`processor`](super) for the rules). At least once, the same loop runs
//! batches instead of transactions: "commit" awaits the deliveries, then
//! commits the offsets through the consumer; "abort" rewinds.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use herald::{DecodeError, Envelope, ErrorClass, Event, RetryPolicy, TraceContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::changelog::read_to_end;
use super::{Guarantee, Input, ProcessorConfig, ProcessorError, ProcessorStats, Transform};
use crate::consumer::envelope_of;
use crate::dlq::{dead_letter, Failure, OriginalRecord};
use crate::error::is_fenced_code;
use crate::error::{is_retriable, ClientError};
use crate::publisher::OutgoingRecord;

/// A topic-partition.
type Tp = (Arc<str>, i32);
/// One input: topic, partition, offset.
type InputRef = (Arc<str>, i32, i64);

/// The producer's context: remembers outputs Kafka refused for good, by the
/// input that made them, so that input can be dead-lettered instead of being
/// retried forever.
struct TxnProducerContext {
    refused: Mutex<Vec<(InputRef, String)>>,
    /// The first delivery failure since the last batch ended. At least once
    /// it keeps the batch's offsets from being committed (exactly once, the
    /// transaction's commit fails by itself).
    undelivered: Mutex<Option<KafkaError>>,
}

impl ClientContext for TxnProducerContext {}

impl ProducerContext for TxnProducerContext {
    type DeliveryOpaque = Box<InputRef>;

    fn delivery(&self, result: &DeliveryResult<'_>, input: Self::DeliveryOpaque) {
        let Err((error, message)) = result else {
            return;
        };
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
        ) {
            // The records of an aborted transaction are purged: expected.
            return;
        }
        tracing::warn!(%error, topic = message.topic(), "output not delivered; its batch is redone (aborted in exactly-once mode)");
        lock(&self.undelivered).get_or_insert_with(|| error.clone());
        if !is_retriable(error) {
            lock(&self.refused).push((*input, error.to_string()));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never leaves this state half-updated in a way that matters more
    // than stopping the processor would.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The open transaction.
struct Txn {
    started: Instant,
    /// Inputs done in it (processed, dead-lettered or skipped).
    inputs: usize,
    outputs: usize,
    /// Per partition: the first offset in this transaction (where an abort
    /// rewinds to: the last committed offset) and the next offset to commit.
    offsets: HashMap<Tp, (i64, i64)>,
    /// Inputs with failure bookkeeping that this transaction finishes.
    finished_failures: Vec<InputRef>,
    span: tracing::Span,
}

/// The failure history of one input, kept until a transaction that finishes
/// it commits (an abort makes the input come again).
struct Attempts {
    attempts: u32,
    first_failed_at: DateTime<Utc>,
    first_instant: Instant,
    last_failed_at: DateTime<Utc>,
    error: String,
    class: ErrorClass,
    /// Dead-letter it next time instead of calling the transform.
    give_up: bool,
}

impl Attempts {
    fn failure(&self) -> Failure {
        Failure {
            error: self.error.clone(),
            class: self.class,
            handler: Some("transform".to_owned()),
            attempts: self.attempts,
            first_failed_at: self.first_failed_at,
            last_failed_at: self.last_failed_at,
        }
    }
}

/// How one transform call failed.
struct Failed {
    attempt: u32,
    error: String,
    class: ErrorClass,
    /// Whether some of its outputs were already added to the transaction.
    outputs_sent: bool,
}

/// What to do with one input.
enum Step<E> {
    Process(E, Arc<Envelope>),
    DeadLetter(Failure),
    Skip,
}

/// How long partitions wait after an abort.
enum Backoff {
    None,
    Partition(Tp, Duration),
    All(Duration),
}

/// Everything the poll loop and the rebalance callback both touch. They run
/// on the same thread; the mutex only makes the context `Sync`.
struct Engine<E, T> {
    transform: T,
    /// Threaded: its own thread serves delivery reports, which librdkafka
    /// needs while `abort_transaction` / `commit_transaction` wait.
    producer: ThreadedProducer<TxnProducerContext>,
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
    topics: Vec<Arc<str>>,
    txn: Option<Txn>,
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
    _family: PhantomData<fn() -> E>,
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    /// Whether batches are Kafka transactions (exactly once).
    fn transactional(&self) -> bool {
        self.guarantee == Guarantee::ExactlyOnce
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.iter().find(|t| &***t == name) {
            return Arc::clone(t);
        }
        let t: Arc<str> = Arc::from(name);
        self.topics.push(Arc::clone(&t));
        t
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
        if fenced {
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

    fn begin(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) -> bool {
        // At least once, a batch starts with nothing to tell Kafka.
        let began = if self.transactional() {
            self.producer.begin_transaction()
        } else {
            Ok(())
        };
        if let Err(error) = began {
            if !self.check_fatal("beginning a transaction", &error) {
                self.kafka_failure(consumer, "beginning a transaction", error, None);
            }
            return false;
        }
        let span = tracing::info_span!(
            "transaction",
            otel.name = %format_args!("{} process", self.topics_label),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %self.topics_label,
            messaging.consumer.group.name = %self.group_id,
            messaging.batch.message_count = tracing::field::Empty,
            messaging.kafka.transactional_id = %self.transactional_id,
            outputs = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        self.txn = Some(Txn {
            started: Instant::now(),
            inputs: 0,
            outputs: 0,
            offsets: HashMap::new(),
            finished_failures: Vec::new(),
            span,
        });
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
        timeout
    }

    /// One input, from decoding to being part of the open transaction.
    fn handle(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        message: &BorrowedMessage<'_>,
    ) {
        self.stats.consumed.fetch_add(1, Ordering::Relaxed);
        let tp: Tp = (self.topic(message.topic()), message.partition());
        let offset = message.offset();
        if self.fatal.is_some() {
            return;
        }
        let input_ref: InputRef = (Arc::clone(&tp.0), tp.1, offset);
        if self.commit_before.remove(&input_ref)
            && self.txn.as_ref().is_some_and(|t| t.inputs > 0)
            && !self.commit(consumer)
        {
            // The commit failed and was aborted: this input comes again.
            self.rewind_to(&tp, offset);
            return;
        }
        if self.txn.is_none() && !self.begin(consumer) {
            // Not processed: it must come again.
            self.rewind_to(&tp, offset);
            return;
        }
        let parent = self
            .txn
            .as_ref()
            .map(|t| t.span.clone())
            .unwrap_or_else(tracing::Span::none);
        // Debug level, like every per-record span (see the consumer's).
        let span = tracing::debug_span!(
            parent: &parent,
            "process",
            otel.name = %format_args!("{} process", message.topic()),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %message.topic(),
            messaging.destination.partition.id = message.partition(),
            messaging.kafka.offset = offset,
            messaging.consumer.group.name = %self.group_id,
            messaging.message.id = tracing::field::Empty,
            event_type = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let envelope = envelope_of(message);
        // The input's producer is the OpenTelemetry parent (set before the
        // span is entered): the order's trace runs on through the processor.
        if let Some(trace) = envelope.as_ref().ok().and_then(|e| e.trace.as_ref()) {
            trace.adopt_as_parent(&span);
        }
        let _entered = span.enter();
        match self.decide(envelope, &input_ref, &span) {
            Step::Skip => {
                tracing::debug!("skipping an input of unknown event type");
                self.stats.skipped_unknown.fetch_add(1, Ordering::Relaxed);
                self.done(&tp, offset, &input_ref);
                span.record("outcome", "skipped");
            }
            Step::DeadLetter(failure) => {
                self.dead_letter(consumer, message, &tp, &input_ref, failure);
                span.record("outcome", "dead_lettered");
            }
            Step::Process(event, envelope) => {
                let outcome = self.process(consumer, message, &tp, &input_ref, event, envelope);
                span.record("outcome", outcome);
            }
        }
    }

    fn decide(
        &self,
        envelope: Result<Envelope, DecodeError>,
        input_ref: &InputRef,
        span: &tracing::Span,
    ) -> Step<E> {
        let now = Utc::now();
        let failure = |error: String, class: ErrorClass| Failure {
            error,
            class,
            handler: None,
            attempts: 1,
            first_failed_at: now,
            last_failed_at: now,
        };
        let envelope = match envelope {
            Ok(mut envelope) => {
                // Outputs carry this span's context when OpenTelemetry is
                // on, the input's otherwise.
                if let Some(own) = TraceContext::of_span(span) {
                    envelope.trace = Some(own);
                }
                Arc::new(envelope)
            }
            Err(error) => {
                tracing::warn!(%error, "undecodable input");
                return Step::DeadLetter(failure(error.to_string(), error.class()));
            }
        };
        span.record(
            "messaging.message.id",
            tracing::field::display(envelope.event_id),
        );
        span.record("event_type", envelope.event_type.as_str());
        if let Some(trace) = &envelope.trace {
            span.record("trace_id", trace.trace_id());
        }
        if !E::is_known_type(&envelope.event_type) {
            if self.dead_letter_unknown {
                return Step::DeadLetter(failure(
                    format!("unknown event type {:?}", envelope.event_type),
                    ErrorClass::UnknownType,
                ));
            }
            return Step::Skip;
        }
        let event: E = match envelope.decode() {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "undecodable input");
                return Step::DeadLetter(failure(error.to_string(), error.class()));
            }
        };
        match self.failures.get(input_ref) {
            Some(attempts) if attempts.give_up => Step::DeadLetter(attempts.failure()),
            _ => Step::Process(event, envelope),
        }
    }

    /// Runs the transform and produces its outputs into the transaction.
    fn process(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        message: &BorrowedMessage<'_>,
        tp: &Tp,
        input_ref: &InputRef,
        event: E,
        envelope: Arc<Envelope>,
    ) -> &'static str {
        let offset = input_ref.2;
        let attempt = self.failures.get(input_ref).map_or(1, |a| a.attempts + 1);
        let input = Input {
            topic: tp.0.to_string(),
            partition: tp.1,
            offset,
            group_id: Arc::clone(&self.group_id),
            envelope,
            attempt,
            source: Arc::clone(&self.source),
        };
        let call = self.transform.process(event, input);
        let stopping = self.stopping.clone();
        let grace = self.shutdown_timeout;
        // The transform runs on the caller's runtime; this thread waits. At
        // shutdown it gets `shutdown_timeout` to finish.
        let result = self.tokio.block_on(async move {
            tokio::select! {
                biased;
                result = AssertUnwindSafe(call).catch_unwind() => Some(result),
                () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => None,
            }
        });
        let (error, class) = match result {
            None => {
                tracing::warn!(
                    "shutdown deadline passed during the transform: aborting the open transaction"
                );
                self.abort(consumer, "shutdown deadline", None, Backoff::None);
                return "abandoned";
            }
            Some(Ok(Ok(outputs))) => {
                self.stats.processed.fetch_add(1, Ordering::Relaxed);
                for (sent, record) in outputs.iter().enumerate() {
                    if let Err(error) = self.send(record, input_ref) {
                        if self.check_fatal("producing an output", &error) {
                            return "fatal";
                        }
                        if is_retriable(&error) {
                            self.kafka_failure(
                                consumer,
                                "producing an output",
                                error,
                                Some((tp.clone(), offset)),
                            );
                            return "retry";
                        }
                        // librdkafka refuses this record for good (too big,
                        // invalid): the input is poison.
                        self.transform_failed(
                            consumer,
                            message,
                            tp,
                            input_ref,
                            Failed {
                                attempt,
                                error: format!("output to {} refused: {error}", record.topic),
                                class: ErrorClass::Permanent,
                                outputs_sent: sent > 0,
                            },
                        );
                        return "failed";
                    }
                    self.stats.produced.fetch_add(1, Ordering::Relaxed);
                }
                self.done(tp, offset, input_ref);
                return "processed";
            }
            Some(Ok(Err(error))) => (error.to_string(), error.class()),
            Some(Err(panic)) => {
                let what = herald::panic_text(&*panic);
                (format!("transform panicked: {what}"), ErrorClass::Permanent)
            }
        };
        let failed = Failed {
            attempt,
            error,
            class,
            outputs_sent: false,
        };
        self.transform_failed(consumer, message, tp, input_ref, failed);
        "failed"
    }

    /// A transform call failed: retry later, or dead-letter the input.
    fn transform_failed(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        message: &BorrowedMessage<'_>,
        tp: &Tp,
        input_ref: &InputRef,
        failed: Failed,
    ) {
        let Failed {
            attempt,
            error,
            class,
            outputs_sent,
        } = failed;
        let now = Utc::now();
        let entry = self
            .failures
            .entry(input_ref.clone())
            .or_insert_with(|| Attempts {
                attempts: 0,
                first_failed_at: now,
                first_instant: Instant::now(),
                last_failed_at: now,
                error: String::new(),
                class,
                give_up: false,
            });
        entry.attempts = attempt;
        entry.last_failed_at = now;
        entry.error.clone_from(&error);
        entry.class = class;
        let delay = if class == ErrorClass::Transient {
            self.retry
                .next_delay(attempt, entry.first_instant.elapsed())
        } else {
            None
        };
        match delay {
            Some(delay) => {
                tracing::info!(attempt, %error, ?delay, "transient failure: the transaction aborts and the input is retried");
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                tracing::warn!(attempt, %class, %error, "giving up on the input: it is dead-lettered");
                entry.give_up = true;
            }
        }
        let mut first_in_txn = self.txn.as_ref().is_none_or(|t| t.inputs == 0);
        if !first_in_txn && !self.transactional() {
            // At least once, outputs already sent cannot be taken back:
            // rather than redo (and duplicate) the inputs before this one,
            // commit them now, and give this input a batch of its own.
            if !self.commit(consumer) || !self.begin(consumer) {
                // Everything uncommitted, this input included, comes again.
                self.rewind_to(tp, input_ref.2);
                return;
            }
            first_in_txn = true;
        }
        // Outputs of this very input already in the transaction (a later one
        // was refused) can only be taken back by an abort: the input then
        // comes again and is dead-lettered without calling the transform.
        let partial = outputs_sent && self.transactional();
        if first_in_txn && delay.is_none() && self.txn.is_some() && !partial {
            // Nothing else is uncommitted: undo this call's state and write
            // the dead letter into the open transaction right away.
            self.transform.rollback();
            let failure = self.failures[input_ref].failure();
            self.dead_letter(consumer, message, tp, input_ref, failure);
            return;
        }
        // Other inputs of the transaction share in-memory state with this
        // call: abort them all and do them again, committing them before this
        // input comes round (a poison input is then dead-lettered without
        // calling the transform).
        if !first_in_txn {
            self.commit_before.insert(input_ref.clone());
        }
        let backoff = match delay {
            Some(delay) => Backoff::Partition(tp.clone(), delay),
            None => Backoff::None,
        };
        self.abort(
            consumer,
            "transform failed",
            Some((tp.clone(), input_ref.2)),
            backoff,
        );
    }

    fn dead_letter(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        message: &BorrowedMessage<'_>,
        tp: &Tp,
        input_ref: &InputRef,
        failure: Failure,
    ) {
        let dlq_topic = format!("{}{}", message.topic(), self.dlq_suffix);
        let record = dead_letter(
            &dlq_topic,
            &self.group_id,
            &OriginalRecord::of(message),
            &failure,
        );
        match self.send(&record, input_ref) {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                self.done(tp, input_ref.2, input_ref);
            }
            Err(error) => {
                if self.check_fatal("dead-lettering an input", &error) {
                    return;
                }
                if is_retriable(&error) {
                    self.kafka_failure(
                        consumer,
                        "dead-lettering an input",
                        error,
                        Some((tp.clone(), input_ref.2)),
                    );
                } else {
                    // Losing the input is not an option: stop loudly.
                    tracing::error!(%error, dlq = %dlq_topic, "the dead letter is refused: the processor stops");
                    self.fatal = Some(ProcessorError::Kafka {
                        transactional_id: self.transactional_id.clone(),
                        operation: "dead-lettering an input",
                        source: error,
                    });
                }
            }
        }
    }

    /// The input is part of the open transaction.
    fn done(&mut self, tp: &Tp, offset: i64, input_ref: &InputRef) {
        let tracked = self.failures.contains_key(input_ref);
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        txn.inputs += 1;
        let entry = txn
            .offsets
            .entry(tp.clone())
            .or_insert((offset, offset + 1));
        entry.1 = offset + 1;
        if tracked {
            txn.finished_failures.push(input_ref.clone());
        }
    }

    /// Puts a record on the producer's queue (inside the open transaction),
    /// waiting while the queue is full.
    fn send(&mut self, record: &OutgoingRecord, input_ref: &InputRef) -> Result<(), KafkaError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: value.as_deref(),
                })
            },
        );
        loop {
            let mut base = BaseRecord::with_opaque_to(&record.topic, Box::new(input_ref.clone()))
                .payload(&record.payload)
                .headers(headers.clone());
            if let Some(key) = &record.key {
                base = base.key(key);
            }
            match self.producer.send(base) {
                Ok(()) => {
                    if let Some(txn) = self.txn.as_mut() {
                        txn.outputs += 1;
                    }
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Backpressure: deliveries drain the queue while we poll.
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    fn rewind_to(&mut self, tp: &Tp, offset: i64) {
        let target = self.rewind.entry(tp.clone()).or_insert(offset);
        *target = (*target).min(offset);
    }

    /// A Kafka error broke the transaction: abort, rewind, back off.
    fn kafka_failure(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        operation: &'static str,
        error: KafkaError,
        current: Option<(Tp, i64)>,
    ) {
        if self.check_fatal(operation, &error) {
            return;
        }
        self.kafka_failures = self.kafka_failures.saturating_add(1);
        let delay = self
            .retry
            .next_delay(
                self.kafka_failures
                    .min(self.retry.max_attempts.saturating_sub(1))
                    .max(1),
                Duration::ZERO,
            )
            .unwrap_or_else(|| self.retry.delay_bound(self.kafka_failures));
        tracing::warn!(%error, operation, ?delay, failures = self.kafka_failures,
            "transaction failed: aborting, rewinding to the last committed offsets, retrying after a backoff");
        self.abort(consumer, operation, current, Backoff::All(delay));
    }

    /// Aborts the open transaction, undoes the transform's in-memory state,
    /// schedules the rewind of every partition in it (plus `current`, the
    /// input being handled) and pauses per `backoff`.
    fn abort(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        why: &'static str,
        current: Option<(Tp, i64)>,
        backoff: Backoff,
    ) {
        let txn = self.txn.take();
        if txn.is_some() && !self.transactional() {
            // Nothing to abort: what was sent stays written (the inputs are
            // redone, so their outputs may be duplicated, never lost). Let
            // the deliveries in flight finish so that their failures are
            // not blamed on the next batch.
            let _ = self.await_deliveries();
            lock(&self.producer.context().undelivered).take();
            self.stats.aborted.fetch_add(1, Ordering::Relaxed);
        } else if txn.is_some() {
            // Let in-flight outputs land first: aborting while the partitions
            // of a just-begun transaction are still being added to it races
            // in the coordinator (INVALID_TXN_STATE, which librdkafka makes
            // fatal). Delivery failures surface through the abort anyway.
            let _ = self.await_deliveries();
            let mut tries = 0;
            loop {
                tries += 1;
                match self.producer.abort_transaction(self.operation_timeout) {
                    Ok(()) => break,
                    Err(error) => {
                        if self.check_fatal("aborting a transaction", &error) {
                            break;
                        }
                        if tries >= 3 {
                            tracing::error!(%error, "cannot abort the transaction: the processor stops");
                            self.fatal = Some(ProcessorError::Kafka {
                                transactional_id: self.transactional_id.clone(),
                                operation: "aborting a transaction",
                                source: error,
                            });
                            break;
                        }
                        tracing::warn!(%error, "aborting the transaction failed; trying again");
                    }
                }
            }
            self.stats.aborted.fetch_add(1, Ordering::Relaxed);
        }
        self.transform.rollback();
        // Outputs refused before the abort were blamed already (or are
        // purged records of this transaction).
        lock(&self.producer.context().refused).clear();
        if let Some(txn) = &txn {
            txn.span.record("outcome", "aborted");
            txn.span.record("messaging.batch.message_count", txn.inputs);
            tracing::info!(parent: &txn.span, why, inputs = txn.inputs, outputs = txn.outputs, "transaction aborted");
            for (tp, (first, _)) in &txn.offsets {
                self.rewind_to(tp, *first);
            }
        }
        if let Some((tp, offset)) = current {
            self.rewind_to(&tp, offset);
        }
        let (to_pause, delay): (Vec<Tp>, Duration) = match backoff {
            Backoff::None => (Vec::new(), Duration::ZERO),
            Backoff::Partition(tp, delay) => (vec![tp], delay),
            Backoff::All(delay) => {
                let assigned = consumer
                    .assignment()
                    .map(|tpl| {
                        tpl.elements()
                            .iter()
                            .map(|e| (Arc::<str>::from(e.topic()), e.partition()))
                            .collect()
                    })
                    .unwrap_or_default();
                (assigned, delay)
            }
        };
        if !to_pause.is_empty() && !delay.is_zero() {
            let mut tpl = TopicPartitionList::new();
            for tp in &to_pause {
                tpl.add_partition(&tp.0, tp.1);
            }
            if let Err(error) = consumer.pause(&tpl) {
                tracing::warn!(%error, "pausing for the backoff failed");
            }
            self.paused.extend(to_pause);
            let until = Instant::now() + delay;
            self.resume_at = Some(self.resume_at.map_or(until, |at| at.max(until)));
        }
    }

    /// Marks inputs whose outputs Kafka refused for good as poison.
    fn blame_refused_outputs(&mut self) {
        let refused: Vec<_> = lock(&self.producer.context().refused).drain(..).collect();
        let now = Utc::now();
        for (input_ref, reason) in refused {
            let entry = self.failures.entry(input_ref).or_insert_with(|| Attempts {
                attempts: 1,
                first_failed_at: now,
                first_instant: Instant::now(),
                last_failed_at: now,
                error: String::new(),
                class: ErrorClass::Permanent,
                give_up: false,
            });
            if entry.give_up {
                // Its dead letter was refused: retrying with backoff is all
                // that is left (the error log says why).
                continue;
            }
            entry.give_up = true;
            entry.class = ErrorClass::Permanent;
            entry.error = format!("an output was refused by Kafka: {reason}");
            entry.last_failed_at = now;
        }
    }

    /// Commits the open transaction with the inputs' offsets. On failure the
    /// transaction is aborted and rewound (see [`Engine::kafka_failure`]).
    fn commit(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) -> bool {
        let Some(txn) = self.txn.take() else {
            return true;
        };
        let span = txn.span.clone();
        let _entered = span.enter();
        match self.commit_txn(consumer, &txn) {
            Ok(()) => {
                self.stats.committed.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .committed_inputs
                    .fetch_add(txn.inputs as u64, Ordering::Relaxed);
                self.transform.commit();
                for input in &txn.finished_failures {
                    self.failures.remove(input);
                }
                self.kafka_failures = 0;
                lock(&self.producer.context().refused).clear();
                span.record("outcome", "committed");
                span.record("messaging.batch.message_count", txn.inputs);
                span.record("outputs", txn.outputs);
                tracing::debug!(
                    inputs = txn.inputs,
                    outputs = txn.outputs,
                    "transaction committed"
                );
                true
            }
            Err((operation, error)) => {
                self.txn = Some(txn);
                self.blame_refused_outputs();
                self.kafka_failure(consumer, operation, error, None);
                false
            }
        }
    }

    fn commit_txn(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        txn: &Txn,
    ) -> Result<(), (&'static str, KafkaError)> {
        if !self.transactional() {
            return self.commit_batch(consumer, txn);
        }
        if !txn.offsets.is_empty() {
            let Some(metadata) = consumer.group_metadata() else {
                self.fatal = Some(ProcessorError::Fatal {
                    transactional_id: self.transactional_id.clone(),
                    operation: "reading the consumer group metadata",
                    code: RDKafkaErrorCode::State,
                    reason: "the consumer has no group metadata".to_owned(),
                });
                return Err((
                    "reading the consumer group metadata",
                    KafkaError::MetadataFetch(RDKafkaErrorCode::State),
                ));
            };
            let mut tpl = TopicPartitionList::new();
            for (tp, (_, next)) in &txn.offsets {
                tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*next))
                    .map_err(|e| ("listing the offsets to commit", e))?;
            }
            let timeout = self.operation_timeout;
            retry_retriable(|| {
                self.producer
                    .send_offsets_to_transaction(&tpl, &metadata, timeout)
            })
            .map_err(|e| ("sending the offsets to the transaction", e))?;
        }
        // So that commit_transaction's flush finds nothing to do.
        self.await_deliveries()
            .map_err(|e| ("awaiting the outputs' deliveries", e))?;
        let timeout = self.operation_timeout;
        retry_retriable(|| self.producer.commit_transaction(timeout))
            .map_err(|e| ("committing the transaction", e))
    }

    /// At least once: awaits every delivery of the batch, then commits its
    /// inputs' offsets through the consumer — in that order, so a crash in
    /// between redoes inputs but never skips one.
    fn commit_batch(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        txn: &Txn,
    ) -> Result<(), (&'static str, KafkaError)> {
        self.await_deliveries()
            .map_err(|e| ("awaiting the outputs' deliveries", e))?;
        if let Some(error) = lock(&self.producer.context().undelivered).take() {
            return Err(("delivering the outputs", error));
        }
        if txn.offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (tp, (_, next)) in &txn.offsets {
            tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*next))
                .map_err(|e| ("listing the offsets to commit", e))?;
        }
        // Synchronous: the batch counts as done only once the group
        // coordinator has the offsets (a member that lost the partitions
        // is refused, and its inputs are redone by their new owner).
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| ("committing the input offsets", e))
    }

    /// Waits until every output handed to the producer has been
    /// acknowledged or has failed ([`crate::publisher::await_released`]).
    fn await_deliveries(&self) -> Result<(), KafkaError> {
        crate::publisher::await_released(&self.producer, self.operation_timeout)
    }

    /// Seeks rewound partitions back; resumes paused ones whose time came.
    fn before_poll(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) {
        if self.resume_at.is_some_and(|at| Instant::now() >= at) {
            let mut tpl = TopicPartitionList::new();
            for tp in self.paused.drain() {
                tpl.add_partition(&tp.0, tp.1);
            }
            if let Err(error) = consumer.resume(&tpl) {
                tracing::warn!(%error, "resuming after the backoff failed");
            }
            self.resume_at = None;
        }
        if self.rewind.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let rewind: Vec<(Tp, i64)> = self.rewind.drain().collect();
        for (tp, offset) in rewind {
            if let Err(error) = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset)) {
                self.fatal_seek(error);
                return;
            }
        }
        tracing::debug!(
            partitions = tpl.count(),
            "rewinding to the last committed offsets"
        );
        match consumer.seek_partitions(tpl, self.operation_timeout) {
            Ok(result) => {
                for element in result.elements() {
                    if let Err(error) = element.error() {
                        self.fatal_seek(error);
                        return;
                    }
                }
            }
            Err(error) => self.fatal_seek(error),
        }
    }

    fn fatal_seek(&mut self, error: KafkaError) {
        // Going on without the rewind would skip inputs: stop instead (a
        // restart starts from the committed offsets, which is exact).
        tracing::error!(%error, "rewinding after an abort failed: the processor stops");
        self.fatal = Some(ProcessorError::Kafka {
            transactional_id: self.transactional_id.clone(),
            operation: "rewinding to the last committed offsets",
            source: error,
        });
    }

    /// Partitions are about to be taken away: finish the open transaction
    /// while they are still ours, then forget them.
    fn revoke(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        tpl: &TopicPartitionList,
    ) {
        let revoked: HashSet<Tp> = tpl
            .elements()
            .iter()
            .map(|e| (self.topic(e.topic()), e.partition()))
            .collect();
        if self.txn.is_some() && self.fatal.is_none() && !self.closing {
            if consumer.assignment_lost() {
                tracing::warn!("assignment lost: aborting the open transaction");
                self.abort(consumer, "assignment lost", None, Backoff::None);
            } else if self.commit(consumer) {
                tracing::debug!("open transaction committed before the revoke");
            }
        }
        self.rewind.retain(|tp, _| !revoked.contains(tp));
        self.paused.retain(|tp| !revoked.contains(tp));
        self.failures
            .retain(|(topic, partition, _), _| !revoked.contains(&(Arc::clone(topic), *partition)));
        self.commit_before
            .retain(|(topic, partition, _)| !revoked.contains(&(Arc::clone(topic), *partition)));
        tracing::info!(partitions = revoked.len(), "partitions revoked");
    }
}

fn retry_retriable(mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match call() {
            Err(KafkaError::Transaction(e))
                if tries < 3 && e.is_retriable() && !e.txn_requires_abort() && !e.is_fatal() =>
            {
                tracing::info!(error = %e, "transactional call failed; trying again");
            }
            other => return other,
        }
    }
}

/// The consumer's context: routes rebalance callbacks to the engine.
struct ProcessorContext<E, T> {
    engine: Arc<Mutex<Engine<E, T>>>,
}

impl<E: Event, T: Transform<E>> ClientContext for ProcessorContext<E, T> {}

impl<E: Event, T: Transform<E>> ConsumerContext for ProcessorContext<E, T> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => lock(&self.engine).revoke(consumer, tpl),
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition paused for a backoff, revoked, then assigned again
            // must not stay paused forever.
            let _ = consumer.resume(tpl);
        }
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
    let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
    let tokio = tokio::runtime::Handle::current();
    let transactional_id = config.transactional_id();
    let thread_stop = Arc::clone(&stop);
    let thread_stopping = stopping.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("herald-processor-{transactional_id}"))
        .spawn(move || {
            let ended = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run_engine(
                    config,
                    transform,
                    stats,
                    tokio,
                    thread_stopping,
                    &thread_stop,
                )
            }))
            .unwrap_or_else(|panic| {
                let what = herald::panic_text(&*panic);
                // The transform went down with the thread: what it held may
                // be half-changed, so it is not reused.
                (
                    Err(ProcessorError::Thread(format!("panicked: {what}"))),
                    None,
                )
            });
            let _ = finished_tx.send(ended);
        });
    if let Err(e) = spawned {
        let error = ProcessorError::Thread(format!("cannot start the processor thread: {e}"));
        return (Err(error), None);
    }

    let thread_gone = || {
        let error = ProcessorError::Thread("the processor thread vanished".to_owned());
        (Err(error), None)
    };
    let mut finished_rx = finished_rx;
    tokio::pin!(shutdown);
    tokio::select! {
        ended = &mut finished_rx => return ended.unwrap_or_else(|_| thread_gone()),
        () = &mut shutdown => {}
    }
    tracing::info!(%transactional_id, "processor stopping");
    stop.store(true, Ordering::SeqCst);
    stopping.cancel();
    let ended = finished_rx.await.unwrap_or_else(|_| thread_gone());
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

    // State is restored after the fencing (exactly once), so no zombie can
    // commit a change the restore would miss, and before the first input.
    for topic in &config.changelogs {
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
        producer,
        tokio,
        stats,
        stopping,
        guarantee: config.guarantee,
        group_id: Arc::from(config.group_id.as_str()),
        source: Arc::from(config.source.as_str()),
        transactional_id: transactional_id.clone(),
        topics_label: config.topics.join(","),
        retry: config.retry.clone(),
        dead_letter_unknown: config.dead_letter_unknown,
        dlq_suffix: config.dlq_suffix.clone(),
        batch_size: config.batch_size,
        batch_time: config.batch_time,
        operation_timeout: config.operation_timeout,
        shutdown_timeout: config.shutdown_timeout,
        topics: Vec::new(),
        txn: None,
        failures: HashMap::new(),
        rewind: HashMap::new(),
        commit_before: HashSet::new(),
        paused: HashSet::new(),
        resume_at: None,
        kafka_failures: 0,
        fatal: None,
        closing: false,
        _family: PhantomData,
    }));
    let result = (|| {
        let consumer: BaseConsumer<ProcessorContext<E, T>> = config
            .consumer_client_config()
            .create_with_context(ProcessorContext {
                engine: Arc::clone(&engine),
            })
            .map_err(ClientError::Config)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| ClientError::Kafka {
                operation: "subscribing",
                source,
            })?;
        tracing::info!(%transactional_id, group = %config.group_id, topics = ?config.topics, "processor started");

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

/// Fences every earlier producer with this transactional.id and aborts
/// whatever transaction it left open: from here on, no zombie commits.
fn init_transactions(
    producer: &ThreadedProducer<TxnProducerContext>,
    config: &ProcessorConfig,
    transactional_id: &str,
) -> Result<(), ProcessorError> {
    producer
        .init_transactions(config.operation_timeout)
        .map_err(|source| {
            let code = source.rdkafka_error_code();
            if code.is_some_and(is_fenced_code) {
                ProcessorError::Fenced {
                    transactional_id: transactional_id.to_owned(),
                    code: code.unwrap_or(RDKafkaErrorCode::Fenced),
                    reason: source.to_string(),
                }
            } else {
                ProcessorError::Kafka {
                    transactional_id: transactional_id.to_owned(),
                    operation: "initializing transactions (fencing earlier instances)",
                    source,
                }
            }
        })?;
    tracing::info!(%transactional_id, "transactions initialized; earlier instances are fenced");
    Ok(())
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
            e.before_poll(consumer);
            if e.fatal.is_none() && e.txn_due() {
                e.commit(consumer);
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
            Some(Ok(message)) => lock(engine).handle(consumer, &message),
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

//! The producer, and the batch's life: begin, commit, abort. Exactly
//! once a batch is a Kafka transaction; at least once, "commit" awaits the
//! deliveries, then commits the offsets through the consumer, and "abort"
//! rewinds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::Event;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::error::is_fenced_code;
use crate::error::is_retriable;
use crate::processor::{ProcessorConfig, ProcessorError, Transform};
use crate::publisher::OutgoingRecord;
use crate::sweep::{partitions, SWEEP_KEY};

use super::rebalance::ProcessorContext;
use super::{lock, Engine, InputRef, Tp};

/// The producer's context: remembers outputs Kafka refused for good, by the
/// input that made them, so that input can be dead-lettered instead of being
/// retried forever.
pub(super) struct TxnProducerContext {
    pub(super) refused: Mutex<Vec<(InputRef, String)>>,
    /// The first delivery failure since the last batch ended. At least once
    /// it keeps the batch's offsets from being committed (exactly once, the
    /// transaction's commit fails by itself).
    pub(super) undelivered: Mutex<Option<KafkaError>>,
    /// Whether the producer lost every broker (or its connection to one)
    /// since the last transaction it committed.
    pub(super) unreachable: AtomicBool,
}

impl ClientContext for TxnProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // Kept quiet as rdkafka's default does, but remembered: a broker the
        // producer could not reach explains a fence that follows (see
        // `Engine::check_fatal`).
        if matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::Resolve
            )
        ) {
            self.unreachable.store(true, Ordering::Relaxed);
        }
        tracing::error!(target: "rdkafka::client", "librdkafka: {}: {}", error, reason);
    }
}

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
        if is_sweep(&input) {
            // A sweep record (see `crate::sweep`) belongs to no input, and its
            // transaction is aborted anyway.
            tracing::warn!(%error, topic = message.topic(), "a sweep record was not delivered; its transaction is aborted");
            return;
        }
        tracing::warn!(%error, topic = message.topic(), "output not delivered; its batch is redone (aborted in exactly-once mode)");
        lock(&self.undelivered).get_or_insert_with(|| error.clone());
        if !is_retriable(error) {
            lock(&self.refused).push((*input, error.to_string()));
        }
    }
}

/// The open transaction.
pub(super) struct Txn {
    pub(super) started: Instant,
    /// How long `begin_transaction` took.
    pub(super) begin: Duration,
    /// Inputs done in it (processed, dead-lettered or skipped).
    pub(super) inputs: usize,
    pub(super) outputs: usize,
    /// Per partition: the first offset in this transaction (where an abort
    /// rewinds to: the last committed offset) and the next offset to commit.
    pub(super) offsets: HashMap<Tp, (i64, i64)>,
    /// Inputs with failure bookkeeping that this transaction finishes.
    pub(super) finished_failures: Vec<InputRef>,
    /// Whether it holds sweep records ([`crate::sweep`]): it is then aborted
    /// where it would be committed, and its inputs are redone.
    pub(super) sweeping: bool,
    /// Exactly once: its outputs and dead letters, not yet handed to the
    /// producer (see [`Engine::release_held`]). An abort drops them.
    pub(super) held: Vec<Held>,
    pub(super) span: tracing::Span,
}

/// An output of the open transaction that the producer has not seen yet.
pub(super) struct Held {
    record: OutgoingRecord,
    input: InputRef,
    dead_letter: bool,
}

/// The most outputs a transaction holds back: past this many they are
/// produced at once, so a huge transaction does not pile up in memory
/// (it then risks the coordinator's `CONCURRENT_TRANSACTIONS` wait, which
/// it can afford).
pub(super) const HOLD_LIMIT: usize = 10_000;

/// How long after a commit (or abort) outputs are held back: librdkafka's
/// fixed wait before it adds partitions again after
/// `CONCURRENT_TRANSACTIONS`. Holding longer gains nothing: a refused
/// attempt made at once would be repeated by then anyway.
pub(super) const HOLD_AFTER_COMMIT: Duration = Duration::from_millis(20);

/// How long the steps of a commit took (reported in the `transaction
/// committed` debug event).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Phases {
    /// `send_offsets_to_transaction` (exactly once).
    pub(super) offsets: Duration,
    /// Awaiting the outputs' delivery reports.
    pub(super) deliveries: Duration,
    /// `commit_transaction`, or at least once the consumer's offset commit.
    pub(super) commit: Duration,
}

/// The time since `clock`, which moves on to now.
fn lap(clock: &mut Instant) -> Duration {
    let now = Instant::now();
    let lap = now.duration_since(*clock);
    *clock = now;
    lap
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// How long partitions wait after an abort.
pub(super) enum Backoff {
    None,
    Partition(Tp, Duration),
    All(Duration),
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    pub(super) fn begin(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) -> bool {
        let called = Instant::now();
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
        let started = Instant::now();
        self.txn = Some(Txn {
            started,
            begin: started.duration_since(called),
            inputs: 0,
            outputs: 0,
            offsets: HashMap::new(),
            finished_failures: Vec::new(),
            sweeping: false,
            held: Vec::new(),
            span,
        });
        true
    }

    /// Adds an output (or, `dead_letter`, the dead letter of `input_ref`)
    /// to the open batch. Exactly once it is held back until the commit
    /// ([`Engine::release_held`]); at least once it goes on the producer's
    /// queue at once.
    pub(super) fn send(
        &mut self,
        record: &OutgoingRecord,
        input_ref: &InputRef,
        dead_letter: bool,
    ) -> Result<(), KafkaError> {
        let holding = self.hold_until.is_some_and(|until| Instant::now() < until);
        // Behind held outputs, an output waits too: a partition's outputs
        // keep their order (the poll loop releases them all).
        if let Some(txn) = self.txn.as_mut().filter(|t| holding || !t.held.is_empty()) {
            txn.held.push(Held {
                record: record.clone(),
                input: input_ref.clone(),
                dead_letter,
            });
            txn.outputs += 1;
            return Ok(());
        }
        self.produce(record, input_ref)?;
        if let Some(txn) = self.txn.as_mut() {
            txn.outputs += 1;
        }
        Ok(())
    }

    /// Exactly once: hands the open transaction's held outputs to the
    /// producer, in order. `false` when one could not be produced: the
    /// transaction is then aborted and rewound (an output Kafka refuses for
    /// good makes its input poison: it is dead-lettered when it comes
    /// again), or the processor stops (fatal error, refused dead letter).
    ///
    /// Why outputs wait (issue #18): librdkafka speaks the transaction
    /// protocol of before KIP-890, in which the producer adds each
    /// partition to the transaction (AddPartitionsToTxn) when it first
    /// produces to it. Right after a commit the coordinator is still
    /// writing that transaction's markers and answers
    /// `CONCURRENT_TRANSACTIONS`; librdkafka then tries again only after a
    /// fixed 20 ms, and until then no output of the new transaction can be
    /// delivered: 20 ms more per transaction, against an at-least-once
    /// batch of a few ms. So for [`HOLD_AFTER_COMMIT`] after a commit the
    /// outputs are kept, and produced when that time is over or when the
    /// transaction is done, whichever comes first: by then the markers
    /// have had a batch's time to land. Read-committed readers see nothing
    /// before the commit anyway, so no one waits longer for them.
    pub(super) fn release_held(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) -> bool {
        let Some(held) = self.txn.as_mut().map(|t| std::mem::take(&mut t.held)) else {
            return true;
        };
        for Held {
            record,
            input,
            dead_letter,
        } in held
        {
            let Err(error) = self.produce(&record, &input) else {
                continue;
            };
            if self.check_fatal("producing an output", &error) {
                return false;
            }
            if is_retriable(&error) {
                self.kafka_failure(consumer, "producing an output", error, None);
            } else if dead_letter {
                // Losing the input is not an option: stop loudly.
                tracing::error!(%error, dlq = %record.topic, "the dead letter is refused: the processor stops");
                self.fatal = Some(ProcessorError::Kafka {
                    transactional_id: self.transactional_id.clone(),
                    operation: "dead-lettering an input",
                    source: error,
                });
            } else {
                // Too big, invalid: no retry helps. Its input is
                // dead-lettered when the abort sends it round again.
                lock(&self.producer.context().refused).push((
                    input,
                    format!("output to {} refused: {error}", record.topic),
                ));
                self.blame_refused_outputs();
                self.abort(consumer, "an output was refused", None, Backoff::None);
            }
            return false;
        }
        true
    }

    /// Adds the outputs that close the open batch ([`Transform::closing`]),
    /// each with the last input of its partition in the batch. `false` when
    /// that failed: the batch is then aborted and rewound, or the processor
    /// stops.
    fn close(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) -> bool {
        let Some(txn) = self.txn.as_ref().filter(|t| t.inputs > 0 && !t.sweeping) else {
            return true;
        };
        let mut last: BTreeMap<i32, InputRef> = BTreeMap::new();
        for (tp, (_, next)) in &txn.offsets {
            last.entry(tp.1)
                .or_insert_with(|| (Arc::clone(&tp.0), tp.1, next - 1));
        }
        let partitions: Vec<i32> = last.keys().copied().collect();
        let closing = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.transform.closing(&partitions)
        }));
        let records = match closing {
            Ok(Ok(records)) => records,
            Ok(Err(error)) => {
                tracing::warn!(%error, "the transform could not close the batch: it is aborted and redone");
                let delay = self.retry.initial_delay;
                self.abort(consumer, "closing the batch", None, Backoff::All(delay));
                return false;
            }
            Err(panic) => {
                let what = herald::panic_text(&*panic);
                tracing::error!(%what, "the transform panicked closing the batch: the processor stops");
                self.fatal = Some(ProcessorError::Thread(format!(
                    "the transform panicked closing a batch: {what}"
                )));
                return false;
            }
        };
        for (partition, record) in records {
            // A partition without an input in the batch is the transform's
            // mistake: the output comes with another input.
            let Some(input) = last
                .get(&partition)
                .or_else(|| last.values().next())
                .cloned()
            else {
                break;
            };
            if let Err(error) = self.send(&record, &input, false) {
                if !self.check_fatal("producing an output", &error) {
                    self.kafka_failure(
                        consumer,
                        "producing an output that closes the batch",
                        error,
                        None,
                    );
                }
                return false;
            }
        }
        true
    }

    /// Exactly once: releases the held outputs once the hold is over
    /// ([`HOLD_AFTER_COMMIT`]) or when there are too many.
    pub(super) fn release_when_due(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) {
        let Some(held) = self.txn.as_ref().map(|t| t.held.len()) else {
            return;
        };
        let over = self.hold_until.is_none_or(|until| Instant::now() >= until);
        if held > 0 && (over || held >= HOLD_LIMIT) {
            self.release_held(consumer);
        }
    }

    /// Puts a record on the producer's queue (inside the open transaction),
    /// waiting while the queue is full.
    fn produce(&mut self, record: &OutgoingRecord, input_ref: &InputRef) -> Result<(), KafkaError> {
        if self.transactional() && !self.swept.contains(record.topic.as_str()) {
            let topic: Arc<str> = Arc::from(record.topic.as_str());
            let partitions = sweep(&self.producer, &[&topic], self.operation_timeout)?;
            tracing::info!(%topic, partitions, "first output to this topic: the transaction sweeps it and is redone");
            self.swept.insert(topic);
            if let Some(txn) = self.txn.as_mut() {
                txn.sweeping = true;
            }
        }
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
            if self
                .partitioned
                .as_ref()
                .is_some_and(|state| state.is_changelog(&record.topic))
            {
                // Partitioned state: a change goes to its input's partition.
                base = base.partition(input_ref.1);
            }
            match self.producer.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Backpressure: deliveries drain the queue while we poll.
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Commits the open transaction with the inputs' offsets. On failure the
    /// transaction is aborted and rewound (see [`Engine::kafka_failure`]).
    pub(super) fn commit(&mut self, consumer: &BaseConsumer<ProcessorContext<E, T>>) -> bool {
        if !self.close(consumer) || !self.release_held(consumer) {
            return false;
        }
        let Some(txn) = self.txn.take() else {
            return true;
        };
        if txn.sweeping {
            self.txn = Some(txn);
            self.abort(
                consumer,
                "sweeping an earlier instance's hanging transaction",
                None,
                Backoff::None,
            );
            return false;
        }
        let span = txn.span.clone();
        let _entered = span.enter();
        let committing = Instant::now();
        match self.commit_txn(consumer, &txn) {
            Ok(phases) => {
                if self.transactional() {
                    // The coordinator writes this transaction's markers now.
                    self.hold_until = Some(Instant::now() + HOLD_AFTER_COMMIT);
                }
                self.stats.committed.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .committed_inputs
                    .fetch_add(txn.inputs as u64, Ordering::Relaxed);
                self.transform.commit();
                for input in &txn.finished_failures {
                    self.failures.remove(input);
                }
                self.kafka_failures = 0;
                self.producer
                    .context()
                    .unreachable
                    .store(false, Ordering::Relaxed);
                lock(&self.producer.context().refused).clear();
                span.record("outcome", "committed");
                span.record("messaging.batch.message_count", txn.inputs);
                span.record("outputs", txn.outputs);
                // The time split of the transaction, in µs (what
                // `herald-bench processor` reports per phase).
                tracing::debug!(
                    inputs = txn.inputs,
                    outputs = txn.outputs,
                    begin_us = micros(txn.begin),
                    process_us = micros(committing.duration_since(txn.started)),
                    offsets_us = micros(phases.offsets),
                    deliveries_us = micros(phases.deliveries),
                    commit_us = micros(phases.commit),
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

    pub(super) fn commit_txn(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        txn: &Txn,
    ) -> Result<Phases, (&'static str, KafkaError)> {
        if !self.transactional() {
            return self.commit_batch(consumer, txn);
        }
        let mut phases = Phases::default();
        let mut clock = Instant::now();
        // Deliveries first, offsets after: a delivered output means its
        // partition was added to the transaction, which the coordinator
        // accepts only once the previous transaction's markers are written.
        // Sent earlier, AddOffsetsToTxn meets the same CONCURRENT_TRANSACTIONS
        // and librdkafka retries it only after `retry.backoff.ms` (100 ms):
        // that wait was most of an exactly-once batch's cost (issue #18).
        // (commit_transaction would flush them anyway.)
        self.await_deliveries()
            .map_err(|e| ("awaiting the outputs' deliveries", e))?;
        phases.deliveries = lap(&mut clock);
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
            self.send_offsets(tpl, metadata)
                .map_err(|e| ("sending the offsets to the transaction", e))?;
            phases.offsets = lap(&mut clock);
        }
        let timeout = self.operation_timeout;
        retry_retriable(|| self.producer.commit_transaction(timeout))
            .map_err(|e| ("committing the transaction", e))?;
        phases.commit = lap(&mut clock);
        Ok(phases)
    }

    /// `send_offsets_to_transaction`, on a thread of its own that this one
    /// waits for no longer than the call's timeout and a grace period.
    ///
    /// librdkafka does not always honour that timeout: when the consumer
    /// group's coordinator is a broker that died and left the cluster's
    /// metadata, the call can wait forever for a coordinator it never looks
    /// up again (confluentinc/librdkafka#5456 and #5511, open against
    /// 2.12–2.14). Seen here with two of three brokers killed and one
    /// brought back: the processor sat in this call for minutes while every
    /// other client had moved on. A call that does not return in time
    /// leaves the producer unusable (librdkafka runs one transactional call
    /// at a time), so the processor stops with [`ProcessorError::Hung`],
    /// which it may be restarted from: a fresh producer with the same
    /// transactional id fences this one and aborts its transaction. The
    /// stuck thread keeps the abandoned producer until the call returns.
    fn send_offsets(
        &mut self,
        offsets: TopicPartitionList,
        metadata: rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<(), KafkaError> {
        let timeout = self.operation_timeout;
        let producer = Arc::clone(&self.producer);
        let (sent, outcome) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("herald-txn-offsets".to_owned())
            .spawn(move || {
                let result = retry_retriable(|| {
                    producer.send_offsets_to_transaction(&offsets, &metadata, timeout)
                });
                let _ = sent.send(result);
            });
        if let Err(error) = spawned {
            self.fatal = Some(ProcessorError::Thread(format!(
                "cannot start the thread that sends a transaction's offsets: {error}"
            )));
            return Err(KafkaError::Canceled);
        }
        // retry_retriable makes up to three calls, each bounded (when
        // librdkafka keeps its word) by the timeout.
        let waited = timeout * 3 + HUNG_GRACE;
        match outcome.recv_timeout(waited) {
            Ok(result) => result,
            Err(_) => {
                tracing::error!(
                    transactional_id = %self.transactional_id, ?waited,
                    "librdkafka's send_offsets_to_transaction did not return in time \
                     (confluentinc/librdkafka#5456); the processor stops for a fresh producer"
                );
                self.fatal = Some(ProcessorError::Hung {
                    transactional_id: self.transactional_id.clone(),
                    operation: "sending the offsets to the transaction",
                    waited,
                });
                Err(KafkaError::Canceled)
            }
        }
    }

    /// At least once: awaits every delivery of the batch, then commits its
    /// inputs' offsets through the consumer — in that order, so a crash in
    /// between redoes inputs but never skips one.
    pub(super) fn commit_batch(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        txn: &Txn,
    ) -> Result<Phases, (&'static str, KafkaError)> {
        let mut phases = Phases::default();
        let mut clock = Instant::now();
        self.await_deliveries()
            .map_err(|e| ("awaiting the outputs' deliveries", e))?;
        phases.deliveries = lap(&mut clock);
        if let Some(error) = lock(&self.producer.context().undelivered).take() {
            return Err(("delivering the outputs", error));
        }
        if txn.offsets.is_empty() {
            return Ok(phases);
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
            .map_err(|e| ("committing the input offsets", e))?;
        phases.commit = lap(&mut clock);
        Ok(phases)
    }

    /// Waits until every output handed to the producer has been
    /// acknowledged or has failed ([`crate::publisher::await_released`]).
    pub(super) fn await_deliveries(&self) -> Result<(), KafkaError> {
        crate::publisher::await_released(&*self.producer, self.operation_timeout)
    }

    /// A Kafka error broke the transaction: abort, rewind, back off.
    pub(super) fn kafka_failure(
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
    pub(super) fn abort(
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
            // The coordinator writes the abort markers now.
            self.hold_until = Some(Instant::now() + HOLD_AFTER_COMMIT);
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
}

/// How much longer than its own timeout a transactional call may take
/// before the processor deems it hung.
const HUNG_GRACE: Duration = Duration::from_secs(5);

pub(super) fn retry_retriable(
    mut call: impl FnMut() -> Result<(), KafkaError>,
) -> Result<(), KafkaError> {
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

/// Fences every earlier producer with this transactional.id and aborts
/// whatever transaction it left open: from here on, no zombie commits.
pub(super) fn init_transactions(
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

/// The input a sweep record is delivered for: none (partition -1).
fn sweep_input() -> InputRef {
    (Arc::from(""), -1, -1)
}

fn is_sweep(input: &InputRef) -> bool {
    input.1 < 0
}

/// Puts a sweep record ([`crate::sweep`]) into every partition of `topics`
/// inside the producer's open transaction, and returns how many partitions
/// that was.
pub(super) fn sweep<C: ProducerContext<DeliveryOpaque = Box<InputRef>>>(
    producer: &ThreadedProducer<C>,
    topics: &[&Arc<str>],
    timeout: Duration,
) -> Result<usize, KafkaError> {
    let mut swept = 0;
    for topic in topics {
        for partition in partitions(producer.client(), topic, timeout)? {
            loop {
                let record = BaseRecord::with_opaque_to(topic.as_ref(), Box::new(sweep_input()))
                    .partition(partition)
                    .key(SWEEP_KEY)
                    .payload(&[] as &[u8]);
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((error, _)) => return Err(error),
                }
            }
            swept += 1;
        }
    }
    Ok(swept)
}

/// At start, right after the fencing and before the changelogs are read
/// or the group joined: one transaction that sweeps `topics`
/// ([`crate::sweep`]) and the group's offsets, and is aborted. No record an
/// earlier instance left open in them can be committed later or hold back
/// their readers, and no offset it left pending can be committed later or
/// keep this instance's consumer from reading the group's committed
/// offsets (the broker answers `UNSTABLE_OFFSET_COMMIT` while one is
/// pending, so the consumer would never start).
///
/// The offsets go with the metadata of a consumer that has not joined
/// (generation -1): the group coordinator accepts that from a
/// transactional producer whatever the group's state, and what they say
/// does not matter, since the transaction is aborted.
pub(super) fn sweep_at_start(
    producer: &ThreadedProducer<TxnProducerContext>,
    config: &ProcessorConfig,
    transactional_id: &str,
    topics: &[&Arc<str>],
) -> Result<usize, ProcessorError> {
    let failed = |operation: &'static str| {
        move |source: KafkaError| ProcessorError::Kafka {
            transactional_id: transactional_id.to_owned(),
            operation,
            source,
        }
    };
    let timeout = config.operation_timeout;
    let group: BaseConsumer = config
        .consumer_client_config()
        .create()
        .map_err(failed("creating the start-up sweep's consumer"))?;
    let metadata = group.group_metadata().ok_or_else(|| {
        failed("reading the group metadata for the start-up sweep")(KafkaError::MetadataFetch(
            RDKafkaErrorCode::State,
        ))
    })?;
    let mut offsets = TopicPartitionList::new();
    if let Some(input) = config.group.topics.first() {
        offsets
            .add_partition_offset(input, 0, Offset::Offset(0))
            .map_err(failed("listing the start-up sweep's offsets"))?;
    }
    producer
        .begin_transaction()
        .map_err(failed("beginning the start-up sweep"))?;
    let swept = sweep(producer, topics, timeout)
        .and_then(|swept| {
            retry_retriable(|| producer.send_offsets_to_transaction(&offsets, &metadata, timeout))
                .map(|()| swept)
        })
        .map_err(failed("sweeping at start-up"));
    // Whatever the sweep managed, the transaction is aborted; a failure is
    // reported after it (the processor does not start then).
    let _ = crate::publisher::await_released(producer, timeout);
    retry_retriable(|| producer.abort_transaction(timeout))
        .map_err(failed("aborting the start-up sweep"))?;
    swept
}

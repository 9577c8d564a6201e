//! One input, from decoding to being part of the open batch: the event
//! type check, the transform call on the caller's runtime, its outputs.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::Utc;
use futures::FutureExt;
use herald::{DecodeError, Envelope, ErrorClass, Event, TraceContext};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use crate::consumer::envelope_of;
use crate::dlq::Failure;
use crate::error::is_retriable;
use crate::processor::{Input, Transform};

use super::failures::Failed;
use super::rebalance::ProcessorContext;
use super::transactions::Backoff;
use super::{Engine, InputRef, Tp};

/// What to do with one input.
pub(super) enum Step<E> {
    Process(E, Arc<Envelope>),
    DeadLetter(Failure),
    Skip,
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    /// One input, from decoding to being part of the open transaction.
    pub(super) fn handle(
        &mut self,
        consumer: &BaseConsumer<ProcessorContext<E, T>>,
        message: &BorrowedMessage<'_>,
    ) {
        self.stats.consumed.fetch_add(1, Ordering::Relaxed);
        let tp: Tp = (self.topics.intern(message.topic()), message.partition());
        let offset = message.offset();
        if self.fatal.is_some() {
            return;
        }
        if self.rewind.contains_key(&tp) {
            // Fetched before an abort scheduled this partition's rewind: it
            // comes again after the seek, in order.
            return;
        }
        if self
            .partitioned
            .as_ref()
            .is_some_and(|state| state.is_restoring(&tp))
        {
            // Fetched before the pause took: not before its state is here.
            self.rewind_to(&tp, offset);
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
        if envelope.is_err() && crate::sweep::is_sweep_record(message.key(), message.payload()) {
            // herald's own, never an input (see `is_sweep_record`).
            self.done(&tp, offset, &input_ref);
            return;
        }
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

    pub(super) fn decide(
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
    pub(super) fn process(
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
                    if let Err(error) = self.send(record, input_ref, false) {
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

    /// The input is part of the open transaction.
    pub(super) fn done(&mut self, tp: &Tp, offset: i64, input_ref: &InputRef) {
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
}

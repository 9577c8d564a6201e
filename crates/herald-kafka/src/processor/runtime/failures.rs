//! Failed transform calls: the failure history per input, retries with
//! backoff, and dead letters (also for inputs whose outputs Kafka refused).

use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::{DateTime, Utc};
use herald::{ErrorClass, Event};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::Producer as _;
use rdkafka::Message;

use crate::dlq::{dead_letter, Failure, OriginalRecord};
use crate::error::is_retriable;
use crate::processor::{ProcessorError, Transform};

use super::rebalance::ProcessorContext;
use super::transactions::Backoff;
use super::{lock, Engine, InputRef, Tp};

/// The failure history of one input, kept until a transaction that finishes
/// it commits (an abort makes the input come again).
pub(super) struct Attempts {
    pub(super) attempts: u32,
    pub(super) first_failed_at: DateTime<Utc>,
    pub(super) first_instant: Instant,
    pub(super) last_failed_at: DateTime<Utc>,
    pub(super) error: String,
    pub(super) class: ErrorClass,
    /// Dead-letter it next time instead of calling the transform.
    pub(super) give_up: bool,
}

impl Attempts {
    pub(super) fn failure(&self) -> Failure {
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
pub(super) struct Failed {
    pub(super) attempt: u32,
    pub(super) error: String,
    pub(super) class: ErrorClass,
    /// Whether some of its outputs were already added to the transaction.
    pub(super) outputs_sent: bool,
}

impl<E: Event, T: Transform<E>> Engine<E, T> {
    /// A transform call failed: retry later, or dead-letter the input.
    pub(super) fn transform_failed(
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

    pub(super) fn dead_letter(
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
        match self.send(&record, input_ref, true) {
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

    /// Marks inputs whose outputs Kafka refused for good as poison.
    pub(super) fn blame_refused_outputs(&mut self) {
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
}

//! Handling one record: decode, route to handlers, retry transient failures
//! with backoff, dead-letter what cannot be handled.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use herald::{Envelope, ErrorClass, RetryPolicy};
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::breaker::{Breaker, ProbeGuard, Turn};
use super::record::Record;
use super::router::{RecordInfo, RouteFailure, Router};
use super::scheduler::FastMap;
use super::ConsumerStats;
use crate::dlq::{dead_letter, Failure};
use crate::metrics::{DeadLetterLabels, HandlerLabels};
use crate::publisher::Publisher;

/// What the runtime shares with every record task.
pub(crate) struct Shared {
    pub router: Router,
    pub group_id: Arc<str>,
    pub retry: RetryPolicy,
    /// The limit of one handler call, if any.
    pub handler_timeout: Option<Duration>,
    pub dead_letter_unknown: bool,
    pub dlq_suffix: String,
    pub dlq: Publisher,
    pub stats: Arc<ConsumerStats>,
    /// Whether to time handlers and label dead letters.
    pub detailed_metrics: bool,
    /// The circuit breaker, unless turned off.
    pub breaker: Option<Arc<Breaker>>,
    /// The parked-key table's topic while keys are parked
    /// ([`crate::parking::DeadLetterMode::ParkKey`]); `None` to continue.
    pub parked_topic: Option<String>,
    /// Per handler (by registration index): its duration histogram per event
    /// type, so that timing a record does not build a label set.
    pub handler_timers: Vec<RwLock<FastMap<String, Histogram>>>,
}

impl Shared {
    /// Records `seconds` in the duration histogram of handler `index` for
    /// `event_type` (once per record: found under a read lock, not cloned).
    fn time_handler(&self, index: usize, event_type: &str, seconds: f64) {
        let timers = &self.handler_timers[index];
        if let Some(timer) = timers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(event_type)
        {
            timer.observe(seconds);
            return;
        }
        // First record of this type for this handler: the set of types is
        // the handler family's, so the map stays small.
        let timer = self
            .stats
            .handler_seconds
            .get_or_create(&HandlerLabels {
                handler: self.router.handlers[index].name().to_owned(),
                event_type: event_type.to_owned(),
            })
            .clone();
        timer.observe(seconds);
        timers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(event_type.to_owned(), timer);
    }
}

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every handler succeeded.
    Handled,
    /// Written to the dead-letter topic (acknowledged).
    DeadLettered,
    /// Written to the dead-letter topic as parked behind an earlier dead
    /// letter of its key, and the key's parked list updated.
    Parked,
    /// No handler knows its type; skipped by configuration.
    Skipped,
    /// Given up at shutdown before it was handled or dead-lettered: not done,
    /// so its offset is not committed and it will be delivered again.
    Abandoned,
}

impl Outcome {
    /// Whether the record's offset may be committed.
    pub fn is_done(self) -> bool {
        !matches!(self, Outcome::Abandoned)
    }
}

/// A parked key's list: the original offsets of its parked records (the
/// dead letter first) and since when it is parked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParkedList {
    pub offsets: Vec<i64>,
    pub since: chrono::DateTime<Utc>,
}

/// What the scheduler decided for a record when it started it, from its
/// key's parked list as the key's earlier records left it.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Handle it; when it is dead-lettered and `park`, park its key.
    Handle { park: bool },
    /// Its key is parked: write it to the dead-letter topic behind `list`.
    Park(ParkedList),
    /// A redrive of its key's head: handle it, then move the head on.
    Redrive(ParkedList),
    /// A discard: `list` is the key's list without the discarded offset.
    Discard(ParkedList),
    /// Nothing to do: another group's redrive, or a record already parked
    /// (delivered again after a restart).
    Skip,
}

/// How a record's handling ended, and the key's parked list after it when
/// that changed (an empty list: unparked).
#[derive(Debug)]
pub(crate) struct Finished {
    pub outcome: Outcome,
    pub parked: Option<ParkedList>,
}

impl From<Outcome> for Finished {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            parked: None,
        }
    }
}

/// A record's handling from its plan to its end.
pub(crate) type Handling = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// Runs `plan` for `message` to its end (see [`crate::parking`]).
///
/// One future per plan, each boxed on its own: a single `async fn` over
/// every plan is as large as the largest plan's state plus everything the
/// others keep, and every record allocates it. The common one, `Handle`,
/// stays within glibc's per-thread cache (tcache: up to 1,032 bytes);
/// larger blocks take the arena's slow path, which consolidates its free
/// lists first.
pub(crate) fn run_planned(
    shared: Arc<Shared>,
    message: Record,
    owned: Arc<CancellationToken>,
    plan: Plan,
) -> Handling {
    match plan {
        Plan::Skip => Box::pin(std::future::ready(Outcome::Skipped.into())),
        Plan::Handle { park } => Box::pin(async move {
            let outcome = process(&shared, &message, &owned).await;
            if !(park && outcome == Outcome::DeadLettered) {
                return outcome.into();
            }
            let offset = message.offset;
            let list = ParkedList {
                offsets: vec![offset],
                since: Utc::now(),
            };
            tracing::warn!(
                topic = %message.topic,
                partition = message.partition,
                offset,
                "key parked: its later records wait behind this dead letter until it is \
                 redriven or discarded"
            );
            let place = Place::of(&message);
            Box::pin(set_parked(
                &shared,
                &place,
                list,
                &owned,
                Outcome::DeadLettered,
            ))
            .await
        }),
        Plan::Park(list) => Box::pin(park(shared, message, owned, list)),
        Plan::Redrive(mut list) => Box::pin(async move {
            let outcome = process(&shared, &message, &owned).await;
            if outcome != Outcome::Handled {
                // Failed again (a new dead letter of the same original
                // offset), or abandoned: the key stays parked as it was.
                return outcome.into();
            }
            shared.stats.redriven.fetch_add(1, Ordering::Relaxed);
            list.offsets.remove(0);
            let place = Place::of(&message);
            Box::pin(set_parked(&shared, &place, list, &owned, Outcome::Handled)).await
        }),
        Plan::Discard(list) => Box::pin(async move {
            shared.stats.discarded.fetch_add(1, Ordering::Relaxed);
            let place = Place::of(&message);
            Box::pin(set_parked(&shared, &place, list, &owned, Outcome::Skipped)).await
        }),
    }
}

/// [`Plan::Park`]: writes the record to the dead-letter topic behind its
/// key's parked `list`, then adds it to the list.
async fn park(
    shared: Arc<Shared>,
    message: Record,
    owned: Arc<CancellationToken>,
    mut list: ParkedList,
) -> Finished {
    let offset = message.offset;
    let head = list.offsets.first().copied().unwrap_or(offset);
    let now = Utc::now();
    let failure = Failure {
        error: format!("parked: an earlier record of its key (offset {head}) was dead-lettered"),
        class: ErrorClass::Parked,
        handler: None,
        attempts: 0,
        first_failed_at: now,
        last_failed_at: now,
    };
    let event_type = message
        .header(herald::headers::EVENT_TYPE)
        .map(String::from_utf8_lossy)
        .unwrap_or_default()
        .into_owned();
    let written = Box::pin(write_dead_letter(
        &shared,
        &message,
        &owned,
        &event_type,
        failure,
        Some(head),
    ))
    .await;
    if written != Outcome::DeadLettered {
        return written.into();
    }
    list.offsets.push(offset);
    shared.stats.parked.fetch_add(1, Ordering::Relaxed);
    let place = Place::of(&message);
    Box::pin(set_parked(&shared, &place, list, &owned, Outcome::Parked)).await
}

/// A record's topic, partition and key: where its parked-list entry is.
struct Place {
    topic: Arc<str>,
    partition: i32,
    /// Shared with the record's buffer: most records never need it.
    key: Option<bytes::Bytes>,
}

impl Place {
    fn of(message: &Record) -> Self {
        Self {
            topic: Arc::clone(&message.topic),
            partition: message.partition,
            key: message.shared_key(),
        }
    }
}

/// Writes `list` as the key's parked-key table entry and waits for the
/// acknowledgement (trying again until the partition is given up), then
/// reports `outcome` with the new list: the record's offset is committed only
/// once the table says what it did.
async fn set_parked(
    shared: &Shared,
    place: &Place,
    list: ParkedList,
    owned: &CancellationToken,
    outcome: Outcome,
) -> Finished {
    let Some(table) = &shared.parked_topic else {
        return outcome.into();
    };
    let record = crate::parking::entry(
        table,
        &shared.group_id,
        &place.topic,
        place.partition,
        place.key.as_deref().unwrap_or_default(),
        &list.offsets,
        list.since,
    );
    // Boxed, here and below: a rare path's future would otherwise be
    // inlined in every record's future, which is moved several times.
    if !Box::pin(publish_acknowledged(
        shared,
        &record,
        owned,
        "parked-key table",
    ))
    .await
    {
        return Outcome::Abandoned.into();
    }
    if list.offsets.is_empty() {
        tracing::info!(
            topic = %place.topic,
            partition = place.partition,
            "key unparked: its parked records were all handled or discarded"
        );
    }
    Finished {
        outcome,
        parked: Some(list),
    }
}

/// Handles one record to its end. `owned` is cancelled when the record's
/// partition is revoked (or the consumer stops): a record waiting then (in
/// a retry's backoff, for the circuit breaker, to write its dead letter)
/// gives up at once instead of applying its effects for a partition that
/// another member now owns.
pub(crate) async fn process(
    shared: &Shared,
    message: &Record,
    owned: &CancellationToken,
) -> Outcome {
    let envelope =
        Envelope::from_record(message.key(), message.payload(), message.headers()).map(Arc::new);
    // Debug level: per-record spans cost more than the rest of a no-op
    // record's handling under a log formatter at info (herald-bench consumer
    // --baseline uninstrumented). An OpenTelemetry layer with its own filter
    // still records them; the service's does.
    let span = tracing::debug_span!(
        "consume",
        otel.name = %format_args!("{} process", message.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.destination.partition.id = message.partition,
        messaging.kafka.offset = message.offset,
        messaging.consumer.group.name = %shared.group_id,
        messaging.message.id = tracing::field::Empty,
        event_type = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    if let Ok(envelope) = &envelope {
        span.record(
            "messaging.message.id",
            tracing::field::display(envelope.event_id),
        );
        span.record("event_type", envelope.event_type.as_str());
        if let Some(trace) = &envelope.trace {
            span.record("trace_id", trace.trace_id());
            // The producer's span becomes this span's parent: one trace
            // from the request that produced the event to its handlers.
            trace.adopt_as_parent(&span);
        }
    }
    let outcome = process_in_span(shared, message, envelope, owned)
        .instrument(span.clone())
        .await;
    span.record("outcome", tracing::field::debug(outcome));
    outcome
}

async fn process_in_span(
    shared: &Shared,
    message: &Record,
    envelope: Result<Arc<Envelope>, herald::DecodeError>,
    owned: &CancellationToken,
) -> Outcome {
    let envelope = match envelope {
        Ok(envelope) => envelope,
        Err(_) if crate::sweep::is_sweep_record(message.key(), message.payload()) => {
            // herald's own, from an aborted transaction: a broker that keeps
            // `read_committed` never hands it out, librdkafka's mock
            // cluster (the embedded default) does.
            return Outcome::Skipped;
        }
        Err(error) => {
            tracing::warn!(%error, "undecodable record");
            let now = Utc::now();
            let failure = Failure {
                error: error.to_string(),
                class: error.class(),
                handler: None,
                attempts: 1,
                first_failed_at: now,
                last_failed_at: now,
            };
            return Box::pin(write_dead_letter(
                shared,
                message,
                owned,
                "undecodable",
                failure,
                None,
            ))
            .await;
        }
    };

    if shared
        .router
        .handlers_for(&envelope.event_type)
        .next()
        .is_none()
    {
        if shared.dead_letter_unknown {
            let now = Utc::now();
            let failure = Failure {
                error: format!("no handler for event type {:?}", envelope.event_type),
                class: ErrorClass::UnknownType,
                handler: None,
                attempts: 1,
                first_failed_at: now,
                last_failed_at: now,
            };
            return Box::pin(write_dead_letter(
                shared, message, owned, "other", failure, None,
            ))
            .await;
        }
        tracing::debug!(event_type = %envelope.event_type, "skipping unknown event type");
        shared.stats.skipped_unknown.fetch_add(1, Ordering::Relaxed);
        return Outcome::Skipped;
    }

    for (index, handler) in shared.router.handlers_for(&envelope.event_type) {
        let mut attempt = 1;
        // Attempts made before the breaker last closed: they do not count
        // towards the retry policy's budget (the handler still sees every
        // attempt's number).
        let mut spent = 0;
        let mut first_failure: Option<(chrono::DateTime<Utc>, Instant)> = None;
        // Set while this record runs as the open breaker's probe.
        let mut probe: Option<ProbeGuard> = None;
        loop {
            let info = RecordInfo {
                topic: Arc::clone(&message.topic),
                partition: message.partition,
                offset: message.offset,
                group_id: Arc::clone(&shared.group_id),
                envelope: Arc::clone(&envelope),
                attempt,
                done_below: message.done_below,
            };
            let span = tracing::debug_span!(
                "handle",
                otel.name = %format_args!("{} handle", handler.name()),
                handler = handler.name(),
                attempt,
            );
            let started = shared.detailed_metrics.then(Instant::now);
            // `None`: cut off after the handler timeout. The timer starts
            // when the call first waits: a call that finishes in its first
            // poll (an in-memory update) costs no clock read and no timer,
            // and a timer could not cut off that poll's computing anyway.
            //
            // The call's future lives in this block only: a call cut off
            // is dropped here, so whatever it held (a transaction and its
            // row locks, a place in an inbox batch) is released before the
            // retry's backoff, the breaker's wait or the dead letter, which
            // can take long and whose next attempt may need what it held.
            let result = {
                let mut call = std::pin::pin!(AssertUnwindSafe(handler.call(info))
                    .catch_unwind()
                    .instrument(span));
                match shared.handler_timeout {
                    Some(limit) => match futures::poll!(call.as_mut()) {
                        std::task::Poll::Ready(result) => Some(result),
                        // Boxed, as is the backoff below: paths that wait
                        // keep their timers out of every record's future,
                        // which stays small enough for the allocator's
                        // per-thread cache (glibc's tcache: up to 1,032
                        // bytes).
                        std::task::Poll::Pending => {
                            Box::pin(tokio::time::timeout(limit, call)).await.ok()
                        }
                    },
                    None => Some(call.await),
                }
            };
            if let Some(started) = started {
                shared.time_handler(index, &envelope.event_type, started.elapsed().as_secs_f64());
            }
            let (error, class) = match result {
                Some(Ok(Ok(()))) => {
                    if let Some(breaker) = &shared.breaker {
                        breaker.succeeded();
                    }
                    break;
                }
                Some(Ok(Err(RouteFailure::Decode(e)))) => (e.to_string(), e.class()),
                Some(Ok(Err(RouteFailure::Handler(e)))) => (e.to_string(), e.class()),
                Some(Err(panic)) => {
                    let what = herald::panic_text(&*panic);
                    (format!("handler panicked: {what}"), ErrorClass::Permanent)
                }
                None => {
                    shared
                        .stats
                        .handler_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    let limit = shared.handler_timeout.unwrap_or_default();
                    (
                        format!("handler timed out after {limit:?}"),
                        ErrorClass::Transient,
                    )
                }
            };
            if let (ErrorClass::Transient, Some(breaker)) = (class, &shared.breaker) {
                if let Some(probe) = probe.take() {
                    probe.failed();
                }
                if breaker.failed(key_hash(message)) {
                    // A dependency is down, not this record: wait for it
                    // instead of spending attempts towards a dead letter.
                    tracing::info!(
                        handler = handler.name(),
                        %error,
                        event_id = %envelope.event_id,
                        "transient failure while the circuit breaker is open; waiting"
                    );
                    match Box::pin(breaker.wait_turn(owned)).await {
                        Turn::Stopping => return Outcome::Abandoned,
                        Turn::Closed => {}
                        Turn::Probe(guard) => probe = Some(guard),
                    }
                    shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                    spent = attempt;
                    attempt += 1;
                    first_failure = None;
                    continue;
                }
            }
            let now = Utc::now();
            let (first_at, first_instant) = *first_failure.get_or_insert((now, Instant::now()));
            let retry_in = (class == ErrorClass::Transient)
                .then(|| {
                    shared
                        .retry
                        .next_delay(attempt - spent, first_instant.elapsed())
                })
                .flatten();
            match retry_in {
                Some(delay) => {
                    tracing::info!(
                        handler = handler.name(),
                        attempt,
                        %error,
                        ?delay,
                        event_id = %envelope.event_id,
                        trace_id = trace_id(&envelope),
                        "transient failure, retrying"
                    );
                    shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let backoff = Box::pin(async {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => true,
                            _ = owned.cancelled() => false,
                        }
                    });
                    if !backoff.await {
                        return Outcome::Abandoned;
                    }
                    attempt += 1;
                }
                None => {
                    tracing::warn!(
                        handler = handler.name(),
                        attempt,
                        %class,
                        %error,
                        event_id = %envelope.event_id,
                        trace_id = trace_id(&envelope),
                        "giving up on record"
                    );
                    let failure = Failure {
                        error,
                        class,
                        handler: Some(handler.name().to_owned()),
                        attempts: attempt,
                        first_failed_at: first_at,
                        last_failed_at: now,
                    };
                    return Box::pin(write_dead_letter(
                        shared,
                        message,
                        owned,
                        &envelope.event_type,
                        failure,
                        None,
                    ))
                    .await;
                }
            }
        }
    }
    shared.stats.handled.fetch_add(1, Ordering::Relaxed);
    Outcome::Handled
}

/// The record's key, hashed for the breaker's distinct-key count (records
/// without a key count per partition).
fn key_hash(message: &Record) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match message.key() {
        Some(key) => key.hash(&mut hasher),
        None => message.partition.hash(&mut hasher),
    }
    hasher.finish()
}

/// The record's trace id for log lines, which may be written outside the
/// record's (debug-level) span.
fn trace_id(envelope: &Envelope) -> &str {
    envelope.trace.as_ref().map_or("", |t| t.trace_id())
}

/// Writes the dead letter and waits for its acknowledgement, trying again
/// until it succeeds or the consumer stops: a record whose dead letter was
/// not written is never marked done, so it is not committed. A parked
/// record's letter says which offset it waits behind.
async fn write_dead_letter(
    shared: &Shared,
    message: &Record,
    owned: &CancellationToken,
    event_type: &str,
    failure: Failure,
    parked_behind: Option<i64>,
) -> Outcome {
    let dlq_topic = format!("{}{}", message.topic, shared.dlq_suffix);
    let mut record = dead_letter(&dlq_topic, &shared.group_id, &message.original(), &failure);
    let parking = match parked_behind {
        Some(head) => Some((crate::parking::headers::PARKED_BEHIND, head.to_string())),
        // This dead letter parks its key (see `run_planned`).
        None if shared.parked_topic.is_some() && message.key().is_some() => {
            Some((crate::parking::headers::PARKS_KEY, "true".to_owned()))
        }
        None => None,
    };
    if let Some((name, value)) = parking {
        record
            .headers
            .push((name.to_owned(), Some(value.into_bytes())));
    }
    let span = tracing::info_span!(
        "dead_letter",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %dlq_topic,
        error.type = %failure.class,
    );
    if !Box::pin(publish_acknowledged(
        shared,
        &record,
        owned,
        "dead-letter topic",
    ))
    .instrument(span)
    .await
    {
        return Outcome::Abandoned;
    }
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .dead_letters
        .get_or_create(&DeadLetterLabels {
            topic: message.topic.to_string(),
            event_type: event_type.to_owned(),
            error_class: failure.class.to_string(),
        })
        .inc();
    Outcome::DeadLettered
}

/// Publishes `record` (to the dead-letter topic or the parked-key table)
/// and waits for its acknowledgement, with backoff up to 5 s, until it is
/// acknowledged (`true`) or the record's partition is given up (`false`).
async fn publish_acknowledged(
    shared: &Shared,
    record: &crate::publisher::OutgoingRecord,
    owned: &CancellationToken,
    what: &'static str,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match shared.dlq.publish_record(record).await {
            Ok(_) => return true,
            Err(error) => {
                shared
                    .stats
                    .dead_letter_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %error,
                    to = what,
                    topic = %record.topic,
                    retry_in = ?backoff,
                    "write failed; the record stays uncommitted (its partition's commit cannot \
                     pass it) and the write is tried again"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = owned.cancelled() => return false,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

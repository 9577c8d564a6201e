//! The outbox relays: they claim committed outbox rows from a store,
//! publish them, and mark what was published in the transaction that
//! claimed it. Two deliveries ([`Delivery`]):
//!
//! - [`TransactionalRelay`] (exactly once, `exactly_once.rs`): a batch is a
//!   Kafka transaction with a checkpoint of what it published
//!   (`checkpoint.rs`); the store's relay slots fence stalled relays and a
//!   slot's next owner marks what its predecessor published but did not
//!   record. `read_committed` readers see every event once.
//! - [`Relay`] (at least once, this file): the idempotent producer, every
//!   acknowledgement awaited, then the mark. A crash between publish and
//!   mark re-publishes the same event ids on the next pass (consumers
//!   deduplicate with the inbox); nothing committed is ever lost. A failed
//!   delivery leaves its row, and every later row of the same aggregate in
//!   the batch, unpublished for the next pass (after a backoff), so an
//!   aggregate's events never overtake each other.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::envelope::headers;
use herald::{OutboxBatch, OutboxStore, PendingRecord, RetryPolicy, TraceContext};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::message::{Header, OwnedHeaders};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{ClientError, PublishError};
use crate::metrics::latency_histogram;
use crate::publisher::{BorrowedRecord, Publisher};

mod checkpoint;
mod exactly_once;

pub use exactly_once::{Delivery, ExactlyOnceConfig, FaultHook, RelayPoint, TransactionalRelay};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed per batch (default 2,000). A batch's fixed costs (the
    /// claim's round trips, the wait for the last acknowledgement, the
    /// commit) are paid once per batch: in `herald-bench relay --records
    /// 300000 --rounds 3`, 2,000 drained at a median 75,061 rec/s and 500 at
    /// 62,100. A batch is never held back to fill up, so a small backlog
    /// still goes out at once.
    pub batch_size: usize,
    /// How long an idle relay waits for a notification before polling again
    /// (default 1 s). Notifications make the usual wake-up immediate.
    pub poll_interval: Duration,
    /// The longest pause after failures (default 10 s).
    pub max_backoff: Duration,
    /// Claim → publish → mark loops run side by side (default 4). Each
    /// claims other aggregates (the store's claim skips what another claim
    /// holds), so while one batch waits for its acknowledgements or its
    /// commit the next is already on its way; per-aggregate order is the
    /// store's, exactly as with several relay processes. In the
    /// exactly-once relay worker `w` serves slots `w`, `w + workers`, …: the
    /// default serves each of the store's 4 slots with a worker of its
    /// own, and workers beyond the slot count have nothing to do.
    pub workers: usize,
}

impl RelayConfig {
    /// The pause after `failures` consecutive failed passes: exponential
    /// from 100 ms up to [`RelayConfig::max_backoff`], with full jitter so
    /// several relays do not hammer a recovering server together.
    pub fn backoff(&self, failures: u32) -> Duration {
        RetryPolicy::forever(Duration::from_millis(100), self.max_backoff).pause(failures)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 2_000,
            poll_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            workers: 4,
        }
    }
}

crate::metrics::stats! {
    /// Counters of a relay, readable while it runs (one method per figure);
    /// a Prometheus collector (see [`crate::metrics`]).
    pub struct RelayStats {
        /// Records published and marked.
        published: counter(
            "herald_relay_published",
            "Outbox records published to Kafka and marked."
        ),
        /// Batches that published at least one record.
        batches: counter("herald_relay_batches", "Relay batches that published records."),
        /// Deliveries that failed (their rows stay for the next pass).
        publish_failures: counter(
            "herald_relay_publish_failures",
            "Deliveries that failed (retried on a later pass)."
        ),
        /// Store errors (claim or commit failed).
        store_failures: counter(
            "herald_relay_store_failures",
            "Outbox store errors (claim or mark)."
        ),
        /// Records the broker refused for good (too large, invalid, not
        /// authorized), each time.
        refused: counter(
            "herald_relay_refused",
            "Outbox records the broker refused for good (too large, invalid, not authorized)."
        ),
        /// Events the store parked, with their aggregates, after refusals.
        parked: counter(
            "herald_relay_parked",
            "Outbox events parked with their aggregates after repeated refusals."
        ),
        /// Exactly once: slot producers initialized (each fences the slot's
        /// earlier producers).
        fences: counter(
            "herald_relay_fences",
            "Exactly-once relay slot producers initialized (each fences earlier ones)."
        ),
        /// Exactly once: transactions refused because another relay fenced
        /// this one's slot producer.
        fenced: counter(
            "herald_relay_fenced",
            "Exactly-once relay transactions refused because another relay took the slot."
        ),
        /// Exactly once: transactions aborted after a Kafka error.
        aborted: counter(
            "herald_relay_transactions_aborted",
            "Exactly-once relay transactions aborted after a Kafka error."
        ),
        /// Exactly once: rows a previous owner of a slot published but did not
        /// mark, marked from its checkpoint by the next owner.
        recovered: counter(
            "herald_relay_recovered",
            "Rows marked from a checkpoint that a previous slot owner published but did not mark."
        ),
        /// Duration of the last non-empty batch, claim to commit, in microseconds.
        last_batch_micros: internal,
        /// Sum of non-empty batch durations, in microseconds.
        batch_micros_total: internal,
    }
    metrics {
        /// Non-empty batch durations, claim to commit, in seconds.
        batch_seconds: Histogram = latency_histogram() => (
            "herald_relay_batch_duration_seconds",
            "Relay batch durations, claim to commit."
        ),
    }
}

impl Collector for RelayStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.encode_figures(&mut encoder)
    }
}

impl RelayStats {
    /// Counts a store failure and wraps it.
    fn store_error<E: std::error::Error + 'static>(&self, error: E) -> RelayError<E> {
        self.store_failures.fetch_add(1, Ordering::Relaxed);
        RelayError::Store(error)
    }

    /// Counts a non-empty batch of `published` records that started at
    /// `started`.
    fn record_batch(&self, published: usize, started: Instant) {
        let elapsed = started.elapsed();
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.published
            .fetch_add(published as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.last_batch_micros.store(micros, Ordering::Relaxed);
        self.batch_micros_total.fetch_add(micros, Ordering::Relaxed);
        self.batch_seconds.observe(elapsed.as_secs_f64());
    }
}

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError<E: std::error::Error + 'static> {
    /// The store failed to claim or to mark.
    #[error("outbox store: {0}")]
    Store(#[source] E),
    /// Some deliveries failed; `published` records of the batch made it.
    #[error("{failed} of the batch's records were not published ({published} were): {source}")]
    Publish {
        /// Records published and marked.
        published: usize,
        /// Records left for the next pass.
        failed: usize,
        /// The first delivery error.
        #[source]
        source: PublishError,
    },
    /// Exactly once: a Kafka transaction step failed; the transaction was
    /// aborted and nothing of the batch was marked.
    #[error("relay slot {slot}: {operation} failed: {source}")]
    Transaction {
        /// The relay slot.
        slot: u16,
        /// What the relay was doing.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// Exactly once: the slot's producer could not be made, or its
    /// checkpoint could not be read; nothing was claimed.
    #[error("relay slot {slot}: {source}")]
    Checkpoint {
        /// The relay slot.
        slot: u16,
        /// What failed.
        #[source]
        source: ClientError,
    },
}

/// The span of one relay batch of `claimed` records (both relays). The
/// at-least-once relay records `published`; the exactly-once one its slot,
/// sequence and transactional id.
fn batch_span(claimed: usize) -> tracing::Span {
    tracing::info_span!(
        "relay_batch",
        otel.name = "outbox relay publish",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.batch.message_count = claimed,
        published = tracing::field::Empty,
        messaging.kafka.transactional_id = tracing::field::Empty,
        relay.slot = tracing::field::Empty,
        relay.sequence = tracing::field::Empty,
    )
}

/// Tells the store about the records the broker refused for good (so that
/// it can park them with their aggregates) and counts them.
async fn note_refusals<S: OutboxStore>(
    store: &S,
    stats: &RelayStats,
    refused: Vec<(PendingRecord, String)>,
) {
    for (record, error) in refused {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        match store.refused(&record, &error).await {
            Ok(true) => {
                stats.parked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    event_id = %record.event_id,
                    topic = %record.topic,
                    %error,
                    "outbox event refused by the broker too often: parked, and its aggregate's \
                     later events wait behind it (retry or discard it by its event id)"
                );
            }
            Ok(false) => tracing::warn!(
                event_id = %record.event_id,
                topic = %record.topic,
                %error,
                "outbox event refused by the broker; its aggregate waits, and it is tried again"
            ),
            Err(store_error) => tracing::warn!(
                event_id = %record.event_id,
                error = %store_error,
                "could not record a refusal; the event is tried again"
            ),
        }
    }
}

/// A token cancelled when `shutdown` completes (a relay's workers watch
/// it between batches).
fn cancelled_by(shutdown: impl Future<Output = ()> + Send + 'static) -> CancellationToken {
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    stop
}

/// Waits for `wait`, or until `stop`.
async fn until_stopped(stop: &CancellationToken, wait: impl Future<Output = ()>) {
    tokio::select! {
        () = wait => {}
        () = stop.cancelled() => {}
    }
}

/// Runs draining workers side by side and adds up what they published;
/// the first error wins.
async fn published_by<E: std::error::Error + 'static>(
    workers: impl IntoIterator<Item = impl Future<Output = Result<usize, RelayError<E>>>>,
) -> Result<usize, RelayError<E>> {
    let mut total = 0;
    for published in futures::future::join_all(workers).await {
        total += published?;
    }
    Ok(total)
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published and marked.
    pub published: usize,
}

/// Drains an [`OutboxStore`] into Kafka, at least once: a crash between
/// the broker's acknowledgement and the store's mark publishes that batch
/// again (consumers deduplicate by event id). [`TransactionalRelay`]
/// publishes exactly once.
///
/// ```no_run
/// use herald_kafka::{Publisher, PublisherConfig, Relay, RelayConfig};
/// // `outbox`: herald_postgres::PgOutbox or herald_sqlite::SqliteOutbox.
/// # async fn run(outbox: impl herald::OutboxStore) -> Result<(), herald_kafka::ClientError> {
/// let publisher = Publisher::new(&PublisherConfig::new("127.0.0.1:9092", "/orders"))?;
/// let relay = Relay::new(outbox, publisher, RelayConfig::default());
/// // Woken by the outbox's commit notifications; per-aggregate order kept.
/// relay.run(async { tokio::signal::ctrl_c().await.ok(); }).await;
/// # Ok(()) }
/// ```
pub struct Relay<S: OutboxStore> {
    store: S,
    publisher: Publisher,
    config: RelayConfig,
    stats: Arc<RelayStats>,
}

impl<S: OutboxStore> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The record for an outbox row, and the span of its publication: a child of
/// the trace the row was written in (its stored `traceparent`). When
/// OpenTelemetry is on, the record carries the publication span's context,
/// so its consumers become children of the relay's span; otherwise it
/// carries the stored context unchanged.
fn outgoing(record: &PendingRecord) -> (BorrowedRecord<'_>, tracing::Span) {
    // Debug level, like every per-record span (see the consumer's): an
    // OpenTelemetry layer with its own filter still records it.
    let span = tracing::debug_span!(
        "relay_publish",
        otel.name = %format_args!("{} publish", record.topic),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %record.topic,
        messaging.message.id = %record.event_id,
    );
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let stored = header(headers::TRACEPARENT)
        .and_then(|parent| TraceContext::new(parent, header(headers::TRACESTATE)).ok());
    if let Some(stored) = &stored {
        stored.adopt_as_parent(&span);
    }
    let carried = TraceContext::of_span(&span).or(stored);
    // Straight into librdkafka's header list: every stored header but the
    // trace context, then the context this record carries.
    let mut out = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        if key != headers::TRACEPARENT && key != headers::TRACESTATE {
            out = out.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
    }
    if let Some(trace) = &carried {
        out = out.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(trace.traceparent().as_bytes()),
        });
        if let Some(state) = trace.tracestate() {
            out = out.insert(Header {
                key: headers::TRACESTATE,
                value: Some(state.as_bytes()),
            });
        }
    }
    let outgoing = BorrowedRecord {
        topic: &record.topic,
        key: Some(record.key.as_bytes()),
        payload: &record.payload,
        headers: out,
        event_id: record.event_id,
        partition: None,
    };
    (outgoing, span)
}

impl<S: OutboxStore> Relay<S> {
    /// A relay from `store` to Kafka through `publisher` (keep its
    /// idempotence on: it is what keeps a batch's order under retries).
    pub fn new(store: S, publisher: Publisher, config: RelayConfig) -> Self {
        Self {
            store,
            publisher,
            config,
            stats: Arc::default(),
        }
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// One pass: claim a batch, publish it, mark what was acknowledged.
    pub async fn run_once(&self) -> Result<Pass, RelayError<S::Error>> {
        let started = Instant::now();
        let batch = self
            .store
            .claim(self.config.batch_size)
            .await
            .map_err(|e| self.store_error(e))?;
        let claimed = batch.records().len();
        if claimed == 0 {
            batch.commit(&[]).await.map_err(|e| self.store_error(e))?;
            return Ok(Pass {
                claimed: 0,
                published: 0,
            });
        }
        let span = batch_span(claimed); // The per-record spans end when the batch's acknowledgements are in.
        let (records, _spans): (Vec<BorrowedRecord<'_>>, Vec<tracing::Span>) =
            batch.records().iter().map(outgoing).unzip();
        let results = self
            .publisher
            .publish_records(records)
            .instrument(span.clone())
            .await;

        // Per aggregate, only the acknowledged prefix counts as published.
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        let mut published = Vec::with_capacity(claimed);
        let mut refused = Vec::new();
        let mut first_error = None;
        let mut failed = 0;
        for (record, result) in batch.records().iter().zip(results) {
            let aggregate = (record.topic.as_str(), record.key.as_str());
            match result {
                Ok(_) if !blocked.contains(&aggregate) => published.push(record.id),
                Ok(_) => failed += 1,
                Err(error) => {
                    failed += 1;
                    blocked.insert(aggregate);
                    if error.is_refusal() {
                        refused.push((record.clone(), error.to_string()));
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        let published_count = published.len();
        batch
            .commit(&published)
            .await
            .map_err(|e| self.store_error(e))?;
        note_refusals(&self.store, &self.stats, refused).await;
        span.record("published", published_count);

        self.stats.record_batch(published_count, started);
        match first_error {
            Some(source) => {
                self.stats
                    .publish_failures
                    .fetch_add(failed as u64, Ordering::Relaxed);
                Err(RelayError::Publish {
                    published: published_count,
                    failed,
                    source,
                })
            }
            None => Ok(Pass {
                claimed,
                published: published_count,
            }),
        }
    }

    /// Passes until one claims nothing; returns how many records were
    /// published. Tests use it to drive the relay until the outbox is idle.
    pub async fn drain(&self) -> Result<usize, RelayError<S::Error>> {
        let workers = (0..self.config.workers.max(1)).map(|_| async {
            let mut total = 0;
            loop {
                let pass = self.run_once().await?;
                total += pass.published;
                if pass.claimed == 0 {
                    return Ok::<_, RelayError<S::Error>>(total);
                }
            }
        });
        published_by(workers).await
    }

    /// Relays until `shutdown` completes. A batch in progress always
    /// finishes (claim → publish → mark) before the relay stops.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let stop = cancelled_by(shutdown);
        tracing::info!(
            batch_size = self.config.batch_size,
            workers = self.config.workers,
            "outbox relay started"
        );
        let workers = (0..self.config.workers.max(1)).map(|_| self.worker(&stop));
        futures::future::join_all(workers).await;
        let _ = self.publisher.flush(Duration::from_secs(5));
        tracing::info!("outbox relay stopped");
    }

    /// One claim → publish → mark loop of [`Relay::run`].
    async fn worker(&self, stop: &CancellationToken) {
        let mut failures: u32 = 0;
        while !stop.is_cancelled() {
            let pause = match self.run_once().await {
                Ok(pass) => {
                    failures = 0;
                    if pass.claimed > 0 {
                        continue;
                    }
                    until_stopped(stop, self.store.wait_for_work(self.config.poll_interval)).await;
                    continue;
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let pause = self.config.backoff(failures);
                    tracing::warn!(%error, ?pause, "outbox relay pass failed; retrying");
                    pause
                }
            };
            until_stopped(stop, tokio::time::sleep(pause)).await;
        }
    }

    fn store_error(&self, error: S::Error) -> RelayError<S::Error> {
        self.stats.store_error(error)
    }
}

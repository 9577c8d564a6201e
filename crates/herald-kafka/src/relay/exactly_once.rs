//! The exactly-once outbox relay: each batch is one Kafka transaction under
//! its relay slot's `transactional.id`, holding the batch's records and a
//! checkpoint of what it published; the store marks the batch in a lease
//! transaction committed after Kafka's. A lease carries as many batches as
//! its slot has ready, up to [`ExactlyOnceConfig::lease_span`].
//!
//! Why no event is published twice, and why a stalled relay cannot commit
//! after another has taken over, is argued where the ownership lives, in
//! `herald_postgres::slots`. This side keeps two rules that argument needs:
//!
//! 1. **Fence, then read, then claim.** A producer for a slot is made (and
//!    `init_transactions` called, which fences every earlier producer of
//!    the slot and settles its open transaction) only while this relay
//!    holds the slot's lease, and the slot's latest checkpoint is read
//!    (`read_committed`) after that, and recovered into the lease before
//!    the lease claims.
//! 2. **A kept producer is only trusted while nothing happened behind its
//!    back.** Between leases a process keeps each slot's producer, with the
//!    sequence it last committed. It reuses it only when the new lease
//!    shows that same sequence; anything else (another relay committed the
//!    slot meanwhile, or this relay's own store commit failed after its
//!    Kafka commit) makes a new producer, which fences and reads again. A
//!    kept producer that another relay fenced meanwhile fails its next
//!    transaction and is dropped; that batch is claimed again later.
//! 3. **A checkpoint lists everything its lease has not made durable.** The
//!    lease's batches are marked in its transaction as Kafka commits them
//!    and become durable only with the lease's commit, so each batch's
//!    checkpoint lists the ids of every earlier batch of the lease (and
//!    the recovered ones) beside its own: whichever checkpoint is the
//!    latest when the relay dies, its recovery marks all of them.
//!
//! Any Kafka error inside a transaction aborts it, drops the slot's
//! producer and backs off; the lease records the batches Kafka committed
//! before that one (or ends with nothing marked): the failed batch is
//! claimed again, in order, by whichever relay gets the slot next.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use herald::{Checkpoint, PendingRecord, SlotLease, SlotStore};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::checkpoint::{self, CheckpointReader};
use super::{
    batch_span, cancelled_by, outgoing, published_by, until_stopped, Pass, RelayConfig, RelayError,
    RelayStats,
};
use crate::admin::TopicDurability;
use crate::error::{is_fenced_code, ClientError};
use crate::publisher::{BorrowedRecord, Publisher, PublisherConfig, PublisherStats};
use crate::settings;

/// Which relay a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// [`TransactionalRelay`]: every outbox event reaches Kafka once, for
    /// `read_committed` readers. Needs a broker with transactions (not
    /// librdkafka's mock cluster) and a [`herald::SlotStore`].
    #[default]
    ExactlyOnce,
    /// [`super::Relay`]: a crash between publish and mark publishes a
    /// batch again (same event ids); consumers deduplicate with the inbox.
    AtLeastOnce,
}

impl Delivery {
    /// The name used in flags and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::ExactlyOnce => "exactly-once",
            Delivery::AtLeastOnce => "at-least-once",
        }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Delivery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exactly-once" => Ok(Delivery::ExactlyOnce),
            "at-least-once" => Ok(Delivery::AtLeastOnce),
            other => Err(format!(
                "unknown delivery {other:?}: expected exactly-once or at-least-once"
            )),
        }
    }
}

/// Settings of the exactly-once relay beyond [`RelayConfig`].
#[derive(Debug, Clone)]
pub struct ExactlyOnceConfig {
    /// Slot `k`'s producer has `transactional.id` `<prefix>-<k>` (default
    /// `herald-relay`). Every relay of one outbox must use the same prefix
    /// (it is what fences a stalled relay), and no other outbox may.
    pub transactional_id_prefix: String,
    /// The compacted topic of checkpoints, one partition per slot (default
    /// `herald-relay-checkpoints`); created at start-up when missing.
    pub checkpoint_topic: String,
    /// `transaction.timeout.ms`: the broker aborts a relay transaction open
    /// longer than this (default 60 s).
    pub transaction_timeout: Duration,
    /// The longest wait for `init_transactions`, a commit, an abort or a
    /// checkpoint read (default 30 s).
    pub operation_timeout: Duration,
    /// How long one lease goes on starting batches while its slot has
    /// records (default 500 ms; see [`TransactionalRelay::run_slot`]). The
    /// store's commit, which makes the lease's marks durable, comes at
    /// least this often on a busy slot; a crash before it costs a
    /// recovery of at most [`RelayConfig::batch_size`] ids.
    pub lease_span: Duration,
    /// How durable the checkpoint topic is when the relay creates it
    /// (default: as the cluster's default; see [`TopicDurability`]).
    pub topic_durability: TopicDurability,
}

impl Default for ExactlyOnceConfig {
    fn default() -> Self {
        Self {
            transactional_id_prefix: "herald-relay".to_owned(),
            checkpoint_topic: "herald-relay-checkpoints".to_owned(),
            transaction_timeout: Duration::from_secs(60),
            operation_timeout: Duration::from_secs(30),
            lease_span: Duration::from_millis(500),
            topic_durability: TopicDurability::default(),
        }
    }
}

/// A point in an exactly-once relay pass, where a [`FaultHook`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelayPoint {
    /// The lease claimed a non-empty batch; nothing is sent yet.
    Claimed,
    /// Every record and the checkpoint are acknowledged inside the open
    /// Kafka transaction; it is not committed.
    Published,
    /// The Kafka transaction committed; the store has not marked the batch.
    KafkaCommitted,
    /// The store marked the batch.
    StoreCommitted,
}

impl RelayPoint {
    /// Every point, in pass order.
    pub const ALL: [RelayPoint; 4] = [
        RelayPoint::Claimed,
        RelayPoint::Published,
        RelayPoint::KafkaCommitted,
        RelayPoint::StoreCommitted,
    ];

    /// The point's name (`claimed`, `published`, `kafka-committed`,
    /// `store-committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            RelayPoint::Claimed => "claimed",
            RelayPoint::Published => "published",
            RelayPoint::KafkaCommitted => "kafka-committed",
            RelayPoint::StoreCommitted => "store-committed",
        }
    }
}

impl std::str::FromStr for RelayPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RelayPoint::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown relay point {s:?}"))
    }
}

/// Called at each [`RelayPoint`] of a pass with the slot, and awaited: a
/// fault-injection test stops the relay there (abort the process, or hold
/// the pass to make a zombie). Production relays have none.
pub type FaultHook =
    Arc<dyn Fn(RelayPoint, u16) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A slot's producer kept between leases, with the checkpoint sequence it
/// last committed (and the store recorded).
struct SlotProducer {
    publisher: Publisher,
    sequence: i64,
    /// Event topics this producer has swept of what an earlier producer of
    /// the slot left open ([`crate::sweep`]).
    swept: HashSet<String>,
}

/// Drains a [`SlotStore`] into Kafka exactly once (see the module
/// documentation).
pub struct TransactionalRelay<S: SlotStore> {
    store: S,
    client: ClientConfig,
    source: String,
    config: RelayConfig,
    exactly_once: ExactlyOnceConfig,
    idle: Mutex<HashMap<u16, SlotProducer>>,
    reader: Arc<Mutex<CheckpointReader>>,
    stats: Arc<RelayStats>,
    publisher_stats: Arc<PublisherStats>,
    hook: Option<FaultHook>,
}

impl<S: SlotStore> std::fmt::Debug for TransactionalRelay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalRelay")
            .field("config", &self.config)
            .field("exactly_once", &self.exactly_once)
            .finish_non_exhaustive()
    }
}

impl<S: SlotStore> TransactionalRelay<S> {
    /// A relay from `store` to the brokers of `producer` (its settings
    /// apply to every slot's producer; herald sets `transactional.id`).
    /// Creates the checkpoint topic when it is missing, and fails when it
    /// exists with fewer partitions than the store has slots.
    pub async fn new(
        store: S,
        producer: &PublisherConfig,
        config: RelayConfig,
        exactly_once: ExactlyOnceConfig,
    ) -> Result<Self, ClientError> {
        let mut client = producer.client_config();
        if !producer.settings.contains_key("linger.ms") {
            // A relay transaction waits for every acknowledgement before
            // it commits, so lingering only delays it; the batch is
            // enqueued at once and goes out in full batches anyway.
            client.set("linger.ms", "0");
        }
        exactly_once.topic_durability.validate()?;
        let reader_client =
            settings::layered(&producer.brokers, settings::security(&producer.settings));
        checkpoint::ensure_topic(
            &reader_client,
            &exactly_once.checkpoint_topic,
            store.slots(),
            exactly_once.topic_durability,
            exactly_once.operation_timeout,
        )
        .await?;
        // A producer's settings are checked when it is made: make one now,
        // so that a bad setting (e.g. message.timeout.ms above
        // transaction.timeout.ms) fails here, not in every later pass.
        drop(
            slot_client(&client, &exactly_once, 0)
                .create::<rdkafka::producer::FutureProducer>()
                .map_err(ClientError::Config)?,
        );
        let reader = CheckpointReader::new(
            &reader_client,
            &exactly_once.checkpoint_topic,
            exactly_once.operation_timeout,
        )?;
        Ok(Self {
            store,
            client,
            source: producer.source.clone(),
            config,
            exactly_once,
            idle: Mutex::default(),
            reader: Arc::new(Mutex::new(reader)),
            stats: Arc::default(),
            publisher_stats: Arc::default(),
            hook: None,
        })
    }

    /// Runs `hook` at every [`RelayPoint`] (fault-injection tests).
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// What every slot's producer did, as one publisher.
    pub fn publisher_stats(&self) -> Arc<PublisherStats> {
        Arc::clone(&self.publisher_stats)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// One pass over `slot`: lease it, fence and recover if needed, then
    /// batches while the slot has records (claim, publish in one Kafka
    /// transaction, mark in the lease), then commit the lease. `Ok(None)`
    /// when another relay holds the slot.
    ///
    /// One lease carries several batches (up to [`RelayConfig::batch_size`]
    /// records or [`ExactlyOnceConfig::lease_span`]): a busy slot then
    /// pays the lease and its synchronous commit once, not per batch, and
    /// a record that arrives while a batch is out waits less for its turn.
    /// What a crash costs stays covered: each batch's checkpoint lists
    /// every id the lease published, the earlier batches' included, so the
    /// latest checkpoint alone recovers all of them (see the module
    /// documentation).
    pub async fn run_slot(&self, slot: u16) -> Result<Option<Pass>, RelayError<S::Error>> {
        let leased = Instant::now();
        let Some(mut lease) = self
            .store
            .lease(slot)
            .await
            .map_err(|e| self.store_error(e))?
        else {
            return Ok(None);
        };
        let (mut producer, recovered) = match self.kept(slot, lease.sequence()) {
            Some(kept) => (kept, Vec::new()),
            None => self.take_over(&mut lease).await?,
        };
        let stored = lease.sequence();
        // The lease has something to record even without a batch.
        let recovering = !recovered.is_empty();
        // Every id this lease's checkpoints list: recovered, then published.
        let mut unrecorded = recovered;
        let mut sequence = stored;
        let mut published = 0;
        let mut started = leased;
        loop {
            let room = self.config.batch_size.saturating_sub(published);
            if room == 0 || (published > 0 && leased.elapsed() >= self.exactly_once.lease_span) {
                break;
            }
            let records = lease.claim(room).await.map_err(|e| self.store_error(e))?;
            let claimed = records.len();
            if claimed == 0 {
                break;
            }
            self.fault(RelayPoint::Claimed, slot).await;
            let checkpoint = Checkpoint {
                slot,
                sequence: sequence + 1,
                ids: unrecorded
                    .iter()
                    .copied()
                    .chain(records.iter().map(|r| r.id))
                    .collect(),
            };
            let mut refusals = Vec::new();
            let sent = self
                .batch(&mut producer, records, &checkpoint, &mut refusals)
                .await;
            if let Err(error) = sent {
                // The producer is dropped (a new one fences and reads
                // again). The lease records the batches Kafka committed
                // before this one, or ends with nothing marked.
                self.stats
                    .publish_failures
                    .fetch_add(claimed as u64, Ordering::Relaxed);
                let refused: Vec<(PendingRecord, String)> = refusals
                    .into_iter()
                    .filter_map(|(i, e)| records.get(i).map(|r| (r.clone(), e)))
                    .collect();
                // Ended before parking: parking deletes a pending row the
                // lease holds locked.
                let ended = if published > 0 || recovering {
                    lease.commit(sequence).await
                } else {
                    lease.release().await
                };
                ended.map_err(|e| self.store_error(e))?;
                if !refused.is_empty() {
                    super::note_refusals(&self.store, &self.stats, refused).await;
                }
                return Err(error);
            }
            self.fault(RelayPoint::KafkaCommitted, slot).await;
            sequence = checkpoint.sequence;
            producer.sequence = sequence;
            unrecorded = checkpoint.ids;
            // A failure from here on leaves Kafka ahead of the store: the
            // producer is dropped with it, so the slot's next lease here
            // does not reuse it but fences and recovers.
            lease.published().await.map_err(|e| self.store_error(e))?;
            published += claimed;
            self.stats.record_batch(claimed, started);
            started = Instant::now();
        }
        // Kept before the lease ends, so that the slot's next lease in this
        // process finds it (see keep's comment on the order).
        self.keep(slot, producer);
        let ended = if published > 0 || recovering {
            lease.commit(sequence).await
        } else {
            lease.release().await
        };
        // On a failed commit Kafka holds a checkpoint the store does not:
        // the kept producer's sequence is ahead of the store's, so the
        // slot's next lease here does not reuse it but fences and recovers.
        ended.map_err(|e| self.store_error(e))?;
        if published > 0 {
            self.fault(RelayPoint::StoreCommitted, slot).await;
        }
        Ok(Some(Pass {
            claimed: published,
            published,
        }))
    }

    /// One batch: the sweep of topics this producer has not written yet,
    /// then the records and `checkpoint` in one Kafka transaction,
    /// committed.
    async fn batch(
        &self,
        producer: &mut SlotProducer,
        records: &[PendingRecord],
        checkpoint: &Checkpoint,
        refusals: &mut Vec<(usize, String)>,
    ) -> Result<(), RelayError<S::Error>> {
        let slot = checkpoint.slot;
        let span = batch_span(records.len());
        span.record(
            "messaging.kafka.transactional_id",
            self.transactional_id(slot),
        );
        span.record("relay.slot", slot);
        span.record("relay.sequence", checkpoint.sequence);
        let (outgoing, _spans): (Vec<BorrowedRecord<'_>>, Vec<tracing::Span>) =
            records.iter().map(outgoing).unzip();
        let unswept: Vec<String> = records
            .iter()
            .map(|r| r.topic.as_str())
            .filter(|topic| !producer.swept.contains(*topic))
            .collect::<HashSet<_>>()
            .into_iter()
            .map(str::to_owned)
            .collect();
        self.sweep(&producer.publisher, slot, &unswept, false)
            .await?;
        producer.swept.extend(unswept);
        self.transaction(&producer.publisher, slot, outgoing, checkpoint, refusals)
            .instrument(span)
            .await
    }

    /// Runs [`RelayConfig::workers`] workers until the store has no slot
    /// with work; returns how many records were published. Tests and
    /// benchmarks use it to drive the relay until the outbox is idle.
    pub async fn drain(&self) -> Result<usize, RelayError<S::Error>> {
        published_by((0..self.config.workers.max(1)).map(|worker| self.work(worker, None))).await
    }

    /// Relays until `shutdown` completes. A batch in progress always
    /// finishes (or aborts) before the relay stops.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let stop = cancelled_by(shutdown);
        tracing::info!(
            batch_size = self.config.batch_size,
            workers = self.config.workers,
            slots = self.store.slots(),
            transactional_id_prefix = %self.exactly_once.transactional_id_prefix,
            checkpoint_topic = %self.exactly_once.checkpoint_topic,
            "outbox relay started (exactly once)"
        );
        let workers = (0..self.config.workers.max(1)).map(|worker| self.work(worker, Some(&stop)));
        futures::future::join_all(workers).await;
        tracing::info!("outbox relay stopped");
    }

    /// One worker. It serves its own slots (`worker`, `worker + workers`,
    /// …): a worker per slot, the default, keeps each slot's passes back to
    /// back in one place, with no sibling asking the store for a slot a
    /// sibling holds. It leases each of its slots in turn; after a round
    /// that published it goes round again at once (more has arrived while
    /// it published), otherwise it asks the store which of its slots have
    /// work, pausing a moment first when a slot was another relay's.
    /// Without work it waits for a notification (`stop` given:
    /// [`TransactionalRelay::run`]) or returns (`None`:
    /// [`TransactionalRelay::drain`], which also returns the first error
    /// instead of backing off). A worker beyond the store's slot count has
    /// none and returns at once.
    async fn work(
        &self,
        worker: usize,
        stop: Option<&CancellationToken>,
    ) -> Result<usize, RelayError<S::Error>> {
        let workers = self.config.workers.max(1);
        let mine: Vec<u16> = (0..self.store.slots())
            .filter(|&slot| usize::from(slot) % workers == worker)
            .collect();
        let mut published = 0;
        let mut failures: u32 = 0;
        let mut todo = mine.clone();
        // Whether to pause before asking the store: the last round claimed
        // nothing although a slot had work (another relay held it, or its
        // rows were not claimable yet), and asking at once would spin.
        let mut pause = false;
        // Pauses in a row: they grow (10 ms doubling, up to the poll
        // interval) while the store keeps reporting work no claim gets,
        // as with events parked behind a refused one.
        let mut pauses: u32 = 0;
        while !mine.is_empty() && !stop.is_some_and(CancellationToken::is_cancelled) {
            if todo.is_empty() {
                if std::mem::take(&mut pause) {
                    let moment = Duration::from_millis(10) * 2u32.pow(pauses.min(7));
                    pauses = pauses.saturating_add(1);
                    let moment = tokio::time::sleep(moment.min(self.config.poll_interval));
                    match stop {
                        Some(stop) => until_stopped(stop, moment).await,
                        None => moment.await,
                    }
                }
                let hinted = match self.store.slots_with_work().await {
                    Ok(slots) => slots,
                    Err(error) => {
                        let error = self.store_error(error);
                        let Some(stop) = stop else {
                            return Err(error);
                        };
                        self.back_off(stop, &mut failures, &error).await;
                        continue;
                    }
                };
                todo = hinted.into_iter().filter(|s| mine.contains(s)).collect();
                if todo.is_empty() {
                    let Some(stop) = stop else {
                        return Ok(published);
                    };
                    let notified = self.store.wait_for_new_work(self.config.poll_interval);
                    until_stopped(stop, notified).await;
                    continue;
                }
                // The store said these have work: claiming nothing from
                // them calls for the pause.
                pause = true;
            }
            let mut claimed = 0;
            let mut failed = None;
            for slot in std::mem::take(&mut todo) {
                match self.run_slot(slot).await {
                    Ok(Some(pass)) => claimed += pass.claimed,
                    Ok(None) => pause = true,
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            published += claimed;
            if let Some(error) = failed {
                let Some(stop) = stop else {
                    return Err(error);
                };
                self.back_off(stop, &mut failures, &error).await;
                todo.clone_from(&mine);
                continue;
            }
            failures = 0;
            if claimed > 0 {
                todo.clone_from(&mine);
                pause = false;
                pauses = 0;
            }
        }
        Ok(published)
    }

    /// Logs a failed pass and waits out the backoff of the `failures`-th
    /// failure in a row (or until `stop`).
    async fn back_off(
        &self,
        stop: &CancellationToken,
        failures: &mut u32,
        error: &RelayError<S::Error>,
    ) {
        *failures = failures.saturating_add(1);
        let pause = self.config.backoff(*failures);
        tracing::warn!(%error, ?pause, "outbox relay pass failed; retrying");
        until_stopped(stop, tokio::time::sleep(pause)).await;
    }

    /// The batch and its checkpoint in one Kafka transaction, committed.
    async fn transaction(
        &self,
        publisher: &Publisher,
        slot: u16,
        records: Vec<BorrowedRecord<'_>>,
        checkpoint: &Checkpoint,
        refusals: &mut Vec<(usize, String)>,
    ) -> Result<(), RelayError<S::Error>> {
        let failed = |operation: &'static str| {
            move |source: KafkaError| RelayError::Transaction {
                slot,
                operation,
                source,
            }
        };
        let producer = publisher.producer();
        let result = async {
            producer
                .begin_transaction()
                .map_err(failed("beginning a relay transaction"))?;
            // The checkpoint goes out with the batch, not after it: the
            // commit below waits for every acknowledgement anyway.
            let payload = checkpoint::encode(checkpoint);
            let key = slot.to_string();
            let marker = FutureRecord::to(&self.exactly_once.checkpoint_topic)
                .partition(i32::from(slot))
                .key(key.as_bytes())
                .payload(&payload);
            let marker = producer
                .send_result(marker)
                .map_err(|(source, _)| failed("writing the relay checkpoint")(source))?;
            let (results, delivered) = futures::join!(publisher.publish_records(records), marker);
            let delivered = match delivered {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((source, _))) => Err(source),
                Err(_canceled) => Err(KafkaError::Canceled),
            };
            // Records refused for good (by index): the store may park them.
            refusals.extend(results.iter().enumerate().filter_map(|(i, result)| {
                result
                    .as_ref()
                    .err()
                    .filter(|e| e.is_refusal())
                    .map(|e| (i, e.to_string()))
            }));
            if let Some(first) = results.into_iter().find_map(Result::err) {
                return Err(RelayError::Publish {
                    published: 0,
                    failed: checkpoint.ids.len(),
                    source: first,
                });
            }
            delivered.map_err(failed("writing the relay checkpoint"))?;
            self.fault(RelayPoint::Published, slot).await;
            let committer = producer.clone();
            let timeout = self.exactly_once.operation_timeout;
            off_thread(move || {
                // So that commit_transaction's flush finds nothing to do.
                crate::publisher::await_released(&committer, timeout)?;
                committer.commit_transaction(timeout)
            })
            .await
            .map_err(failed("committing a relay transaction"))
        }
        .await;
        if let Err(error) = &result {
            if is_fenced(error) {
                self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    slot,
                    transactional_id = %self.transactional_id(slot),
                    "relay slot fenced: another relay took the slot; its batch is left to it"
                );
            } else {
                self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                let aborter = producer.clone();
                let timeout = self.exactly_once.operation_timeout;
                // Best effort: the producer is dropped either way, and a
                // new one's initialization aborts whatever is still open.
                let _ = off_thread(move || aborter.abort_transaction(timeout)).await;
            }
        }
        result
    }

    /// One aborted transaction that sweeps ([`crate::sweep`]) every
    /// partition of `topics`, and the slot's checkpoint partition when
    /// `checkpoint`: an earlier producer of the slot that died with a
    /// batch open, whose markers the broker then lost, would otherwise have
    /// that batch and its checkpoint committed by this producer's next
    /// commit (seen in `orders/tests/faults/broker_outage.rs`: a record
    /// from before a broker outage committed with the first batch after it).
    async fn sweep(
        &self,
        publisher: &Publisher,
        slot: u16,
        topics: &[String],
        checkpoint: bool,
    ) -> Result<(), RelayError<S::Error>> {
        if topics.is_empty() && !checkpoint {
            return Ok(());
        }
        let producer = publisher.producer().clone();
        let timeout = self.exactly_once.operation_timeout;
        let mut targets: Vec<(String, i32)> = Vec::new();
        if checkpoint {
            targets.push((self.exactly_once.checkpoint_topic.clone(), i32::from(slot)));
        }
        let topics = topics.to_vec();
        off_thread(move || {
            for topic in topics {
                for partition in crate::sweep::partitions(producer.client(), &topic, timeout)? {
                    targets.push((topic.clone(), partition));
                }
            }
            producer.begin_transaction()?;
            let sent = targets.iter().try_for_each(|(topic, partition)| {
                let record = FutureRecord::to(topic)
                    .partition(*partition)
                    .key(crate::sweep::SWEEP_KEY)
                    .payload(&[] as &[u8]);
                producer
                    .send_result(record)
                    .map(drop)
                    .map_err(|(error, _)| error)
            });
            // Aborted whatever the sends did; their failure is told after.
            let _ = crate::publisher::await_released(&producer, timeout);
            producer.abort_transaction(timeout)?;
            sent
        })
        .await
        .map_err(|source| RelayError::Transaction {
            slot,
            operation: "sweeping what an earlier producer of the slot left open",
            source,
        })
    }

    /// The kept producer of `slot`, when its sequence is still the store's.
    fn kept(&self, slot: u16, sequence: i64) -> Option<SlotProducer> {
        let kept = self.idle().remove(&slot)?;
        (kept.sequence == sequence).then_some(kept)
    }

    /// Keeps `producer` for the slot's next lease in this process. Called
    /// while the lease is still held: kept after it ended, another worker
    /// could lease the slot in between, find nothing kept, and make a new
    /// producer, fencing this one, which would then be kept, stale.
    fn keep(&self, slot: u16, producer: SlotProducer) {
        self.idle().insert(slot, producer);
    }

    fn idle(&self) -> MutexGuard<'_, HashMap<u16, SlotProducer>> {
        // A panic while the map was held leaves at worst a producer
        // missing, which only costs a new one.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new producer for the lease's slot: fences earlier owners, reads
    /// the slot's latest checkpoint and recovers it into the lease when the
    /// store is behind. Returns the producer and the recovered ids.
    async fn take_over(
        &self,
        lease: &mut S::Lease,
    ) -> Result<(SlotProducer, Vec<i64>), RelayError<S::Error>> {
        let slot = lease.slot();
        let publisher = self.fence(slot).await?;
        // Before the checkpoint is read: a checkpoint an earlier producer
        // left open must neither hold the read back nor be committed by
        // this producer's first batch.
        self.sweep(&publisher, slot, &[], true).await?;
        let reader = Arc::clone(&self.reader);
        let latest = tokio::task::spawn_blocking(move || {
            reader
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .latest(slot)
        })
        .await
        .unwrap_or(Err(ClientError::Kafka {
            operation: "reading a relay checkpoint",
            source: KafkaError::Canceled,
        }))
        .map_err(|source| RelayError::Checkpoint { slot, source })?;
        let stored = lease.sequence();
        let mut recovered = Vec::new();
        if let Some(checkpoint) = latest.filter(|c| c.sequence > stored) {
            let pending = lease
                .recover(&checkpoint)
                .await
                .map_err(|e| self.store_error(e))?;
            self.stats.recovered.fetch_add(pending, Ordering::Relaxed);
            tracing::info!(
                slot,
                stored,
                kafka = checkpoint.sequence,
                ids = checkpoint.ids.len(),
                pending,
                "relay slot taken over: marked what the previous owner published but did not record"
            );
            recovered = checkpoint.ids;
        }
        Ok((
            SlotProducer {
                publisher,
                sequence: lease.sequence(),
                swept: HashSet::new(),
            },
            recovered,
        ))
    }

    /// A transactional producer for `slot`, initialized: every earlier
    /// producer of the slot is fenced from here on.
    async fn fence(&self, slot: u16) -> Result<Publisher, RelayError<S::Error>> {
        let client = slot_client(&self.client, &self.exactly_once, slot);
        let publisher = Publisher::from_client_config(client, &self.source)
            .map_err(|source| RelayError::Checkpoint { slot, source })?
            .with_stats(Arc::clone(&self.publisher_stats));
        let producer = publisher.producer().clone();
        let timeout = self.exactly_once.operation_timeout;
        off_thread(move || producer.init_transactions(timeout))
            .await
            .map_err(|source| RelayError::Transaction {
                slot,
                operation: "initializing a relay slot's transactions",
                source,
            })?;
        self.stats.fences.fetch_add(1, Ordering::Relaxed);
        Ok(publisher)
    }

    fn transactional_id(&self, slot: u16) -> String {
        transactional_id(&self.exactly_once, slot)
    }

    async fn fault(&self, point: RelayPoint, slot: u16) {
        if let Some(hook) = &self.hook {
            hook(point, slot).await;
        }
    }

    fn store_error(&self, error: S::Error) -> RelayError<S::Error> {
        self.stats.store_error(error)
    }
}

/// Runs one of librdkafka's blocking transaction calls on a blocking thread;
/// a call whose thread is gone counts as cancelled.
async fn off_thread(
    call: impl FnOnce() -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), KafkaError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// Slot `slot`'s transactional id.
fn transactional_id(exactly_once: &ExactlyOnceConfig, slot: u16) -> String {
    format!("{}-{slot}", exactly_once.transactional_id_prefix)
}

/// The client configuration of `slot`'s producer.
fn slot_client(client: &ClientConfig, exactly_once: &ExactlyOnceConfig, slot: u16) -> ClientConfig {
    let mut client = client.clone();
    client
        .set("transactional.id", transactional_id(exactly_once, slot))
        .set(
            "transaction.timeout.ms",
            exactly_once.transaction_timeout.as_millis().to_string(),
        );
    client
}

/// Whether a relay error means another producer of the slot won.
fn is_fenced(error: &RelayError<impl std::error::Error + 'static>) -> bool {
    let code = match error {
        RelayError::Transaction { source, .. } => source.rdkafka_error_code(),
        RelayError::Publish {
            source: crate::PublishError::Kafka { source, .. },
            ..
        } => source.rdkafka_error_code(),
        _ => None,
    };
    code.is_some_and(is_fenced_code)
}

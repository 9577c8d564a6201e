//! The poll thread: owns the librdkafka consumer, hands records to the
//! [scheduler](super::scheduler), tracks offsets, commits, pauses for
//! backpressure and handles rebalances.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::breaker::Breaker;
use super::offsets::PartitionOffsets;
use super::process::{ParkedList, Shared};
use super::record::Batch;
use super::router::Router;
use super::scheduler::{FastMap, KeySlot, Lease, Order, Report, Scheduler, Tp};
use super::stored::StoredOffsets;
use super::{ConsumerConfig, ConsumerStats};
use crate::error::ClientError;
use crate::metrics::PartitionLabels;
use crate::poll_thread::{self, PollThread, TopicNames};
use crate::publisher::Publisher;

/// Where the parked keys are read from when partitions are assigned.
struct ParkedTable {
    topic: String,
    client: rdkafka::ClientConfig,
    timeout: Duration,
}

/// An assigned partition, as the poll thread keeps it.
struct Assigned {
    offsets: PartitionOffsets,
    /// What the scheduler's records of it share.
    lease: Arc<Lease>,
}

/// Everything the poll loop and the rebalance callback both touch. They run
/// on the same thread; the mutex only makes the context `Sync`.
struct Dispatch {
    shared: Arc<Shared>,
    tokio: tokio::runtime::Handle,
    /// To the scheduler, which handles the records.
    orders: UnboundedSender<Order>,
    /// From the scheduler: what finished.
    reports: Receiver<Report>,
    topics: TopicNames,
    /// Assigned partitions.
    partitions: FastMap<Tp, Assigned>,
    /// Fires at shutdown.
    stopping: CancellationToken,
    /// Records accepted in this poll pass, sent to the scheduler at its end.
    accepted: Batch,
    /// Records received in this poll pass ([`ConsumerStats`]' `consumed`).
    consumed: usize,
    /// The last revoke's number ([`Order::Revoke`]).
    revokes: u64,
    /// Where assigned partitions start ([`super::ConsumerConfig::offsets_in`]).
    stored_offsets: Option<StoredOffsets>,
    /// The parked-key table, while keys are parked.
    parked_table: Option<ParkedTable>,
    /// Why the consumer must stop (the parked keys of an assigned partition
    /// could not be read): the poll loop ends, and `run` returns it.
    fatal: Option<ClientError>,
    /// Records accepted and not finished (queued + running).
    buffered: usize,
    /// Paused for backpressure.
    paused: bool,
    /// Paused because the circuit breaker is open.
    halted: bool,
    /// Whether the assignment is paused in librdkafka (`paused || halted`).
    fetch_paused: bool,
    /// Since when the in-flight limit has been reached (not paused yet).
    full_since: Option<Instant>,
    max_in_flight: usize,
    revoke_timeout: Duration,
    /// Set by the commit callback when the broker rejected an asynchronous
    /// commit: the offsets it carried are no longer "committed", and the
    /// next periodic commit sends every partition's again. Without it, a
    /// commit rejected at the end of a stream (during a rebalance, say)
    /// would never be retried, as nothing more moves the offsets.
    commit_rejected: Arc<AtomicBool>,
}

impl Dispatch {
    fn set_in_flight(&self) {
        self.shared
            .stats
            .in_flight
            .store(self.buffered as u64, Ordering::Relaxed);
    }

    /// A record arrived from Kafka.
    fn accept(&mut self, message: &BorrowedMessage<'_>) {
        if self.fatal.is_some() {
            // Stopping: nothing more is handled, nothing more committed.
            return;
        }
        // Counted per batch: the scheduler's thread bumps a counter beside
        // this one for every record, and one shared cache line written by
        // both threads per record would bounce between their cores.
        self.consumed += 1;
        let tp: Tp = (self.topics.intern(message.topic()), message.partition());
        let Some(assigned) = self.partitions.get_mut(&tp) else {
            // Polled just before its partition was revoked: not ours any
            // more, so neither handled nor committed here.
            return;
        };
        assigned.offsets.received(message.offset());
        self.buffered += 1;
        self.accepted.push(message, tp.0);
    }

    /// Hands the records accepted since the last call to the scheduler.
    fn send_accepted(&mut self) {
        let consumed = std::mem::take(&mut self.consumed);
        self.shared
            .stats
            .consumed
            .fetch_add(consumed as u64, Ordering::Relaxed);
        self.set_in_flight();
        let records = self.accepted.take();
        if !records.is_empty() {
            self.order(Order::Records(records));
        }
    }

    fn order(&mut self, order: Order) {
        // The scheduler ends only after the poll thread (it stops when this
        // channel closes), unless the runtime it runs on shut down first:
        // then nothing more can be handled, and the consumer stops.
        if self.orders.send(order).is_err() {
            self.scheduler_gone();
        }
    }

    fn scheduler_gone(&mut self) {
        if self.fatal.is_none() {
            tracing::error!("the consumer's scheduler is gone; the consumer stops");
            self.fatal = Some(ClientError::Scheduler(
                "its tokio runtime shut down while the consumer ran".to_owned(),
            ));
        }
    }

    /// Applies what the scheduler reported; returns a revoke's number when
    /// the report says its partitions are drained.
    fn apply(&mut self, report: Report) -> Option<u64> {
        match report {
            Report::Finished { done, left } => {
                self.buffered -= left;
                for (tp, offset) in done {
                    if let Some(assigned) = self.partitions.get_mut(&tp) {
                        assigned.offsets.done(offset);
                    }
                }
                // Once per report, not per record: the scheduler reads it
                // only when it starts a record.
                for assigned in self.partitions.values() {
                    assigned
                        .lease
                        .set_done_below(assigned.offsets.committable());
                }
                self.set_in_flight();
                None
            }
            Report::Drained(id) => Some(id),
        }
    }

    /// Applies reports, waiting up to `timeout` for the first one. Returns
    /// false when the scheduler is gone (nothing more will finish).
    fn wait_completions(&mut self, timeout: Duration) -> bool {
        match self.reports.recv_timeout(timeout) {
            Ok(report) => {
                self.apply(report);
            }
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => {
                self.scheduler_gone();
                return false;
            }
        }
        self.drain_completions();
        true
    }

    /// Applies every report already sent.
    fn drain_completions(&mut self) {
        loop {
            match self.reports.try_recv() {
                Ok(report) => {
                    self.apply(report);
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.scheduler_gone();
                    return;
                }
            }
        }
    }

    /// Commits the finished offsets of `which` partitions (all when `None`).
    /// Returns whether everything due is committed (false: the broker
    /// refused, and the offsets stay due for the next attempt).
    ///
    /// `at_position`: every record polled so far was accepted, so the
    /// consumer's positions may move idle partitions' commits past
    /// transaction markers ([`PartitionOffsets::passed`]). Not inside a
    /// rebalance callback, where records polled just before may not be.
    fn commit(
        &mut self,
        consumer: &BaseConsumer<RuntimeContext>,
        which: Option<&HashSet<Tp>>,
        mode: CommitMode,
        force: bool,
        at_position: bool,
    ) -> bool {
        if at_position {
            if let Ok(positions) = consumer.position() {
                for element in positions.elements() {
                    let Offset::Offset(position) = element.offset() else {
                        continue;
                    };
                    let tp: Tp = (Arc::from(element.topic()), element.partition());
                    if let Some(assigned) = self.partitions.get_mut(&tp) {
                        assigned.offsets.passed(position);
                    }
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        let mut included = Vec::new();
        for (tp, assigned) in &mut self.partitions {
            if which.is_some_and(|w| !w.contains(tp)) {
                continue;
            }
            if force {
                assigned.offsets.commit_failed();
            }
            if let Some(offset) = assigned.offsets.take_commit() {
                if tpl
                    .add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))
                    .is_ok()
                {
                    included.push(tp.clone());
                }
            }
        }
        if included.is_empty() {
            return true;
        }
        let result = consumer.commit(&tpl, mode);
        if let Err(error) = &result {
            tracing::warn!(%error, "offset commit failed; it is retried");
            self.shared
                .stats
                .commit_failures
                .fetch_add(1, Ordering::Relaxed);
            for tp in included {
                if let Some(assigned) = self.partitions.get_mut(&tp) {
                    assigned.offsets.commit_failed();
                }
            }
        }
        result.is_ok()
    }

    /// Backpressure at `max_in_flight` records. Returns whether the poll
    /// loop should hold off polling.
    ///
    /// A short burst is absorbed by simply not polling: librdkafka keeps
    /// prefetching into its own bounded queue (`queued.max.messages.kbytes`)
    /// and nothing is lost. Only when the limit holds for
    /// [`PAUSE_AFTER`] (slow handlers) are the partitions paused, so that
    /// rebalance callbacks keep being served; fetching resumes below half of
    /// the limit. Pausing is the expensive path: librdkafka drops what it
    /// prefetched for a paused partition and fetches it again on resume.
    fn apply_backpressure(&mut self, consumer: &BaseConsumer<RuntimeContext>) -> bool {
        let full = self.buffered >= self.max_in_flight;
        if self.paused {
            if self.buffered <= self.max_in_flight / 2 {
                self.set_paused(consumer, false);
            }
            return false;
        }
        if !full {
            self.full_since = None;
            return false;
        }
        let since = *self.full_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= PAUSE_AFTER {
            self.set_paused(consumer, true);
            return false;
        }
        true
    }

    fn set_paused(&mut self, consumer: &BaseConsumer<RuntimeContext>, paused: bool) {
        self.paused = paused;
        self.full_since = None;
        self.apply_pause(consumer);
    }

    /// Follows the circuit breaker: pauses fetching while it is open, and
    /// has the scheduler start nothing until it closes.
    fn follow_breaker(&mut self, consumer: &BaseConsumer<RuntimeContext>) {
        let open = self.shared.breaker.as_ref().is_some_and(|b| b.is_open());
        if open == self.halted {
            return;
        }
        self.halted = open;
        self.apply_pause(consumer);
        self.order(Order::Halt(open));
    }

    /// Pauses or resumes the whole assignment to match `paused || halted`.
    fn apply_pause(&mut self, consumer: &BaseConsumer<RuntimeContext>) {
        let want = self.paused || self.halted;
        if want == self.fetch_paused {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let result = if want {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        };
        match result {
            Ok(()) => self.fetch_paused = want,
            Err(error) => tracing::warn!(%error, paused = want, "pause/resume failed"),
        }
    }

    /// The revoked partitions stop here: the scheduler drops their queued
    /// records (not committed, so the next owner gets them), running ones
    /// get `revoke_timeout` to finish, finished offsets are committed while
    /// the partitions are still ours, and then they are forgotten.
    fn revoke(&mut self, consumer: &BaseConsumer<RuntimeContext>, tpl: &TopicPartitionList) {
        let revoked: HashSet<Tp> = tpl
            .elements()
            .iter()
            .map(|e| (self.topics.intern(e.topic()), e.partition()))
            .collect();
        tracing::info!(partitions = revoked.len(), "partitions revoked");
        // Records of these partitions that wait (backoff, breaker, a dead
        // letter's retry) give up now; running handlers get the timeout.
        for tp in &revoked {
            if let Some(assigned) = self.partitions.get(tp) {
                assigned.lease.token.cancel();
            }
        }
        // Records accepted before the revoke go first, so that the
        // scheduler drops those of the revoked partitions too.
        self.send_accepted();
        self.revokes += 1;
        let id = self.revokes;
        self.order(Order::Revoke {
            id,
            partitions: revoked.clone(),
        });
        let deadline = Instant::now() + self.revoke_timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!("revoke timeout: leaving running records uncommitted");
                break;
            }
            match self.reports.recv_timeout(deadline - now) {
                Ok(report) => {
                    if self.apply(report) == Some(id) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.scheduler_gone();
                    break;
                }
            }
        }
        self.commit(consumer, Some(&revoked), CommitMode::Sync, true, false);
        for tp in &revoked {
            self.partitions.remove(tp);
        }
        self.shared
            .stats
            .assigned_partitions
            .store(self.partitions.len() as u64, Ordering::Relaxed);
    }

    /// Sets the partitions of `tpl`, about to be assigned, to start at
    /// their stored offsets (when the consumer keeps them in a store). A
    /// store that cannot be read stops the consumer: starting from Kafka's
    /// commit alone could apply again what the store already has.
    fn start_at_stored_offsets(
        &mut self,
        consumer: &BaseConsumer<RuntimeContext>,
        tpl: &mut TopicPartitionList,
    ) {
        let Some(stored) = &self.stored_offsets else {
            return;
        };
        if tpl.count() == 0 || self.fatal.is_some() {
            return;
        }
        if let Err(error) =
            stored.start_assigned(&self.tokio, consumer, tpl, STORED_OFFSETS_TIMEOUT)
        {
            tracing::error!(%error, "the consumer stops: assigned partitions have no known start");
            self.fatal = Some(error);
        }
    }

    fn assign(&mut self, tpl: &TopicPartitionList) {
        let parked = match self.read_parked(tpl) {
            Ok(parked) => parked,
            Err(error) => {
                tracing::error!(
                    %error,
                    "cannot read the parked keys of the assigned partitions; the consumer stops \
                     rather than handle a key it may not know is parked"
                );
                self.fatal = Some(error);
                Vec::new()
            }
        };
        let mut leases = Vec::new();
        for e in tpl.elements() {
            let tp = (self.topics.intern(e.topic()), e.partition());
            if self.partitions.contains_key(&tp) {
                continue;
            }
            let lease = Arc::new(Lease::new(self.stopping.child_token()));
            leases.push((tp.clone(), Arc::clone(&lease)));
            self.partitions.insert(
                tp,
                Assigned {
                    offsets: PartitionOffsets::default(),
                    lease,
                },
            );
        }
        self.order(Order::Assign {
            partitions: leases,
            parked,
        });
        let stats = &self.shared.stats;
        stats
            .assigned_partitions
            .store(self.partitions.len() as u64, Ordering::Relaxed);
        if tpl.count() > 0 {
            stats.assignments.fetch_add(1, Ordering::Relaxed);
        }
        stats.rebalances.fetch_add(1, Ordering::Relaxed);
        tracing::info!(partitions = tpl.count(), "partitions assigned");
    }

    /// Reads the parked keys of the partitions in `tpl` from the table
    /// (blocking the poll thread, inside the assignment: no record of theirs
    /// is handled before).
    fn read_parked(
        &mut self,
        tpl: &TopicPartitionList,
    ) -> Result<Vec<(KeySlot, ParkedList)>, ClientError> {
        let Some(table) = &self.parked_table else {
            return Ok(Vec::new());
        };
        if tpl.count() == 0 {
            return Ok(Vec::new());
        }
        let assigned: HashSet<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let keys = crate::parking::read_parked(
            &table.client,
            &table.topic,
            Some(&self.shared.group_id),
            table.timeout,
        )?;
        let mut parked = Vec::new();
        for key in keys {
            if !assigned.contains(&(key.topic.clone(), key.partition)) {
                continue;
            }
            let slot: KeySlot = (
                (self.topics.intern(&key.topic), key.partition),
                Some(Bytes::from(key.key_bytes())),
            );
            parked.push((
                slot,
                ParkedList {
                    offsets: key.offsets,
                    since: key.since,
                },
            ));
        }
        if !parked.is_empty() {
            tracing::warn!(
                keys = parked.len(),
                "parked keys in the assigned partitions"
            );
        }
        Ok(parked)
    }
}

/// The consumer's context: routes rebalance callbacks to the dispatch state.
pub(crate) struct RuntimeContext {
    dispatch: Arc<Mutex<Dispatch>>,
    stats: Arc<ConsumerStats>,
    /// [`Dispatch::commit_rejected`], reachable without the lock.
    commit_rejected: Arc<AtomicBool>,
}

impl RuntimeContext {
    fn lock(&self) -> MutexGuard<'_, Dispatch> {
        lock(&self.dispatch)
    }
}

fn lock(dispatch: &Mutex<Dispatch>) -> MutexGuard<'_, Dispatch> {
    // A panic elsewhere never leaves the state half-updated in a way that
    // matters more than stopping the consumer would.
    dispatch
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientContext for RuntimeContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        // Only the partitions this member fetches: librdkafka also reports
        // the others it knows from metadata, in fetch state "none".
        self.stats.lag.clear();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || p.fetch_state == "none" {
                    continue;
                }
                // librdkafka reports -1 until the group committed something
                // for the partition: then everything retained is behind.
                let end = if p.ls_offset >= 0 {
                    p.ls_offset
                } else {
                    p.hi_offset
                };
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.committed_offset < 0 && end >= 0 && p.lo_offset >= 0 {
                    end - p.lo_offset
                } else {
                    continue;
                };
                self.stats
                    .lag
                    .get_or_create(&PartitionLabels {
                        topic: topic.clone(),
                        partition: partition.to_string(),
                    })
                    .set(lag);
            }
        }
    }
}

impl ConsumerContext for RuntimeContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        let rejected_partitions = offsets
            .elements()
            .iter()
            .filter(|e| e.error().is_err())
            .count();
        if result.is_err() || rejected_partitions > 0 {
            let error = result.err().map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(
                %error,
                partitions = offsets.count(),
                rejected_partitions,
                "offset commit rejected; it is sent again"
            );
            // No lock here: this may run while the poll thread holds it.
            self.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            self.commit_rejected.store(true, Ordering::SeqCst);
        }
    }

    /// rdkafka's default rebalance (which an override cannot call), with
    /// assigned partitions first set to start at their stored offsets when
    /// the consumer keeps them in a store.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            self.lock().start_at_stored_offsets(consumer, tpl);
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => Rebalance::Error(KafkaError::Rebalance(err.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let done = match (&rebalance, cooperative) {
            (Rebalance::Assign(tpl), true) => consumer.incremental_assign(tpl),
            (Rebalance::Assign(tpl), false) => consumer.assign(tpl),
            (_, true) => consumer.incremental_unassign(tpl),
            (_, false) => consumer.unassign(),
        };
        if let Err(error) = done {
            tracing::error!(%error, "applying a rebalance failed");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.lock().revoke(consumer, tpl),
            Rebalance::Assign(tpl) => self.lock().assign(tpl),
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut dispatch = self.lock();
            if dispatch.fetch_paused {
                // Newly assigned partitions start unpaused: pause them too.
                dispatch.fetch_paused = false;
                dispatch.apply_pause(consumer);
            } else if let Err(error) = consumer.resume(tpl) {
                // A partition paused before it was revoked can come back
                // still paused in librdkafka: clear that, since this
                // instance wants to fetch.
                tracing::warn!(%error, "resuming newly assigned partitions failed");
            }
        }
    }
}

pub(crate) async fn run(
    config: ConsumerConfig,
    router: Router,
    stats: Arc<ConsumerStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClientError> {
    let dlq = Publisher::from_client_config(config.producer_client_config(), "")?;
    let parked_table = match config.dead_letter_mode {
        crate::parking::DeadLetterMode::ParkKey => {
            let client = config.producer_client_config();
            crate::admin::ensure_compacted_topic(
                &client,
                &config.parked_topic,
                1,
                config.group.topic_durability,
                config.parked_read_timeout,
            )
            .await
            .map_err(|error| ClientError::Setting {
                setting: "parked_topic",
                reason: format!(
                    "the parked-key table {:?} cannot be made: {error}",
                    config.parked_topic
                ),
            })?;
            Some(ParkedTable {
                topic: config.parked_topic.clone(),
                client,
                timeout: config.parked_read_timeout,
            })
        }
        crate::parking::DeadLetterMode::Continue => None,
    };
    let stopping = CancellationToken::new();
    let handler_count = router.handlers.len();
    let shared = Arc::new(Shared {
        router,
        group_id: Arc::from(config.group.group_id.as_str()),
        retry: config.group.retry.clone(),
        handler_timeout: config.handler_timeout,
        dead_letter_unknown: config.group.dead_letter_unknown,
        detailed_metrics: config.detailed_metrics,
        dlq_suffix: config.group.dlq_suffix.clone(),
        dlq: dlq.clone(),
        stats: Arc::clone(&stats),
        breaker: config
            .circuit_breaker
            .clone()
            .map(|c| Arc::new(Breaker::new(c, Arc::clone(&stats)))),
        parked_topic: parked_table.as_ref().map(|t| t.topic.clone()),
        handler_timers: (0..handler_count).map(|_| RwLock::default()).collect(),
    });
    let (orders, scheduler_orders) = tokio::sync::mpsc::unbounded_channel();
    let (report, reports) = channel();
    let tokio = tokio::runtime::Handle::current();
    Scheduler::spawn(
        &tokio,
        Arc::clone(&shared),
        &config,
        parked_table.is_some(),
        scheduler_orders,
        report,
    );
    let commit_rejected = Arc::new(AtomicBool::new(false));
    let dispatch = Arc::new(Mutex::new(Dispatch {
        shared,
        tokio,
        orders,
        reports,
        topics: TopicNames::default(),
        partitions: FastMap::default(),
        stopping: stopping.clone(),
        accepted: Batch::default(),
        consumed: 0,
        revokes: 0,
        stored_offsets: config.stored_offsets.clone(),
        parked_table,
        fatal: None,
        buffered: 0,
        paused: false,
        halted: false,
        fetch_paused: false,
        full_since: None,
        max_in_flight: config.max_in_flight,
        revoke_timeout: config.revoke_timeout,
        commit_rejected: Arc::clone(&commit_rejected),
    }));
    let consumer: BaseConsumer<RuntimeContext> = config
        .consumer_client_config()
        .create_with_context(RuntimeContext {
            dispatch: Arc::clone(&dispatch),
            stats: Arc::clone(&stats),
            commit_rejected,
        })
        .map_err(ClientError::Config)?;
    poll_thread::subscribe(&consumer, &config.group.topics)?;
    tracing::info!(group = %config.group.group_id, topics = ?config.group.topics, "consumer started");

    let stop = Arc::new(AtomicBool::new(false));
    let loop_stop = Arc::clone(&stop);
    let fatal_of = Arc::clone(&dispatch);
    let commit_interval = config.commit_interval;
    let shutdown_timeout = config.group.shutdown_timeout;
    let thread = PollThread::spawn(
        format!("herald-consumer-{}", config.group.group_id),
        move || {
            poll_loop(&consumer, &dispatch, &loop_stop, commit_interval);
            drain_and_close(consumer, &dispatch, shutdown_timeout);
        },
    )
    .map_err(ClientError::Thread)?;
    let group = &config.group.group_id;
    let stop_all = || {
        stop.store(true, Ordering::SeqCst);
        // Retries in backoff stop now; running handlers get the shutdown
        // deadline.
        stopping.cancel();
    };
    let ended = thread
        .supervise(shutdown, || {
            tracing::info!(%group, "consumer stopping");
            stop_all();
        })
        .await;
    // A thread that ended by itself (a fatal error) leaves handlers that
    // may still be retrying: they stop too.
    stop_all();
    let _ = dlq.flush(Duration::from_secs(5));
    tracing::info!(%group, by_itself = ended.by_itself, "consumer stopped");
    ended.outcome.map_err(ClientError::Thread)?;
    let fatal = lock(&fatal_of).fatal.take();
    match fatal {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The longest wait for the Kafka commits of assigned partitions, read
/// beside their stored offsets.
const STORED_OFFSETS_TIMEOUT: Duration = Duration::from_secs(30);

/// Records taken from librdkafka per lock of the dispatch state.
const POLL_BATCH: usize = 512;

/// How long shutdown keeps retrying a final commit the broker refused.
const FINAL_COMMIT_RETRIES: Duration = Duration::from_secs(5);

/// How long the in-flight limit may hold before partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

fn poll_loop(
    consumer: &BaseConsumer<RuntimeContext>,
    dispatch: &Mutex<Dispatch>,
    stop: &AtomicBool,
    commit_interval: Duration,
) {
    let mut last_commit = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let (busy, room) = {
            let mut d = lock(dispatch);
            if d.fatal.is_some() {
                return;
            }
            d.drain_completions();
            d.follow_breaker(consumer);
            if last_commit.elapsed() >= commit_interval {
                let resend = d.commit_rejected.swap(false, Ordering::SeqCst);
                d.commit(consumer, None, CommitMode::Async, resend, true);
                last_commit = Instant::now();
            }
            if d.apply_backpressure(consumer) {
                // At the limit: let handlers finish before taking more.
                d.wait_completions(Duration::from_millis(2));
                continue;
            }
            // Take no more than fits under the in-flight limit (at least one:
            // poll must run to serve rebalances even when paused).
            let room = d
                .max_in_flight
                .saturating_sub(d.buffered)
                .clamp(1, POLL_BATCH);
            (d.buffered > 0 && !d.halted, room)
        };
        // Never hold the lock across poll: rebalance callbacks run inside it.
        let timeout = if busy {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let mut polled = Vec::new();
        let mut next = consumer.poll(timeout);
        while let Some(result) = next {
            match result {
                Ok(message) => polled.push(message),
                Err(error) => tracing::warn!(%error, "consumer error"),
            }
            if polled.len() >= room {
                break;
            }
            next = consumer.poll(Duration::ZERO);
        }
        let mut d = lock(dispatch);
        if polled.is_empty() {
            if busy {
                d.wait_completions(Duration::from_millis(2));
            }
            continue;
        }
        d.accepted.expect(polled.len());
        for message in &polled {
            d.accept(message);
        }
        d.send_accepted();
    }
}

/// Stops fetching, gives running records `timeout` to finish, commits what
/// finished, and closes the consumer (leaving the group).
fn drain_and_close(
    consumer: BaseConsumer<RuntimeContext>,
    dispatch: &Mutex<Dispatch>,
    timeout: Duration,
) {
    let mut committed = {
        let mut d = lock(dispatch);
        if let Ok(assignment) = consumer.assignment() {
            let _ = consumer.pause(&assignment);
        }
        // Queued records never started: they stay uncommitted.
        d.order(Order::Drain);
        let deadline = Instant::now() + timeout;
        while d.buffered > 0 && Instant::now() < deadline {
            if !d.wait_completions(Duration::from_millis(50)) {
                break;
            }
        }
        if d.buffered > 0 {
            tracing::warn!(
                running = d.buffered,
                "shutdown deadline passed; unfinished records stay uncommitted"
            );
        }
        d.commit(&consumer, None, CommitMode::Sync, true, true)
    };
    // The broker refuses commits while the group rebalances (another member
    // leaving at the same moment, say): keep serving the rebalance and try
    // again for a little while, or the work just finished is done twice by
    // the next owner.
    let give_up = Instant::now() + FINAL_COMMIT_RETRIES;
    while !committed && Instant::now() < give_up {
        // Partitions are paused: a record polled now is left unhandled and
        // uncommitted, for the next owner.
        let _ = consumer.poll(Duration::from_millis(100));
        committed = lock(dispatch).commit(&consumer, None, CommitMode::Sync, true, false);
    }
    consumer.unsubscribe();
    // Dropping the consumer closes it: it leaves the group (the revoke
    // callback runs and commits nothing new).
    drop(consumer);
}

//! The poll thread: owns the librdkafka consumer, schedules records per key,
//! tracks offsets, commits, pauses for backpressure and handles rebalances.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::breaker::Breaker;
use super::offsets::PartitionOffsets;
use super::process::{run_planned, Finished, Outcome, ParkedList, Plan, Shared};
use super::record::Record;
use super::router::Router;
use super::stored::StoredOffsets;
use super::{ConsumerConfig, ConsumerStats};
use crate::error::ClientError;
use crate::metrics::PartitionLabels;
use crate::poll_thread::{self, PollThread, TopicNames};
use crate::publisher::Publisher;

/// A topic-partition.
type Tp = (Arc<str>, i32);

/// A multiply-rotate hash over 8-byte words (the scheme of rustc's FxHash):
/// the maps below are hashed several times per record, and their keys are
/// not attacker-chosen in a way that matters (a consumer reads its own
/// topics), so SipHash's cost buys nothing.
#[derive(Default)]
struct WordHash(u64);

impl WordHash {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0; 8];
            w.copy_from_slice(word);
            self.add(u64::from_le_bytes(w));
        }
        let mut tail = [0; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        self.add(u64::from_le_bytes(tail));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn write_i32(&mut self, n: i32) {
        self.add(u64::from(n as u32));
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<WordHash>>;
/// Records of one key run in sequence; `None` keys are sequenced per partition.
type KeySlot = (Tp, Option<Bytes>);

/// A record's handling, boxed so that it can move to a tokio task after its
/// first poll.
type Handling = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// A record task's report to the poll thread.
struct Completion {
    slot: KeySlot,
    offset: i64,
    finished: Finished,
}

/// Where the parked keys are read from when partitions are assigned.
struct ParkedTable {
    topic: String,
    client: rdkafka::ClientConfig,
    timeout: Duration,
}

/// A key with records to handle.
struct ActiveKey {
    /// Whether one of its records is running (else the key is in `ready`).
    running: bool,
    /// Its next record. Kept apart from `queue` because most keys have one
    /// record at a time, and a queue of one would cost an allocation per
    /// record.
    next: Option<Record>,
    /// Its records after `next`, in offset order.
    queue: VecDeque<Record>,
}

impl ActiveKey {
    fn push(&mut self, record: Record) {
        if self.next.is_none() && self.queue.is_empty() {
            self.next = Some(record);
        } else {
            self.queue.push_back(record);
        }
    }

    fn pop(&mut self) -> Option<Record> {
        self.next.take().or_else(|| self.queue.pop_front())
    }

    /// Records waiting behind the running one.
    fn queued(&self) -> usize {
        usize::from(self.next.is_some()) + self.queue.len()
    }

    fn clear(&mut self) {
        self.next = None;
        self.queue.clear();
    }
}

/// Everything the poll loop and the rebalance callback both touch. They run
/// on the same thread; the mutex only makes the context `Sync`.
struct Dispatch {
    shared: Arc<Shared>,
    tokio: tokio::runtime::Handle,
    done_tx: Sender<Completion>,
    done_rx: Receiver<Completion>,
    topics: TopicNames,
    /// Owned partitions and their offsets.
    partitions: FastMap<Tp, PartitionOffsets>,
    /// Per owned partition, cancelled when it is revoked: its records stop
    /// waiting (see [`process`]). Children of `stopping`; shared through an
    /// `Arc`, as every record takes one (a token's own clone locks).
    owned: FastMap<Tp, Arc<CancellationToken>>,
    /// Fires at shutdown.
    stopping: CancellationToken,
    /// Active keys: each has a running record or waits in `ready`, with
    /// its later records queued.
    keys: FastMap<KeySlot, ActiveKey>,
    /// Keys waiting for a concurrency slot.
    ready: VecDeque<KeySlot>,
    running: usize,
    running_by_partition: FastMap<Tp, usize>,
    /// Records to start, by [`Dispatch::flush_starts`].
    starting: Vec<(KeySlot, Record, Plan)>,
    /// Where assigned partitions start ([`super::ConsumerConfig::offsets_in`]).
    stored_offsets: Option<StoredOffsets>,
    /// Parked keys of the owned partitions ([`crate::parking`]).
    parked: FastMap<KeySlot, ParkedList>,
    /// The parked-key table, while keys are parked.
    parked_table: Option<ParkedTable>,
    /// Why the consumer must stop (the parked keys of an assigned partition
    /// could not be read): the poll loop ends, and `run` returns it.
    fatal: Option<ClientError>,
    /// Whether a record's first poll runs on the poll thread
    /// (`ConsumerConfig::inline_start`).
    inline_start: bool,
    /// Records received and not finished (queued + running).
    buffered: usize,
    /// Paused for backpressure.
    paused: bool,
    /// Paused because the circuit breaker is open.
    halted: bool,
    /// Whether the assignment is paused in librdkafka (`paused || halted`).
    fetch_paused: bool,
    /// Since when the in-flight limit has been reached (not paused yet).
    full_since: Option<Instant>,
    concurrency: usize,
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
        self.shared.stats.consumed.fetch_add(1, Ordering::Relaxed);
        let tp: Tp = (self.topics.intern(message.topic()), message.partition());
        let Some(offsets) = self.partitions.get_mut(&tp) else {
            // Polled just before its partition was revoked: not ours any
            // more, so neither handled nor committed here.
            return;
        };
        offsets.received(message.offset());
        self.buffered += 1;
        self.set_in_flight();
        let message = Record::copy(message, Arc::clone(&tp.0));
        let slot: KeySlot = (tp, message.shared_key());
        match self.keys.get_mut(&slot) {
            Some(key) => key.push(message),
            None => {
                self.keys.insert(
                    slot.clone(),
                    ActiveKey {
                        running: false,
                        next: Some(message),
                        queue: VecDeque::new(),
                    },
                );
                self.ready.push_back(slot);
                self.start_ready();
            }
        }
    }

    /// Starts queued keys while concurrency slots are free (none while the
    /// circuit breaker is open: they would only fail too).
    fn start_ready(&mut self) {
        if self.halted {
            return;
        }
        while self.running < self.concurrency {
            let Some(slot) = self.ready.pop_front() else {
                return;
            };
            let Some(key) = self.keys.get_mut(&slot) else {
                continue;
            };
            let Some(message) = key.pop() else {
                self.keys.remove(&slot);
                continue;
            };
            key.running = true;
            self.running += 1;
            *self.running_by_partition.entry(slot.0.clone()).or_default() += 1;
            let plan = self.plan(&slot, &message);
            self.starting.push((slot, message, plan));
        }
    }

    /// What to do with `message` of `slot`, now that every earlier record
    /// of its key has finished (see [`crate::parking`]).
    fn plan(&self, slot: &KeySlot, message: &Record) -> Plan {
        use crate::parking::headers::{REDRIVE_ACTION, REDRIVE_GROUP, REDRIVE_OF, REDRIVE_PARKED};
        let parking = self.parked_table.is_some() && slot.1.is_some();
        let parked = self.parked.get(slot);
        let Some(group) = message.header(REDRIVE_GROUP) else {
            return match parked {
                // Delivered again after a restart: already parked.
                Some(list)
                    if list
                        .offsets
                        .last()
                        .is_some_and(|last| message.offset <= *last) =>
                {
                    Plan::Skip
                }
                Some(list) => Plan::Park(list.clone()),
                None => Plan::Handle { park: parking },
            };
        };
        if group != self.shared.group_id.as_bytes() {
            // Another group's redrive: that group handles it, no one else.
            return Plan::Skip;
        }
        let of = message
            .header(REDRIVE_OF)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok());
        let discard = message.header(REDRIVE_ACTION) == Some(b"discard".as_slice());
        match (parked, of) {
            (Some(list), Some(of)) if discard && list.offsets.contains(&of) => {
                let mut rest = list.clone();
                rest.offsets.retain(|o| *o != of);
                Plan::Discard(rest)
            }
            (Some(list), Some(of)) if !discard && list.offsets.first() == Some(&of) => {
                Plan::Redrive(list.clone())
            }
            // Not its turn (an earlier record of the key failed again) or
            // already done (a redrive sent twice): it stays where it is.
            (Some(_), _) => Plan::Skip,
            // A key that is not parked: a letter that parked its key (or was
            // parked) was resolved already; any other (keyless, or of a
            // consumer that continued) is handled.
            (None, _) if discard || message.header(REDRIVE_PARKED).is_some() => Plan::Skip,
            (None, _) => Plan::Handle { park: parking },
        }
    }

    /// Sets the parked-key gauges from the parked lists.
    fn count_parked(&self) {
        let stats = &self.shared.stats;
        stats
            .parked_keys
            .store(self.parked.len() as u64, Ordering::Relaxed);
        stats.parked_records.store(
            self.parked.values().map(|l| l.offsets.len() as u64).sum(),
            Ordering::Relaxed,
        );
        let oldest = self
            .parked
            .values()
            .map(|l| l.since.timestamp_millis())
            .min()
            .map_or(0, |ms| u64::try_from(ms).unwrap_or(0));
        stats
            .parked_oldest_since_ms
            .store(oldest, Ordering::Relaxed);
    }

    /// Starts the records queued by [`Dispatch::start_ready`].
    ///
    /// With `inline_start`, each record's handling is first polled here, on
    /// the poll thread: a record whose handlers finish without waiting (a
    /// cache update, a counter, a no-op) completes at once, with no hand-off
    /// to another thread and back, and the next record of its key starts in
    /// the same pass. Only handling that waits moves on: the records still
    /// pending are spawned together as one tokio task, which reports each
    /// completion as it comes. A handler that computes for long before its
    /// first wait delays polling by that long; such handlers belong on
    /// `spawn_blocking`, or turn `inline_start` off.
    fn flush_starts(&mut self) {
        let mut waiting: Vec<(KeySlot, i64, Handling)> = Vec::new();
        let mut context = Context::from_waker(Waker::noop());
        while !self.starting.is_empty() {
            for (slot, mut message, plan) in std::mem::take(&mut self.starting) {
                let offset = message.offset;
                // Every earlier record of the partition is done (this one
                // is pending, so this is at most its offset).
                message.done_below = self
                    .partitions
                    .get(&slot.0)
                    .and_then(PartitionOffsets::committable);
                let owned = self
                    .owned
                    .get(&slot.0)
                    .map_or_else(|| Arc::new(self.stopping.child_token()), Arc::clone);
                let mut handling: Handling =
                    Box::pin(run_planned(Arc::clone(&self.shared), message, owned, plan));
                if !self.inline_start {
                    waiting.push((slot, offset, handling));
                    continue;
                }
                // The runtime catches handler panics; this one only guards the
                // poll thread against a defect in the runtime's own code.
                let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    handling.as_mut().poll(&mut context)
                }));
                let finished = match polled {
                    Ok(Poll::Pending) => {
                        // Polled again by its task, with a real waker, before
                        // anything can depend on the no-op one used here.
                        waiting.push((slot, offset, handling));
                        continue;
                    }
                    Ok(Poll::Ready(finished)) => finished,
                    Err(_) => {
                        tracing::error!(offset, "record handling panicked; left uncommitted");
                        Outcome::Abandoned.into()
                    }
                };
                self.complete(Completion {
                    slot,
                    offset,
                    finished,
                });
            }
        }
        if waiting.is_empty() {
            return;
        }
        let done = self.done_tx.clone();
        self.tokio.spawn(async move {
            let mut running: futures::stream::FuturesUnordered<_> = waiting
                .into_iter()
                .map(|(slot, offset, handling)| async move {
                    Completion {
                        slot,
                        offset,
                        finished: handling.await,
                    }
                })
                .collect();
            while let Some(completion) = futures::StreamExt::next(&mut running).await {
                // The poll thread may be gone at the very end of shutdown.
                let _ = done.send(completion);
            }
        });
    }

    fn complete(&mut self, completion: Completion) {
        let Completion {
            slot,
            offset,
            finished: Finished { outcome, parked },
        } = completion;
        self.running -= 1;
        if let Some(n) = self.running_by_partition.get_mut(&slot.0) {
            *n -= 1;
        }
        self.buffered -= 1;
        let owned = self.partitions.get_mut(&slot.0);
        let is_owned = owned.is_some();
        if let (true, Some(offsets)) = (outcome.is_done(), owned) {
            offsets.done(offset);
        }
        // Only for a partition still owned: a revoked one's list is the next
        // owner's to read from the table.
        if let (Some(list), true) = (parked, is_owned) {
            if list.offsets.is_empty() {
                self.parked.remove(&slot);
            } else {
                self.parked.insert(slot.clone(), list);
            }
            self.count_parked();
        }
        let queued = match self.keys.get_mut(&slot) {
            Some(key) => {
                key.running = false;
                key.queued()
            }
            None => 0,
        };
        if !outcome.is_done() && queued > 0 {
            // Later records of this key must not overtake the abandoned one;
            // they stay uncommitted and come back after a restart.
            self.buffered -= queued;
            self.keys.remove(&slot);
        } else if queued > 0 {
            self.ready.push_back(slot);
        } else {
            self.keys.remove(&slot);
        }
        self.set_in_flight();
        self.start_ready();
    }

    /// Applies completions, waiting up to `timeout` for the first one.
    fn wait_completions(&mut self, timeout: Duration) {
        match self.done_rx.recv_timeout(timeout) {
            Ok(c) => self.complete(c),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        }
        self.drain_completions();
    }

    /// Applies every completion already reported and starts what they freed.
    fn drain_completions(&mut self) {
        while let Ok(c) = self.done_rx.try_recv() {
            self.complete(c);
        }
        self.flush_starts();
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
                    if let Some(offsets) = self.partitions.get_mut(&tp) {
                        offsets.passed(position);
                    }
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        let mut included = Vec::new();
        for (tp, offsets) in &mut self.partitions {
            if which.is_some_and(|w| !w.contains(tp)) {
                continue;
            }
            if force {
                offsets.commit_failed();
            }
            if let Some(offset) = offsets.take_commit() {
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
                if let Some(offsets) = self.partitions.get_mut(&tp) {
                    offsets.commit_failed();
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
    /// starts the queued keys again when it closes.
    fn follow_breaker(&mut self, consumer: &BaseConsumer<RuntimeContext>) {
        let open = self.shared.breaker.as_ref().is_some_and(|b| b.is_open());
        if open == self.halted {
            return;
        }
        self.halted = open;
        self.apply_pause(consumer);
        if !open {
            self.start_ready();
            self.flush_starts();
        }
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

    /// The revoked partitions stop here: queued records are dropped (not
    /// committed, so the next owner gets them), running ones get
    /// `revoke_timeout` to finish, finished offsets are committed while the
    /// partitions are still ours, and then they are forgotten.
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
            if let Some(owned) = self.owned.remove(tp) {
                owned.cancel();
            }
        }
        let mut dropped = 0;
        self.keys.retain(|slot, key| {
            if !revoked.contains(&slot.0) {
                return true;
            }
            dropped += key.queued();
            key.clear();
            // Keep the entry while this key's record runs, so that a
            // re-assigned partition's records of the key still queue behind
            // it (its completion starts them). A key that was only waiting
            // goes: kept, it would catch the returned records in a queue
            // that no completion and no `ready` entry ever starts.
            key.running
        });
        self.ready.retain(|slot| !revoked.contains(&slot.0));
        self.parked.retain(|slot, _| !revoked.contains(&slot.0));
        self.count_parked();
        self.buffered -= dropped;
        self.set_in_flight();

        let deadline = Instant::now() + self.revoke_timeout;
        loop {
            let running: usize = revoked
                .iter()
                .map(|tp| self.running_by_partition.get(tp).copied().unwrap_or(0))
                .sum();
            let now = Instant::now();
            if running == 0 || now >= deadline {
                if running > 0 {
                    tracing::warn!(
                        running,
                        "revoke timeout: leaving running records uncommitted"
                    );
                }
                break;
            }
            self.wait_completions((deadline - now).min(Duration::from_millis(50)));
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
        if let Err(error) = self.read_parked(tpl) {
            tracing::error!(
                %error,
                "cannot read the parked keys of the assigned partitions; the consumer stops \
                 rather than handle a key it may not know is parked"
            );
            self.fatal = Some(error);
        }
        for e in tpl.elements() {
            let tp = (self.topics.intern(e.topic()), e.partition());
            self.partitions.entry(tp.clone()).or_default();
            let stopping = Arc::new(self.stopping.child_token());
            self.owned.entry(tp).or_insert(stopping);
        }
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
}

impl Dispatch {
    /// Reads the parked keys of the partitions in `tpl` from the table
    /// (blocking the poll thread, inside the assignment: no record of theirs
    /// is handled before).
    fn read_parked(&mut self, tpl: &TopicPartitionList) -> Result<(), ClientError> {
        let Some(table) = &self.parked_table else {
            return Ok(());
        };
        if tpl.count() == 0 {
            return Ok(());
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
        let mut restored = 0;
        for key in keys {
            if !assigned.contains(&(key.topic.clone(), key.partition)) {
                continue;
            }
            let slot: KeySlot = (
                (self.topics.intern(&key.topic), key.partition),
                Some(Bytes::from(key.key_bytes())),
            );
            self.parked.insert(
                slot,
                ParkedList {
                    offsets: key.offsets,
                    since: key.since,
                },
            );
            restored += 1;
        }
        if restored > 0 {
            tracing::warn!(keys = restored, "parked keys in the assigned partitions");
        }
        self.count_parked();
        Ok(())
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
    let (done_tx, done_rx) = channel();
    let commit_rejected = Arc::new(AtomicBool::new(false));
    let dispatch = Arc::new(Mutex::new(Dispatch {
        shared,
        tokio: tokio::runtime::Handle::current(),
        done_tx,
        done_rx,
        topics: TopicNames::default(),
        partitions: FastMap::default(),
        owned: FastMap::default(),
        stopping: stopping.clone(),
        keys: FastMap::default(),
        ready: VecDeque::new(),
        running: 0,
        running_by_partition: FastMap::default(),
        starting: Vec::new(),
        stored_offsets: config.stored_offsets.clone(),
        parked: FastMap::default(),
        parked_table,
        fatal: None,
        inline_start: config.inline_start,
        buffered: 0,
        paused: false,
        halted: false,
        fetch_paused: false,
        full_since: None,
        concurrency: config.concurrency,
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
            (d.running > 0, room)
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
        for message in &polled {
            d.accept(message);
        }
        d.flush_starts();
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
        let queued: usize = d.keys.values().map(ActiveKey::queued).sum();
        d.buffered -= queued;
        d.keys.clear();
        d.ready.clear();
        let deadline = Instant::now() + timeout;
        while d.running > 0 && Instant::now() < deadline {
            d.wait_completions(Duration::from_millis(50));
        }
        if d.running > 0 {
            tracing::warn!(
                running = d.running,
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

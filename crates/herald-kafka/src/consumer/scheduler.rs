//! The scheduler: a tokio task that owns the per-key queues.
//!
//! The poll thread hands it the records it accepted, in batches and in
//! partition order; the scheduler queues each behind the earlier records
//! of its key, starts at most `concurrency` keys at a time, polls each
//! record's handling once itself ([`super::ConsumerConfig::inline_start`]),
//! hands what then still waits to tokio tasks, starts a key's next record
//! as soon as the previous one finished, and reports the finished offsets
//! back in batches. Offsets, commits, pausing and rebalances stay on the
//! poll thread.
//!
//! Why a task of its own: a record's handling (decoding, the handlers)
//! costs more than polling it. Run on the poll thread, it left one core
//! doing everything while the others idled; here it runs beside the
//! polling. The concurrency slots move with it: a slot is freed where the
//! record finished, with no round trip to the poll thread, which would
//! bound throughput by `concurrency` ÷ the round trip's latency.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;

use super::process::{run_planned, Finished, Handling, Outcome, ParkedList, Plan, Shared};
use super::record::Record;

/// A topic-partition.
pub(super) type Tp = (Arc<str>, i32);

/// Records of one key run in sequence; `None` keys are sequenced per partition.
pub(super) type KeySlot = (Tp, Option<Bytes>);

/// A multiply-rotate hash over 8-byte words (the scheme of rustc's FxHash):
/// the maps of the runtime are hashed several times per record, and their
/// keys are not attacker-chosen in a way that matters (a consumer reads its
/// own topics), so SipHash's cost buys nothing.
#[derive(Default)]
pub(super) struct WordHash(u64);

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

pub(super) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<WordHash>>;

/// What the poll thread and the scheduler share about one assigned
/// partition (one assignment of it: a partition assigned again gets a new
/// one).
pub(super) struct Lease {
    /// Cancelled when the partition is revoked: its records stop waiting
    /// (see [`super::process`]). A child of the consumer's shutdown token;
    /// shared through an `Arc`, as every record takes one (a token's own
    /// clone locks).
    pub token: Arc<CancellationToken>,
    /// The partition's committable offset as the poll thread last knew it
    /// (`NO_OFFSET` for none): every record below it is done. A record
    /// starting reads it as its [`Record::done_below`]; the value can be
    /// behind, never ahead, which is all that field promises.
    done_below: AtomicI64,
}

/// [`Lease::done_below`] when nothing is known.
const NO_OFFSET: i64 = i64::MIN;

impl Lease {
    pub fn new(token: CancellationToken) -> Self {
        Self {
            token: Arc::new(token),
            done_below: AtomicI64::new(NO_OFFSET),
        }
    }

    /// Publishes the partition's committable offset.
    pub fn set_done_below(&self, offset: Option<i64>) {
        self.done_below
            .store(offset.unwrap_or(NO_OFFSET), Ordering::Relaxed);
    }

    fn done_below(&self) -> Option<i64> {
        let offset = self.done_below.load(Ordering::Relaxed);
        (offset != NO_OFFSET).then_some(offset)
    }
}

/// What the poll thread tells the scheduler, in the order it happened.
pub(super) enum Order {
    /// Records accepted, in offset order per partition.
    Records(Vec<Record>),
    /// Partitions assigned, with the parked keys read for them (before any
    /// of their records).
    Assign {
        partitions: Vec<(Tp, Arc<Lease>)>,
        parked: Vec<(KeySlot, ParkedList)>,
    },
    /// Partitions revoked: their queued records are dropped, and
    /// [`Report::Drained`] with `id` follows once none of theirs runs.
    Revoke { id: u64, partitions: HashSet<Tp> },
    /// The circuit breaker opened (`true`: start nothing) or closed.
    Halt(bool),
    /// Shutdown: every queued record is dropped; running ones finish.
    Drain,
}

/// What the scheduler tells the poll thread.
pub(super) enum Report {
    /// Records that left the scheduler: `done` ones (handled, skipped or
    /// dead-lettered: their offsets may be committed) and `left` in all
    /// (the done ones, abandoned ones and dropped ones).
    Finished { done: Vec<(Tp, i64)>, left: usize },
    /// No record of revoke `id`'s partitions runs any more; sent after the
    /// [`Report::Finished`] that carries their last offsets.
    Drained(u64),
}

/// A handling's end.
struct Completion {
    slot: KeySlot,
    offset: i64,
    finished: Finished,
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

/// The scheduler's state (see the module's doc).
pub(super) struct Scheduler {
    shared: Arc<Shared>,
    /// Assigned partitions.
    partitions: FastMap<Tp, Arc<Lease>>,
    /// Active keys: each has a running record or waits in `ready`, with
    /// its later records queued.
    keys: FastMap<KeySlot, ActiveKey>,
    /// Keys waiting for a concurrency slot.
    ready: VecDeque<KeySlot>,
    running: usize,
    /// Records to start, by [`Scheduler::flush_starts`].
    starting: Vec<(KeySlot, Record, Plan)>,
    /// Parked keys of the assigned partitions ([`crate::parking`]).
    parked: FastMap<KeySlot, ParkedList>,
    /// Whether dead letters park their key.
    parking: bool,
    inline_start: bool,
    concurrency: usize,
    /// The circuit breaker is open: nothing starts.
    halted: bool,
    /// Revokes waiting for their partitions' running records.
    drains: Vec<(u64, HashSet<Tp>)>,
    /// Offsets done since the last report.
    done: Vec<(Tp, i64)>,
    /// Records that left since the last report.
    left: usize,
    report: Sender<Report>,
    completions: UnboundedSender<Completion>,
}

impl Scheduler {
    /// Runs the scheduler until the poll thread drops its end of `orders`.
    pub(super) fn spawn(
        tokio: &tokio::runtime::Handle,
        shared: Arc<Shared>,
        config: &super::ConsumerConfig,
        parking: bool,
        orders: UnboundedReceiver<Order>,
        report: Sender<Report>,
    ) {
        let (completions, completed) = tokio::sync::mpsc::unbounded_channel();
        let scheduler = Self {
            shared,
            partitions: FastMap::default(),
            keys: FastMap::default(),
            ready: VecDeque::new(),
            running: 0,
            starting: Vec::new(),
            parked: FastMap::default(),
            parking,
            inline_start: config.inline_start,
            concurrency: config.concurrency,
            halted: false,
            drains: Vec::new(),
            done: Vec::new(),
            left: 0,
            report,
            completions,
        };
        tokio.spawn(scheduler.run(orders, completed));
    }

    async fn run(
        mut self,
        mut orders: UnboundedReceiver<Order>,
        mut completed: UnboundedReceiver<Completion>,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(completion) = completed.recv() => self.complete(completion),
                order = orders.recv() => match order {
                    Some(order) => self.apply(order),
                    // The poll thread ended: nothing more is reported to it.
                    None => return,
                },
            }
            // Whatever else is there already goes in the same report.
            while let Ok(completion) = completed.try_recv() {
                self.complete(completion);
            }
            while let Ok(order) = orders.try_recv() {
                self.apply(order);
            }
            self.flush_starts();
            self.send_report();
        }
    }

    fn apply(&mut self, order: Order) {
        match order {
            Order::Records(records) => {
                for record in records {
                    self.accept(record);
                }
            }
            Order::Assign { partitions, parked } => {
                self.partitions.extend(partitions);
                self.parked.extend(parked);
                self.count_parked();
            }
            Order::Revoke { id, partitions } => self.revoke(id, partitions),
            Order::Halt(halted) => {
                self.halted = halted;
                self.start_ready();
            }
            Order::Drain => self.drop_queued(|_| true),
        }
    }

    /// Queues `record` behind its key's earlier records.
    fn accept(&mut self, record: Record) {
        let slot: KeySlot = (
            (Arc::clone(&record.topic), record.partition),
            record.shared_key(),
        );
        match self.keys.entry(slot) {
            Entry::Occupied(mut key) => key.get_mut().push(record),
            Entry::Vacant(vacant) => {
                self.ready.push_back(vacant.key().clone());
                vacant.insert(ActiveKey {
                    running: false,
                    next: Some(record),
                    queue: VecDeque::new(),
                });
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
            let Some(record) = key.pop() else {
                self.keys.remove(&slot);
                continue;
            };
            key.running = true;
            self.running += 1;
            let plan = self.plan(&slot, &record);
            self.starting.push((slot, record, plan));
        }
    }

    /// What to do with `record` of `slot`, now that every earlier record
    /// of its key has finished (see [`crate::parking`]).
    fn plan(&self, slot: &KeySlot, record: &Record) -> Plan {
        use crate::parking::headers::{REDRIVE_ACTION, REDRIVE_GROUP, REDRIVE_OF, REDRIVE_PARKED};
        let parking = self.parking && slot.1.is_some();
        let parked = self.parked.get(slot);
        let Some(group) = record.header(REDRIVE_GROUP) else {
            return match parked {
                // Delivered again after a restart: already parked.
                Some(list)
                    if list
                        .offsets
                        .last()
                        .is_some_and(|last| record.offset <= *last) =>
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
        let of = record
            .header(REDRIVE_OF)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok());
        let discard = record.header(REDRIVE_ACTION) == Some(b"discard".as_slice());
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
            (None, _) if discard || record.header(REDRIVE_PARKED).is_some() => Plan::Skip,
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

    /// Starts the records queued by [`Scheduler::start_ready`].
    ///
    /// With `inline_start`, each record's handling is first polled here, on
    /// the scheduler's task: a record whose handlers finish without waiting
    /// (a cache update, a counter, a no-op) completes at once, with no
    /// hand-off to another task and back, and the next record of its key
    /// starts in the same pass. Only handling that waits moves on: the
    /// records still pending are spawned together as one tokio task, which
    /// reports each completion as it comes. A handler that computes for
    /// long before its first wait delays the other keys by that long (not
    /// the polling); such handlers belong on `spawn_blocking`, or turn
    /// `inline_start` off.
    fn flush_starts(&mut self) {
        let mut waiting: Vec<(KeySlot, i64, Handling)> = Vec::new();
        let mut context = Context::from_waker(Waker::noop());
        while !self.starting.is_empty() {
            for (slot, mut record, plan) in std::mem::take(&mut self.starting) {
                let offset = record.offset;
                // A lease is cancelled by the poll thread when its partition
                // is revoked (or the consumer stops), before the order to
                // drop its records reaches this task. A record of it is not
                // started then: its handler would run (and spend what it
                // spends, a fault, a side effect outside the transaction)
                // while a failure could no longer be dead-lettered, as that
                // waits on the lease; left unhandled and uncommitted, it goes
                // to the partition's next owner whole. (A partition not
                // assigned here is one a revoke dropped; it does not happen,
                // and is treated the same.)
                let token = match self.partitions.get(&slot.0) {
                    Some(lease) if !lease.token.is_cancelled() => {
                        record.done_below = lease.done_below();
                        Arc::clone(&lease.token)
                    }
                    _ => {
                        self.complete(Completion {
                            slot,
                            offset,
                            finished: Outcome::Abandoned.into(),
                        });
                        continue;
                    }
                };
                let mut handling = run_planned(Arc::clone(&self.shared), record, token, plan);
                if !self.inline_start {
                    waiting.push((slot, offset, handling));
                    continue;
                }
                // The runtime catches handler panics; this one only guards the
                // scheduler against a defect in the runtime's own code.
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
        let completions = self.completions.clone();
        tokio::spawn(async move {
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
                // The scheduler is gone only once the consumer has stopped.
                let _ = completions.send(completion);
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
        self.left += 1;
        if outcome.is_done() {
            self.done.push((slot.0.clone(), offset));
        }
        // Only for a partition still assigned: a revoked one's list is the
        // next owner's to read from the table.
        if let (Some(list), true) = (parked, self.partitions.contains_key(&slot.0)) {
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
            self.left += queued;
            self.keys.remove(&slot);
        } else if queued > 0 {
            self.ready.push_back(slot);
        } else {
            self.keys.remove(&slot);
        }
        self.start_ready();
    }

    /// Drops the queued records of the revoked partitions (not committed,
    /// so the next owner gets them) and their parked lists; the revoke is
    /// answered once none of their records runs.
    fn revoke(&mut self, id: u64, revoked: HashSet<Tp>) {
        for tp in &revoked {
            self.partitions.remove(tp);
        }
        self.drop_queued(|tp| revoked.contains(tp));
        self.parked.retain(|slot, _| !revoked.contains(&slot.0));
        self.count_parked();
        self.drains.push((id, revoked));
    }

    /// Drops the queued records of the partitions `which` selects (they
    /// leave unhandled and uncommitted); their running records go on.
    fn drop_queued(&mut self, which: impl Fn(&Tp) -> bool) {
        let mut dropped = 0;
        self.keys.retain(|slot, key| {
            if !which(&slot.0) {
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
        self.ready.retain(|slot| !which(&slot.0));
        self.left += dropped;
    }

    /// Sends what finished since the last report, then answers the revokes
    /// whose partitions have nothing running.
    fn send_report(&mut self) {
        if self.left > 0 {
            // The next report's list is sized like this one at once: grown
            // record by record it would take several large allocations per
            // report, each of which has glibc consolidate its free lists.
            let capacity = self.done.len();
            let report = Report::Finished {
                done: std::mem::replace(&mut self.done, Vec::with_capacity(capacity)),
                left: std::mem::take(&mut self.left),
            };
            // The poll thread is gone only once the consumer has stopped.
            let _ = self.report.send(report);
        }
        if self.drains.is_empty() {
            return;
        }
        // A running record's key is marked running (a scan, but only while a
        // revoke waits: no per-record count to keep for it).
        let keys = &self.keys;
        let report = &self.report;
        self.drains.retain(|(id, partitions)| {
            let busy = keys
                .iter()
                .any(|(slot, key)| key.running && partitions.contains(&slot.0));
            if !busy {
                let _ = report.send(Report::Drained(*id));
            }
            busy
        });
    }
}

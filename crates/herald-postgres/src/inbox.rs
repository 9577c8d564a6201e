//! The inbox: exactly-once effects for an at-least-once consumer.
//!
//! A handler's database effects and the inbox row `(consumer group, event id)`
//! commit in one transaction. A redelivered event finds its row and is
//! skipped; two consumers handling the same event at once serialize on the
//! row's primary key, and the second one skips.
//!
//! ```no_run
//! # async fn f(inbox: herald_postgres::Inbox, event_id: uuid::Uuid) -> Result<(), herald::HandlerError> {
//! inbox
//!     .apply(event_id, async |conn| {
//!         sqlx::query("UPDATE stock SET n = n - 1 WHERE sku = 'A'")
//!             .execute(&mut *conn)
//!             .await
//!             .map_err(herald_postgres::classify)?;
//!         Ok(())
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! [`Inbox::batched`] groups concurrent calls (different keys, handled in
//! parallel by the consumer runtime) into one transaction — one commit for
//! many events — with a savepoint per event so one failure does not undo the
//! others. Per-key order is unaffected: the runtime starts a key's next record
//! only after the call for the previous one returned, i.e. after its commit.
//! Effects that panic fail their own event (a permanent error, its savepoint
//! rolled back); the batch and the batcher go on.
//!
//! With [`Inbox::dedupe`] the inbox also keeps the consumer's offsets
//! ([`herald::offsets`]): [`Inbox::apply_at`] moves the record's partition
//! in `herald_consumer_offsets` in the effects' transaction, and the
//! consumer ([`herald_kafka::ConsumerConfig::offsets_in`] with this inbox)
//! starts each assigned partition there. Which rows say "applied":
//!
//! | [`Dedupe`] | input | rows |
//! |---|---|---|
//! | `EventIds` (default) | any producer | one per event |
//! | `Offsets` | an exactly-once producer (each event once in the log) | one per partition |
//! | `EventIdsAndOffsets` | an at-least-once producer (an event may be in the log twice) | both |
//!
//! [`herald_kafka::ConsumerConfig::offsets_in`]: https://docs.rs/herald-kafka

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use herald::inbox::Effects;
use herald::{HandlerError, Position};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{classify, StoreError};

/// The future of boxed effects, borrowing the connection they run on.
type EffectsFuture<'c> =
    std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'c>>;

/// A handler's effects with their type erased: the batcher queues effects
/// of different closures, one job each.
type BoxedEffects = Box<dyn for<'c> FnOnce(&'c mut PgConnection) -> EffectsFuture<'c> + Send>;

/// What happened to an event offered to the inbox: the core's type, shared
/// by every store so that code generic over [`herald::InboxStore`] and code
/// written against this crate see one `Applied`.
pub use herald::inbox::Applied;

struct Job {
    event_id: Uuid,
    /// The record's position, when the inbox keeps offsets.
    position: Option<Position>,
    /// Whether an inbox row says the event was applied ([`Dedupe`]).
    by_event_id: bool,
    effects: BoxedEffects,
    reply: oneshot::Sender<Result<Applied, HandlerError>>,
}

/// What an inbox records to know that an event was applied (see the module
/// documentation for which input each is right for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dedupe {
    /// A row per event id (`herald_inbox`): right whatever produced the
    /// input, as an event published twice has one id.
    #[default]
    EventIds,
    /// The record's partition offset only (`herald_consumer_offsets`, a row
    /// per partition: the offset below which every record is done, and the
    /// offsets applied above it): a record among them is applied. Only for
    /// input in which each event is once (an exactly-once producer, read
    /// `read_committed`), consumed with `ConsumerConfig::offsets_in`; every
    /// call must give the record's position ([`Inbox::apply_at`]).
    ///
    /// The offsets applied above the done offset live in the row: a record
    /// retried for long (its retry policy, a hung handler cut off and
    /// tried again) holds the done offset back, and the row grows by what
    /// its partition applies meanwhile.
    Offsets,
    /// Both rows: the event ids catch an at-least-once producer's
    /// duplicates, the offsets let the consumer start where the effects
    /// are. Every call must give the record's position.
    EventIdsAndOffsets,
}

impl Dedupe {
    fn event_ids(self) -> bool {
        matches!(self, Self::EventIds | Self::EventIdsAndOffsets)
    }

    fn offsets(self) -> bool {
        matches!(self, Self::Offsets | Self::EventIdsAndOffsets)
    }
}

/// The inbox of one consumer group: a handler's effects and the event's
/// inbox row commit in one transaction, so a redelivered event (the same
/// `event_id`) is applied once.
///
/// ```no_run
/// use herald::HandlerError;
/// use herald_postgres::{Applied, Inbox};
/// # async fn handle(pool: sqlx::PgPool, event_id: uuid::Uuid) -> Result<(), HandlerError> {
/// let inbox = Inbox::new(pool, "projection");
/// let applied = inbox
///     // An async closure: it borrows the transaction's connection across
///     // its awaits (the type of `conn` may be left out).
///     .apply(event_id, async move |conn: &mut sqlx::PgConnection| {
///         sqlx::query("UPDATE views SET seen = seen + 1")
///             .execute(&mut *conn)
///             .await
///             .map_err(herald_postgres::classify)?;
///         sqlx::query("INSERT INTO audit (event_id) VALUES ($1)")
///             .bind(event_id)
///             .execute(&mut *conn)
///             .await
///             .map_err(herald_postgres::classify)?;
///         Ok(())
///     })
///     .await?;
/// if applied == Applied::AlreadyProcessed {
///     // Already applied by this group: nothing ran.
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Inbox {
    pool: PgPool,
    group: Arc<str>,
    dedupe: Dedupe,
    batcher: Option<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("group", &self.group)
            .field("dedupe", &self.dedupe)
            .field("batched", &self.batcher.is_some())
            .finish_non_exhaustive()
    }
}

const INSERT: &str =
    "INSERT INTO herald_inbox (consumer_group, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";

impl Inbox {
    /// An inbox that runs each event in its own transaction.
    pub fn new(pool: PgPool, group: impl Into<String>) -> Self {
        Self {
            pool,
            group: Arc::from(group.into()),
            dedupe: Dedupe::default(),
            batcher: None,
        }
    }

    /// An inbox that commits up to `max_events` (at most 64) concurrent
    /// events together, waiting at most `max_wait` for a batch to fill.
    /// Up to four batches run at once, each on a connection of its own;
    /// events that arrive meanwhile make the next batch, so batches grow
    /// with the load. Spawns its batching task on the current tokio
    /// runtime; it ends when the last clone drops.
    pub fn batched(
        pool: PgPool,
        group: impl Into<String>,
        max_events: usize,
        max_wait: Duration,
    ) -> Self {
        let group: Arc<str> = Arc::from(group.into());
        let max_events = max_events.clamp(1, MAX_BATCH);
        let (tx, rx) = mpsc::channel(max_events * 4);
        tokio::spawn(run_batches(
            pool.clone(),
            Arc::clone(&group),
            rx,
            max_events,
            max_wait,
        ));
        Self {
            pool,
            group,
            dedupe: Dedupe::default(),
            batcher: Some(tx),
        }
    }

    /// What the inbox records to know an event was applied (default
    /// [`Dedupe::EventIds`]). With offsets, give each call the record's
    /// position ([`Inbox::apply_at`]) and consume with
    /// `ConsumerConfig::offsets_in(inbox.clone())`.
    pub fn dedupe(mut self, dedupe: Dedupe) -> Self {
        self.dedupe = dedupe;
        self
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Runs `effects`, an async closure over the transaction's connection
    /// ([`herald::inbox::Effects`]), for `event_id` exactly once for this
    /// group.
    ///
    /// Errors: the effects' own error, or a classified database error
    /// (transient for lost connections, deadlocks and serialization
    /// failures; permanent otherwise).
    //
    // Not an `async fn`: the declared `Send` is proven here, once, from the
    // bounds of `Effects`. An `async fn`'s future would leave callers to
    // prove it from the closure's own future type, which the compiler
    // cannot always do when a caller's future borrows across the call
    // ("implementation of `Send` is not general enough").
    pub fn apply<F>(
        &self,
        event_id: Uuid,
        effects: F,
    ) -> impl Future<Output = Result<Applied, HandlerError>> + Send + '_
    where
        F: Effects<PgConnection>,
    {
        self.apply_to(event_id, None, effects)
    }

    /// [`Inbox::apply`] for the record read at `position`: with offsets
    /// kept ([`Inbox::dedupe`]), the effects' transaction also records it
    /// as done in its partition's row (and moves the partition's done
    /// offset to `position.done_below`), and a record below the done
    /// offset or recorded above it is already processed.
    pub fn apply_at<F>(
        &self,
        event_id: Uuid,
        position: Position,
        effects: F,
    ) -> impl Future<Output = Result<Applied, HandlerError>> + Send + '_
    where
        F: Effects<PgConnection>,
    {
        self.apply_to(event_id, Some(position), effects)
    }

    #[allow(clippy::manual_async_fn)]
    fn apply_to<F>(
        &self,
        event_id: Uuid,
        position: Option<Position>,
        effects: F,
    ) -> impl Future<Output = Result<Applied, HandlerError>> + Send + '_
    where
        F: Effects<PgConnection>,
    {
        async move {
            let position = match (self.dedupe.offsets(), position) {
                (true, None) => {
                    return Err(HandlerError::permanent(format!(
                        "the inbox of {} keeps offsets ({:?}): apply each event with its \
                         record's position (Inbox::apply_at)",
                        self.group, self.dedupe
                    )))
                }
                (true, position) => position,
                (false, _) => None,
            };
            match &self.batcher {
                None => self.apply_alone(event_id, position, effects).await,
                Some(batcher) => {
                    // Boxed only here: the batcher's queue holds effects of
                    // any closure type.
                    let effects: BoxedEffects = Box::new(move |conn| Box::pin(effects.call(conn)));
                    let (reply, answer) = oneshot::channel();
                    batcher
                        .send(Job {
                            event_id,
                            position,
                            by_event_id: self.dedupe.event_ids(),
                            effects,
                            reply,
                        })
                        .await
                        .map_err(|_| HandlerError::transient("inbox batcher stopped"))?;
                    answer
                        .await
                        .map_err(|_| HandlerError::transient("inbox batch dropped"))?
                }
            }
        }
    }

    async fn apply_alone<F>(
        &self,
        event_id: Uuid,
        position: Option<Position>,
        effects: F,
    ) -> Result<Applied, HandlerError>
    where
        F: Effects<PgConnection>,
    {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let positions: &[Position] = position.as_slice();
        if !positions.is_empty() {
            let stored = read_positions(&mut tx, &self.group, positions)
                .await
                .map_err(classify)?;
            if stored.applied(&positions[0]) {
                tx.rollback().await.map_err(classify)?;
                return Ok(Applied::AlreadyProcessed);
            }
        }
        if self.dedupe.event_ids() {
            let inserted = sqlx::query(INSERT)
                .bind(&*self.group)
                .bind(event_id)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            if inserted.rows_affected() == 0 {
                if !positions.is_empty() {
                    // Applied before, at another offset (an at-least-once
                    // producer's duplicate): this record is done all the
                    // same.
                    record_positions(&mut tx, &self.group, positions, &[true])
                        .await
                        .map_err(classify)?;
                    tx.commit().await.map_err(classify)?;
                } else {
                    tx.rollback().await.map_err(classify)?;
                }
                return Ok(Applied::AlreadyProcessed);
            }
        }
        effects.call(&mut *tx).await?;
        if !positions.is_empty()
            && !record_positions(&mut tx, &self.group, positions, &[true])
                .await
                .map_err(classify)?
        {
            // Another member applied the record meanwhile (a rebalance):
            // these effects go.
            tx.rollback().await.map_err(classify)?;
            return Ok(Applied::AlreadyProcessed);
        }
        tx.commit().await.map_err(classify)?;
        Ok(Applied::Now)
    }

    /// Whether this group has processed `event_id`.
    pub async fn contains(&self, event_id: Uuid) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM herald_inbox WHERE consumer_group = $1 AND event_id = $2)",
        )
        .bind(&*self.group)
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db("reading the inbox"))
    }
}

/// The PostgreSQL inbox under the store-independent contract; the inherent
/// methods of [`Inbox`] do the work (batched or not, as configured).
impl herald::InboxStore for Inbox {
    type Connection = PgConnection;
    type Error = StoreError;

    fn group(&self) -> &str {
        Inbox::group(self)
    }

    async fn apply<F>(&self, event_id: Uuid, effects: F) -> Result<Applied, HandlerError>
    where
        F: Effects<PgConnection>,
    {
        Inbox::apply(self, event_id, effects).await
    }

    async fn contains(&self, event_id: Uuid) -> Result<bool, StoreError> {
        Inbox::contains(self, event_id).await
    }
}

/// The consumer offsets this inbox keeps ([`Dedupe::Offsets`],
/// [`Dedupe::EventIdsAndOffsets`]): give the inbox to
/// `ConsumerConfig::offsets_in` and each assigned partition starts at its
/// stored offset.
impl herald::OffsetStore for Inbox {
    type Error = StoreError;

    async fn next_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<(i32, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT partition, next_offset FROM herald_consumer_offsets
             WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
        )
        .bind(&*self.group)
        .bind(topic)
        .bind(partitions)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading consumer offsets"))
    }
}

/// Deletes inbox rows of every group older than `retention`, at most `limit`
/// per call. Keep `retention` longer than any redelivery window (the longest
/// a record can wait uncommitted, plus DLQ replays you may still run).
pub async fn purge_processed(
    pool: &PgPool,
    retention: Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM herald_inbox WHERE ctid IN (
             SELECT ctid FROM herald_inbox WHERE processed_at < now() - $1::interval LIMIT $2)",
    )
    .bind(crate::outbox::pg_interval(retention))
    .bind(limit)
    .execute(pool)
    .await
    .map_err(StoreError::db("purging inbox rows"))?;
    Ok(done.rows_affected())
}

/// Batches one batched inbox runs at once, each on its own connection:
/// while one waits for its commit (the WAL flush), the next runs its
/// statements. Concurrent events queue meanwhile, so batches grow with the
/// load and stay small (no added latency) when it is light.
const BATCHES_IN_FLIGHT: usize = 4;

/// The most events in one transaction. Each event's savepoint is a
/// subtransaction, and PostgreSQL caches at most 64 of them per
/// transaction (`PGPROC_MAX_CACHED_SUBXIDS`); past that, every other
/// session's snapshots get slower until the transaction ends.
const MAX_BATCH: usize = 64;

/// Forms batches of at most `max_events` (already within 1..=[`MAX_BATCH`])
/// from `jobs` and runs them, [`BATCHES_IN_FLIGHT`] at a time.
async fn run_batches(
    pool: PgPool,
    group: Arc<str>,
    mut jobs: mpsc::Receiver<Job>,
    max_events: usize,
    max_wait: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_events {
            match tokio::time::timeout_at(deadline, jobs.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        // What arrived while every batch was running joins this one.
        while batch.len() < max_events {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (pool, group) = (pool.clone(), Arc::clone(&group));
        tokio::spawn(async move {
            run_batch(&pool, &group, batch).await;
            drop(slot);
        });
    }
}

/// Runs `batch` in one transaction: the inbox rows of all its events are
/// claimed with one statement (and, with offsets kept, their partitions'
/// rows read with another), then each event to apply runs its effects in a
/// savepoint of its own, so that one event's failure rolls back that event
/// alone (its effects and its claim) and the others commit; with offsets
/// kept, one statement at the end records the batch's records in their
/// partitions.
async fn run_batch(pool: &PgPool, group: &str, batch: Vec<Job>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, &classify(e).to_string()),
    };
    // Sorted, so that two transactions claiming the same events (two
    // instances of a group during a rebalance) lock them in one order.
    let mut ids: Vec<Uuid> = batch
        .iter()
        .filter(|job| job.by_event_id)
        .map(|job| job.event_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut claimed: HashSet<Uuid> = if ids.is_empty() {
        HashSet::new()
    } else {
        match sqlx::query_scalar::<_, Uuid>(CLAIM)
            .bind(group)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
        {
            Ok(claimed) => claimed.into_iter().collect(),
            Err(e) => return fail_all(batch, &classify(e).to_string()),
        }
    };
    // What the store has of the batch's partitions (read unlocked: what a
    // committed transaction recorded stays recorded; one applying the same
    // record meanwhile is caught when the batch records its own).
    let positions: Vec<Position> = batch.iter().filter_map(|j| j.position.clone()).collect();
    let stored = if positions.is_empty() {
        StoredPositions::default()
    } else {
        match read_positions(&mut tx, group, &positions).await {
            Ok(stored) => stored,
            Err(e) => return fail_all(batch, &classify(e).to_string()),
        }
    };
    // Which events run their effects: not applied before by either record.
    let runs = |job: &Job, claimed: &HashSet<Uuid>| {
        let id = !job.by_event_id || claimed.contains(&job.event_id);
        let offset = job.position.as_ref().is_none_or(|p| !stored.applied(p));
        id && offset
    };
    let to_run = batch.iter().filter(|job| runs(job, &claimed)).count();
    let mut results = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    // One event to apply needs no savepoint: its failure rolls back the
    // transaction, which holds nothing else (as `Inbox::new` does).
    let mut savepoint = (to_run > 1).then_some(SAVEPOINT);
    let mut seen = HashSet::with_capacity(batch.len());
    // The batch's positions and whether each record is done here (applied,
    // or applied before under its event id): what the batch records.
    let mut done: Vec<(Position, bool)> = Vec::new();
    let mut jobs = batch.into_iter();
    while let Some(mut job) = jobs.next() {
        if !seen.insert(job.event_id) {
            replies.push(job.reply);
            // The same event twice in one batch (delivered on two keys):
            // whether it is applied is known only once the batch commits,
            // so this copy comes back later and finds out.
            results.push(Err(HandlerError::transient(
                "the same event is being applied in this batch",
            )));
            continue;
        }
        if !runs(&job, &claimed) {
            // Applied before: by a committed transaction's inbox row, or
            // its record is among its partition's done offsets. An
            // event-id claim made here all the same goes back (its record
            // says it was applied); a record whose event was applied at
            // another offset is done (recorded with the batch).
            if let Some(position) = job.position.take() {
                let applied_elsewhere = !stored.applied(&position);
                done.push((position, applied_elsewhere));
            }
            if claimed.remove(&job.event_id) {
                if let Err(e) = give_back(&mut tx, group, job.event_id).await {
                    replies.push(job.reply);
                    results.push(Err(e));
                    return abandon(tx, results, replies, jobs, "giving a claim back failed");
                }
            }
            replies.push(job.reply);
            results.push(Ok(Applied::AlreadyProcessed));
            continue;
        }
        let id_claim = claimed.remove(&job.event_id).then_some(job.event_id);
        let applied = apply_in_savepoint(
            &mut tx,
            savepoint,
            group,
            id_claim,
            job.effects,
            &mut job.reply,
        )
        .await;
        replies.push(job.reply);
        match applied {
            Ok(result) => {
                if let Some(position) = job.position.take() {
                    done.push((position, result.is_ok()));
                }
                results.push(result);
            }
            Err(Broken(error)) => {
                results.push(Err(error));
                return abandon(tx, results, replies, jobs, "an event's rollback failed");
            }
        }
        savepoint = savepoint.and(Some(NEXT_SAVEPOINT));
    }
    if !done.is_empty() {
        let (positions, applied): (Vec<Position>, Vec<bool>) = done.into_iter().unzip();
        match record_positions(&mut tx, group, &positions, &applied).await {
            Ok(true) => {}
            Ok(false) => {
                // Another member applied one of these records meanwhile (a
                // rebalance): its events come back to find out which.
                return abandon(
                    tx,
                    results,
                    replies,
                    [],
                    "another member of the group applied a record of this batch meanwhile",
                );
            }
            Err(e) => {
                let why = format!("recording the batch's offsets failed: {}", classify(e));
                return abandon(tx, results, replies, [], &why);
            }
        }
    }
    match tx.commit().await {
        Ok(()) => reply_all(results, replies, ""),
        Err(e) => reply_all(
            results,
            replies,
            &format!("inbox batch commit failed: {}", classify(e)),
        ),
    }
}

/// Claims the inbox rows of a batch's events; returns those that were new.
const CLAIM: &str = "INSERT INTO herald_inbox (consumer_group, event_id)
     SELECT $1, id FROM unnest($2::uuid[]) AS id
     ON CONFLICT DO NOTHING RETURNING event_id";

/// What the store has of some partitions: per partition, the offset below
/// which every record is done and the offsets applied above it.
#[derive(Default)]
struct StoredPositions(HashMap<(Arc<str>, i32), (i64, HashSet<i64>)>);

impl StoredPositions {
    /// Whether the record at `position` was applied.
    fn applied(&self, position: &Position) -> bool {
        self.0
            .get(&(Arc::clone(&position.topic), position.partition))
            .is_some_and(|(below, done)| {
                position.offset < *below || done.contains(&position.offset)
            })
    }
}

/// Reads the stored state of the partitions of `positions`.
async fn read_positions(
    conn: &mut PgConnection,
    group: &str,
    positions: &[Position],
) -> Result<StoredPositions, sqlx::Error> {
    let topics: Vec<&str> = positions.iter().map(|p| &*p.topic).collect();
    let partitions: Vec<i32> = positions.iter().map(|p| p.partition).collect();
    let rows: Vec<(String, i32, i64, Vec<i64>)> = sqlx::query_as(
        "SELECT c.topic, c.partition, c.next_offset, c.done
         FROM herald_consumer_offsets c
         JOIN (SELECT DISTINCT * FROM unnest($2::text[], $3::int[])) AS p(topic, partition)
           ON p.topic = c.topic AND p.partition = c.partition
         WHERE c.consumer_group = $1",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .fetch_all(&mut *conn)
    .await?;
    let mut stored = StoredPositions::default();
    for (topic, partition, below, done) in rows {
        let topic = positions
            .iter()
            .find(|p| *p.topic == topic)
            .map_or_else(|| Arc::from(topic.as_str()), |p| Arc::clone(&p.topic));
        stored
            .0
            .insert((topic, partition), (below, done.into_iter().collect()));
    }
    Ok(stored)
}

/// Records a batch's records as done in their partitions (`applied`: the
/// ones whose effects this transaction holds, or that count as applied),
/// and moves each partition's done offset to the highest `done_below` of
/// its records; returns false when another transaction recorded one of the
/// applied records first (its partition's row is left as it was). The
/// rows are locked in (topic, partition) order until the commit.
const RECORD_POSITIONS: &str = "INSERT INTO herald_consumer_offsets AS c
         (consumer_group, topic, partition, next_offset, done)
     SELECT $1, r.topic, r.partition, COALESCE(max(r.below), 0),
            COALESCE(array_agg(r.record_offset ORDER BY r.record_offset)
                     FILTER (WHERE r.applied), '{}')
     FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bool[])
          AS r(topic, partition, record_offset, below, applied)
     GROUP BY r.topic, r.partition
     ORDER BY r.topic, r.partition
     ON CONFLICT (consumer_group, topic, partition) DO UPDATE
         SET next_offset = GREATEST(c.next_offset, excluded.next_offset),
             done = ARRAY(SELECT DISTINCT x FROM unnest(c.done || excluded.done) AS x
                          WHERE x >= GREATEST(c.next_offset, excluded.next_offset)
                          ORDER BY x),
             updated_at = now()
         WHERE NOT (c.done && excluded.done)
           AND c.next_offset <= COALESCE(
               (SELECT min(x) FROM unnest(excluded.done) AS x), c.next_offset)
     RETURNING topic, partition";

/// Runs [`RECORD_POSITIONS`] for `positions` (`applied[i]` for the i-th).
async fn record_positions(
    conn: &mut PgConnection,
    group: &str,
    positions: &[Position],
    applied: &[bool],
) -> Result<bool, sqlx::Error> {
    let topics: Vec<&str> = positions.iter().map(|p| &*p.topic).collect();
    let partitions: Vec<i32> = positions.iter().map(|p| p.partition).collect();
    let offsets: Vec<i64> = positions.iter().map(|p| p.offset).collect();
    let below: Vec<Option<i64>> = positions.iter().map(|p| p.done_below).collect();
    let recorded: Vec<(String, i32)> = sqlx::query_as(RECORD_POSITIONS)
        .bind(group)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&below)
        .bind(applied)
        .fetch_all(&mut *conn)
        .await?;
    let mut partitions: Vec<(&str, i32)> = topics.into_iter().zip(partitions).collect();
    partitions.sort_unstable();
    partitions.dedup();
    Ok(recorded.len() == partitions.len())
}

/// Gives back an event's inbox row in its transaction, so that the event
/// is not taken as processed when the transaction commits.
async fn give_back(
    conn: &mut PgConnection,
    group: &str,
    event_id: Uuid,
) -> Result<(), HandlerError> {
    sqlx::query("DELETE FROM herald_inbox WHERE consumer_group = $1 AND event_id = $2")
        .bind(group)
        .bind(event_id)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    Ok(())
}

/// Opens the first event's savepoint.
const SAVEPOINT: &str = "SAVEPOINT herald_event";
/// Keeps the previous event's effects and opens the next one's savepoint,
/// in one round trip (the simple protocol runs both).
const NEXT_SAVEPOINT: &str = "RELEASE SAVEPOINT herald_event; SAVEPOINT herald_event";

/// An error after which the batch's transaction cannot go on.
struct Broken(HandlerError);

/// Runs one claimed event's effects after `savepoint` (the statement that
/// opens its savepoint). Their failure rolls back to the savepoint and
/// gives the event's inbox-row `claim` back: `Ok(Err(..))`, the batch goes
/// on. `Err(Broken)`: a savepoint
/// statement failed, or the effects failed with no savepoint to go back
/// to; the transaction is lost.
///
/// The effects run only while their caller waits for `reply`: a caller
/// that gives up (the consumer runtime's handler timeout drops its call)
/// abandons them, as dropping an unbatched transaction would. Without
/// that, effects that hang would hold their batch, and with it every
/// event batched with them, for as long as they hang.
async fn apply_in_savepoint(
    conn: &mut PgConnection,
    savepoint: Option<&str>,
    group: &str,
    claim: Option<Uuid>,
    effects: BoxedEffects,
    reply: &mut oneshot::Sender<Result<Applied, HandlerError>>,
) -> Result<Result<Applied, HandlerError>, Broken> {
    if let Some(savepoint) = savepoint {
        // A `&str` with no arguments goes by the simple protocol, which
        // runs the two statements of `NEXT_SAVEPOINT` in one round trip.
        sqlx::Executor::execute(&mut *conn, savepoint)
            .await
            .map_err(|e| Broken(classify(e)))?;
    }
    // A panic here would end the batcher task and, with it, every later
    // event of the group ("inbox batcher stopped", forever): it fails this
    // event alone, as the consumer runtime fails a panicking handler.
    let run = AssertUnwindSafe(async { effects(&mut *conn).await }).catch_unwind();
    // The caller's side first: effects whose caller gave up while they
    // waited for the batch never start (an unbiased select could poll them
    // first and run them up to their first wait, spending whatever they do
    // outside the transaction for a result no one reads).
    let outcome = tokio::select! {
        biased;
        () = reply.closed() => Err(HandlerError::transient("the caller stopped waiting for the effects")),
        outcome = run => outcome.unwrap_or_else(|panic| {
            let what = herald::panic_text(&*panic);
            Err(HandlerError::permanent(format!("effects panicked: {what}")))
        }),
    };
    let Err(error) = outcome else {
        return Ok(Ok(Applied::Now));
    };
    if savepoint.is_none() {
        return Err(Broken(error));
    }
    sqlx::Executor::execute(&mut *conn, "ROLLBACK TO SAVEPOINT herald_event")
        .await
        .map_err(|e| Broken(classify(e)))?;
    // The claim was made before the savepoint.
    if let Some(event_id) = claim {
        give_back(conn, group, event_id).await.map_err(Broken)?;
    }
    Ok(Err(error))
}

/// Ends a batch whose transaction is lost or must not commit: nothing of
/// it commits. The events done so far get their `results` (an applied one
/// a transient `why` instead), those not reached (`rest`) a transient
/// error.
fn abandon(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    results: Vec<Result<Applied, HandlerError>>,
    replies: Vec<oneshot::Sender<Result<Applied, HandlerError>>>,
    rest: impl IntoIterator<Item = Job>,
    why: &str,
) {
    drop(tx);
    fail_all(rest, "an earlier event of its batch broke the transaction");
    reply_all(results, replies, why);
}

/// Sends each of `jobs` the same transient error.
fn fail_all(jobs: impl IntoIterator<Item = Job>, error: &str) {
    for job in jobs {
        let _ = job
            .reply
            .send(Err(HandlerError::transient(error.to_owned())));
    }
}

/// Sends each job its result; with `failed` (the batch did not commit),
/// what would have been applied is a transient error instead.
fn reply_all(
    results: Vec<Result<Applied, HandlerError>>,
    replies: Vec<oneshot::Sender<Result<Applied, HandlerError>>>,
    failed: &str,
) {
    for (result, reply) in results.into_iter().zip(replies) {
        let outcome = match result {
            Ok(Applied::Now) if !failed.is_empty() => Err(HandlerError::transient(failed)),
            other => other,
        };
        let _ = reply.send(outcome);
    }
}

/// Inbox rows per consumer group: what retention keeps (a metric's source).
pub async fn rows_per_group(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    sqlx::query_as(
        "SELECT consumer_group, count(*) FROM herald_inbox GROUP BY consumer_group ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::db("counting inbox rows"))
}

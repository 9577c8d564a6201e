//! The transactional outbox: events are inserted in the caller's transaction,
//! so they exist if and only if the business change committed.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool, record: herald_postgres::OutboxRecord) -> Result<(), herald_postgres::StoreError> {
//! let mut tx = pool.begin().await.map_err(herald_postgres::StoreError::db("begin"))?;
//! // ... business writes on &mut *tx ...
//! herald_postgres::outbox::enqueue(&mut tx, &record).await?;
//! tx.commit().await.map_err(herald_postgres::StoreError::db("commit"))?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres, Row, Transaction};
use tracing::Instrument;

use crate::shards::ShardRotation;
use crate::StoreError;

/// The LISTEN/NOTIFY channel an enqueue notifies (at commit) so that an idle
/// relay wakes at once.
pub const NOTIFY_CHANNEL: &str = "herald_outbox";

/// Shards of aggregates in the outbox (`herald_outbox_shard(aggregate_type,
/// aggregate_id)`, a hash of the aggregate; see the migration
/// `herald_outbox_pending`). At most this many relay transactions publish at
/// once, across all relay processes.
pub const SHARDS: u16 = 64;

/// The first key of the transaction-level advisory locks by which a relay
/// owns a shard (`pg_try_advisory_xact_lock(SHARD_LOCK_CLASS, shard)`); it
/// shows as `classid` in `pg_locks`, the shard as `objid`. "herl" in ASCII.
pub const SHARD_LOCK_CLASS: i32 = 0x6865_726c;

pub use herald::OutboxRecord;

/// Inserts `record` in the caller's transaction and notifies the relay (the
/// notification is delivered only if the transaction commits).
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
/// # struct OrderPlaced {
/// #     #[event(id)] event_id: uuid::Uuid,
/// #     #[event(key)] order_id: uuid::Uuid,
/// #     #[event(time)] at: chrono::DateTime<chrono::Utc>,
/// # }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
/// # #[serde(tag = "event_type")]
/// # #[event(aggregate = "order")]
/// # enum OrderEvent { OrderPlaced(OrderPlaced) }
/// use herald_postgres::outbox::{enqueue, OutboxRecord};
/// # async fn place(pool: &sqlx::PgPool, placed: OrderEvent) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES (gen_random_uuid())")
///     .execute(&mut *tx)
///     .await?;
/// // The event is published if and only if this transaction commits.
/// let record = OutboxRecord::new("order-events", &placed, "/orders", None)?;
/// enqueue(&mut tx, &record).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    record: &OutboxRecord,
) -> Result<(), StoreError> {
    enqueue_all(tx, std::slice::from_ref(record)).await
}

/// Inserts many records in the caller's transaction, in order: they are
/// published in this order.
pub async fn enqueue_all(
    tx: &mut Transaction<'_, Postgres>,
    records: &[OutboxRecord],
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut event_ids = Vec::with_capacity(records.len());
    let mut aggregate_types = Vec::with_capacity(records.len());
    let mut aggregate_ids = Vec::with_capacity(records.len());
    let mut event_types = Vec::with_capacity(records.len());
    let mut topics = Vec::with_capacity(records.len());
    let mut payloads = Vec::with_capacity(records.len());
    let mut headers = Vec::with_capacity(records.len());
    let mut occurred = Vec::with_capacity(records.len());
    for r in records {
        let e = &r.envelope;
        event_ids.push(e.event_id);
        aggregate_types.push(r.aggregate_type.clone());
        aggregate_ids.push(e.key.clone());
        event_types.push(e.event_type.clone());
        topics.push(r.topic.clone());
        payloads.push(e.payload.clone());
        let map: BTreeMap<&str, String> = e.headers().into_iter().collect();
        headers.push(serde_json::to_value(map).map_err(|e| StoreError::Encode(e.to_string()))?);
        occurred.push(e.occurred_at);
    }
    let span = herald::outbox::enqueue_span("postgresql", records.len());
    async {
        sqlx::query(include_str!("sql/outbox_enqueue.sql"))
            .bind(&event_ids)
            .bind(&aggregate_types)
            .bind(&aggregate_ids)
            .bind(&event_types)
            .bind(&topics)
            .bind(&payloads)
            .bind(&headers)
            .bind(&occurred)
            .bind(NOTIFY_CHANNEL)
            .execute(&mut **tx)
            .await
            .map_err(|source| {
                let conflict = source
                    .as_database_error()
                    .and_then(|d| d.constraint())
                    .is_some_and(|c| c == "herald_outbox_aggregate_seq");
                if conflict {
                    StoreError::AggregateConflict { source }
                } else {
                    StoreError::Database {
                        operation: "inserting outbox rows",
                        source,
                    }
                }
            })?;
        Ok(())
    }
    .instrument(span)
    .await
}

pub use herald::OutboxStatus;

/// Reads the backlog figures.
pub async fn status(pool: &PgPool) -> Result<OutboxStatus, StoreError> {
    // The oldest pending event is taken among each shard's first one (ids
    // follow creation time): 64 index descents instead of a join of every
    // pending row.
    let row = sqlx::query(
        "WITH pending AS (SELECT count(*) AS n FROM herald_outbox_pending)
         SELECT pending.n AS backlog,
                (SELECT min(o.created_at)
                 FROM generate_series(0, $1 - 1) AS s(shard)
                 CROSS JOIN LATERAL (
                     SELECT p.id FROM herald_outbox_pending p
                     WHERE p.shard = s.shard ORDER BY p.id LIMIT 1) first
                 JOIN herald_outbox o ON o.id = first.id) AS oldest,
                (SELECT count(*) FROM herald_outbox) - pending.n AS retained
         FROM pending",
    )
    .bind(i32::from(SHARDS))
    .fetch_one(pool)
    .await
    .map_err(StoreError::db("reading outbox status"))?;
    Ok(OutboxStatus {
        backlog: row.get("backlog"),
        oldest_unpublished_at: row.get("oldest"),
        published_retained: row.get("retained"),
    })
}

/// Deletes published events created more than `retention` ago, at most
/// `limit` per call; returns how many were deleted. Events still pending
/// are kept, whatever their age.
pub async fn purge_published(
    pool: &PgPool,
    retention: Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM herald_outbox WHERE ctid = ANY (ARRAY(
             SELECT o.ctid FROM herald_outbox o
             WHERE o.created_at < now() - $1::interval
               AND NOT EXISTS (
                   SELECT 1 FROM herald_outbox_pending p
                   WHERE p.shard = herald_outbox_shard(o.aggregate_type, o.aggregate_id)
                     AND p.id = o.id)
             LIMIT $2))",
    )
    .bind(pg_interval(retention))
    .bind(limit)
    .execute(pool)
    .await
    .map_err(StoreError::db("purging published outbox rows"))?;
    Ok(done.rows_affected())
}

/// A duration as a PostgreSQL interval literal.
pub(crate) fn pg_interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// What the relay does with a published event ([`herald::AfterPublish`]).
///
/// Either way its row in `herald_outbox_pending`, the relay's queue, is
/// deleted in the claiming transaction; see the migration
/// `herald_outbox_pending` for why that is the mark. Kept events go when
/// retention ([`purge_published`]) removes them.
pub use herald::AfterPublish;

/// The PostgreSQL outbox as the relay sees it ([`herald::OutboxStore`]).
///
/// The tables: `herald_outbox` holds the events, `herald_outbox_pending`
/// the relay's queue, one `(shard, id)` row per unpublished event, written
/// by [`enqueue_all`] in the same statement. Marking an event published
/// deletes its pending row.
///
/// Ordering: every event takes the next sequence number of its aggregate at
/// insert, and every aggregate belongs to one of [`SHARDS`] shards. A claim
/// owns shards, not rows: it takes a shard's transaction-level advisory lock
/// with `pg_try_advisory_xact_lock` (a shard another relay holds is skipped,
/// as `SKIP LOCKED` skips a row), then reads the shard's pending events in
/// id order and locks their pending rows `FOR UPDATE`, oldest shard first,
/// until the batch is full. Only the owner of a shard publishes its
/// aggregates, and it publishes each one's events in creation order, so
/// order holds across any number of relay workers and processes; the
/// argument is in `sql/relay_claim.sql`. A late commit is simply found on a
/// later pass: nothing reads past a cursor.
///
/// Parallelism: relay transactions never scan or wait for each other's
/// rows, and up to [`SHARDS`] of them publish at once. One busy aggregate
/// is published by one relay at a time, as before.
///
/// Long transactions: a transaction that stays open delays only its own
/// events. Unlike a relay that waits for the oldest running transaction
/// (an xmin horizon), this one is not held back by unrelated transactions
/// on the server.
///
/// Writers of one aggregate serialize on it (a row lock taken before the
/// enqueue, as the orders service does); their events are then published
/// in the order they committed. The outbox catches most writers that do
/// not: two transactions that see the same latest unpublished row of an
/// aggregate take the same next sequence number, and the second fails with
/// [`StoreError::AggregateConflict`], a transient error: retry it. The
/// sequence counts the events still in `herald_outbox`, so once retention
/// (or [`AfterPublish::Delete`]) has removed all of an aggregate's events,
/// it starts again from 1; two writers that race as its last event is
/// removed can then both succeed, and their events are published in id
/// order, or in commit order if the later id commits first.
pub struct PgOutbox {
    pub(crate) pool: PgPool,
    pub(crate) after_publish: AfterPublish,
    listen: bool,
    synchronous_marks: bool,
    pub(crate) lease_timeout: Duration,
    park_after: u32,
    listener: tokio::sync::Mutex<Option<sqlx::postgres::PgListener>>,
    /// Signalled by the task holding the listener when a notification
    /// comes, so that every waiting worker wakes, not only that one.
    notified: tokio::sync::Notify,
    rotation: std::sync::Mutex<ShardRotation>,
}

impl std::fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutbox")
            .field("after_publish", &self.after_publish)
            .field("listen", &self.listen)
            .field("synchronous_marks", &self.synchronous_marks)
            .field("lease_timeout", &self.lease_timeout)
            .finish_non_exhaustive()
    }
}

impl PgOutbox {
    /// The outbox on `pool`, marking published rows and listening for
    /// notifications.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            after_publish: AfterPublish::default(),
            listen: true,
            synchronous_marks: false,
            lease_timeout: crate::slots::DEFAULT_LEASE_TIMEOUT,
            park_after: crate::refusals::DEFAULT_PARK_AFTER,
            listener: tokio::sync::Mutex::new(None),
            notified: tokio::sync::Notify::new(),
            rotation: std::sync::Mutex::default(),
        }
    }

    /// How many refusals by the broker (a record larger than its topic
    /// takes, say) park an event and its aggregate (default 3; see
    /// [`crate::refusals`]).
    pub fn park_after(mut self, refusals: u32) -> Self {
        self.park_after = refusals.max(1);
        self
    }

    /// What to do with published rows.
    pub fn after_publish(mut self, after_publish: AfterPublish) -> Self {
        self.after_publish = after_publish;
        self
    }

    /// Whether to wake on LISTEN/NOTIFY (on by default); without it the relay
    /// polls at its interval.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// Whether the relay's mark (or delete) waits for its WAL flush at
    /// commit. Off by default: the relay commits with
    /// `synchronous_commit = off`.
    ///
    /// Why that is safe: the events themselves were committed durably by
    /// the writer's transaction; only the note that they were published is
    /// asynchronous. If PostgreSQL crashes, the relay commits of its last
    /// moments (up to three `wal_writer_delay`s, 600 ms by default) may be
    /// lost, and their rows are published again, with the same event ids,
    /// in the same per-aggregate order, exactly as after a relay crash
    /// between publish and mark. Consumers deduplicate either way. Nothing
    /// is lost and nothing overtakes: a lost commit is always a suffix of
    /// the WAL, so a later batch of an aggregate is never kept while an
    /// earlier one is lost. Turn it on to shrink that re-publish window
    /// to the relay crash case, at the cost of one WAL flush per batch.
    pub fn synchronous_marks(mut self, synchronous: bool) -> Self {
        self.synchronous_marks = synchronous;
        self
    }

    /// How long an exactly-once relay may keep a slot while doing nothing
    /// on its connection (publishing, waiting for Kafka) before PostgreSQL
    /// ends its session and so frees the slot for another relay (default
    /// 30 s; see [`crate::slots`]). Only [`herald::SlotStore`] leases use it.
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.lease_timeout = timeout;
        self
    }

    /// Waits for a notification on [`NOTIFY_CHANNEL`] (or `timeout`);
    /// without LISTEN, for `timeout`.
    pub(crate) async fn wait_for_new_rows(&self, timeout: Duration) {
        if !self.listen {
            tokio::time::sleep(timeout).await;
            return;
        }
        if let Err(error) = self.wait_for_notification(timeout).await {
            tracing::warn!(%error, "outbox LISTEN failed; polling until it is back");
            tokio::time::sleep(timeout.min(Duration::from_secs(1))).await;
        }
    }

    async fn wait_for_notification(&self, timeout: Duration) -> Result<(), sqlx::Error> {
        tokio::time::timeout(timeout, self.next_notification())
            .await
            .unwrap_or(Ok(()))
    }

    /// Resolves on the next notification. One worker at a time holds the
    /// listener and wakes every other waiting worker when it hears one; a
    /// waiter takes the listener over when the holder lets it go.
    async fn next_notification(&self) -> Result<(), sqlx::Error> {
        // Made before the listener is looked at, so that a wake-up given in
        // between is not missed.
        let woken = self.notified.notified();
        let mut guard = tokio::select! {
            biased;
            () = woken => return Ok(()),
            guard = self.listener.lock() => guard,
        };
        if guard.is_none() {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            *guard = Some(listener);
        }
        let listener = guard.as_mut().expect("listener just set");
        // One wake-up per notification: a burst costs a few empty passes,
        // never a wait (PgListener::try_recv blocks for the next message, so
        // there is no cheap way to drain the rest).
        match listener.recv().await {
            Ok(_) => {
                self.notified.notify_waiters();
                Ok(())
            }
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    /// Replaces the rotation with the shards that have unpublished rows.
    async fn search(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
        let found = sqlx::query_scalar(crate::sql::RELAY_SHARDS.as_str())
            .fetch_all(&mut **tx)
            .await;
        match found {
            Ok(shards) => {
                self.rotation().found(shards, Instant::now());
                Ok(())
            }
            Err(error) => {
                self.rotation().search_failed();
                Err(StoreError::db(
                    "finding outbox shards with unpublished rows",
                )(error))
            }
        }
    }

    fn rotation(&self) -> std::sync::MutexGuard<'_, ShardRotation> {
        // The rotation is only a hint: a panic while it was held cannot
        // leave it in a state that matters.
        self.rotation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether unpublished rows exist (claimable or not yet).
    async fn has_backlog(&self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(crate::sql::HAS_BACKLOG.as_str())
            .fetch_one(&self.pool)
            .await
    }
}

/// The stored `{"name": "value"}` headers as the relay's list, sorted by
/// name: decoded straight into the list, without a map in between (the
/// relay decodes every row it publishes).
struct HeaderList(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for HeaderList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = HeaderList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of header names and string values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderList, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                // JSONB keeps keys shortest first; names sort as they did
                // when this was a map.
                pairs.sort_unstable_by(|a: &(String, String), b| a.0.cmp(&b.0));
                Ok(HeaderList(pairs))
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

/// Claims up to `limit` pending events of `shard`, which `tx` owns (its
/// advisory lock was taken in an earlier statement: see
/// `sql/relay_claim.sql`), lowest ids first.
pub(crate) async fn claim_shard(
    tx: &mut Transaction<'static, Postgres>,
    shard: i16,
    limit: usize,
) -> Result<Vec<herald::PendingRecord>, StoreError> {
    let rows = sqlx::query(crate::sql::RELAY_CLAIM.as_str())
        .bind(shard)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut **tx)
        .await
        .map_err(StoreError::db("claiming outbox rows"))?;
    Ok(rows.iter().map(pending_record).collect())
}

/// A claimed row (`relay_claim.sql`'s columns) as the record to publish.
pub(crate) fn pending_record(row: &sqlx::postgres::PgRow) -> herald::PendingRecord {
    let headers: sqlx::types::Json<HeaderList> = row.get("headers");
    herald::PendingRecord {
        id: row.get("id"),
        event_id: row.get("event_id"),
        topic: row.get("topic"),
        key: row.get("record_key"),
        payload: row.get("payload"),
        headers: headers.0 .0,
    }
}

/// Marks the events `ids` (with their `shards`, pairwise) published in
/// `tx`, as `after_publish` says.
pub(crate) async fn mark_published(
    tx: &mut Transaction<'static, Postgres>,
    after_publish: AfterPublish,
    shards: &[i16],
    ids: &[i64],
) -> Result<(), StoreError> {
    let sql = match after_publish {
        AfterPublish::MarkPublished => include_str!("sql/relay_mark.sql"),
        AfterPublish::Delete => include_str!("sql/relay_mark_delete.sql"),
    };
    sqlx::query(sql)
        .bind(shards)
        .bind(ids)
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db("marking outbox rows published"))?;
    Ok(())
}

/// A claimed batch, holding its transaction (and so its row locks).
pub struct PgOutboxBatch {
    tx: Transaction<'static, Postgres>,
    records: Vec<herald::PendingRecord>,
    /// The shard of each record (its pending row's key with the id).
    shards: Vec<i16>,
    after_publish: AfterPublish,
    synchronous_marks: bool,
}

impl std::fmt::Debug for PgOutboxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutboxBatch")
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl herald::OutboxStore for PgOutbox {
    type Batch = PgOutboxBatch;
    type Error = StoreError;

    async fn claim(&self, max: usize) -> Result<PgOutboxBatch, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("starting a relay transaction"))?;
        let mut records = Vec::new();
        let mut shards = Vec::new();
        let mut searched = false;
        let mut tried = Vec::new();
        while records.len() < max {
            if !searched && self.rotation().start_search(Instant::now()) {
                self.search(&mut tx).await?;
                searched = true;
            }
            let Some(shard) = self.rotation().next_untried(&tried) else {
                if searched {
                    break;
                }
                // Every shard the rotation knows was tried: look once for
                // shards it does not know yet.
                self.search(&mut tx).await?;
                searched = true;
                continue;
            };
            tried.push(shard);
            let remaining = max - records.len();
            let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
                .bind(SHARD_LOCK_CLASS)
                .bind(i32::from(shard))
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::db("locking an outbox shard"))?;
            if !ours {
                self.rotation().again(shard);
                continue;
            }
            // A statement after the lock: see relay_claim.sql for why.
            let claimed = claim_shard(&mut tx, shard, remaining).await?;
            if claimed.len() == remaining {
                // More may be waiting: serve it again after the others.
                self.rotation().again(shard);
            }
            shards.resize(shards.len() + claimed.len(), shard);
            records.extend(claimed);
        }
        Ok(PgOutboxBatch {
            tx,
            records,
            shards,
            after_publish: self.after_publish,
            synchronous_marks: self.synchronous_marks,
        })
    }

    async fn refused(
        &self,
        record: &herald::PendingRecord,
        error: &str,
    ) -> Result<bool, StoreError> {
        crate::refusals::record(&self.pool, record.id, error, self.park_after).await
    }

    async fn wait_for_work(&self, timeout: Duration) {
        // Rows that exist but could not be claimed (their transaction is not
        // settled yet, or another relay holds their shard) are worth a
        // quick second look rather than a full poll interval.
        if let Ok(true) = self.has_backlog().await {
            tokio::time::sleep(timeout.min(Duration::from_millis(10))).await;
            return;
        }
        self.wait_for_new_rows(timeout).await;
    }
}

impl herald::OutboxBatch for PgOutboxBatch {
    type Error = StoreError;

    fn records(&self) -> &[herald::PendingRecord] {
        &self.records
    }

    async fn commit(mut self, published: &[i64]) -> Result<(), StoreError> {
        if published.is_empty() {
            self.tx
                .rollback()
                .await
                .map_err(StoreError::db("releasing outbox rows"))?;
            return Ok(());
        }
        let shard_of: HashMap<i64, i16> = self
            .records
            .iter()
            .map(|r| r.id)
            .zip(self.shards.iter().copied())
            .collect();
        let shards: Vec<i16> = published
            .iter()
            .map(|id| {
                shard_of
                    .get(id)
                    .copied()
                    .ok_or(StoreError::NotClaimed { id: *id })
            })
            .collect::<Result<_, _>>()?;
        if !self.synchronous_marks {
            // See PgOutbox::synchronous_marks.
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *self.tx)
                .await
                .map_err(StoreError::db("relaxing the relay commit"))?;
        }
        mark_published(&mut self.tx, self.after_publish, &shards, published).await?;
        self.tx
            .commit()
            .await
            .map_err(StoreError::db("committing the relay transaction"))
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderList;

    #[test]
    fn stored_headers_decode_to_a_list_sorted_by_name() {
        let HeaderList(pairs) =
            serde_json::from_str(r#"{"traceparent": "00-x", "ce_id": "1", "a": "2"}"#)
                .expect("decode");
        assert_eq!(
            pairs,
            [("a", "2"), ("ce_id", "1"), ("traceparent", "00-x")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert!(serde_json::from_str::<HeaderList>(r#"{"a": 1}"#).is_err());
        assert!(serde_json::from_str::<HeaderList>(r#"["a"]"#).is_err());
    }
}

//! The transactional outbox on SQLite: events are inserted in the caller's
//! transaction, so they exist if and only if the business change committed.
//!
//! ```no_run
//! # async fn f(pool: sqlx::SqlitePool, record: herald_sqlite::OutboxRecord) -> Result<(), herald_sqlite::StoreError> {
//! let mut tx = herald_sqlite::begin(&pool).await?;
//! // ... business writes on &mut *tx ...
//! herald_sqlite::outbox::enqueue(&mut tx, &record).await?;
//! tx.commit().await.map_err(herald_sqlite::StoreError::db("commit"))?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use tracing::Instrument;

use crate::{ago_modifier, parse_timestamp, timestamp, StoreError};

pub use herald::OutboxRecord;

/// Inserts `record` in the caller's transaction. A relay of a
/// [`SqliteDatabase`](crate::SqliteDatabase) pool wakes when it commits.
pub async fn enqueue(
    tx: &mut Transaction<'_, Sqlite>,
    record: &OutboxRecord,
) -> Result<(), StoreError> {
    enqueue_all(tx, std::slice::from_ref(record)).await
}

/// Inserts many records in the caller's transaction, in order: they are
/// published in this order. Start the transaction with
/// [`begin`](crate::begin) (`BEGIN IMMEDIATE`).
pub async fn enqueue_all(
    tx: &mut Transaction<'_, Sqlite>,
    records: &[OutboxRecord],
) -> Result<(), StoreError> {
    let span = herald::outbox::enqueue_span("sqlite", records.len());
    async {
        for r in records {
            let e = &r.envelope;
            let headers: BTreeMap<&str, String> = e.headers().into_iter().collect();
            let headers =
                serde_json::to_string(&headers).map_err(|e| StoreError::Encode(e.to_string()))?;
            sqlx::query(include_str!("sql/outbox_enqueue.sql"))
                .bind(e.event_id.hyphenated().to_string())
                .bind(&r.aggregate_type)
                .bind(&e.key)
                .bind(&e.event_type)
                .bind(&r.topic)
                .bind(&e.payload)
                .bind(headers)
                .bind(timestamp(&e.occurred_at))
                .execute(&mut **tx)
                .await
                .map_err(|source| {
                    // SQLite names the columns, not the constraint, in its message.
                    let conflict = source.as_database_error().is_some_and(|d| {
                        d.is_unique_violation()
                            && d.message().contains("herald_outbox.aggregate_seq")
                    });
                    if conflict {
                        StoreError::AggregateConflict { source }
                    } else {
                        StoreError::Database {
                            operation: "inserting outbox rows",
                            source,
                        }
                    }
                })?;
        }
        Ok(())
    }
    .instrument(span)
    .await
}

pub use herald::OutboxStatus;

/// Reads the backlog figures.
pub async fn status(pool: &SqlitePool) -> Result<OutboxStatus, StoreError> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE published_at IS NULL) AS backlog,
                min(created_at) FILTER (WHERE published_at IS NULL) AS oldest,
                count(*) FILTER (WHERE published_at IS NOT NULL) AS retained
         FROM herald_outbox",
    )
    .fetch_one(pool)
    .await
    .map_err(StoreError::db("reading outbox status"))?;
    let oldest: Option<String> = row.get("oldest");
    Ok(OutboxStatus {
        backlog: row.get("backlog"),
        oldest_unpublished_at: oldest
            .map(|t| parse_timestamp("herald_outbox.created_at", &t))
            .transpose()?,
        published_retained: row.get("retained"),
    })
}

/// Deletes rows published at least `retention` ago, at most `limit` per
/// call; returns how many were deleted. (Timestamps have millisecond
/// precision, so the bound is inclusive: a zero retention purges every
/// published row.)
pub async fn purge_published(
    pool: &SqlitePool,
    retention: Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM herald_outbox WHERE id IN (
             SELECT id FROM herald_outbox
             WHERE published_at IS NOT NULL
               AND published_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)
             LIMIT ?2)",
    )
    .bind(ago_modifier(retention))
    .bind(limit)
    .execute(pool)
    .await
    .map_err(StoreError::db("purging published outbox rows"))?;
    Ok(done.rows_affected())
}

/// What the relay does with a published row ([`herald::AfterPublish`]):
/// set `published_at` and keep it until retention, or delete it when the
/// batch commits.
pub use herald::AfterPublish;

/// The SQLite outbox as the relay sees it ([`herald::OutboxStore`]).
///
/// Ordering (see `sql/relay_claim.sql`): every row takes the next sequence
/// number of its aggregate at insert, and the relay publishes an aggregate's
/// rows in that order, taking the whole aggregate through its earliest
/// unpublished row. SQLite has no row locks and no `SKIP LOCKED`: instead a
/// claim holds this outbox's claim lock until its batch commits (or is
/// dropped), so claims are serialized and a second claim never sees rows
/// that are in flight. The lock is in process and shared by clones, so
/// **one relay process per file**; run several relay tasks from clones if
/// you like, they take turns.
///
/// A claim is a plain read (WAL readers never wait for the writer); only the
/// commit of a non-empty batch writes, in a short `BEGIN IMMEDIATE`
/// transaction, so publishing to Kafka never holds the file's write lock.
/// A transaction that stays open delays only itself: its rows are invisible
/// until it commits and are found by a later pass.
#[derive(Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    after_publish: AfterPublish,
    claims: Arc<Mutex<()>>,
    wakeups: Option<Arc<Notify>>,
}

impl std::fmt::Debug for SqliteOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOutbox")
            .field("after_publish", &self.after_publish)
            .field("notified", &self.wakeups.is_some())
            .finish_non_exhaustive()
    }
}

impl SqliteOutbox {
    /// The outbox on `pool`, marking published rows. Without
    /// [`wakeups`](Self::wakeups) an idle relay polls at its interval; a
    /// [`SqliteDatabase::outbox`](crate::SqliteDatabase::outbox) is woken on
    /// commit.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            after_publish: AfterPublish::default(),
            claims: Arc::new(Mutex::new(())),
            wakeups: None,
        }
    }

    /// What to do with published rows.
    pub fn after_publish(mut self, after_publish: AfterPublish) -> Self {
        self.after_publish = after_publish;
        self
    }

    /// Wake an idle relay when `wakeups` is notified (one notification per
    /// commit that inserted outbox rows).
    pub fn wakeups(mut self, wakeups: Arc<Notify>) -> Self {
        self.wakeups = Some(wakeups);
        self
    }

    /// Whether unpublished rows exist.
    async fn has_backlog(&self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM herald_outbox WHERE published_at IS NULL)")
            .fetch_one(&self.pool)
            .await
    }
}

/// A claimed batch: holds the outbox's claim lock until committed or dropped
/// (dropping it releases every row for a later pass).
pub struct SqliteOutboxBatch {
    pool: SqlitePool,
    records: Vec<herald::PendingRecord>,
    after_publish: AfterPublish,
    _claim: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for SqliteOutboxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOutboxBatch")
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

fn pending(row: &sqlx::sqlite::SqliteRow) -> Result<herald::PendingRecord, StoreError> {
    let event_id: String = row.get("event_id");
    let headers: String = row.get("headers");
    let headers: BTreeMap<String, String> =
        serde_json::from_str(&headers).map_err(|e| StoreError::Decode {
            what: "herald_outbox.headers",
            detail: e.to_string(),
        })?;
    Ok(herald::PendingRecord {
        id: row.get("id"),
        event_id: event_id.parse().map_err(|e| StoreError::Decode {
            what: "herald_outbox.event_id",
            detail: format!("{event_id:?}: {e}"),
        })?,
        topic: row.get("topic"),
        key: row.get("record_key"),
        payload: row.get("payload"),
        headers: headers.into_iter().collect(),
    })
}

impl herald::OutboxStore for SqliteOutbox {
    type Batch = SqliteOutboxBatch;
    type Error = StoreError;

    async fn claim(&self, max: usize) -> Result<SqliteOutboxBatch, StoreError> {
        // Taken before the read and held by the batch: a second claim waits
        // until this batch's rows are marked or released.
        let claim = Arc::clone(&self.claims).lock_owned().await;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = sqlx::query(include_str!("sql/relay_claim.sql"))
            .bind(limit)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("claiming outbox rows"))?;
        let records = rows.iter().map(pending).collect::<Result<Vec<_>, _>>()?;
        Ok(SqliteOutboxBatch {
            pool: self.pool.clone(),
            records,
            after_publish: self.after_publish,
            _claim: claim,
        })
    }

    async fn wait_for_work(&self, timeout: Duration) {
        // Rows that exist but were not in the last (empty) pass committed
        // since it: look again soon rather than after a full interval. This
        // also covers a wake-up that raced its commit (SQLite's commit hook
        // runs just before the commit is visible).
        if let Ok(true) = self.has_backlog().await {
            tokio::time::sleep(timeout.min(Duration::from_millis(10))).await;
            return;
        }
        match &self.wakeups {
            Some(wakeups) => {
                let _ = tokio::time::timeout(timeout, wakeups.notified()).await;
            }
            None => tokio::time::sleep(timeout).await,
        }
    }
}

impl herald::OutboxBatch for SqliteOutboxBatch {
    type Error = StoreError;

    fn records(&self) -> &[herald::PendingRecord] {
        &self.records
    }

    async fn commit(self, published: &[i64]) -> Result<(), StoreError> {
        if published.is_empty() {
            // Nothing was written: dropping the claim lock releases the rows.
            return Ok(());
        }
        // SQLite has no arrays: the ids travel as one JSON array.
        let ids =
            serde_json::to_string(published).map_err(|e| StoreError::Encode(e.to_string()))?;
        let sql = match self.after_publish {
            AfterPublish::MarkPublished => {
                "UPDATE herald_outbox SET published_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 WHERE published_at IS NULL AND id IN (SELECT value FROM json_each(?1))"
            }
            AfterPublish::Delete => {
                "DELETE FROM herald_outbox WHERE id IN (SELECT value FROM json_each(?1))"
            }
        };
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("starting the relay transaction"))?;
        sqlx::query(sql)
            .bind(ids)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("marking outbox rows published"))?;
        tx.commit()
            .await
            .map_err(StoreError::db("committing the relay transaction"))
        // The claim lock is released here, after the rows are marked.
    }
}

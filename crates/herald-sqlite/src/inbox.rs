//! The inbox on SQLite: exactly-once effects for an at-least-once consumer,
//! with the same contract as `herald_postgres::Inbox` ([`herald::InboxStore`]).
//!
//! A handler's database effects and the inbox row `(consumer group, event id)`
//! commit in one transaction. The transaction starts with `BEGIN IMMEDIATE`,
//! so two deliveries of one event run one after the other and the second
//! finds the row and skips.
//!
//! ```no_run
//! # async fn f(inbox: herald_sqlite::SqliteInbox, event_id: uuid::Uuid) -> Result<(), herald::HandlerError> {
//! inbox
//!     .apply(event_id, async |conn| {
//!         sqlx::query("UPDATE stock SET n = n - 1 WHERE sku = 'A'")
//!             .execute(&mut *conn)
//!             .await
//!             .map_err(herald_sqlite::classify)?;
//!         Ok(())
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use herald::inbox::{Applied, Effects};
use herald::HandlerError;
use sqlx::{SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::{ago_modifier, classify, StoreError};

const INSERT: &str =
    "INSERT INTO herald_inbox (consumer_group, event_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING";

/// The inbox of one consumer group.
#[derive(Clone)]
pub struct SqliteInbox {
    pool: SqlitePool,
    group: Arc<str>,
}

impl std::fmt::Debug for SqliteInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInbox")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl SqliteInbox {
    /// An inbox that runs each event in its own transaction.
    pub fn new(pool: SqlitePool, group: impl Into<String>) -> Self {
        Self {
            pool,
            group: Arc::from(group.into()),
        }
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
    /// (transient when the file stayed busy past the busy timeout, or on
    /// I/O errors; permanent otherwise).
    //
    // Not an `async fn`: the declared `Send` is proven here, once, from the
    // bounds of `Effects` (see `herald_postgres::Inbox::apply`).
    #[allow(clippy::manual_async_fn)]
    pub fn apply<F>(
        &self,
        event_id: Uuid,
        effects: F,
    ) -> impl Future<Output = Result<Applied, HandlerError>> + Send + '_
    where
        F: Effects<SqliteConnection>,
    {
        async move {
            // IMMEDIATE: the write lock up front, so the insert below can
            // never meet a stale snapshot and concurrent deliveries simply
            // queue.
            let mut tx = self
                .pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(classify)?;
            let inserted = sqlx::query(INSERT)
                .bind(&*self.group)
                .bind(event_id.hyphenated().to_string())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            if inserted.rows_affected() == 0 {
                tx.rollback().await.map_err(classify)?;
                return Ok(Applied::AlreadyProcessed);
            }
            // On error the transaction is dropped, i.e. rolled back: no
            // inbox row, so a retry runs the effects again.
            effects.call(&mut *tx).await?;
            tx.commit().await.map_err(classify)?;
            Ok(Applied::Now)
        }
    }

    /// Whether this group has processed `event_id`.
    pub async fn contains(&self, event_id: Uuid) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM herald_inbox WHERE consumer_group = ?1 AND event_id = ?2)",
        )
        .bind(&*self.group)
        .bind(event_id.hyphenated().to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db("reading the inbox"))
    }
}

impl herald::InboxStore for SqliteInbox {
    type Connection = SqliteConnection;
    type Error = StoreError;

    fn group(&self) -> &str {
        SqliteInbox::group(self)
    }

    async fn apply<F>(&self, event_id: Uuid, effects: F) -> Result<Applied, HandlerError>
    where
        F: Effects<SqliteConnection>,
    {
        SqliteInbox::apply(self, event_id, effects).await
    }

    async fn contains(&self, event_id: Uuid) -> Result<bool, StoreError> {
        SqliteInbox::contains(self, event_id).await
    }
}

/// Deletes inbox rows of every group processed at least `retention` ago, at
/// most `limit` per call. Keep `retention` longer than any redelivery window
/// (the longest a record can wait uncommitted, plus DLQ replays you may
/// still run).
pub async fn purge_processed(
    pool: &SqlitePool,
    retention: Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM herald_inbox WHERE rowid IN (
             SELECT rowid FROM herald_inbox
             WHERE processed_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)
             LIMIT ?2)",
    )
    .bind(ago_modifier(retention))
    .bind(limit)
    .execute(pool)
    .await
    .map_err(StoreError::db("purging inbox rows"))?;
    Ok(done.rows_affected())
}

/// Inbox rows per consumer group: what retention keeps (a metric's source).
pub async fn rows_per_group(pool: &SqlitePool) -> Result<Vec<(String, i64)>, StoreError> {
    sqlx::query_as(
        "SELECT consumer_group, count(*) FROM herald_inbox GROUP BY consumer_group ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::db("counting inbox rows"))
}
